"""What the tokenizer models (TOTEM, BrainOmni, Vidtok) share as trainable modules.

`TokenizerModel` gives them the interface the trainer and registry use:
- `init_weights()`: every submodule with `reset_parameters()` re-initialises itself, children
  before parents, so a block can override its children's defaults (e.g. a zero-initialised last
  conv). Models built on the meta device have no other initialisation.
- `num_params()`, `num_flops_per_token()`: the latter counts the training FLOPs per input element
  with torch's FlopCounterMode on a meta copy of the model (nothing is allocated), so every conv,
  LSTM and attention is counted without hand-written formulas.
- `set_gradient_checkpointing(enabled)`, which sets the flag of every encoder and decoder, and
  `modeling/layers/stages.run_stages()`, with which they recompute each stage in the backward pass when it is on.
- `last_metrics`: detached scalars of the latest forward (loss parts, codebook perplexity, ...),
  for `tokfleet eval`; `last_report`: the loss parts for the trainer (modeling/reports.py: means
  weighted by the batch size; the quantisers report their code usage themselves).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from modeling import reports
from modeling.reports import Reported


def check_positive(config: object, *names: str) -> None:
    """Raise ValueError naming the first field of `config` among `names` that is not > 0."""
    for name in names:
        value = getattr(config, name)
        values = value if isinstance(value, (list, tuple)) else [value]
        if not values or any(v <= 0 for v in values):
            raise ValueError(f"{name} must be > 0 (every entry), got {value!r}")


class TokenizerModel(nn.Module):
    """Base class of the tokenizer models. Subclasses set `config` and implement `example_inputs`."""

    config: object
    input_name: str  # the forward keyword whose elements the FLOP count is normalised by

    def __init__(self) -> None:
        super().__init__()
        self.use_gradient_checkpointing = False
        self.last_metrics: dict[str, torch.Tensor] = {}
        self._last_parts: dict[str, torch.Tensor] = {}
        self._last_batch_size = 0
        self._flops_per_element: int | None = None

    def keep_parts(self, parts: dict[str, torch.Tensor], batch_size: int) -> None:
        """Called by forward with the loss parts of its batch."""
        self._last_parts, self._last_batch_size = parts, batch_size

    @property
    def last_report(self) -> dict[str, Reported]:
        return {name: reports.mean(value, self._last_batch_size) for name, value in self._last_parts.items()}

    @torch.no_grad()
    def init_weights(self) -> None:
        """Initialise every parameter and buffer. Draws from torch's global RNG, so it is seeded."""
        for module in reversed(list(self.modules())):  # descendants before their ancestors
            if module is not self and hasattr(module, "reset_parameters"):
                module.reset_parameters()

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        self.use_gradient_checkpointing = enabled
        for module in self.modules():
            if module is not self and hasattr(module, "use_gradient_checkpointing"):
                module.use_gradient_checkpointing = enabled

    def num_params(self, include_codebooks: bool = True) -> int:
        """Parameters, plus the EMA codebooks (learned state kept in buffers) unless excluded."""
        num = sum(p.numel() for p in self.parameters())
        if include_codebooks:
            num += sum(b.numel() for name, b in self.named_buffers() if name.endswith("codebook"))
        return num

    def example_inputs(self, batch_size: int = 1, device: torch.device | str = "meta") -> dict[str, torch.Tensor]:
        """Forward keyword arguments of a nominal input (used for the FLOP count)."""
        raise NotImplementedError

    def num_flops_per_token(self) -> int:
        """Training FLOPs (forward + backward, counted as 3x forward) per INPUT ELEMENT.

        An input element is one scalar of the `input_name` tensor: one time sample of one channel
        for signals, one colour value of one pixel of one frame for video. Counted once, on a meta
        copy of the model run on `example_inputs()`, in eval mode (no codebook updates).
        """
        if self._flops_per_element is None:
            with torch.device("meta"):
                meta_model = type(self)(self.config)
            meta_model.eval()
            inputs = meta_model.example_inputs(batch_size=1, device="meta")
            with FlopCounterMode(display=False) as counter:
                meta_model(**inputs)
            self._flops_per_element = round(3 * counter.get_total_flops() / inputs[self.input_name].numel())
        return self._flops_per_element
