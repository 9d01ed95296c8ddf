"""Vidtok causal video tokenizers, registered as "Vidtok" (FSQ) and "VidtokRVQ" (residual VQ).

After Microsoft's VidTok as adapted in brain-gen. Input video (B, C, T, H, W):
- encoder: causal 3D conv in -> per level: num_res_blocks x (2D residual block on each frame, then
  a causal 1D residual block along time at each pixel), then optional 2x spatial and 2x temporal
  downsampling -> middle (causal 3D residual block, self-attention within each frame, causal 3D
  residual block) -> norm, SiLU, causal 3D conv to z_channels.
- quantiser: FSQ over the z_channels of every latent voxel (Vidtok) or a residual VQ (VidtokRVQ).
- decoder: the mirror image, with nearest-neighbour upsampling followed by convs.
Time is causal everywhere: convs pad the past with copies of the first frame, normalisation
statistics never span frames (GroupNorm per frame, a deviation from the reference, whose
temporal GroupNorm mixed frames), attention stays within a frame. A latent frame j therefore
depends on input frames < (j + 1) * temporal_factor only.

A clip whose length is not a multiple of the temporal factor is padded at the start with copies
of its first frame, and the decoded clip is cut back to its last T frames.

Batches: `video` is what the shards hold, uint8 (B, T, H, W, C) in [0, 255], which is mapped to
float (B, C, T, H, W) in [-1, 1]; a float tensor is taken as (B, C, T, H, W) already in [-1, 1].
Shapes: T' = T / temporal_factor, H' = H / spatial_factor, W' likewise; factors = 2^(levels listed).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from modeling.layers.causal_conv import CausalConv1d, CausalConv3d, pad_past
from modeling.tokenizers.quantizers import FiniteScalarQuantizer, QuantizerOutput, ResidualVectorQuantizer
from modeling.registry import ModelSpec, register_model
from modeling.tokenizers.signal_losses import covariance_loss, frequency_domain_losses, pearson_correlation
from modeling.layers.stages import run_stages
from modeling.tokenizers.base import TokenizerModel, check_positive

NORM_TYPES = ("groupnorm", "layernorm")


@dataclass(frozen=True, kw_only=True)
class VidtokArchitecture:
    """Fields shared by Vidtok and VidtokRVQ: encoder/decoder shape and the reconstruction loss."""

    in_channels: int = field(default=3, metadata={"help": "colour channels of the video (3 for RGB)"})
    base_channels: int = field(metadata={"help": "conv width of the first level"})
    channel_multipliers: list[int] = field(metadata={"help": "width of each level as a multiple of base_channels"})
    num_res_blocks: int = field(
        metadata={"help": "spatio-temporal residual blocks per encoder level (decoder: one more)"}
    )
    z_channels: int = field(metadata={"help": "latent channels per voxel, the quantiser's input width"})
    spatial_downsample_levels: list[int] = field(
        metadata={"help": "encoder levels followed by a 2x spatial downsampling (decoder mirrors)"}
    )
    temporal_downsample_levels: list[int] = field(
        metadata={"help": "encoder levels followed by a 2x causal temporal downsampling"}
    )
    norm_type: str = field(
        default="groupnorm", metadata={"help": "'groupnorm' (per frame) or 'layernorm' (per voxel, over channels)"}
    )
    dropout: float = field(default=0.0, metadata={"help": "dropout inside residual blocks"})
    logvar_init: float = field(
        default=0.0, metadata={"help": "initial log-variance of the L1 likelihood: loss = L1 / exp(logvar) + logvar"}
    )
    learn_logvar: bool = field(
        default=False, metadata={"help": "learn the log-variance (else it stays at logvar_init)"}
    )
    temporal_pcc_weight: float = field(default=0.0, metadata={"help": "weight of exp(-PCC) of pixel time courses"})
    temporal_freq_amp_weight: float = field(
        default=0.0, metadata={"help": "weight of the FFT-magnitude L1 of pixel time courses"}
    )
    temporal_freq_phase_weight: float = field(
        default=0.0, metadata={"help": "weight of the FFT-phase L1 of pixel time courses"}
    )
    temporal_cov_weight: float = field(
        default=0.0, metadata={"help": "weight of the L1 between covariances of pixel time courses"}
    )
    num_temporal_loss_pixels: int = field(
        default=64, metadata={"help": "pixels drawn per step for the temporal losses"}
    )
    aux_loss_weight: float = field(
        default=1.0, metadata={"help": "weight of the quantiser's auxiliary (commitment) loss"}
    )
    num_frames: int = field(
        default=16, metadata={"help": "nominal clip length, for FLOP estimates (inputs may differ)"}
    )
    frame_size: int = field(default=128, metadata={"help": "nominal square frame side in pixels, for FLOP estimates"})
    use_gradient_checkpointing: bool = field(
        default=False, metadata={"help": "recompute encoder/decoder stages in the backward pass"}
    )

    def __post_init__(self):
        check_positive(self, "in_channels", "base_channels", "channel_multipliers", "num_res_blocks", "z_channels",
                       "num_temporal_loss_pixels", "num_frames", "frame_size")
        num_levels = len(self.channel_multipliers)
        for name in ("spatial_downsample_levels", "temporal_downsample_levels"):
            levels = getattr(self, name)
            if any(not 0 <= level < num_levels for level in levels) or len(set(levels)) != len(levels):
                raise ValueError(f"{name} must list distinct levels in [0, {num_levels}), got {levels}")
        if self.norm_type not in NORM_TYPES:
            raise ValueError(f"norm_type must be one of {NORM_TYPES}, got {self.norm_type!r}")
        for name in ("dropout", "temporal_pcc_weight", "temporal_freq_amp_weight", "temporal_freq_phase_weight",
                     "temporal_cov_weight", "aux_loss_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.frame_size % self.spatial_factor:
            raise ValueError(f"frame_size ({self.frame_size}) must be a multiple of the spatial factor ({self.spatial_factor})")

    @property
    def spatial_factor(self) -> int:
        return 2 ** len(self.spatial_downsample_levels)

    @property
    def temporal_factor(self) -> int:
        return 2 ** len(self.temporal_downsample_levels)


@dataclass(frozen=True, kw_only=True)
class VidtokConfig(VidtokArchitecture):
    fsq_levels: list[int] = field(metadata={"help": "FSQ levels per latent dimension; codebook size = their product"})
    fsq_commitment_weight: float = field(default=0.25, metadata={"help": "weight of FSQ's commitment loss"})


@dataclass(frozen=True, kw_only=True)
class VidtokRVQConfig(VidtokArchitecture):
    codebook_size: int = field(metadata={"help": "codes per RVQ level"})
    codebook_dim: int = field(metadata={"help": "width of the codebook vectors (projected from/to z_channels)"})
    num_quantizers: int = field(metadata={"help": "RVQ levels per latent voxel"})
    commitment_weight: float = field(default=0.25, metadata={"help": "weight of the VQ commitment loss"})
    ema_decay: float = field(default=0.99, metadata={"help": "decay of the EMA codebook updates"})
    dead_code_threshold: float = field(
        default=0.1, metadata={"help": "revive codes used less than this fraction of the uniform rate; 0 disables"}
    )
    rotation_trick: bool = field(
        default=True, metadata={"help": "pass gradients through the VQ with the rotation trick"}
    )


# ---------------------------------------------------------------------------------------- blocks


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channel axis (dim 1) of (N, C, ...)."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(channels, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.movedim(1, -1)).movedim(-1, 1)


class FrameNorm(nn.Module):
    """Normalisation that never mixes time steps: (B, C, T, H, W) per frame, (N, C, T) per step, (N, C, H, W) as is."""

    def __init__(self, channels: int, norm_type: str):
        super().__init__()
        if norm_type == "groupnorm":
            self.norm = nn.GroupNorm(math.gcd(channels, max(channels // 4, 1)), channels, eps=1e-6)
        else:
            self.norm = ChannelLayerNorm(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 5:
            B = x.shape[0]
            return rearrange(self.norm(rearrange(x, "B C T H W -> (B T) C H W")), "(B T) C H W -> B C T H W", B=B)
        if x.dim() == 3:
            N = x.shape[0]
            return rearrange(self.norm(rearrange(x, "N C T -> (N T) C")), "(N T) C -> N C T", N=N)
        return self.norm(x)


class SpatialResBlock(nn.Module):
    """2D residual block on single frames (N, C_in, H, W) -> (N, C_out, H, W)."""

    def __init__(self, in_channels: int, out_channels: int, norm_type: str, dropout: float):
        super().__init__()
        self.norm1 = FrameNorm(in_channels, norm_type)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = FrameNorm(out_channels, norm_type)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.shortcut(x) + h


class TemporalResBlock(nn.Module):
    """Causal 1D residual block along time at every pixel, (N, C, T) -> (N, C, T); starts as the identity."""

    def __init__(self, channels: int, norm_type: str, dropout: float):
        super().__init__()
        self.norm1 = FrameNorm(channels, norm_type)
        self.conv1 = CausalConv1d(channels, channels, 3, pad_mode="replicate")
        self.norm2 = FrameNorm(channels, norm_type)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = CausalConv1d(channels, channels, 3, pad_mode="replicate")

    def reset_parameters(self) -> None:  # runs after the children's own reset (TokenizerModel.init_weights)
        nn.init.zeros_(self.conv2.conv.weight)
        nn.init.zeros_(self.conv2.conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        return x + self.conv2(self.dropout(F.silu(self.norm2(h))))


class SpatioTemporalBlock(nn.Module):
    """(B, C_in, T, H, W) -> (B, C_out, T, H, W): a SpatialResBlock on every frame, then a TemporalResBlock at every pixel."""

    def __init__(self, in_channels: int, out_channels: int, norm_type: str, dropout: float):
        super().__init__()
        self.spatial = SpatialResBlock(in_channels, out_channels, norm_type, dropout)
        self.temporal = TemporalResBlock(out_channels, norm_type, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, _, T, H, W = x.shape
        x = rearrange(self.spatial(rearrange(x, "B C T H W -> (B T) C H W")), "(B T) C H W -> (B H W) C T", B=B)
        return rearrange(self.temporal(x), "(B H W) C T -> B C T H W", B=B, H=H, W=W)


class CausalResBlock3D(nn.Module):
    """Residual block of causal 3D convs, (B, C, T, H, W) -> same."""

    def __init__(self, channels: int, norm_type: str, dropout: float):
        super().__init__()
        self.norm1 = FrameNorm(channels, norm_type)
        self.conv1 = CausalConv3d(channels, channels, 3)
        self.norm2 = FrameNorm(channels, norm_type)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = CausalConv3d(channels, channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        return x + self.conv2(self.dropout(F.silu(self.norm2(h))))


class FrameAttention(nn.Module):
    """Single-head self-attention among the pixels of each frame, with a residual: (B, C, T, H, W) -> same."""

    def __init__(self, channels: int, norm_type: str):
        super().__init__()
        self.norm = FrameNorm(channels, norm_type)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj_out = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, T, H, W = x.shape
        h = rearrange(self.norm(x), "B C T H W -> (B T) (H W) C")
        q, k, v = self.qkv(h).chunk(3, dim=-1)
        h = self.proj_out(F.scaled_dot_product_attention(q, k, v))
        return x + rearrange(h, "(B T) (H W) C -> B C T H W", B=B, H=H)


class SpatialDownsample(nn.Module):
    """Stride-2 3x3 conv on every frame: (B, C, T, H, W) -> (B, C, T, H/2, W/2)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B = x.shape[0]
        h = self.conv(F.pad(rearrange(x, "B C T H W -> (B T) C H W"), (0, 1, 0, 1)))
        return rearrange(h, "(B T) C H W -> B C T H W", B=B)


