"""BrainOmniCausalForecast: an autoregressive forecaster over BrainOmni RVQ tokens (brain-gen seed 004).

A sample is a grid of codes (B, C, W, Q): C latent channels of a BrainOmni tokenizer (its n_neuro),
W tokens in time, Q RVQ levels. The model predicts the codes at time w + 1 from everything at times <= w:

1. Embed: the tokenizer's frozen RVQ turns the first Qu codes of each site into its quantised token
   vector (B, C, W, D), D = the token width; a per-channel vector is added (BrainOmni's latent queries
   `encoder.neuros`, frozen; BrainTokMix tokens have none, so a learned per-channel embedding there),
   then a linear map to lm_dim (none when D == lm_dim).
2. lm_depth SpatialTemporalBlocks. Each splits the normalised width in two halves: one attends over
   the C channels of each time step (non-causal, rotary positions = channel index), the other over
   time within each channel (causal, rotary positions = time). As brain-gen's block, the channel
   attention's output is added to the first half of the residual stream and the time attention's to
   the second, so the halves swap roles from block to block. Then an RMSNorm'd SELU feed-forward.
   The RMSNorms (modeling/layers/transformer.py) have no gains: each feeds a linear layer, which absorbs one.
3. A final RMSNorm and one linear head -> logits (B, C, W, Qu, K) for the Qu predicted levels.

Only the time attention crosses time steps, and it is causal: logits at time w see inputs at times
<= w (any channel). `forecast` rolls the grid forward one time step (all channels, all predicted
levels) at a time; with a KV cache of the time attention each step costs one position.

The frozen codebooks (and BrainOmni's neuros) are part of this model's state_dict, so a checkpoint
is self-contained; `tokenizer_path` names the tokenizer checkpoint init_weights copies them from.

Shapes: B batch, C channels, W time steps, Q RVQ levels in the data, Qu levels predicted, K codes
per level (vocab_size), D token width, d = lm_dim, H = lm_head (H / 2 heads per half), Dh = d / H.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from modeling.layers.transformer import KVCache
from modeling.layers.transformer import RMSNorm, RotaryEmbedding, apply_rotary, sample_tokens
from modeling.tokenizers.quantizers import ResidualVectorQuantizer
from modeling.registry import ModelSpec, build_model, model_config, register_model

WEIGHTS_FILE = "model.safetensors"  # what a tokenizer checkpoint folder (or export) holds
TOKENIZER_NAMES = ("BrainOmniCausalTokenizer", "BrainOmniCausalTokenizerSEANetChannelMix")
NEUROS_KEY = "encoder.neuros"  # BrainOmni's latent queries in a tokenizer state_dict


@dataclass(frozen=True, kw_only=True)
class BrainOmniForecastConfig:
    lm_dim: int = field(metadata={"help": "width of the forecaster (d); each block gives half to channel, half to time attention"})
    lm_head: int = field(metadata={"help": "attention heads per block, split evenly between the halves; head_dim = lm_dim / lm_head"})
    lm_depth: int = field(metadata={"help": "number of spatial-temporal blocks"})
    lm_dropout: float = field(default=0.0, metadata={"help": "dropout on attention weights and feed-forward outputs in training"})
    vocab_size: int = field(metadata={"help": "codes per RVQ level (K); the trainer sets it from the token manifest"})
    num_quantizers: int = field(metadata={"help": "RVQ levels in the data (Q); the trainer sets it from the token manifest"})
    num_quantizers_used: int | None = field(
        default=None, metadata={"help": "RVQ levels embedded and predicted (the first ones); empty: all"})
    num_channels: int = field(metadata={"help": "latent channels per time step (C, the tokenizer's n_neuro); set by the trainer"})
    sequence_len: int = field(
        metadata={"help": "max time steps (W) per channel the model sees at once (rotary table size); set by the trainer"})
    tokenizer_name: str = field(default="BrainOmniCausalTokenizer", metadata={
        "help": "registry name of the tokenizer that made the codes: BrainOmniCausalTokenizer or "
                "BrainOmniCausalTokenizerSEANetChannelMix"})
    tokenizer_flavor: str = field(default="debug", metadata={"help": "the tokenizer's flavor (from the token manifest's provenance)"})
    tokenizer_args: dict = field(
        default_factory=dict, metadata={"help": "the tokenizer's config overrides (from the token manifest's provenance)"})
    tokenizer_path: str | None = field(default="", metadata={
        "help": "tokenizer checkpoint folder (or its model.safetensors) whose codebooks init_weights loads and freezes; "
                "null: random frozen codebooks (set by loaders of a whole checkpoint of this model)"})
    use_gradient_checkpointing: bool = field(
        default=False, metadata={"help": "recompute each block in the backward pass to save activation memory"})

    def __post_init__(self):
        for name in ("lm_dim", "lm_head", "lm_depth", "vocab_size", "num_quantizers", "num_channels", "sequence_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lm_head % 2 != 0:
            raise ValueError(f"lm_head must be even (half the heads attend over channels, half over time), got {self.lm_head}")
        if self.lm_dim % self.lm_head != 0 or self.head_dim % 2 != 0:
            raise ValueError(f"lm_dim ({self.lm_dim}) must be lm_head ({self.lm_head}) times an even head_dim (rotary pairs)")
        if not 0.0 <= self.lm_dropout < 1.0:
            raise ValueError(f"lm_dropout must be in [0, 1), got {self.lm_dropout}")
        if self.num_quantizers_used is not None and not 1 <= self.num_quantizers_used <= self.num_quantizers:
            raise ValueError(f"num_quantizers_used must be in [1, num_quantizers={self.num_quantizers}] or empty, "
                             f"got {self.num_quantizers_used}")
        if self.tokenizer_name not in TOKENIZER_NAMES:
            raise ValueError(f"tokenizer_name must be one of {TOKENIZER_NAMES}, got {self.tokenizer_name!r}")
        tokenizer = self.tokenizer_config()
        for name, tokenizer_name, value in (("vocab_size", "codebook_size", tokenizer.codebook_size),
                                            ("num_quantizers", "num_quantizers", tokenizer.num_quantizers),
                                            ("num_channels", "n_neuro", tokenizer.n_neuro)):
            if getattr(self, name) != value:
                raise ValueError(f"{name} ({getattr(self, name)}) does not match the tokenizer's {tokenizer_name} ({value}) "
                                 f"({self.tokenizer_name}, flavor {self.tokenizer_flavor!r}, tokenizer_args {self.tokenizer_args})")

    def tokenizer_config(self):
        """The tokenizer's BrainOmniConfig; a bad flavor or argument is a ValueError naming tokenizer_*."""
        try:
            return model_config(self.tokenizer_name, self.tokenizer_flavor, self.tokenizer_args)
        except ValueError as error:
            raise ValueError(f"tokenizer_flavor / tokenizer_args: {error}") from None

    @property
    def head_dim(self) -> int:
        return self.lm_dim // self.lm_head

    @property
    def num_levels_predicted(self) -> int:
        return self.num_quantizers if self.num_quantizers_used is None else self.num_quantizers_used


