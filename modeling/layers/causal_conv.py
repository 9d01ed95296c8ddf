"""Causal convolutions over time, shared by the SEANet (BrainOmni) and Vidtok tokenizers.

Causal here means: an output frame never depends on input frames after the end of its own
stride block. A stride-s layer maps input frames [j*s, (j+1)*s) to output frame j, so output j
sees inputs < (j+1)*s; all padding is on the left (the past). Lengths must be multiples of the
stride, so no right padding is ever needed and every output frame is complete.

Shapes: (B, C, T) for 1D, (B, C, T, H, W) for 3D (time causal, space padded symmetrically).
"""

import torch
import torch.nn.functional as F
from torch import nn


def _check_stride(length: int, stride: int) -> None:
    if length % stride != 0:
        raise ValueError(f"causal conv: time length {length} is not a multiple of the stride {stride}")


def pad_past(x: torch.Tensor, num_frames: int, mode: str, time_dim: int = 2) -> torch.Tensor:
    """Prepend num_frames frames along time_dim: zeros ("constant") or copies of the first frame ("replicate")."""
    if num_frames == 0:
        return x
    first = x.narrow(time_dim, 0, 1)
    if mode == "replicate":
        shape = list(x.shape)
        shape[time_dim] = num_frames
        pad = first.expand(shape)
    elif mode == "constant":
        pad = torch.zeros_like(first).expand([num_frames if d == time_dim else s for d, s in enumerate(x.shape)])
    else:
        raise ValueError(f"pad mode must be 'constant' or 'replicate', got {mode!r}")
    return torch.cat([pad, x], dim=time_dim)


class CausalConv1d(nn.Module):
    """Conv1d with (kernel_size - 1) * dilation - (stride - 1) frames of left padding: (B, C, T) -> (B, C', T / stride)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        dilation: int = 1,
        pad_mode: str = "constant",
        bias: bool = True,
    ):
        super().__init__()
        if kernel_size < stride:
            raise ValueError(f"kernel_size ({kernel_size}) must be >= stride ({stride}) to cover every input frame")
        self.conv = nn.Conv1d(in_channels, out_channels, kernel_size, stride=stride, dilation=dilation, bias=bias)
        self.stride = stride
        self.left_padding = (kernel_size - 1) * dilation - (stride - 1)
        self.pad_mode = pad_mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_stride(x.shape[-1], self.stride)
        return self.conv(pad_past(x, self.left_padding, self.pad_mode))


class CausalConvTranspose1d(nn.Module):
    """ConvTranspose1d trimmed on the right: (B, C, T) -> (B, C', T * stride).

    Output frame t depends on input frames <= t // stride only (the trimmed tail would hold the
    contributions of the last input frames to the future).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, bias: bool = True):
        super().__init__()
        if kernel_size < stride:
            raise ValueError(f"kernel_size ({kernel_size}) must be >= stride ({stride})")
        self.convtr = nn.ConvTranspose1d(in_channels, out_channels, kernel_size, stride=stride, bias=bias)
        self.trim_right = kernel_size - stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.convtr(x)
        return y[..., : y.shape[-1] - self.trim_right]


def _triple(value: int | tuple[int, int, int]) -> tuple[int, int, int]:
    return value if isinstance(value, tuple) else (value, value, value)


class CausalConv3d(nn.Module):
    """Conv3d causal in time, 'same' in space: (B, C, T, H, W) -> (B, C', T / s_t, H / s_h, W / s_w).

    Time is padded on the left by copies of the first frame (as Vidtok: a still scene before the
    clip), space symmetrically with zeros; spatial kernels must be odd.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int, int],
        stride: int | tuple[int, int, int] = 1,
        time_pad_mode: str = "replicate",
    ):
        super().__init__()
        kernel_t, kernel_h, kernel_w = _triple(kernel_size)
        stride_t, stride_h, stride_w = _triple(stride)
        if kernel_h % 2 == 0 or kernel_w % 2 == 0:
            raise ValueError(f"spatial kernel sizes must be odd, got {kernel_h}x{kernel_w}")
        if kernel_t < stride_t:
            raise ValueError(f"time kernel ({kernel_t}) must be >= time stride ({stride_t})")
        self.conv = nn.Conv3d(in_channels, out_channels, (kernel_t, kernel_h, kernel_w), stride=(stride_t, stride_h, stride_w))
        self.stride_t = stride_t
        self.time_padding = kernel_t - 1 - (stride_t - 1)
        pad_h, pad_w = kernel_h - stride_h, kernel_w - stride_w
        # F.pad order: (W left, W right, H left, H right)
        self.spatial_padding = (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2)
        self.time_pad_mode = time_pad_mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_stride(x.shape[2], self.stride_t)
        x = pad_past(x, self.time_padding, self.time_pad_mode)
        if any(self.spatial_padding):
            x = F.pad(x, (*self.spatial_padding, 0, 0))
        return self.conv(x)