class SpatialUpsample(nn.Module):
    """Nearest 2x then a 3x3 conv on every frame: (B, C, T, H, W) -> (B, C, T, 2H, 2W)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B = x.shape[0]
        h = F.interpolate(rearrange(x, "B C T H W -> (B T) C H W"), scale_factor=2.0, mode="nearest")
        return rearrange(self.conv(h), "(B T) C H W -> B C T H W", B=B)


class MixFactor(nn.Module):
    """A learned blend sigmoid(m) * a + (1 - sigmoid(m)) * b between a fixed resampling and a conv (Open-Sora-Plan)."""

    def __init__(self):
        super().__init__()
        self.mix_factor = nn.Parameter(torch.empty(1))

    def reset_parameters(self) -> None:
        nn.init.constant_(self.mix_factor, 2.0)

    def forward(self, fixed: torch.Tensor, learned: torch.Tensor) -> torch.Tensor:
        alpha = torch.sigmoid(self.mix_factor)
        return alpha * fixed + (1 - alpha) * learned


class TemporalDownsample(nn.Module):
    """Causal 2x downsampling in time, (B, C, T, H, W) -> (B, C, T/2, H, W): frames (2j-1, 2j, 2j+1) -> j."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = CausalConv3d(channels, channels, 3, stride=(2, 1, 1))
        self.mix = MixFactor()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        averaged = F.avg_pool3d(pad_past(x, 1, "replicate"), kernel_size=(3, 1, 1), stride=(2, 1, 1))
        return self.mix(averaged, self.conv(x))