# ----------------------------------------------------------------------------- layers


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_cached: int, dropout_p: float) -> torch.Tensor:
    """q (N, H, T, Dh) at positions num_cached .. num_cached + T - 1; k, v (N, H, S, Dh) at 0 .. S - 1."""
    T = q.size(2)
    if num_cached == 0:  # training, or a prefill into an empty cache
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p)
    if T == 1:  # one new step sees every cached one
        return F.scaled_dot_product_attention(q, k, v)
    # a chunk on top of a cache: is_causal would align the mask top-left, which is wrong when S > T
    query_pos = num_cached + torch.arange(T, device=q.device)
    key_pos = torch.arange(k.size(2), device=q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=key_pos[None, :] <= query_pos[:, None])


class RotarySelfAttention(nn.Module):
    """Multi-head self-attention with rotary positions over (N, T, dim) sequences, qkv and output biases.

    Causal ones (time) can extend a KVCache (layer `layer_idx`); the others (channels) see all T.
    """

    def __init__(self, dim: int, num_heads: int, dropout: float, is_causal: bool, layer_idx: int = 0):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.dropout = dropout
        self.is_causal = is_causal
        self.layer_idx = layer_idx
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_cache: KVCache | None = None) -> torch.Tensor:
        N, T, dim = x.shape
        q, k, v = self.qkv(x).view(N, T, 3, self.num_heads, self.head_dim).unbind(dim=2)  # (N, T, H, Dh) each
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (N, H, T, Dh)
        dropout_p = self.dropout if self.training else 0.0
        if not self.is_causal:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
        else:
            num_cached = 0
            if kv_cache is not None:
                num_cached = kv_cache.pos
                k, v = kv_cache.insert(self.layer_idx, k, v)  # (N, H, num_cached + T, Dh)
                k, v = k.to(q.dtype), v.to(q.dtype)  # the cache may be kept in another precision (autocast)
            y = causal_attention(q, k, v, num_cached, dropout_p)
        return self.proj(y.transpose(1, 2).reshape(N, T, dim))


