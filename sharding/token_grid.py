"""The code grid of a token dataset: how each sample's codes are laid out, and the canonical
(T, H, W, Q) view through which every sequence model reads them.

`tokfleet pretokenize` stores a tokenizer's codes in the tokenizer's own layout and names its axes
in the manifest (`fields["tokens.npy"]["axes"]`); this module turns any such layout into the
canonical grid time x height x width x RVQ levels and back:

    tokenizer              tokens.npy axes                  canonical (T, H, W, Q)
    totem                  (channel, time)                  (W, C, 1, 1)
    BrainOmni* (RVQ)       (channel, time, level)           (W, n_neuro, 1, Q)
    Vidtok (FSQ)           (time, height, width)            (T', H', W', 1)
    VidtokRVQ              (time, height, width, level)     (T', H', W', Q)

"channel" is the height axis of the canonical grid. A packed text / token-id dataset (one axis of
`seq_len + 1` ids) has no grid: its models read the sequence as it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from core.errors import UserError

CANONICAL_AXES = ("time", "height", "width", "level")
AXIS_ALIASES = {"channel": "height"}
TOKENS_FIELD = "tokens.npy"
# manifests written before the axes were recorded: the layout follows from the tokenizer family
AXES_OF_TOKENIZER = {
    "totem": ("channel", "time"),
    "BrainOmniCausalTokenizer": ("channel", "time", "level"),
    "BrainOmniCausalTokenizerSEANetChannelMix": ("channel", "time", "level"),
    "Vidtok": ("time", "height", "width"),
    "VidtokRVQ": ("time", "height", "width", "level"),
}


@dataclass(frozen=True)
class TokenGrid:
    """The codes of one sample: stored `axes` of `shape` (None: varies between samples), ids < vocab_size."""

    axes: tuple[str, ...]
    shape: tuple[int | None, ...]
    vocab_size: int

    def __post_init__(self):
        names = [AXIS_ALIASES.get(axis, axis) for axis in self.axes]
        if len(names) != len(self.shape) or len(set(names)) != len(names) or not set(names) <= set(CANONICAL_AXES) \
                or "time" not in names:
            raise UserError(f"token grid: axes {list(self.axes)} of shape {list(self.shape)} are not a layout of "
                            f"{CANONICAL_AXES} with a time axis")

    @property
    def canonical_shape(self) -> tuple[int | None, int | None, int | None, int | None]:
        """(T, H, W, Q): the stored sizes moved to the canonical axes; a missing axis has size 1."""
        sizes = {AXIS_ALIASES.get(axis, axis): size for axis, size in zip(self.axes, self.shape)}
        return tuple(sizes.get(axis, 1) for axis in CANONICAL_AXES)

    @property
    def num_levels(self) -> int:
        return self.canonical_shape[3] or 1

    def describe(self) -> str:
        """e.g. "(channel 8, time 125)": the stored layout, as error messages name it."""
        return "(" + ", ".join(f"{axis} {'*' if size is None else size}" for axis, size in zip(self.axes, self.shape)) + ")"

    def _names(self) -> list[str]:
        return [AXIS_ALIASES.get(axis, axis) for axis in self.axes]

    def _permutation(self) -> list[int]:
        """Stored axis index of each stored canonical axis, in canonical order."""
        names = self._names()
        return [names.index(axis) for axis in CANONICAL_AXES if axis in names]

    def to_canonical(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, *stored layout) -> (B, T, H, W, Q)."""
        if codes.dim() - 1 != len(self.axes):
            raise ValueError(f"codes of shape {tuple(codes.shape)} do not have the grid's axes (B, {', '.join(self.axes)})")
        names = self._names()
        grid = codes.permute(0, *(1 + i for i in self._permutation()))
        for k, axis in enumerate(CANONICAL_AXES):
            if axis not in names:
                grid = grid.unsqueeze(1 + k)
        return grid

    def from_canonical(self, grid: torch.Tensor) -> torch.Tensor:
        """(B, T, H, W, Q) -> codes (B, *stored layout): the inverse of to_canonical."""
        names = self._names()
        missing = [1 + k for k, axis in enumerate(CANONICAL_AXES) if axis not in names]
        if any(grid.shape[k] != 1 for k in missing):
            raise ValueError(f"grid {tuple(grid.shape)} has more than one entry on an axis the layout {self.axes} lacks")
        kept = grid.reshape([n for k, n in enumerate(grid.shape) if k not in missing])
        order = self._permutation()
        return kept.permute(0, *(1 + order.index(i) for i in range(len(order))))

    def to_json(self) -> dict[str, Any]:
        return {"axes": list(self.axes), "shape": list(self.shape), "vocab_size": self.vocab_size}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TokenGrid:
        return cls(tuple(data["axes"]), tuple(data["shape"]), int(data["vocab_size"]))

    @classmethod
    def from_manifest(cls, manifest: Any, url: str = "data.dataset") -> TokenGrid | None:
        """The grid of a token dataset (kind meg_tokens / video_tokens); None for packed token sequences
        and raw datasets."""
        field = manifest.fields.get(TOKENS_FIELD)
        if field is None or manifest.kind not in ("meg_tokens", "video_tokens"):
            return None
        axes = field.get("axes") or AXES_OF_TOKENIZER.get(manifest.tokenizer.get("model", ""))
        if axes is None:
            raise UserError(f"{url}: token dataset of kind {manifest.kind} names no axes for {TOKENS_FIELD} and no known "
                            f"tokenizer ({manifest.tokenizer.get('model')!r}): re-run `tokfleet pretokenize`")
        if not manifest.vocab_size:
            raise UserError(f"{url}: token dataset without a vocab_size (codebook size) in its manifest")
        return cls(tuple(axes), tuple(field["shape"]), int(manifest.vocab_size))
