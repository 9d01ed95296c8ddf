"""BrainOmni causal tokenizers for MEG/EEG, registered as "BrainOmniCausalTokenizer" and
"BrainOmniCausalTokenizerSEANetChannelMix" (BrainTokMix).

BrainOmniCausalTokenizer (after BrainOmni, OpenTSLab, as adapted in brain-gen):
1. The signal (B, C, T) is cut into N = T / window_length windows of L = window_length samples.
2. A causal SEANet encodes every channel of every window alone: (B C N, 1, L) -> (B C N, D, Tk)
   with Tk = L / prod(ratios) tokens per window.
3. The "backward solution" maps C sensors to n_neuro latent channels at each token: n_neuro learned
   queries attend over the sensors (keys: features + sensor embedding) -> (B, n_neuro, N, Tk, D).
   Sensor embeddings come from `pos` (B, C, 3 or 6) and `sensor_type` (B, C) ("sensor" space) or
   from the channel index (up to num_sensors channels, "source" space).
4. A residual VQ (num_quantizers levels of codebook_size codes) quantises each latent token.
5. The "forward solution" maps back: each sensor's embedding attends over the n_neuro latents;
   a causal SEANet decoder turns each channel's tokens back into L samples.
Steps 3 and 5 mix channels at the same token only, so token j of a window depends on the
window's samples < (j + 1) * prod(ratios) (the encoder is causal), and decoded sample t on
tokens <= t // prod(ratios).

BrainOmniCausalTokenizerSEANetChannelMix (BrainTokMix): no attention and no sensor embeddings.
One SEANet encodes all num_sensors channels together (channel mixing in its first conv) into
n_dim features per token, split into n_neuro spatial tokens of n_dim / n_neuro dims each; the
decoder mirrors it. Input channels must equal num_sensors, in a fixed order.

Both return from forward the BrainOmniCausalTokenizerLoss (below). Tokens: `tokenize()` gives a
CausalTokenSequence with embeddings (B, n_neuro, W, D_token) and indices (B, n_neuro, W, Q),
W = N * Tk; its "C" axis is the latent channels (n_neuro), not the sensors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from modeling.tokenizers.quantizers import ResidualVectorQuantizer
from modeling.registry import ModelSpec, register_model
from modeling.layers.seanet import SEANetDecoder, SEANetEncoder, SEANetShape
from modeling.tokenizers.signal_losses import frequency_domain_losses, l1_loss, pearson_correlation
from modeling.tokenizers.base import TokenizerModel, check_positive

SENSOR_SPACES = ("source", "sensor")
POS_DIM = 6  # sensor position (3) + orientation (3); positions given without orientation are zero-padded


@dataclass(frozen=True, kw_only=True)
class BrainOmniConfig:
    window_length: int = field(
        metadata={"help": "samples per window; a multiple of prod(ratios); signals are cut into whole windows"}
    )
    ratios: list[int] = field(
        metadata={"help": "SEANet temporal downsampling ratios; tokens per window = window_length / prod(ratios)"}
    )
    n_filters: int = field(metadata={"help": "SEANet base width (doubles at each ratio)"})
    n_dim: int = field(
        metadata={"help": "latent width per token (BrainTokMix: total width, split into n_neuro tokens)"}
    )
    n_neuro: int = field(
        metadata={"help": "latent channels per token: learned queries (BrainOmni) or spatial splits (BrainTokMix)"}
    )
    n_head: int = field(
        metadata={"help": "heads of the sensor <-> latent cross-attention (BrainOmni only); divides n_dim"}
    )
    codebook_size: int = field(metadata={"help": "codes per RVQ level"})
    codebook_dim: int = field(
        metadata={"help": "width of the codebook vectors (projected from/to the token width when it differs)"}
    )
    num_quantizers: int = field(default=4, metadata={"help": "RVQ levels per token"})
    kernel_size: int = field(default=5, metadata={"help": "SEANet first-conv kernel size"})
    last_kernel_size: int = field(default=5, metadata={"help": "SEANet last-conv kernel size"})
    n_residual_layers: int = field(default=1, metadata={"help": "SEANet residual blocks per ratio"})
    lstm_layers: int = field(
        default=2, metadata={"help": "unidirectional LSTM layers at the SEANet bottleneck (0: none)"}
    )
    dropout: float = field(default=0.0, metadata={"help": "attention dropout of the sensor <-> latent cross-attention"})
    rotation_trick: bool = field(
        default=True, metadata={"help": "pass gradients through the VQ with the rotation trick instead of straight-through"}
    )
    noise_std: float = field(
        default=0.0, metadata={"help": "std of Gaussian noise added to the encoder input in training (target stays clean)"}
    )
    num_sensors: int = field(
        default=68, metadata={"help": "channels: max channels of the 'source' embedding; exact input channels of BrainTokMix"}
    )
    num_sensor_types: int = field(
        default=3, metadata={"help": "distinct sensor_type ids (e.g. magnetometer, gradiometer, EEG) in 'sensor' space"}
    )
    normalize: bool = field(
        default=False, metadata={"help": "L2-normalise tokens before the RVQ and z-score each window's target"}
    )
    sensor_space: str = field(
        default="source", metadata={"help": "'source': embedding per channel index; 'sensor': embedding from pos and sensor_type"}
    )
    shuffle_channels: bool = field(
        default=False, metadata={"help": "randomly permute channels (with their embeddings) in training"}
    )
    commitment_weight: float = field(
        default=0.25, metadata={"help": "weight of the VQ commitment loss (per level, averaged over levels)"}
    )
    ema_decay: float = field(default=0.99, metadata={"help": "decay of the EMA codebook updates"})
    dead_code_threshold: float = field(
        default=0.1, metadata={"help": "revive codes used less than this fraction of the uniform rate; 0 disables"}
    )
    time_loss_weight: float = field(default=1.0, metadata={"help": "weight of the L1 loss in time"})
    pcc_loss_weight: float = field(default=1.0, metadata={"help": "weight of exp(-Pearson correlation)"})
    amplitude_loss_weight: float = field(default=1.0, metadata={"help": "weight of the L1 loss between FFT magnitudes"})
    phase_loss_weight: float = field(default=0.5, metadata={"help": "weight of the L1 loss between FFT phases"})
    use_gradient_checkpointing: bool = field(
        default=False, metadata={"help": "recompute SEANet stages in the backward pass to save activation memory"}
    )

    def __post_init__(self):
        check_positive(self, "window_length", "ratios", "n_filters", "n_dim", "n_neuro", "n_head", "codebook_size",
                       "codebook_dim", "num_quantizers", "kernel_size", "last_kernel_size", "num_sensors", "num_sensor_types")
        hop_length = math.prod(self.ratios)
        if self.window_length % hop_length != 0:
            raise ValueError(f"window_length ({self.window_length}) must be a multiple of prod(ratios) ({hop_length})")
        if self.sensor_space not in SENSOR_SPACES:
            raise ValueError(f"sensor_space must be one of {SENSOR_SPACES}, got {self.sensor_space!r}")
        for name in ("n_residual_layers", "lstm_layers", "dropout", "noise_std", "commitment_weight", "dead_code_threshold"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")


@dataclass
class CausalTokenSequence:
    """Tokens of a signal, windows flattened along time: W = num_windows * tokens_per_window."""

    embeddings: torch.Tensor  # (B, C, W, D): quantised token vectors, C = latent channels (n_neuro)
    indices: torch.Tensor  # (B, C, W, Q) int64 RVQ codes
    tokens_per_window: int
    num_windows: int
    overlap_ratio: float = 0.0  # windows never overlap here; kept for the seed's interface

    def detach(self) -> CausalTokenSequence:
        return CausalTokenSequence(self.embeddings.detach(), self.indices.detach(), self.tokens_per_window,
                                   self.num_windows, self.overlap_ratio)


class FeedForward(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BrainSensorModule(nn.Module):
    """pos (B, C, 6) + sensor_type (B, C) -> sensor embeddings (B, C, D)."""

    def __init__(self, n_dim: int, num_sensor_types: int):
        super().__init__()
        self.sensor_embedding_layer = nn.Embedding(num_sensor_types, n_dim)
        hidden = max(n_dim // 2, 1)
        self.pos_embedding_layer = nn.Sequential(nn.Linear(POS_DIM, hidden), nn.SELU(), nn.Linear(hidden, n_dim))
        self.aggregate_mlp = FeedForward(n_dim)
        self.norm = nn.RMSNorm(n_dim)

    def forward(self, pos: torch.Tensor, sensor_type: torch.Tensor) -> torch.Tensor:
        x = self.pos_embedding_layer(pos) + self.sensor_embedding_layer(sensor_type)
        return self.norm(x + self.aggregate_mlp(x))


class BrainSensorModuleFixed(nn.Module):
    """A learned embedding per channel index: (B, C) channels -> (B, C, D); C <= num_sensors."""

    def __init__(self, n_dim: int, num_sensors: int):
        super().__init__()
        self.embedding = nn.Embedding(num_sensors, n_dim)
        self.aggregate_mlp = FeedForward(n_dim)
        self.norm = nn.RMSNorm(n_dim)

    def forward(self, batch_size: int, num_channels: int) -> torch.Tensor:
        x = self.embedding.weight[:num_channels]  # (C, D)
        x = self.norm(x + self.aggregate_mlp(x))
        return x.unsqueeze(0).expand(batch_size, -1, -1)


def _split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    return rearrange(x, "B S (H Dh) -> B H S Dh", H=num_heads)


class BackwardSolution(nn.Module):
    """Sensors -> latents: queries (B', K, D) attend over keys (B', C, D) and values v(x) (B', C, D)."""

    def __init__(self, n_dim: int, n_head: int, dropout: float):
        super().__init__()
        self.n_head = n_head
        self.dropout = dropout
        self.v = nn.Linear(n_dim, n_dim)
        self.proj = nn.Linear(n_dim, n_dim)

    def forward(self, queries: torch.Tensor, keys: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (_split_heads(t, self.n_head) for t in (queries, keys, self.v(x)))
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(rearrange(out, "B H S Dh -> B S (H Dh)"))


class ForwardSolution(nn.Module):
    """Latents -> sensors: sensor embeddings (B', C, D) attend over latents (B', K, D)."""

    def __init__(self, n_dim: int, n_head: int, dropout: float):
        super().__init__()
        self.n_dim = n_dim
        self.n_head = n_head
        self.dropout = dropout
        self.kv = nn.Linear(n_dim, 2 * n_dim)
        self.proj = nn.Linear(n_dim, n_dim)

    def forward(self, sensor_embedding: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        k, v = self.kv(latents).split(self.n_dim, dim=-1)
        q, k, v = (_split_heads(t, self.n_head) for t in (sensor_embedding, k, v))
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(rearrange(out, "B H S Dh -> B S (H Dh)"))


def seanet_shape(config: BrainOmniConfig, channels: int) -> SEANetShape:
    return SEANetShape(channels=channels, dimension=config.n_dim, n_filters=config.n_filters, ratios=tuple(config.ratios),
                       kernel_size=config.kernel_size, last_kernel_size=config.last_kernel_size,
                       n_residual_layers=config.n_residual_layers, lstm_layers=config.lstm_layers)


class CausalBrainTokenizerEncoder(nn.Module):
    """windows (B, C, N, L) + sensor embeddings (B, C, D) -> latent tokens (B, n_neuro, N, Tk, D)."""

    def __init__(self, config: BrainOmniConfig):
        super().__init__()
        self.seanet_encoder = SEANetEncoder(seanet_shape(config, channels=1))
        self.neuros = nn.Parameter(torch.empty(config.n_neuro, config.n_dim))  # the latent channels' queries
        self.backwardsolution = BackwardSolution(config.n_dim, config.n_head, config.dropout)
        self.k_proj = nn.Linear(config.n_dim, config.n_dim)

    def reset_parameters(self) -> None:
        nn.init.normal_(self.neuros)  # unit scale, like the RMS-normalised sensor embeddings they meet

    def forward(self, x: torch.Tensor, sensor_embedding: torch.Tensor) -> torch.Tensor:
        B, C, N, L = x.shape
        features = self.seanet_encoder(rearrange(x, "B C N L -> (B C N) 1 L"))  # (B C N, D, Tk)
        Tk = features.shape[-1]
        features = rearrange(features, "(B C N) D Tk -> (B N Tk) C D", B=B, C=C, N=N)
        sensors = rearrange(sensor_embedding[:, None].expand(B, N * Tk, C, -1), "B W C D -> (B W) C D")
        keys = self.k_proj(features + sensors)
        queries = self.neuros[None].expand(features.shape[0], -1, -1).to(features.dtype)
        latents = self.backwardsolution(queries, keys, features)  # (B N Tk, K, D)
        return rearrange(latents, "(B N Tk) K D -> B K N Tk D", B=B, N=N)


class CausalBrainTokenizerDecoder(nn.Module):
    """latent tokens (B, n_neuro, N, Tk, D) + sensor embeddings (B, C, D) -> windows (B, C, N, L)."""

    def __init__(self, config: BrainOmniConfig):
        super().__init__()
        self.forwardsolution = ForwardSolution(config.n_dim, config.n_head, config.dropout)
        self.seanet_decoder = SEANetDecoder(seanet_shape(config, channels=1))

    def forward(self, latents: torch.Tensor, sensor_embedding: torch.Tensor) -> torch.Tensor:
        B, K, N, Tk, D = latents.shape
        C = sensor_embedding.shape[1]
        latents = rearrange(latents, "B K N Tk D -> (B N Tk) K D")
        sensors = rearrange(sensor_embedding[:, None].expand(B, N * Tk, C, D), "B W C D -> (B W) C D")
        per_sensor = self.forwardsolution(sensors, latents)  # (B N Tk, C, D)
        per_sensor = rearrange(per_sensor, "(B N Tk) C D -> (B C N) D Tk", B=B, N=N)
        return rearrange(self.seanet_decoder(per_sensor), "(B C N) 1 L -> B C N L", B=B, C=C)


class BrainOmniCausalTokenizerLoss(nn.Module):
    """BrainOmni's tokenizer objective, on windows (B, C, N, L) compared along L:

        loss = time_weight * L1 + pcc_weight * exp(-PCC) + quantizer_loss
               + amplitude_weight * L1(|FFT|) + phase_weight * L1(angle(FFT))

    PCC is the mean Pearson correlation of each channel's window with its reconstruction; the
    FFTs are of Hamming-windowed windows; quantizer_loss is the RVQ's weighted commitment loss.
    Returns the total and the detached parts under BrainOmni's metric names.
    """

    def __init__(self, time_loss_weight: float = 1.0, pcc_loss_weight: float = 1.0,
                 amplitude_loss_weight: float = 1.0, phase_loss_weight: float = 0.5):
        super().__init__()
        self.time_loss_weight = time_loss_weight
        self.pcc_loss_weight = pcc_loss_weight
        self.amplitude_loss_weight = amplitude_loss_weight
        self.phase_loss_weight = phase_loss_weight

    def forward(self, reconstruction: torch.Tensor, target: torch.Tensor,
                quantizer_loss: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        time_loss = l1_loss(reconstruction, target)
        pcc = pearson_correlation(reconstruction, target)
        amplitude_loss, phase_loss = frequency_domain_losses(reconstruction, target)
        loss = (self.time_loss_weight * time_loss + self.pcc_loss_weight * torch.exp(-pcc) + quantizer_loss
                + self.amplitude_loss_weight * amplitude_loss + self.phase_loss_weight * phase_loss)
        parts = {"l1": time_loss, "pcc": pcc, "amp": amplitude_loss, "phi": phase_loss, "commit": quantizer_loss}
        return loss, {name: value.detach() for name, value in parts.items()}


class BrainOmniCausalTokenizer(TokenizerModel):
    """forward(signal (B, C, T), pos (B, C, 3|6), sensor_type (B, C)) -> scalar loss; see the module docstring."""

    input_name = "signal"
    _no_split_modules = ["SEANetEncoder", "SEANetDecoder"]  # what FSDP shards one by one

    def __init__(self, config: BrainOmniConfig):
        super().__init__()
        self.config = config
        self.window_length = config.window_length
        self.hop_length = math.prod(config.ratios)
        self.tokens_per_window = config.window_length // self.hop_length
        self._check_variant_config(config)
        self.sensor_embed = self._build_sensor_embed(config)
        self.encoder = self._build_encoder(config)
        self.quantizer = ResidualVectorQuantizer(
            config.num_quantizers, self.token_dim, config.codebook_size, codebook_dim=config.codebook_dim,
            commitment_weight=config.commitment_weight, ema_decay=config.ema_decay,
            dead_code_threshold=config.dead_code_threshold, use_rotation_trick=config.rotation_trick,
        )
        self.decoder = self._build_decoder(config)
        self.loss_fn = BrainOmniCausalTokenizerLoss(config.time_loss_weight, config.pcc_loss_weight,
                                                    config.amplitude_loss_weight, config.phase_loss_weight)
        self.set_gradient_checkpointing(config.use_gradient_checkpointing)

    def compile_units(self) -> list[nn.Module]:
        """What engine.compile compiles: the encoder's and decoder's conv stacks. The quantizer stays
        eager: its EMA codebook updates and dead-code resets are data-dependent."""
        return [self.encoder, self.decoder]

    # ------------------------------------------------------------- variant hooks

    @property
    def token_dim(self) -> int:
        return self.config.n_dim

    def _check_variant_config(self, config: BrainOmniConfig) -> None:
        if config.n_dim % config.n_head != 0:
            raise ValueError(f"n_head ({config.n_head}) must divide n_dim ({config.n_dim})")

    def _build_sensor_embed(self, config: BrainOmniConfig) -> nn.Module | None:
        if config.sensor_space == "source":
            return BrainSensorModuleFixed(config.n_dim, config.num_sensors)
        return BrainSensorModule(config.n_dim, config.num_sensor_types)

    def _build_encoder(self, config: BrainOmniConfig) -> nn.Module:
        return CausalBrainTokenizerEncoder(config)

    def _build_decoder(self, config: BrainOmniConfig) -> nn.Module:
        return CausalBrainTokenizerDecoder(config)

    def sensor_embedding(self, pos: torch.Tensor | None, sensor_type: torch.Tensor | None,
                         batch_size: int, num_channels: int) -> torch.Tensor | None:
        """(B, C, n_dim) sensor embeddings for the encoder and decoder."""
        if self.config.sensor_space == "source":
            if num_channels > self.config.num_sensors:
                raise ValueError(f"signal has {num_channels} channels; 'source' space embeds at most num_sensors="
                                 f"{self.config.num_sensors}")
            return self.sensor_embed(batch_size, num_channels)
        if pos is None or sensor_type is None:
            raise ValueError("sensor_space 'sensor' needs pos (B, C, 3 or 6) and sensor_type (B, C)")
        if pos.shape[:2] != (batch_size, num_channels) or sensor_type.shape != (batch_size, num_channels):
            raise ValueError(f"pos {tuple(pos.shape)} and sensor_type {tuple(sensor_type.shape)} must start with "
                             f"(B, C) = {(batch_size, num_channels)}")
        if pos.shape[-1] not in (3, POS_DIM):
            raise ValueError(f"pos must hold 3 (position) or 6 (+ orientation) values per sensor, got {pos.shape[-1]}")
        if pos.shape[-1] == 3:
            pos = F.pad(pos, (0, POS_DIM - 3))
        sensor_type = sensor_type.long()
        if not sensor_type.is_meta and sensor_type.numel():  # an out-of-range id is a device assert on GPUs
            low, high = int(sensor_type.min()), int(sensor_type.max())
            if low < 0 or high >= self.config.num_sensor_types:
                raise ValueError(f"sensor_type ids must be in [0, num_sensor_types={self.config.num_sensor_types}), got {low}..{high}")
        return self.sensor_embed(pos.float(), sensor_type)

    # ------------------------------------------------------------- shared steps
    @torch.no_grad()
    def init_weights(self) -> None:
        """Torch's defaults for convs, LSTMs and embeddings; linear layers N(0, 1/fan_in), zero bias.

        BrainOmni draws linear weights with std 0.02, which is 1/sqrt(fan_in) at a width of 2500;
        at the widths of the debug and small flavors it shrinks the latents about 100x (std ~5e-4)
        and the model stalls for many steps, so the width-aware scale is used instead.
        """
        super().init_weights()
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=module.in_features**-0.5)
                nn.init.zeros_(module.bias)

    def _windows(self, signal: torch.Tensor, allow_shorter_windows: bool) -> torch.Tensor:
        """(B, C, T) -> (B, C, N, L). T must be a multiple of window_length; with allow_shorter_windows
        a shorter signal is one window (its length a multiple of prod(ratios))."""
        if signal.dim() != 3:
            raise ValueError(f"signal must be (B, C, T), got shape {tuple(signal.shape)}")
        T = signal.shape[-1]
        if T < self.window_length and allow_shorter_windows:
            if T == 0 or T % self.hop_length != 0:
                raise ValueError(f"a short signal must be a non-zero multiple of prod(ratios)={self.hop_length}, got T={T}")
            return signal.unsqueeze(2)
        if T == 0 or T % self.window_length != 0:
            raise ValueError(f"signal length {T} must be a non-zero multiple of window_length={self.window_length}")
        return rearrange(signal, "B C (N L) -> B C N L", L=self.window_length)

    def _encode(self, signal, pos, sensor_type, allow_shorter_windows: bool, is_training_step: bool = False):
        windows = self._windows(signal.float(), allow_shorter_windows)  # (B, C, N, L)
        B, C = windows.shape[:2]
        sensor_embedding = self.sensor_embedding(pos, sensor_type, B, C)
        encoder_input = windows
        if is_training_step and self.config.shuffle_channels:
            permutation = torch.randperm(C, device=windows.device)
            windows, encoder_input = windows[:, permutation], encoder_input[:, permutation]
            if sensor_embedding is not None:
                sensor_embedding = sensor_embedding[:, permutation]
        if is_training_step and self.config.noise_std > 0:
            encoder_input = encoder_input + self.config.noise_std * torch.randn_like(encoder_input)
        latents = self.encoder(encoder_input, sensor_embedding)  # (B, K, N, Tk, D)
        if self.config.normalize:
            latents = F.normalize(latents, dim=-1)
        return windows, sensor_embedding, latents

    @staticmethod
    def normalize_target(windows: torch.Tensor) -> torch.Tensor:
        """z-score each channel's window along time."""
        windows = windows - windows.mean(dim=-1, keepdim=True)
        return windows / (windows.std(dim=-1, keepdim=True) + 1e-6)

    def forward(self, signal: torch.Tensor, pos: torch.Tensor | None = None, sensor_type: torch.Tensor | None = None,
                allow_shorter_windows: bool = False) -> torch.Tensor:
        """signal (B, C, T) float, pos (B, C, 3|6), sensor_type (B, C) int -> scalar training loss.

        The loss parts and codebook statistics of this call are left in `last_metrics`.
        """
        windows, sensor_embedding, latents = self._encode(signal, pos, sensor_type, allow_shorter_windows,
                                                          is_training_step=self.training)
        quantized = self.quantizer(latents)
        reconstruction = self.decoder(quantized.quantized, sensor_embedding).float()  # (B, C, N, L)
        target = self.normalize_target(windows) if self.config.normalize else windows
        loss, parts = self.loss_fn(reconstruction, target, quantized.loss)
        self.last_metrics = {**parts, "ppl": quantized.perplexity, "codebook_utilization": quantized.utilization.detach()}
        self.keep_parts(parts, signal.shape[0])
        return loss

    def tokenize(self, signal: torch.Tensor, pos: torch.Tensor | None = None, sensor_type: torch.Tensor | None = None,
                 allow_shorter_windows: bool = False) -> CausalTokenSequence:
        """signal (B, C, T) -> tokens; no codebook update, no noise. Gradients reach the signal
        through the embeddings (straight-through / rotation trick) when grad mode is on."""
        _, _, latents = self._encode(signal, pos, sensor_type, allow_shorter_windows)
        quantized = self.quantizer(latents, update=False)
        return CausalTokenSequence(
            embeddings=rearrange(quantized.quantized, "B K N Tk D -> B K (N Tk) D"),
            indices=rearrange(quantized.indices, "B K N Tk Q -> B K (N Tk) Q"),
            tokens_per_window=latents.shape[3],
            num_windows=latents.shape[2],
        )

    def decode(self, tokens: CausalTokenSequence | torch.Tensor, pos: torch.Tensor | None = None,
               sensor_type: torch.Tensor | None = None, num_channels: int | None = None,
               tokens_per_window: int | None = None) -> torch.Tensor:
        """Tokens -> signal (B, C, W * prod(ratios)) float32.

        tokens: a CausalTokenSequence (its embeddings are decoded) or indices (B, n_neuro, W, q)
        with q <= num_quantizers levels (the first q levels are summed). W need not fill the last
        window: the decoder is causal, so the window is completed by repeating the last token and
        the output is cut after W tokens, which leaves the decoded samples unchanged. The output
        channels C come from pos/sensor_type (or num_channels in 'source' space; num_sensors for
        BrainTokMix).
        """
        if isinstance(tokens, CausalTokenSequence):
            tokens_per_window = tokens.tokens_per_window
            embeddings = tokens.embeddings  # (B, K, W, D)
        else:
            embeddings = self.quantizer.decode(tokens)  # (B, K, W, D)
        tokens_per_window = tokens_per_window or self.tokens_per_window
        B, _, W, _ = embeddings.shape
        num_windows = -(-W // tokens_per_window)
        num_missing = num_windows * tokens_per_window - W
        if num_missing:
            embeddings = torch.cat([embeddings, embeddings[:, :, -1:].expand(-1, -1, num_missing, -1)], dim=2)
        latents = rearrange(embeddings, "B K (N Tk) D -> B K N Tk D", Tk=tokens_per_window)
        if num_channels is None:
            num_channels = pos.shape[1] if pos is not None else self.config.num_sensors
        sensor_embedding = self.sensor_embedding(pos, sensor_type, B, num_channels)
        windows = self.decoder(latents, sensor_embedding)  # (B, C, N, L)
        return rearrange(windows, "B C N L -> B C (N L)")[..., : W * self.hop_length].float()

    def example_inputs(self, batch_size: int = 1, device: torch.device | str = "meta") -> dict[str, torch.Tensor]:
        C, T = self.config.num_sensors, self.window_length
        return {
            "signal": torch.randn(batch_size, C, T, device=device),
            "pos": torch.randn(batch_size, C, POS_DIM, device=device),
            "sensor_type": torch.zeros(batch_size, C, dtype=torch.long, device=device),
        }


class CausalSEANetChannelMixEncoder(nn.Module):
    """windows (B, num_sensors, N, L) -> tokens (B, n_neuro, N, Tk, n_dim / n_neuro): one SEANet over all channels."""

    def __init__(self, config: BrainOmniConfig):
        super().__init__()
        self.num_sensors = config.num_sensors
        self.n_neuro = config.n_neuro
        self.seanet_encoder = SEANetEncoder(seanet_shape(config, channels=config.num_sensors))

    def forward(self, x: torch.Tensor, sensor_embedding: torch.Tensor | None = None) -> torch.Tensor:
        B, C, N, L = x.shape
        if C != self.num_sensors:
            raise ValueError(f"BrainTokMix expects num_sensors={self.num_sensors} input channels, got {C}")
        features = self.seanet_encoder(rearrange(x, "B C N L -> (B N) C L"))  # (B N, n_dim, Tk)
        return rearrange(features, "(B N) (K d) Tk -> B K N Tk d", B=B, K=self.n_neuro)


class CausalSEANetChannelMixDecoder(nn.Module):
    """tokens (B, n_neuro, N, Tk, d) -> windows (B, num_sensors, N, L)."""

    def __init__(self, config: BrainOmniConfig):
        super().__init__()
        self.n_neuro = config.n_neuro
        self.seanet_decoder = SEANetDecoder(seanet_shape(config, channels=config.num_sensors))

    def forward(self, latents: torch.Tensor, sensor_embedding: torch.Tensor | None = None) -> torch.Tensor:
        B, K, N, Tk, d = latents.shape
        if K != self.n_neuro:
            raise ValueError(f"expected {self.n_neuro} latent channels, got {K}")
        windows = self.seanet_decoder(rearrange(latents, "B K N Tk d -> (B N) (K d) Tk"))
        return rearrange(windows, "(B N) C L -> B C N L", B=B)


class BrainOmniCausalTokenizerSEANetChannelMix(BrainOmniCausalTokenizer):
    """BrainTokMix: channel-mixing SEANet, latent split into n_neuro spatial tokens; pos and sensor_type unused."""

    @property
    def token_dim(self) -> int:
        return self.config.n_dim // self.config.n_neuro

    def _check_variant_config(self, config: BrainOmniConfig) -> None:
        if config.n_dim % config.n_neuro != 0:
            raise ValueError(f"n_dim ({config.n_dim}) must be divisible by n_neuro ({config.n_neuro})")

    def _build_sensor_embed(self, config: BrainOmniConfig) -> nn.Module | None:
        return None

    def _build_encoder(self, config: BrainOmniConfig) -> nn.Module:
        return CausalSEANetChannelMixEncoder(config)

    def _build_decoder(self, config: BrainOmniConfig) -> nn.Module:
        return CausalSEANetChannelMixDecoder(config)

    def sensor_embedding(self, pos, sensor_type, batch_size: int, num_channels: int) -> None:
        return None


_COMMON = dict(kernel_size=5, last_kernel_size=5, n_residual_layers=1, sensor_space="sensor")
BRAINOMNI_FLAVORS = {
    # Seconds on a CPU: 8 channels, 2 windows of 32 samples -> 8 tokens per window.
    "debug": dict(_COMMON, window_length=32, ratios=[2, 2], n_filters=8, n_dim=16, n_neuro=3, n_head=2,
                  codebook_size=32, codebook_dim=16, num_quantizers=2, lstm_layers=1, num_sensors=8),
    "small": dict(_COMMON, window_length=256, ratios=[2, 2, 2], n_filters=16, n_dim=128, n_neuro=8, n_head=4,
                  codebook_size=1024, codebook_dim=128, num_quantizers=4, num_sensors=68),
    # brain-gen configs/brainomni/cross_dataset/tokenizer10s.yaml (1024-sample windows, 128 tokens each).
    "full": dict(_COMMON, window_length=1024, ratios=[2, 2, 2], n_filters=128, n_dim=1024, n_neuro=8, n_head=8,
                 codebook_size=16384, codebook_dim=1024, num_quantizers=4, num_sensors=68),
}
BRAINTOKMIX_FLAVORS = {
    "debug": dict(_COMMON, window_length=32, ratios=[2, 2], n_filters=8, n_dim=16, n_neuro=2, n_head=1,
                  codebook_size=32, codebook_dim=8, num_quantizers=2, lstm_layers=1, num_sensors=8),
    "small": dict(_COMMON, window_length=256, ratios=[2, 2, 2], n_filters=64, n_dim=256, n_neuro=4, n_head=1,
                  codebook_size=1024, codebook_dim=64, num_quantizers=4, num_sensors=68),
    # The BrainOmni full flavor's SEANet over all 68 channels at once, 4 spatial tokens of 256 dims.
    "full": dict(_COMMON, window_length=1024, ratios=[2, 2, 2], n_filters=128, n_dim=1024, n_neuro=4, n_head=1,
                 codebook_size=16384, codebook_dim=256, num_quantizers=4, num_sensors=68),
}

register_model(ModelSpec(name="BrainOmniCausalTokenizer", config_cls=BrainOmniConfig, builder=BrainOmniCausalTokenizer,
                         flavors=BRAINOMNI_FLAVORS, task="signal_reconstruction"))
register_model(ModelSpec(name="BrainOmniCausalTokenizerSEANetChannelMix", config_cls=BrainOmniConfig,
                         builder=BrainOmniCausalTokenizerSEANetChannelMix, flavors=BRAINTOKMIX_FLAVORS,
                         task="signal_reconstruction"))