class SELUFeedForward(nn.Module):
    """dim -> 4 dim -> SELU -> dim, dropout on the output (brain-gen's BrainOmni feed-forward)."""

    def __init__(self, dim: int, dropout: float):
        super().__init__()
        self.fc = nn.Linear(dim, 4 * dim)
        self.proj = nn.Linear(4 * dim, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(F.selu(self.fc(x))))


class SpatialTemporalBlock(nn.Module):
    """(B, C, W, d) -> (B, C, W, d): channel attention on one half of the width, causal time attention
    on the other, then a feed-forward over the whole width; pre-norm residuals."""

    def __init__(self, config: BrainOmniForecastConfig, layer_idx: int):
        super().__init__()
        half, num_heads = config.lm_dim // 2, config.lm_head // 2
        self.attn_norm = RMSNorm()
        self.time_attn = RotarySelfAttention(half, num_heads, config.lm_dropout, is_causal=True, layer_idx=layer_idx)
        self.channel_attn = RotarySelfAttention(half, num_heads, config.lm_dropout, is_causal=False)
        self.mlp_norm = RMSNorm()
        self.mlp = SELUFeedForward(config.lm_dim, config.lm_dropout)

    def forward(self, x: torch.Tensor, time_rope: tuple[torch.Tensor, torch.Tensor],
                channel_rope: tuple[torch.Tensor, torch.Tensor], kv_cache: KVCache | None = None) -> torch.Tensor:
        B, C, W, d = x.shape
        h = self.attn_norm(x)
        h_time = h[..., : d // 2].reshape(B * C, W, d // 2)  # each channel's sequence over time
        h_channel = h[..., d // 2 :].transpose(1, 2).reshape(B * W, C, d // 2)  # each time step's channels
        y_time = self.time_attn(h_time, *time_rope, kv_cache).view(B, C, W, d // 2)
        y_channel = self.channel_attn(h_channel, *channel_rope).view(B, W, C, d // 2).transpose(1, 2)
        x = x + torch.cat([y_channel, y_time], dim=-1)  # brain-gen's layout: the halves swap roles each block
        return x + self.mlp(self.mlp_norm(x))


# ----------------------------------------------------------------------------- tokenizer parts


def decode_only(quantizer: ResidualVectorQuantizer) -> ResidualVectorQuantizer:
    """Strip a tokenizer's RVQ to what `decode` reads: each level's codebook and project_out.

    The EMA statistics and project_in serve the tokenizer's own training and encoding; at full size
    the EMA sums alone are as large as the codebooks, in memory and in every checkpoint.
    """
    for layer in quantizer.layers:
        del layer.ema_cluster_size, layer.ema_embed_sum
        layer.project_in = nn.Identity()
    return quantizer


def load_tokenizer_weights(model: BrainOmniCausalForecast, path: str) -> None:
    """Copy the RVQ codebooks (and BrainOmni's encoder.neuros) from a tokenizer checkpoint at `path`
    (a folder holding model.safetensors, or the file). ValueError naming the path when the file is
    missing, unreadable or of another architecture."""
    from safetensors.torch import load_file

    file = Path(path)
    if file.is_dir():
        file = file / WEIGHTS_FILE
    if not file.is_file():
        hint = " (a checkpoint of a sharded engine? `tokfleet export` it first)" if Path(path).is_dir() else ""
        raise ValueError(f"model.args.tokenizer_path {path}: no tokenizer weights there: expected a {model.config.tokenizer_name} "
                         f"checkpoint folder holding {WEIGHTS_FILE}, or the file itself{hint}")
    try:
        tensors = load_file(file, device=str(model.channel_embedding.device))
    except Exception as error:  # a torn or foreign file: name it
        raise ValueError(f"model.args.tokenizer_path {file}: unreadable: {str(error).splitlines()[0]}") from None
    expected = {f"quantizer.{key}": value for key, value in model.quantizer.state_dict().items()}
    if model.has_neuros:
        expected[NEUROS_KEY] = model.channel_embedding
    missing = sorted(set(expected) - set(tensors))
    wrong = [f"{key} {tuple(tensors[key].shape)} (model: {tuple(value.shape)})" for key, value in expected.items()
             if key in tensors and tensors[key].shape != value.shape]
    if missing or wrong:
        raise ValueError(f"model.args.tokenizer_path {file}: not a {model.config.tokenizer_name} of this architecture "
                         f"(missing {missing[:3]}, wrong shapes {wrong[:3]}): set tokenizer_flavor / tokenizer_args to "
                         f"the tokenizer's")
    model.quantizer.load_state_dict({key.removeprefix("quantizer."): tensors[key] for key in expected if key != NEUROS_KEY})
    if model.has_neuros:
        model.channel_embedding.copy_(tensors[NEUROS_KEY])


# ----------------------------------------------------------------------------- model


class BrainOmniCausalForecast(nn.Module):
    """Codes (B, C, W, Q) -> next-step logits (B, C, W, Qu, K); see the module docstring."""

    _no_split_modules = ["SpatialTemporalBlock"]  # the unit engines shard or wrap one by one (FSDP)
    time_axis = 2  # the axis of idx the trainer shifts by one for the targets

    def __init__(self, config: BrainOmniForecastConfig):
        super().__init__()
        self.config = config
        tokenizer = build_model(config.tokenizer_name, config.tokenizer_flavor, config.tokenizer_args, device="meta")
        self.token_dim = tokenizer.token_dim  # D
        # frozen: no gradients, and kept out of the optimizer; in state_dict so checkpoints are whole
        self.quantizer = decode_only(tokenizer.quantizer).requires_grad_(False)
        self.has_neuros = hasattr(tokenizer.encoder, "neuros")
        if self.has_neuros:  # BrainOmni: the latent channels' queries, frozen
            self.register_buffer("channel_embedding", torch.empty_like(tokenizer.encoder.neuros.detach()))
        else:  # BrainTokMix: its spatial tokens carry no channel vector; learn one
            self.channel_embedding = nn.Parameter(torch.empty(config.num_channels, self.token_dim))
        del tokenizer  # the encoder and decoder are not part of this model
        self.projection = nn.Linear(self.token_dim, config.lm_dim) if self.token_dim != config.lm_dim else nn.Identity()
        self.blocks = nn.ModuleList(SpatialTemporalBlock(config, layer_idx) for layer_idx in range(config.lm_depth))
        self.final_norm = RMSNorm()
        self.head = nn.Linear(config.lm_dim, config.num_levels_predicted * config.vocab_size)
        self.time_rotary = RotaryEmbedding(config.head_dim, config.sequence_len)
        self.channel_rotary = RotaryEmbedding(config.head_dim, config.num_channels)
        self.use_gradient_checkpointing = config.use_gradient_checkpointing

    def train(self, mode: bool = True) -> BrainOmniCausalForecast:
        super().train(mode)
        self.quantizer.eval()  # frozen: always in inference mode, whatever the engine asks
        return self

    # --------------------------------------------------------------- weights

    @torch.no_grad()
    def init_weights(self) -> None:
        """nanochat's init for the forecaster (zero output projections and head: loss ln K at init);
        the codebooks from config.tokenizer_path (random when it is None), frozen."""
        for module in [self.projection, *self.blocks, self.head]:
            for linear in module.modules():
                if isinstance(linear, nn.Linear):
                    # std 1/sqrt(fan_in), shrunk for layers that narrow (https://arxiv.org/abs/2310.17813)
                    fan_out, fan_in = linear.weight.shape
                    nn.init.normal_(linear.weight, std=fan_in**-0.5 * min(1.0, math.sqrt(fan_out / fan_in)))
                    nn.init.zeros_(linear.bias)
        for block in self.blocks:
            for output in (block.time_attn.proj, block.channel_attn.proj, block.mlp.proj):
                nn.init.zeros_(output.weight)  # every block starts as the identity
        nn.init.zeros_(self.head.weight)  # uniform first prediction
        self.time_rotary.reset_buffers()
        self.channel_rotary.reset_buffers()

        path = self.config.tokenizer_path
        if path == "":
            raise ValueError(f"model.args.tokenizer_path is not set: BrainOmniCausalForecast embeds codes with the frozen "
                             f"codebooks of the {self.config.tokenizer_name} that made them; name its checkpoint folder "
                             f"(holding {WEIGHTS_FILE})")
        # random codebooks (and neuros) when there is no file: what the tokenizer starts from
        for layer in self.quantizer.layers:
            nn.init.normal_(layer.codebook)
            if isinstance(layer.project_out, nn.Linear):
                layer.project_out.reset_parameters()
        if self.has_neuros:
            nn.init.normal_(self.channel_embedding)
        else:
            nn.init.normal_(self.channel_embedding, std=0.02)  # a learned position embedding
        if path is not None:
            load_tokenizer_weights(self, path)
        self.quantizer.requires_grad_(False)

    def compile_units(self) -> list[nn.Module]:
        """The blocks engine.compile compiles one by one (the frozen codebooks are lookups)."""
        return list(self.blocks)

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        self.use_gradient_checkpointing = enabled

    def num_params(self, include_embedding: bool = True) -> int:
        """Parameters (trainable and frozen), plus the frozen codebooks, which are buffers, unless
        include_embedding is False: then only the trainable ones (projection, blocks, head, and
        BrainTokMix's channel embedding)."""
        if not include_embedding:
            return sum(p.numel() for p in self.parameters() if p.requires_grad)
        num_codebook = sum(layer.codebook.numel() for layer in self.quantizer.layers)
        num_neuros = self.channel_embedding.numel() if self.has_neuros else 0
        return sum(p.numel() for p in self.parameters()) + num_codebook + num_neuros

    def num_flops_per_token(self) -> int:
        """Training FLOPs per position, i.e. per (channel, time step) site; a time step of all channels
        is num_channels times this.

        6 x the matmul weights a site goes through (projection, blocks, head: forward + both gradients),
        less the input gradient of the projection, whose input (frozen codebook vectors + frozen neuros)
        needs none; 2 x the frozen codebook output projections (forward only); attention as gpt.py:
        QK^T and AV at 2 flops x keys x width, x3 for forward + backward, over the full sequence_len
        (time half) or num_channels (channel half) keys, causal masking not discounted.
        """
        config = self.config
        num_trainable = sum(module.weight.numel() for module in [self.projection, *self.blocks.modules(), self.head]
                            if isinstance(module, nn.Linear))
        flops = 6 * num_trainable
        if isinstance(self.projection, nn.Linear) and not self.channel_embedding.requires_grad:
            flops -= 2 * self.projection.weight.numel()
        for layer in self.quantizer.layers[: config.num_levels_predicted]:
            if isinstance(layer.project_out, nn.Linear):
                flops += 2 * layer.project_out.weight.numel()
        half = config.lm_dim // 2
        flops += 12 * config.lm_depth * half * (config.sequence_len + config.num_channels)
        return flops

    # --------------------------------------------------------------- forward

    def make_kv_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        """An empty cache of the time attention for batch_size samples (all their channels), up to
        max_len (default sequence_len) time steps, on the model's device."""
        weight = self.head.weight
        device_type = weight.device.type
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else weight.dtype
        config = self.config
        return KVCache(num_layers=config.lm_depth, batch_size=batch_size * config.num_channels,
                       num_kv_heads=config.lm_head // 2, max_len=config.sequence_len if max_len is None else max_len,
                       head_dim=config.head_dim, device=weight.device, dtype=dtype)

    def embed(self, idx: torch.Tensor) -> torch.Tensor:
        """Codes (B, C, W, q >= Qu) -> the frozen RVQ's token vectors of their first Qu levels (B, C, W, D)."""
        config = self.config
        num_levels = idx.size(-1)
        if idx.dim() != 4 or idx.size(1) != config.num_channels or not config.num_levels_predicted <= num_levels <= config.num_quantizers:
            raise ValueError(f"idx must be (B, C={config.num_channels}, W, q) codes with {config.num_levels_predicted} <= q <= "
                             f"{config.num_quantizers} RVQ levels, got {tuple(idx.shape)}")
        return self.quantizer.decode(idx[..., : config.num_levels_predicted])

    def logits_from_embeddings(self, embeddings: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Token vectors (B, C, W, D) -> logits (B, C, W, Qu, K). With a cache, they continue the time
        steps the cache holds (at cache.pos .. cache.pos + W - 1) and are added to it."""
        B, C, W, _ = embeddings.shape
        start = 0
        if cache is not None:
            start = cache.pos
            if cache.batch_size != B * C or start + W > cache.max_len:
                raise ValueError(f"KV cache holds {cache.batch_size} rows x {cache.max_len} steps; got {B} x {C} rows and "
                                 f"steps {start}..{start + W - 1}")
        time_rope = self.time_rotary(start, W)  # raises past sequence_len
        channel_rope = self.channel_rotary(0, C)
        channel = self.channel_embedding[None, :, None, :].to(embeddings.dtype)  # (1, C, 1, D)
        x = self.projection(embeddings + channel)  # (B, C, W, d)
        is_checkpointing = self.use_gradient_checkpointing and self.training and torch.is_grad_enabled() and cache is None
        for block in self.blocks:
            if is_checkpointing:
                x = checkpoint(block, x, time_rope, channel_rope, use_reentrant=False)
            else:
                x = block(x, time_rope, channel_rope, cache)
        if cache is not None:
            cache.advance(W)
        logits = self.head(self.final_norm(x))  # (B, C, W, Qu K)
        return logits.view(B, C, W, self.config.num_levels_predicted, self.config.vocab_size)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache: KVCache | None = None) -> torch.Tensor:
        """idx (B, C, W, q) int64 codes -> logits (B, C, W, Qu, K) of the codes at time w + 1, or the mean
        cross-entropy against targets (B, C, W, q' >= Qu: the first Qu levels are scored, -1 ignored)."""
        logits = self.logits_from_embeddings(self.embed(idx), cache)
        if targets is None:
            return logits
        Qu = self.config.num_levels_predicted
        if targets.shape[:3] != logits.shape[:3] or targets.size(3) < Qu:
            raise ValueError(f"targets must be (B, C, W, >= {Qu}) like idx {tuple(idx.shape)}, got {tuple(targets.shape)}")
        # fp32 for the softmax: bf16 logits lose too much precision over a large codebook
        return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets[..., :Qu].reshape(-1), ignore_index=-1)

    # --------------------------------------------------------------- forecast

    @torch.inference_mode()
    def forecast(self, idx: torch.Tensor, num_steps: int, *, temperature: float = 1.0, top_k: int | None = None,
                 generator: torch.Generator | None = None, use_cache: bool = True, shift_fraction: float = 0.5) -> torch.Tensor:
        """Roll codes idx (B, C, W, q) forward by num_steps time steps -> (B, C, W + num_steps, q).

        One time step (every channel, every predicted level) at a time: temperature 0 is greedy, top_k
        keeps the k likeliest codes of each. With use_cache the window is prefilled once and each new
        step runs alone on the KV cache of the time attention. A window longer than sequence_len drops
        its oldest shift_fraction of sequence_len steps and is prefilled again (as FlatGPT's generate).
        Levels not predicted (num_quantizers_used < q) repeat the last code idx holds for them.
        """
        config = self.config
        if num_steps < 0 or temperature < 0 or (top_k is not None and top_k < 1) or not 0.0 < shift_fraction <= 1.0:
            raise ValueError(f"need num_steps >= 0, temperature >= 0, top_k >= 1 or None, 0 < shift_fraction <= 1; got "
                             f"{num_steps}, {temperature}, {top_k}, {shift_fraction}")
        self.embed(idx[:, :, :0])  # checks the shape
        if idx.size(2) == 0:
            raise ValueError("forecast needs a context of at least one time step")
        B, C, W, num_levels = idx.shape
        Qu = config.num_levels_predicted
        max_steps = config.sequence_len
        shift = max(1, round(shift_fraction * max_steps))
        was_training = self.training
        self.eval()
        codes, window_start, cache, logits = idx[..., :Qu], 0, None, None
        for _ in range(num_steps):
            if logits is None:  # (re)fill the window
                while codes.size(2) - window_start > max_steps:
                    window_start += shift
                cache = self.make_kv_cache(B) if use_cache else None
                logits = self(codes[:, :, window_start:], cache=cache)[:, :, -1]  # (B, C, Qu, K)
            new = sample_tokens(logits.reshape(-1, logits.size(-1)), temperature, top_k, generator).view(B, C, 1, Qu)
            codes = torch.cat([codes, new], dim=2)
            if codes.size(2) - window_start > max_steps:
                logits = None  # the window is full: shift it
            elif use_cache:
                logits = self(new, cache=cache)[:, :, -1]
            else:
                logits = self(codes[:, :, window_start:])[:, :, -1]
        self.train(was_training)
        if num_levels > Qu:  # brain-gen's _restore_full_indices
            held = idx[:, :, -1:, Qu:].expand(B, C, num_steps, num_levels - Qu)
            codes = torch.cat([codes, torch.cat([idx[:, :, :, Qu:], held], dim=2)], dim=-1)
        return codes


# ----------------------------------------------------------------------------- registry

FORECAST_FLAVORS = {
    # seconds on a CPU: the debug BrainOmni tokenizer's grid (3 latent channels, 2 levels of 32 codes, width 16)
    "debug": dict(lm_dim=32, lm_head=4, lm_depth=2, vocab_size=32, num_quantizers=2, num_channels=3, sequence_len=32,
                  tokenizer_name="BrainOmniCausalTokenizer", tokenizer_flavor="debug"),
    # the small tokenizer: 8 latent channels, 4 levels of 1024 codes, width 128; 8 windows of 32 tokens
    "small": dict(lm_dim=256, lm_head=8, lm_depth=4, vocab_size=1024, num_quantizers=4, num_channels=8, sequence_len=256,
                  tokenizer_name="BrainOmniCausalTokenizer", tokenizer_flavor="small"),
    # the full tokenizer (brain-gen tokenizer10s: width 1024, 8 latent channels, 4 levels of 16384 codes,
    # 128 tokens per 1024-sample window); lm_dim = the token width, so no projection; 8 windows of context
    "full": dict(lm_dim=1024, lm_head=16, lm_depth=12, vocab_size=16384, num_quantizers=4, num_channels=8,
                 sequence_len=1024, tokenizer_name="BrainOmniCausalTokenizer", tokenizer_flavor="full"),
}

register_model(ModelSpec(name="BrainOmniCausalForecast", config_cls=BrainOmniForecastConfig, builder=BrainOmniCausalForecast,
                         flavors=FORECAST_FLAVORS, task="causal_lm", weight_file_fields=("tokenizer_path",)))
