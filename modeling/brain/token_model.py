"""What brain-gen's token-grid sequence models share: the loss choice, the FLOP count, init and forecasting.

STGPT2MEG, TASA3D, Wavenet3D and WavenetFullChannel read ids with time on their last axis
((B, C, T) or (B, H, W, T)) and return logits of the next code at every position (idx's shape + (V,)).
`TokenGridModel` gives them:

- the loss (`loss_name`, brain-gen's spellings, brain_gen/training/utils.py): `CrossEntropy` (with
  label smoothing) or `CrossEntropySpectral`, which adds spectral_weight x the L1 distance between the
  log power spectra (over time, in a frequency band) of the expected code index and of the target
  codes: for amplitude-quantised signals (mu-law codes) the code index is the amplitude. The parts
  go to `last_report` (modeling/reports.py);
- `num_flops_per_token()`: training FLOPs (3x forward) per position, counted by torch's
  FlopCounterMode on a meta copy of the model run on one nominal input (nothing is allocated);
- `init_weights()`: every submodule's `reset_parameters()`, children first, then the model's own
  `reset_extra()`; `set_gradient_checkpointing`;
- `forecast(idx, num_steps, ...)`: roll the ids forward in time one step at a time through the
  model's `start_decoding` / `decode_step` (a KV cache, a conv-state queue, or a plain re-run over
  the window), sampling each new code (temperature 0: greedy; top_k).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from modeling import reports
from modeling.layers.transformer import sample_tokens
from modeling.reports import Reported

LOSS_NAMES = ("CrossEntropy", "CrossEntropySpectral")


@dataclass(frozen=True, kw_only=True)
class TokenLossFields:
    """The loss knobs of a family's config: inherit them (keyword-only, so they follow the family's
    own fields) and call `check_loss()` in `__post_init__`."""

    loss_name: str = field(default="CrossEntropy", metadata={
        "help": "training loss (brain-gen's names): CrossEntropy, or CrossEntropySpectral (cross-entropy + "
                "spectral_weight x L1 of log power spectra of expected vs target code index in a band)"})
    label_smoothing: float = field(default=0.0, metadata={"help": "label smoothing of the cross-entropy, in [0, 1)"})
    spectral_weight: float = field(default=0.1, metadata={"help": "CrossEntropySpectral: weight of the spectral term"})
    spectral_low_hz: float = field(default=8.0, metadata={"help": "CrossEntropySpectral: lower edge of the band (Hz)"})
    spectral_high_hz: float = field(default=12.0, metadata={"help": "CrossEntropySpectral: upper edge of the band (Hz)"})
    code_rate_hz: float = field(default=250.0, metadata={"help": "CrossEntropySpectral: code steps per second (the band's scale)"})
    spectral_n_fft: int = field(default=256, metadata={"help": "CrossEntropySpectral: FFT length over time"})

    def check_loss(self) -> None:
        if self.loss_name not in LOSS_NAMES:
            raise ValueError(f"loss_name must be one of {LOSS_NAMES}, got {self.loss_name!r}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.spectral_weight < 0 or self.spectral_n_fft < 2 or self.code_rate_hz <= 0:
            raise ValueError(f"spectral_weight must be >= 0, spectral_n_fft >= 2 and code_rate_hz > 0, got "
                             f"{self.spectral_weight}, {self.spectral_n_fft}, {self.code_rate_hz}")
        if not 0 <= self.spectral_low_hz <= self.spectral_high_hz:
            raise ValueError(f"spectral_low_hz must be in [0, spectral_high_hz], got {self.spectral_low_hz}, {self.spectral_high_hz}")


def log_band_power(series: torch.Tensor, n_fft: int, band: slice) -> torch.Tensor:
    """series (N, T) -> log of its power spectrum averaged over the N rows, in `band` of the rfft bins."""
    power = torch.fft.rfft(series, n=n_fft, dim=-1).abs().square().mean(dim=0)  # (n_fft // 2 + 1,)
    return torch.log(power[band] + 1e-8)


class TokenGridModel(nn.Module):
    """Base of the four families. Subclasses set `config`, build their layers, and implement
    `logits(idx)`, `example_idx(device)`, `start_decoding(context)` / `decode_step(state, new)`."""

    config: TokenLossFields
    time_axis = -1  # of idx: the axis the trainer shifts by one for the targets

    def __init__(self) -> None:
        super().__init__()
        self.use_gradient_checkpointing = False
        self._last_parts: dict[str, torch.Tensor] = {}
        self._last_count = 0
        self._flops_per_position: int | None = None

    # --------------------------------------------------------------- weights

    @torch.no_grad()
    def init_weights(self) -> None:
        """Every submodule re-initialises itself (children before parents), then `reset_extra`.
        Draws from torch's global RNG, so it is seeded."""
        for module in reversed(list(self.modules())):
            if module is not self and hasattr(module, "reset_parameters"):
                module.reset_parameters()
        self.reset_extra()

    def reset_extra(self) -> None:
        """The family's own initialisation after the submodules' defaults (embeddings, zeroed outputs, tables)."""

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        self.use_gradient_checkpointing = enabled

    def is_checkpointing(self) -> bool:
        return self.use_gradient_checkpointing and self.training and torch.is_grad_enabled()

    def num_params(self, include_embedding: bool = True) -> int:
        return sum(p.numel() for p in self.parameters())

    # --------------------------------------------------------------- FLOPs

    def example_idx(self, device: torch.device | str) -> torch.Tensor:
        """One nominal sample of ids (1, ..., T) for the FLOP count."""
        raise NotImplementedError

    def num_flops_per_token(self) -> int:
        """Training FLOPs (forward + backward, 3x forward) per position (one code of one site at one
        time step), counted once on a meta copy run on `example_idx` (attention over its full length,
        causal masking not discounted)."""
        if self._flops_per_position is None:
            with torch.device("meta"):
                meta_model = type(self)(self.config)
            meta_model.eval()
            idx = meta_model.example_idx("meta")
            with FlopCounterMode(display=False) as counter:
                meta_model.logits(idx)
            self._flops_per_position = round(3 * counter.get_total_flops() / idx.numel())
        return self._flops_per_position

    # --------------------------------------------------------------- loss

    @property
    def last_report(self) -> dict[str, Reported]:
        return {name: reports.mean(value, self._last_count) for name, value in self._last_parts.items()}

    def logits(self, idx: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """idx (ids) -> logits idx.shape + (V,) of the next code at each position, or the training loss
        against targets (idx's shape; -1 ignored)."""
        logits = self.logits(idx)
        if targets is None:
            return logits
        return self.loss(logits, targets)

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        config = self.config
        if targets.shape != logits.shape[:-1]:
            raise ValueError(f"targets must have the shape of idx {tuple(logits.shape[:-1])}, got {tuple(targets.shape)}")
        flat = logits.float().reshape(-1, logits.size(-1))  # fp32 softmax: bf16 loses too much over a codebook
        cross_entropy = F.cross_entropy(flat, targets.reshape(-1), ignore_index=-1, label_smoothing=config.label_smoothing)
        parts = {"cross_entropy": cross_entropy.detach()}
        loss = cross_entropy
        if config.loss_name == "CrossEntropySpectral":
            spectral = self.spectral_loss(logits, targets)
            parts["spectral"] = spectral.detach()
            loss = loss + config.spectral_weight * spectral
        self._last_parts, self._last_count = parts, int(targets.numel())
        return loss

    def spectral_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """L1 between the log band power over time of the expected code index and of the targets."""
        config = self.config
        codes = torch.arange(logits.size(-1), device=logits.device, dtype=torch.float32)
        expected = (logits.float().softmax(dim=-1) * codes).sum(dim=-1)  # idx's shape
        expected = expected.movedim(self.time_axis, -1).reshape(-1, expected.size(self.time_axis))  # (N, T)
        target = targets.clamp_min(0).float().movedim(self.time_axis, -1).reshape_as(expected)
        num_bins = config.spectral_n_fft // 2 + 1
        frequencies = torch.linspace(0, config.code_rate_hz / 2, num_bins)
        inside = ((frequencies >= config.spectral_low_hz) & (frequencies <= config.spectral_high_hz)).nonzero().flatten()
        band = slice(int(inside.min()), int(inside.max()) + 1) if len(inside) else slice(0, num_bins)
        return F.l1_loss(log_band_power(expected, config.spectral_n_fft, band),
                         log_band_power(target, config.spectral_n_fft, band))

    # --------------------------------------------------------------- forecasting

    def max_context_steps(self) -> int | None:
        """The most time steps the model reads at once (None: any number)."""
        return None

    def start_decoding(self, context: torch.Tensor) -> tuple[object, torch.Tensor]:
        """context ids (..., T) -> (decoding state, logits (..., V) of the step after it)."""
        raise NotImplementedError

    def decode_step(self, state: object, new: torch.Tensor) -> tuple[object, torch.Tensor]:
        """The next step's ids (..., 1) -> (state, logits (..., V) of the step after it); (None, None) when
        the state cannot take it (a full cache): forecast starts again from the codes so far."""
        raise NotImplementedError

    @torch.inference_mode()
    def forecast(self, idx: torch.Tensor, num_steps: int, *, temperature: float = 1.0, top_k: int | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Roll ids idx (..., T) forward by num_steps time steps -> (..., T + num_steps): one step (every
        site) at a time, each new code sampled from the model's next-step distribution."""
        if num_steps < 0 or temperature < 0 or (top_k is not None and top_k < 1):
            raise ValueError(f"need num_steps >= 0, temperature >= 0, top_k >= 1 or None; got {num_steps}, {temperature}, {top_k}")
        if idx.size(-1) == 0:
            raise ValueError("forecast needs a context of at least one time step")
        was_training = self.training
        self.eval()
        codes = idx
        state, logits = self.start_decoding(codes)
        for step in range(num_steps):
            new = sample_tokens(logits.reshape(-1, logits.size(-1)), temperature, top_k, generator)
            new = new.view(*codes.shape[:-1], 1)
            codes = torch.cat([codes, new], dim=-1)
            if step == num_steps - 1:
                break
            if state is not None:
                state, logits = self.decode_step(state, new)
            if state is None:  # no state to extend (or it is full): start again from the codes so far
                state, logits = self.start_decoding(codes)
        self.train(was_training)
        return codes
