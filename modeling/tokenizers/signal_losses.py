"""Reconstruction losses over time series, shared by the BrainOmni and Vidtok tokenizer losses.

All take a reconstruction and a target of the same shape (..., T) and compare along the last
(time) axis; the leading axes are independent series (channels, windows, pixels).
"""

import torch


def l1_loss(reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (reconstruction - target).abs().mean()


def pearson_correlation(reconstruction: torch.Tensor, target: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Mean over series of the Pearson correlation along time, in [-1, 1]."""
    x = reconstruction - reconstruction.mean(dim=-1, keepdim=True)
    y = target - target.mean(dim=-1, keepdim=True)
    covariance = (x * y).sum(dim=-1)
    return (covariance / (x.norm(dim=-1) * y.norm(dim=-1) + eps)).mean()


def frequency_domain_losses(reconstruction: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(amplitude loss, phase loss): L1 between the magnitudes and between the phases (radians) of
    the orthonormal real FFTs of both series, after a Hamming window (as BrainOmni).

    The phase term does not wrap around +-pi and is noisy where the spectrum is near zero; BrainOmni
    weights it by 0.5.
    """
    window = torch.hamming_window(target.shape[-1], device=target.device, dtype=target.dtype)
    reconstruction_fft = torch.fft.rfft(reconstruction * window, dim=-1, norm="ortho")
    target_fft = torch.fft.rfft(target * window, dim=-1, norm="ortho")
    amplitude = l1_loss(reconstruction_fft.abs(), target_fft.abs())
    phase = l1_loss(torch.angle(reconstruction_fft), torch.angle(target_fft))
    return amplitude, phase


def covariance_loss(reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L1 between the covariance matrices of the series: inputs (..., S, T) -> (..., S, S) covariances."""
    x = reconstruction - reconstruction.mean(dim=-1, keepdim=True)
    y = target - target.mean(dim=-1, keepdim=True)
    denominator = max(target.shape[-1] - 1, 1)
    return l1_loss(x @ x.transpose(-1, -2) / denominator, y @ y.transpose(-1, -2) / denominator)
