"""TOTEM VQ-VAE tokenizer for multichannel time series, registered as "totem".

After TOTEM (Talukder et al. 2024) with the seed's improvements: every channel is an independent
univariate series (B, C, T) -> (B C, 1, T), so one model serves any channel count.
1. RevIN (Kim et al. 2021): each series is normalised by its own mean and std over time (plus an
   optional learned affine map); the statistics are kept so that decoding restores the scale.
2. A residual conv encoder downsamples time by compression_factor (stride-2 convs, a residual
   stack) to embedding_dim features per token.
3. A VQ with an EMA codebook (modeling.tokenizers.quantizers) maps each token to one of codebook_size codes;
   usage and perplexity are tracked, dead codes are revived from the batch.
4. A mirrored decoder (transposed convs) reconstructs the normalised series.

Training loss = MSE between the reconstruction and the instance-normalised input (computed
before RevIN's affine map, so the affine cannot shrink the loss) + the weighted commitment loss.

Shapes: B batch, C channels, T samples (a multiple of compression_factor), T' = T /
compression_factor tokens per channel, D = embedding_dim, K = codebook_size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from modeling.tokenizers.quantizers import VectorQuantizer, code_histogram, entropy_from_counts
from modeling.registry import ModelSpec, register_model
from modeling.layers.stages import run_stages
from modeling.tokenizers.base import TokenizerModel, check_positive


@dataclass(frozen=True, kw_only=True)
class TotemConfig:
    compression_factor: int = field(metadata={"help": "samples per token; a power of 2, >= 2 (TOTEM uses 4)"})
    block_hidden_size: int = field(metadata={"help": "conv width of the encoder and decoder"})
    num_residual_layers: int = field(
        metadata={"help": "residual blocks in the encoder's and the decoder's residual stack"}
    )
    res_hidden_size: int = field(metadata={"help": "bottleneck width inside a residual block"})
    embedding_dim: int = field(metadata={"help": "width of a token's latent vector and of the codebook vectors"})
    codebook_size: int = field(metadata={"help": "number of codes K (the vocabulary of the token streams)"})
    commitment_weight: float = field(
        default=0.25, metadata={"help": "weight of the commitment loss (beta of the VQ-VAE)"}
    )
    ema_decay: float = field(default=0.99, metadata={"help": "decay of the EMA codebook updates"})
    dead_code_threshold: float = field(
        default=0.1, metadata={"help": "revive codes used less than this fraction of the uniform rate; 0 disables"}
    )
    use_revin: bool = field(
        default=True, metadata={"help": "normalise every series by its own mean and std (RevIN) before encoding"}
    )
    revin_affine: bool = field(
        default=False, metadata={"help": "learn RevIN's affine map (one scale and shift shared by all channels)"}
    )
    revin_eps: float = field(default=1e-5, metadata={"help": "variance floor of RevIN"})
    example_length: int = field(
        default=256, metadata={"help": "nominal series length for FLOP estimates (any multiple of compression_factor works)"}
    )
    use_gradient_checkpointing: bool = field(
        default=False, metadata={"help": "recompute encoder and decoder stages in the backward pass"}
    )
    dropout: float = field(
        default=0.0, metadata={"help": "dropout on each residual block's output while training (TOTEM uses none); 0: none"}
    )

    def __post_init__(self):
        check_positive(self, "compression_factor", "block_hidden_size", "num_residual_layers", "res_hidden_size",
                       "embedding_dim", "codebook_size", "revin_eps", "example_length")
        if self.compression_factor < 2 or self.compression_factor & (self.compression_factor - 1):
            raise ValueError(f"compression_factor must be a power of 2 >= 2, got {self.compression_factor}")
        if self.block_hidden_size < 2:
            raise ValueError(f"block_hidden_size must be >= 2, got {self.block_hidden_size}")
        if self.example_length % self.compression_factor:
            raise ValueError(f"example_length ({self.example_length}) must be a multiple of compression_factor")
        for name in ("commitment_weight", "dead_code_threshold"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")


@dataclass
class RevINStats:
    """Per-series statistics that RevIN removed: mean and std, each (B, C, 1)."""

    mean: torch.Tensor
    std: torch.Tensor


class RevIN(nn.Module):
    """Reversible instance normalisation over the last (time) axis of (..., T) series."""

    def __init__(self, eps: float = 1e-5, affine: bool = False):
        super().__init__()
        self.eps = eps
        self.affine = affine
        if affine:  # one scale and shift for all channels: channels are interchangeable here
            self.weight = nn.Parameter(torch.empty(1))
            self.bias = nn.Parameter(torch.empty(1))

    def reset_parameters(self) -> None:
        if self.affine:
            nn.init.ones_(self.weight)
            nn.init.zeros_(self.bias)

    def statistics(self, x: torch.Tensor) -> RevINStats:
        mean = x.mean(dim=-1, keepdim=True).detach()
        std = torch.sqrt(x.var(dim=-1, keepdim=True, unbiased=False) + self.eps).detach()
        return RevINStats(mean, std)

    def normalize(self, x: torch.Tensor, stats: RevINStats) -> torch.Tensor:
        x = (x - stats.mean) / stats.std
        return x * self.weight + self.bias if self.affine else x

    def undo_affine(self, y: torch.Tensor) -> torch.Tensor:
        """Back from the affine space to the instance-normalised one."""
        return (y - self.bias) / (self.weight + self.eps * self.eps) if self.affine else y

    def denormalize(self, y: torch.Tensor, stats: RevINStats) -> torch.Tensor:
        return self.undo_affine(y) * stats.std + stats.mean


class ResidualStack(nn.Module):
    """num_layers of x + dropout(conv1(ReLU(conv3(ReLU(x))))), then ReLU: (N, H, T) -> (N, H, T)."""

    def __init__(self, hidden: int, res_hidden: int, num_layers: int, dropout: float = 0.0):
        super().__init__()
        self.layers = nn.ModuleList(  # the dropout last: the convs keep their checkpoint keys (layers.i.1, layers.i.3)
            nn.Sequential(nn.ReLU(), nn.Conv1d(hidden, res_hidden, 3, padding=1), nn.ReLU(), nn.Conv1d(res_hidden, hidden, 1),
                          nn.Dropout(dropout))
            for _ in range(num_layers)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = x + layer(x)
        return F.relu(x)


def _conv_widths(hidden: int, num_resamples: int) -> list[int]:
    """Channel widths from the input series through the stride-2 convs: [1, H/2, H, ..., H] (TOTEM's)."""
    return [1, hidden] if num_resamples == 1 else [1, hidden // 2] + [hidden] * (num_resamples - 1)


class TotemEncoder(nn.Module):
    """(N, 1, T) -> (N, D, T / compression_factor)."""

    def __init__(self, config: TotemConfig):
        super().__init__()
        hidden = config.block_hidden_size
        widths = _conv_widths(hidden, int(math.log2(config.compression_factor)))
        layers: list[nn.Module] = []
        for width_in, width_out in zip(widths[:-1], widths[1:]):
            layers += [nn.Conv1d(width_in, width_out, 4, stride=2, padding=1), nn.ReLU()]
        layers.append(nn.Conv1d(hidden, hidden, 3, padding=1))
        self.downsample = nn.Sequential(*layers)
        self.residual_stack = ResidualStack(hidden, config.res_hidden_size, config.num_residual_layers, config.dropout)
        self.pre_vq_conv = nn.Conv1d(hidden, config.embedding_dim, 1)
        self.use_gradient_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        stages = (self.downsample, self.residual_stack, self.pre_vq_conv)
        return run_stages(stages, x, self.use_gradient_checkpointing and self.training)


class TotemDecoder(nn.Module):
    """(N, D, T') -> (N, 1, T' * compression_factor); the encoder's widths in reverse."""

    def __init__(self, config: TotemConfig):
        super().__init__()
        hidden = config.block_hidden_size
        self.conv_in = nn.Conv1d(config.embedding_dim, hidden, 3, padding=1)
        self.residual_stack = ResidualStack(hidden, config.res_hidden_size, config.num_residual_layers, config.dropout)
        widths = _conv_widths(hidden, int(math.log2(config.compression_factor)))[::-1]
        layers: list[nn.Module] = []
        for width_in, width_out in zip(widths[:-1], widths[1:]):
            layers += [nn.ConvTranspose1d(width_in, width_out, 4, stride=2, padding=1), nn.ReLU()]
        self.upsample = nn.Sequential(*layers[:-1])  # no ReLU on the output
        self.use_gradient_checkpointing = False

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        stages = (self.conv_in, self.residual_stack, self.upsample)
        return run_stages(stages, z, self.use_gradient_checkpointing and self.training)


class TotemVQVAE(TokenizerModel):
    """forward(signal (B, C, T)) -> scalar loss; tokenize / decode / metrics below."""

    input_name = "signal"
    _no_split_modules = ["TotemEncoder", "TotemDecoder"]  # what FSDP shards one by one

    def __init__(self, config: TotemConfig):
        super().__init__()
        self.config = config
        self.revin = RevIN(config.revin_eps, config.revin_affine)
        self.encoder = TotemEncoder(config)
        self.quantizer = VectorQuantizer(
            config.embedding_dim, config.codebook_size, commitment_weight=config.commitment_weight,
            ema_decay=config.ema_decay, dead_code_threshold=config.dead_code_threshold,
        )
        self.decoder = TotemDecoder(config)
        self.set_gradient_checkpointing(config.use_gradient_checkpointing)

    def compile_units(self) -> list[nn.Module]:
        """What engine.compile compiles: the encoder's and decoder's conv stacks. The quantizer stays
        eager: its EMA codebook updates and dead-code resets are data-dependent."""
        return [self.encoder, self.decoder]

    def _series(self, signal: torch.Tensor) -> tuple[torch.Tensor, RevINStats]:
        """(B, C, T) -> normalised series (B C, 1, T) and their RevIN statistics (B, C, 1)."""
        if signal.dim() != 3:
            raise ValueError(f"signal must be (B, C, T), got shape {tuple(signal.shape)}")
        T = signal.shape[-1]
        if T == 0 or T % self.config.compression_factor:
            raise ValueError(f"signal length {T} must be a non-zero multiple of compression_factor={self.config.compression_factor}")
        signal = signal.float()
        stats = self.normalization_stats(signal)
        x = self.revin.normalize(signal, stats) if self.config.use_revin else signal
        return x.reshape(-1, 1, T), stats

    def normalization_stats(self, signal: torch.Tensor) -> RevINStats:
        """RevIN statistics of signal (B, C, T): mean and std (B, C, 1); identity stats without RevIN."""
        if self.config.use_revin:
            return self.revin.statistics(signal.float())
        ones = signal.new_ones(*signal.shape[:2], 1, dtype=torch.float32)
        return RevINStats(mean=torch.zeros_like(ones), std=ones)

    def _latents(self, series: torch.Tensor) -> torch.Tensor:
        return self.encoder(series).transpose(1, 2)  # (B C, T', D)

    def _reconstruct(self, quantized: torch.Tensor, batch_size: int) -> torch.Tensor:
        """quantised latents (B C, T', D) -> reconstruction in the normalised space (B, C, T)."""
        out = self.decoder(quantized.transpose(1, 2))  # (B C, 1, T)
        return out.view(batch_size, -1, out.shape[-1])

    def forward(self, signal: torch.Tensor, pos: torch.Tensor | None = None,
                sensor_type: torch.Tensor | None = None) -> torch.Tensor:
        """signal (B, C, T) -> scalar loss. pos and sensor_type are accepted and unused (channels are
        independent series here), so TOTEM takes the same batches as the other signal tokenizers."""
        del pos, sensor_type
        series, _ = self._series(signal)
        quantized = self.quantizer(self._latents(series))
        reconstruction = self._reconstruct(quantized.quantized, signal.shape[0])
        target = series.view_as(reconstruction)
        if self.config.use_revin:  # compare before the affine map (module docstring)
            reconstruction, target = self.revin.undo_affine(reconstruction), self.revin.undo_affine(target)
        reconstruction_loss = F.mse_loss(reconstruction, target)
        self.keep_parts({"reconstruction_mse": reconstruction_loss, "commitment": quantized.loss}, signal.shape[0])
        self.last_metrics = {
            "reconstruction_mse": reconstruction_loss.detach(),
            "commitment": quantized.loss.detach(),
            "perplexity": quantized.perplexity,
            "codebook_utilization": quantized.utilization.detach(),
        }
        return reconstruction_loss + quantized.loss

    @torch.no_grad()
    def tokenize(self, signal: torch.Tensor, series_per_chunk: int | None = None) -> torch.Tensor:
        """signal (B, C, T) -> codes (B, C, T / compression_factor) int64. Keep
        `normalization_stats(signal)` to decode at the original scale.

        series_per_chunk: encode the B C independent series that many at a time (None: all at once).
        The codes are the same; on a CPU, chunks whose activations fit in a core's cache run ~3x
        faster than one pass over a batch of 32 MEG windows (`series_per_chunk_for_cache`).
        """
        series, _ = self._series(signal)
        chunks = series.split(series_per_chunk or series.shape[0])
        codes = torch.cat([self.quantizer.encode(self._latents(chunk)) for chunk in chunks])  # (B C, T')
        return codes.view(signal.shape[0], signal.shape[1], -1)

    @property
    def num_lookahead_tokens(self) -> int:
        """Trailing tokens of a series whose codes depend on samples after its end (the encoder is not
        causal): token j reaches 1 + num_residual_layers tokens ahead (the 3-tap convs on the token
        grid) plus 2 (compression_factor - 1) samples (the stride-2 4-tap convs). A forecaster
        re-generates these tokens of a context instead of trusting codes computed from zero padding."""
        reach = self.config.compression_factor * (1 + self.config.num_residual_layers) + 2 * (self.config.compression_factor - 1)
        return math.ceil((reach - (self.config.compression_factor - 1)) / self.config.compression_factor)

    def series_per_chunk_for_cache(self, length: int, cache_bytes: int) -> int:
        """Series of `length` samples per `tokenize` chunk whose widest activation (block_hidden_size
        fp32 channels at half the length) takes about `cache_bytes`."""
        return max(1, cache_bytes // (self.config.block_hidden_size * (length // 2) * 4))

    def decode(self, codes: torch.Tensor, stats: RevINStats | None = None) -> torch.Tensor:
        """codes (B, C, T') -> signal (B, C, T' * compression_factor) float32: denormalised with
        stats (from `normalization_stats`), or left in the normalised space when stats is None."""
        B, C, num_tokens = codes.shape
        latents = self.quantizer.decode(codes.reshape(B * C, num_tokens))  # (B C, T', D)
        reconstruction = self._reconstruct(latents, B)
        if stats is None:
            return self.revin.undo_affine(reconstruction) if self.config.use_revin else reconstruction
        return self.revin.denormalize(reconstruction, stats) if self.config.use_revin else reconstruction

    @torch.no_grad()
    def metrics(self, signal: torch.Tensor) -> dict[str, float]:
        """The seed's quality targets on signal (B, C, T), each with the seed's goal:

        - codebook_utilization: share of the K codes used at least once (> 0.8, ideally > 0.9)
        - perplexity: exp(entropy) of the code histogram, in [1, K] (> 50)
        - token_entropy_bits: entropy of the code histogram in bits (> 5 for K = 256)
        - reconstruction_mse: MSE in the instance-normalised space, i.e. the MSE of the decoded
          signal divided by each series' variance, averaged (< 0.05)
        - scale_error: mean over series of |std(decoded) - std(signal)| / std(signal), after
          denormalisation (< 0.01)
        """
        codes = self.tokenize(signal)
        stats = self.normalization_stats(signal)
        decoded = self.decode(codes, stats)
        signal = signal.float()
        counts = code_histogram(codes, self.config.codebook_size)
        entropy = entropy_from_counts(counts)
        variance = signal.var(dim=-1, unbiased=False).clamp_min(self.config.revin_eps)  # (B, C)
        normalized_mse = ((decoded - signal).pow(2).mean(dim=-1) / variance).mean()
        signal_std = signal.std(dim=-1, unbiased=False).clamp_min(math.sqrt(self.config.revin_eps))
        scale_error = ((decoded.std(dim=-1, unbiased=False) - signal_std).abs() / signal_std).mean()
        return {
            "codebook_utilization": float((counts > 0).float().mean()),
            "perplexity": float(torch.exp(entropy)),
            "token_entropy_bits": float(entropy / math.log(2)),
            "reconstruction_mse": float(normalized_mse),
            "scale_error": float(scale_error),
        }

    def example_inputs(self, batch_size: int = 1, device: torch.device | str = "meta") -> dict[str, torch.Tensor]:
        return {"signal": torch.randn(batch_size, 1, self.config.example_length, device=device)}


TOTEM_FLAVORS = {
    "debug": dict(compression_factor=4, block_hidden_size=32, num_residual_layers=1, res_hidden_size=16,
                  embedding_dim=16, codebook_size=32),
    "small": dict(compression_factor=4, block_hidden_size=64, num_residual_layers=2, res_hidden_size=32,
                  embedding_dim=32, codebook_size=256),
    # TOTEM's published setting: 128 hidden, 2 residual layers of 64, 64-dim codes, 256 codes, 4x.
    "full": dict(compression_factor=4, block_hidden_size=128, num_residual_layers=2, res_hidden_size=64,
                 embedding_dim=64, codebook_size=256),
}

register_model(ModelSpec(name="totem", config_cls=TotemConfig, builder=TotemVQVAE, flavors=TOTEM_FLAVORS,
                         task="signal_reconstruction"))