class TemporalUpsample(nn.Module):
    """Causal 2x upsampling in time, (B, C, T, H, W) -> (B, C, 2T, H, W): each frame repeated, then a causal conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = CausalConv3d(channels, channels, 3)
        self.mix = MixFactor()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.repeat_interleave(2, dim=2)
        return self.mix(x, self.conv(x))


class OutputHead(nn.Module):
    """norm, SiLU, causal 3D conv."""

    def __init__(self, in_channels: int, out_channels: int, norm_type: str):
        super().__init__()
        self.norm = FrameNorm(in_channels, norm_type)
        self.conv = CausalConv3d(in_channels, out_channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.silu(self.norm(x)))


def _middle(channels: int, config: VidtokArchitecture) -> list[nn.Module]:
    return [CausalResBlock3D(channels, config.norm_type, config.dropout), FrameAttention(channels, config.norm_type),
            CausalResBlock3D(channels, config.norm_type, config.dropout)]


class VidtokEncoder(nn.Module):
    """(B, in_channels, T, H, W) -> (B, z_channels, T', H', W'); T a multiple of the temporal factor."""

    def __init__(self, config: VidtokArchitecture):
        super().__init__()
        widths = [config.base_channels * m for m in config.channel_multipliers]
        stages: list[nn.Module] = [CausalConv3d(config.in_channels, config.base_channels, 3)]
        width = config.base_channels
        for level, level_width in enumerate(widths):
            for _ in range(config.num_res_blocks):
                stages.append(SpatioTemporalBlock(width, level_width, config.norm_type, config.dropout))
                width = level_width
            if level in config.spatial_downsample_levels:
                stages.append(SpatialDownsample(width))
            if level in config.temporal_downsample_levels:
                stages.append(TemporalDownsample(width))
        stages += _middle(width, config)
        stages.append(OutputHead(width, config.z_channels, config.norm_type))
        self.stages = nn.ModuleList(stages)
        self.use_gradient_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return run_stages(self.stages, x, self.use_gradient_checkpointing and self.training)


class VidtokDecoder(nn.Module):
    """(B, z_channels, T', H', W') -> (B, in_channels, T' * temporal factor, H' * spatial factor, ...)."""

    def __init__(self, config: VidtokArchitecture):
        super().__init__()
        widths = [config.base_channels * m for m in config.channel_multipliers]
        width = widths[-1]
        stages: list[nn.Module] = [CausalConv3d(config.z_channels, width, 3)]
        stages += _middle(width, config)
        for level in reversed(range(len(widths))):
            for _ in range(config.num_res_blocks + 1):
                stages.append(SpatioTemporalBlock(width, widths[level], config.norm_type, config.dropout))
                width = widths[level]
            # undo the encoder's resampling after level - 1, in the reverse order (time, then space)
            if level - 1 in config.temporal_downsample_levels:
                stages.append(TemporalUpsample(width))
            if level - 1 in config.spatial_downsample_levels:
                stages.append(SpatialUpsample(width))
        stages.append(OutputHead(width, config.in_channels, config.norm_type))
        self.stages = nn.ModuleList(stages)
        self.use_gradient_checkpointing = False

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return run_stages(self.stages, z, self.use_gradient_checkpointing and self.training)


# ------------------------------------------------------------------------------------ loss, model


class VidtokLoss(nn.Module):
    """Vidtok's reconstruction objective on videos (B, C, T, H, W):

        loss = mean(|x - x_rec| / exp(logvar) + logvar)                    (Laplace NLL; L1 at logvar 0)
               + temporal_pcc_weight * exp(-PCC) + temporal_freq_amp_weight * amp + temporal_freq_phase_weight * phase
               + temporal_cov_weight * L1(cov(rec pixels) - cov(target pixels))
               + aux_loss_weight * quantiser loss

    The temporal terms treat the time courses of num_temporal_loss_pixels pixels, drawn with
    torch's global RNG each call, as signals (BrainOmni's losses along T); the covariance is
    between those pixels' flattened (C, T) time courses.
    """

    def __init__(self, config: VidtokArchitecture):
        super().__init__()
        self.config = config
        if config.learn_logvar:
            self.logvar = nn.Parameter(torch.empty(()))
        else:
            self.register_buffer("logvar", torch.empty(()))

    def reset_parameters(self) -> None:
        nn.init.constant_(self.logvar, self.config.logvar_init)

    def forward(self, reconstruction: torch.Tensor, target: torch.Tensor,
                aux_loss: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        config = self.config
        l1 = (target - reconstruction).abs()
        loss = (l1 / torch.exp(self.logvar) + self.logvar).mean()
        parts = {"l1": l1.mean(), "aux": aux_loss}
        uses_temporal = (config.temporal_pcc_weight, config.temporal_freq_amp_weight,
                         config.temporal_freq_phase_weight, config.temporal_cov_weight)
        if any(weight > 0 for weight in uses_temporal):
            B, C, T, H, W = target.shape
            pixels = torch.randint(0, H * W, (config.num_temporal_loss_pixels,), device=target.device)
            target_series = rearrange(target, "B C T H W -> B (H W) C T")[:, pixels]  # (B, P, C, T)
            reconstruction_series = rearrange(reconstruction, "B C T H W -> B (H W) C T")[:, pixels]
            if config.temporal_pcc_weight > 0:
                parts["temporal_pcc"] = pearson_correlation(reconstruction_series, target_series)
                loss = loss + config.temporal_pcc_weight * torch.exp(-parts["temporal_pcc"])
            if config.temporal_freq_amp_weight > 0 or config.temporal_freq_phase_weight > 0:
                parts["temporal_amp"], parts["temporal_phase"] = frequency_domain_losses(reconstruction_series, target_series)
                loss = loss + config.temporal_freq_amp_weight * parts["temporal_amp"]
                loss = loss + config.temporal_freq_phase_weight * parts["temporal_phase"]
            if config.temporal_cov_weight > 0:
                parts["temporal_cov"] = covariance_loss(reconstruction_series.flatten(2), target_series.flatten(2))
                loss = loss + config.temporal_cov_weight * parts["temporal_cov"]
        loss = loss + config.aux_loss_weight * aux_loss
        return loss, {name: value.detach() for name, value in parts.items()}


def video_to_model_input(video: torch.Tensor) -> torch.Tensor:
    """uint8 (B, T, H, W, C) frames -> float (B, C, T, H, W) in [-1, 1]; a float (B, C, T, H, W) passes through."""
    if video.dim() != 5:
        raise ValueError(f"video must be 5-D: uint8 (B, T, H, W, C) or float (B, C, T, H, W), got {tuple(video.shape)}")
    if video.dtype == torch.uint8:
        return (video.float() / 127.5 - 1.0).permute(0, 4, 1, 2, 3)
    return video.float()


def model_output_to_video(x: torch.Tensor) -> torch.Tensor:
    """float (B, C, T, H, W) in [-1, 1] -> uint8 (B, T, H, W, C) frames."""
    return ((x.clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 4, 1)


class Vidtok(TokenizerModel):
    """forward(video) -> scalar loss; FSQ over every latent voxel. tokenize / decode below."""

    input_name = "video"
    _no_split_modules = ["SpatioTemporalBlock"]  # what FSDP shards one by one

    def __init__(self, config: VidtokArchitecture):
        super().__init__()
        self.config = config
        self.encoder = VidtokEncoder(config)
        self.decoder = VidtokDecoder(config)
        self.regularization = self._build_quantizer(config)
        self.loss_fn = VidtokLoss(config)
        self.set_gradient_checkpointing(config.use_gradient_checkpointing)

    def compile_units(self) -> list[nn.Module]:
        """What engine.compile compiles: the encoder's and decoder's conv stacks. The quantizer stays
        eager: its EMA codebook updates and dead-code resets are data-dependent."""
        return [self.encoder, self.decoder]

    def _build_quantizer(self, config: VidtokConfig) -> nn.Module:
        return FiniteScalarQuantizer(config.fsq_levels, dim=config.z_channels, commitment_weight=config.fsq_commitment_weight)

    @property
    def codebook_size(self) -> int:
        return self.regularization.codebook_size

    def _pad_clip(self, x: torch.Tensor) -> torch.Tensor:
        """Check H, W; pad the start of time to a multiple of the temporal factor with the first frame."""
        _, C, T, H, W = x.shape
        if C != self.config.in_channels:
            raise ValueError(f"video has {C} channels, the model expects in_channels={self.config.in_channels}")
        factor = self.config.spatial_factor
        if H % factor or W % factor:
            raise ValueError(f"frame size {H}x{W} must be a multiple of the spatial factor {factor}")
        return pad_past(x, -T % self.config.temporal_factor, "replicate")

    def encode(self, video: torch.Tensor, update: bool | None = None) -> QuantizerOutput:
        """video -> QuantizerOutput: quantized (B, z_channels, T', H', W'), indices (B, T', H', W'[, Q])."""
        x = self._pad_clip(video_to_model_input(video))
        latents = self.encoder(x).movedim(1, -1)  # (B, T', H', W', z)
        out = self.regularization(latents, update=update)
        out.quantized = out.quantized.movedim(-1, 1)
        return out

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        """video uint8 (B, T, H, W, C) or float (B, C, T, H, W) -> scalar loss; parts in `last_metrics`."""
        x = video_to_model_input(video)
        quantized = self.encode(x)
        reconstruction = self.decoder(quantized.quantized)[:, :, -x.shape[2]:].float()
        loss, parts = self.loss_fn(reconstruction, x, quantized.loss)
        self.last_metrics = {**parts, "perplexity": quantized.perplexity, "codebook_utilization": quantized.utilization.detach()}
        self.keep_parts(parts, x.shape[0])
        return loss

    @torch.no_grad()
    def tokenize(self, video: torch.Tensor, clips_per_chunk: int | None = None) -> torch.Tensor:
        """video -> indices int64 (B, T', H', W') (FSQ) or (B, T', H', W', Q) (RVQ). No state changes.

        clips_per_chunk: encode the clips that many at a time (None: all at once). The codes are the
        same; on a CPU, chunks whose activations fit in the shared cache run faster than one pass over
        a big batch (`clips_per_chunk_for_cache`).
        """
        chunks = video.split(clips_per_chunk or video.shape[0])
        return torch.cat([self.encode(chunk, update=False).indices for chunk in chunks])

    def clips_per_chunk_for_cache(self, num_frames: int, height: int, width: int, cache_bytes: int) -> int:
        """Clips of num_frames x height x width per `tokenize` chunk whose widest activation (base_channels
        fp32 channels at the clip's full resolution, the encoder's first level) takes about `cache_bytes`."""
        return max(1, cache_bytes // (self.config.base_channels * num_frames * height * width * 4))

    def decode(self, indices: torch.Tensor, num_frames: int | None = None) -> torch.Tensor:
        """indices from tokenize -> video float (B, C, T, H, W) in about [-1, 1] (see model_output_to_video);
        T = T' * temporal factor, or the last num_frames of those (to undo the start padding)."""
        latents = self.regularization.decode(indices).movedim(-1, 1)  # (B, z, T', H', W')
        video = self.decoder(latents).float()
        return video if num_frames is None else video[:, :, -num_frames:]

    def example_inputs(self, batch_size: int = 1, device: torch.device | str = "meta") -> dict[str, torch.Tensor]:
        c = self.config
        return {"video": torch.randn(batch_size, c.in_channels, c.num_frames, c.frame_size, c.frame_size, device=device)}


class VidtokRVQ(Vidtok):
    """Vidtok with a residual VQ (EMA codebooks) instead of FSQ; indices (B, T', H', W', Q)."""

    def _build_quantizer(self, config: VidtokRVQConfig) -> nn.Module:
        return ResidualVectorQuantizer(
            config.num_quantizers, config.z_channels, config.codebook_size, codebook_dim=config.codebook_dim,
            commitment_weight=config.commitment_weight, ema_decay=config.ema_decay,
            dead_code_threshold=config.dead_code_threshold, use_rotation_trick=config.rotation_trick,
        )


_ARCH_DEBUG = dict(base_channels=8, channel_multipliers=[1, 2], num_res_blocks=1, spatial_downsample_levels=[0],
                   temporal_downsample_levels=[0], num_frames=4, frame_size=16)
_ARCH_SMALL = dict(base_channels=32, channel_multipliers=[1, 2, 4], num_res_blocks=1, spatial_downsample_levels=[0, 1],
                   temporal_downsample_levels=[0, 1], num_frames=8, frame_size=64)
# brain-gen configs/vidtok/model81616.yaml: 8x temporal, 16x16 spatial compression.
_ARCH_FULL = dict(base_channels=64, channel_multipliers=[1, 2, 4, 4, 4], num_res_blocks=2,
                  spatial_downsample_levels=[0, 1, 2, 3], temporal_downsample_levels=[0, 1, 2], num_frames=16, frame_size=128)

VIDTOK_FLAVORS = {
    "debug": dict(_ARCH_DEBUG, z_channels=3, fsq_levels=[5, 5, 5]),
    "small": dict(_ARCH_SMALL, z_channels=4, fsq_levels=[8, 8, 8, 8]),
    "full": dict(_ARCH_FULL, z_channels=6, fsq_levels=[8, 8, 8, 8, 8, 8]),
}
VIDTOK_RVQ_FLAVORS = {
    "debug": dict(_ARCH_DEBUG, z_channels=8, codebook_size=32, codebook_dim=8, num_quantizers=2),
    "small": dict(_ARCH_SMALL, z_channels=64, codebook_size=1024, codebook_dim=64, num_quantizers=4),
    # brain-gen configs/vidtok/rvq81616.yaml
    "full": dict(_ARCH_FULL, z_channels=2048, codebook_size=16384, codebook_dim=2048, num_quantizers=8, norm_type="layernorm"),
}

register_model(ModelSpec(name="Vidtok", config_cls=VidtokConfig, builder=Vidtok, flavors=VIDTOK_FLAVORS,
                         task="video_reconstruction"))
register_model(ModelSpec(name="VidtokRVQ", config_cls=VidtokRVQConfig, builder=VidtokRVQ, flavors=VIDTOK_RVQ_FLAVORS,
                         task="video_reconstruction"))
