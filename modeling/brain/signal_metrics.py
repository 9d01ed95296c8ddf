"""How close a predicted or reconstructed signal is to its target, for the continuous-signal models
(BENDRForecast, NTD, MEGFactorizedAutoencoder): their `last_report` and `tokfleet eval`.

All take a prediction and a target of the same shape (..., T): the leading axes are independent
series (batch, channels), compared along the last (time) axis.

- mse: mean squared error over every value.
- correlation: mean over series of the Pearson correlation along time, in [-1, 1].
- psd_distance_db: mean over series and frequency bins of |10 log10 P_pred - 10 log10 P_target|,
  P the Hann-windowed periodogram; x against 2x is 20 log10(2) = 6.02 dB at every bin.
"""

from __future__ import annotations

import torch

from modeling.tokenizers.signal_losses import pearson_correlation

POWER_FLOOR = 1e-12  # periodogram floor: an all-zero series does not give -inf dB


def periodogram(x: torch.Tensor) -> torch.Tensor:
    """(..., T) -> power (..., T // 2 + 1) of the Hann-windowed real FFT, normalised by the window's energy."""
    window = torch.hann_window(x.shape[-1], periodic=False, device=x.device, dtype=x.dtype)
    spectrum = torch.fft.rfft(x * window, dim=-1)
    return spectrum.abs().square() / window.square().sum()


def log_power(x: torch.Tensor) -> torch.Tensor:
    """Periodogram of (..., T) in dB (..., T // 2 + 1)."""
    return 10.0 * torch.log10(periodogram(x) + POWER_FLOOR)


def psd_distance_db(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (log_power(prediction) - log_power(target)).abs().mean()


def signal_metrics(prediction: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
    """{"mse", "correlation", "psd_distance_db"} of prediction vs target (..., T), detached fp32 scalars."""
    prediction, target = prediction.detach().float(), target.detach().float()
    return {
        "mse": (prediction - target).square().mean(),
        "correlation": pearson_correlation(prediction, target),
        "psd_distance_db": psd_distance_db(prediction, target),
    }
