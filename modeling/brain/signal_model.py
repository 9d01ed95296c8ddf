"""What the continuous-signal models (BENDRForecast, NTD, MEGFactorizedAutoencoder) share.

They read MEG/EEG windows signal (B, C, T) with a fixed channel count C (`num_channels`) and window
length T (`signal_length`); the trainer sets both from the dataset's windows. Besides the training
loss each gives `evaluation_pair(signal)`: its prediction of a batch (a forecast, a reconstruction)
next to the target and a naive baseline, which `tokfleet eval` and the trainer's reconstruction
plot score with modeling/brain/signal_metrics.py.

The interface (init_weights, FLOPs from the layers on a meta copy, gradient checkpointing flags,
last_report) is TokenizerModel's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from modeling.tokenizers.base import TokenizerModel


@dataclass
class SignalPair:
    """A batch's prediction, target and baseline, each (B, C, N) float32 in the windows' units."""

    prediction: torch.Tensor
    target: torch.Tensor
    baseline: torch.Tensor


class SignalModel(TokenizerModel):
    input_name = "signal"
    baseline_name = ""  # what SignalPair.baseline is, in words

    def check_signal(self, signal: torch.Tensor) -> torch.Tensor:
        """signal as float32 (B, C, T) after checking C (and T, unless `any_length`) against the config."""
        config = self.config
        if signal.dim() != 3 or signal.shape[1] != config.num_channels:
            raise ValueError(f"signal must be (B, num_channels={config.num_channels}, T), got shape {tuple(signal.shape)}")
        if signal.shape[-1] != config.signal_length:
            raise ValueError(f"signal has {signal.shape[-1]} samples per window; the model reads signal_length={config.signal_length}")
        return signal.float()

    def example_inputs(self, batch_size: int = 1, device: torch.device | str = "meta") -> dict[str, torch.Tensor]:
        return {"signal": torch.randn(batch_size, self.config.num_channels, self.config.signal_length, device=device)}

    def evaluation_pair(self, signal: torch.Tensor, generator: torch.Generator | None = None) -> SignalPair:
        raise NotImplementedError
