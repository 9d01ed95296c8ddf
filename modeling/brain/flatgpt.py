"""FlatGPT family: spatiotemporal token grids flattened into one sequence for a causal HF backbone.

A sample is a grid of codes. `input_shape` (T, H, W) is its size in input units (frames x height
x width for video; timesteps x channels x RVQ levels for MEG/EEG codes); the tokenizer that made
the codes divided time by `temporal_reduction` and space by `spatial_reduction`, leaving the
reduced grid (T', H', W') = (T // tr, H // sh, W // sw) of codes. The backbone sees the grid in
(t, h, w) order, causally. Each variant decides which grid axes form the backbone's sequence and
which are folded into one position; the backbone's positions walk the "rope grid":

  registry name      idx            one position holds               rope grid     logits
  FlatGPT            (B, S)         a code                           (T', H', W')  (B, S, V)
  FlatGPTEmbeds      (B, S)         a code; a table per channel      (T', C, 1)    (B, S, V)
  FlatGPTEmbedsRVQ   (B, S)         a code; a table per RVQ level    (T', C, Q)    (B, S, V)
  FlatGPTRVQ         (B, S, Q)      the Q levels of a site (t, c)    (T', C, 1)    (B, S, Q, V)
  FlatGPTMix         (B, S, C)      the C channels of a timestep     (T', 1, 1)    (B, S, C, V)
  FlatGPTMixRVQ      (B, S, C, Q)   the C x Q codes of a timestep    (T', 1, 1)    (B, S, C, Q, V)

with S <= the rope grid's size (T', H', W' the reduced grid; C channels, Q RVQ levels).
Positions: sequence index s sits at rope-grid coordinate (t, h, w) = (s // (H W), s // W % H, s % W).
mrope backbones (Qwen2_5_Video, Qwen3_Video) get those three coordinates as (3, B, S) position ids,
which is exactly what HF's Qwen2.5-VL/Qwen3-VL give a video grid (`get_vision_position_ids` with
the reductions as merge sizes); 1D backbones (Qwen2, Qwen3, Llama, SmoLLM3, MiniMax) get s.
Training: forward(idx, targets) with targets[b, s] the code position s must predict (idx shifted
by one position, -1 ignored), so the trainer's causal_lm task (a sample one position longer than
the context, cut into idx / targets along axis 1) trains every variant: flat token samples (S + 1,),
(S + 1, Q) sites for FlatGPTRVQ, (S + 1, C) or (S + 1, C, Q) timesteps for the Mix variants. `sequence_len` (set by the
trainer from the data) longer than the grid grows the grid's T' to fit. `generate` / `forecast`
roll a sequence forward on a KV cache; `resize_context` extends T after loading.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from modeling.tokenizers.flat import TOKENIZERS, AmplitudeTokenizer, build_flat_tokenizer
from modeling.brain.flatgpt_layers import (
    MIX_METHODS, ChannelHead, EmbeddingCorruptor, JointRVQHead, ListEmbedding, MixEmbedding, MixHead,
    MixQuantizerEmbedding, MixRVQHead, QuantizerEmbedding, TiedHead, TiedRVQHead, TokenEmbedding, corrupt_tokens,
)
from modeling.layers.transformer import sample_tokens
from modeling.layers.hf_backbones import HFBackbone, backbone_config, backbone_spec
from modeling.layers.moe import MoEFields, moe_aux_loss
from modeling.registry import ModelSpec, register_model

QUANTIZER_HEADS = ("joint", "tied")
CORRUPTION_DEFAULTS = {"enabled": True, "p_start": 0.0, "p_end": 0.0, "block_len_steps": 8, "tokens_per_step": None}


def reduce_grid(input_shape: list[int], temporal_reduction: int, spatial_reduction_hw: tuple[int, int]) -> tuple[int, int, int]:
    """(T, H, W) in input units -> the tokenizer's code grid (T', H', W') (floor division, as its strides)."""
    T, H, W = input_shape
    return (T // temporal_reduction, H // spatial_reduction_hw[0], W // spatial_reduction_hw[1])


@dataclass(frozen=True)
class FlatGPTConfig(MoEFields):
    trf_class: str = field(metadata={"help": "backbone: Qwen2_5_Video, Qwen3_Video (3D mrope), Qwen2, Qwen3, Llama, SmoLLM3, MiniMax (1D)"})
    trf_args: dict = field(metadata={"help": "backbone config: num_hidden_layers, num_attention_heads, intermediate_size (required), "
                                             "num_key_value_heads, rope_theta, mrope_section, max_position_embeddings, any HF config field"})
    hidden_size: int = field(metadata={"help": "width of the backbone"})
    vocab_size: int = field(metadata={"help": "codes per token (per RVQ level); the trainer sets it from the data"})
    input_shape: list[int] = field(metadata={"help": "(T, H, W) of a sample in input units, before the tokenizer's reductions"})
    spatial_reduction: int | list[int] = field(default=1, metadata={"help": "tokenizer's spatial downsampling: one factor or (H, W) factors"})
    temporal_reduction: int = field(default=1, metadata={"help": "tokenizer's temporal downsampling factor"})
    sequence_len: int | None = field(default=None, metadata={"help": "positions per training sequence (set by the trainer); "
                                                                     "longer than the grid grows its T; empty: the grid"})
    tok_class: str | None = field(default=None, metadata={"help": "flat tokenizer for raw signals: AmplitudeTokenizer, "
                                                                  "DelimitedTokenizer, BPETokenizer; empty: codes arrive tokenized"})
    tok_args: dict = field(default_factory=dict, metadata={"help": "arguments of tok_class (num_bins defaults to what vocab_size allows)"})
    tokenizer_path: str | None = field(default=None, metadata={"help": "folder of a saved flat tokenizer (BPETokenizer.save), or "
                                                                       "a learned tokenizer's run dir / checkpoint (BrainOmni, "
                                                                       "TOTEM, Vidtok): frozen, it tokenizes raw windows on the fly"})
    token_corruption_cfg: dict = field(default_factory=dict, metadata={
        "help": "train-time input corruption: p_start, p_end (per-timestep probability, log-interpolated over the "
                "sequence), block_len_steps (default 8), tokens_per_step (default H'W'), enabled"})
    quantizer_head: str = field(default="joint", metadata={"help": "RVQ variants: joint (one linear to all levels) or tied (per-level tables)"})
    mix_method: str = field(default="mix", metadata={"help": "Mix variants: mix (channels concatenated into one position) or "
                                                             "none (each channel its own sequence)"})
    use_embedding_corruption: bool = field(default=False, metadata={"help": "FlatGPTEmbedsRVQ: corrupt input embeddings while training"})
    embedding_corruption_p_levels: list[float] = field(default_factory=lambda: [0.01, 0.02, 0.05, 0.1], metadata={
        "help": "FlatGPTEmbedsRVQ: corruption probability per RVQ level (one value or one per level)"})
    use_gradient_checkpointing: bool = field(default=False, metadata={"help": "recompute each backbone layer in the backward pass"})
    dropout: float = field(default=0.0, metadata={"help": "dropout on the backbone's attention weights while training (its HF "
                                                          "attention_dropout); 0: none"})

    def __post_init__(self):
        backbone_spec(self.trf_class)
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        self.check_moe(self.trf_args.get("num_hidden_layers", 0))
        if self.hidden_size < 1 or self.vocab_size < 2:
            raise ValueError(f"hidden_size must be >= 1 and vocab_size >= 2, got {self.hidden_size} and {self.vocab_size}")
        if len(self.input_shape) != 3 or not all(isinstance(n, int) and n >= 1 for n in self.input_shape):
            raise ValueError(f"input_shape must be 3 positive ints (T, H, W), got {self.input_shape}")
        reduction = self.spatial_reduction if isinstance(self.spatial_reduction, list) else [self.spatial_reduction] * 2
        if len(reduction) != 2 or not all(isinstance(n, int) and n >= 1 for n in reduction):
            raise ValueError(f"spatial_reduction must be a positive int or two, got {self.spatial_reduction}")
        if self.temporal_reduction < 1:
            raise ValueError(f"temporal_reduction must be >= 1, got {self.temporal_reduction}")
        if min(self.reduced_shape) < 1:
            raise ValueError(f"input_shape {self.input_shape} reduced by ({self.temporal_reduction}, {reduction}) leaves "
                             f"an empty grid {self.reduced_shape}")
        if self.sequence_len is not None and self.sequence_len < 1:
            raise ValueError(f"sequence_len must be >= 1, got {self.sequence_len}")
        if self.tok_class is not None and self.tok_class not in TOKENIZERS:
            raise ValueError(f"tok_class: unknown flat tokenizer {self.tok_class!r}; valid: {', '.join(TOKENIZERS)}")
        unknown = set(self.token_corruption_cfg) - set(CORRUPTION_DEFAULTS)
        if unknown:
            raise ValueError(f"token_corruption_cfg: unknown keys {sorted(unknown)}; valid: {', '.join(CORRUPTION_DEFAULTS)}")
        corruption = {**CORRUPTION_DEFAULTS, **self.token_corruption_cfg}
        if (not (0.0 <= corruption["p_start"] <= 1.0 and 0.0 <= corruption["p_end"] <= 1.0) or corruption["block_len_steps"] < 1
                or (corruption["tokens_per_step"] or 1) < 1):
            raise ValueError(f"token_corruption_cfg: p_start/p_end must lie in [0, 1], block_len_steps and tokens_per_step "
                             f"be >= 1; got {corruption}")
        if self.quantizer_head not in QUANTIZER_HEADS:
            raise ValueError(f"quantizer_head must be one of {QUANTIZER_HEADS}, got {self.quantizer_head!r}")
        if self.mix_method not in MIX_METHODS:
            raise ValueError(f"mix_method must be one of {MIX_METHODS}, got {self.mix_method!r}")
        backbone_config(self.trf_class, self.trf_args, hidden_size=self.hidden_size, vocab_size=self.vocab_size,
                        num_positions=1, attention_dropout=self.dropout)  # checks trf_args now; the position budget at build

    @property
    def spatial_reduction_hw(self) -> tuple[int, int]:
        reduction = self.spatial_reduction
        return tuple(reduction) if isinstance(reduction, list) else (reduction, reduction)

    @property
    def reduced_shape(self) -> tuple[int, int, int]:
        return reduce_grid(self.input_shape, self.temporal_reduction, self.spatial_reduction_hw)

    @property
    def corruption(self) -> dict | None:
        """The token corruption settings, or None when it is off."""
        cfg = {**CORRUPTION_DEFAULTS, **self.token_corruption_cfg}
        return cfg if cfg["enabled"] and (cfg["p_start"] > 0 or cfg["p_end"] > 0) else None


# Fields that only some variants read; any other variant refuses a non-default value.
VARIANT_FIELDS = {
    "quantizer_head": ("FlatGPTRVQ", "FlatGPTMixRVQ"),
    "mix_method": ("FlatGPTMix", "FlatGPTMixRVQ"),
    "use_embedding_corruption": ("FlatGPTEmbedsRVQ",),
    "embedding_corruption_p_levels": ("FlatGPTEmbedsRVQ",),
}


class FlatGPT(nn.Module):
    """Flat codes (B, S) of a (T', H', W') grid -> logits (B, S, V); head tied to the embedding."""

    num_sequence_axes = 3  # leading reduced-grid axes that the backbone's sequence runs over
    tokenizers = (None, *TOKENIZERS)  # tok_class values this variant can use

    def __init__(self, config: FlatGPTConfig):
        super().__init__()
        name = type(self).__name__
        defaults = FlatGPTConfig.__dataclass_fields__
        for key, variants in VARIANT_FIELDS.items():
            default = defaults[key].default_factory() if defaults[key].default is dataclasses.MISSING else defaults[key].default
            if name not in variants and getattr(config, key) != default:
                raise ValueError(f"{key} does not apply to {name} (it is for {', '.join(variants)})")
        if config.tok_class not in self.tokenizers:
            raise ValueError(f"tok_class {config.tok_class!r} does not fit {name}; use one of {self.tokenizers}")
        self.config = config
        self._set_grid(self._grid_layout(list(config.input_shape), config.sequence_len))
        hf_config = backbone_config(config.trf_class, config.trf_args, hidden_size=config.hidden_size, vocab_size=config.vocab_size,
                                    num_positions=self._num_position_ids(self.rope_shape), attention_dropout=config.dropout)
        self.backbone = HFBackbone(config.trf_class, hf_config)
        for index in config.moe_block_indices(hf_config.num_hidden_layers):
            self.backbone.use_moe_mlp(index, config.moe_config("swiglu"))
        self.embedding, self.head = self.build_embedding_and_head()
        self.tokenizer = build_flat_tokenizer(config.tok_class, config.tok_args, config.vocab_size, config.tokenizer_path)
        self._no_split_modules = [self.backbone.layer_class_name]  # FSDP wraps the decoder layers one by one
        self.backbone.set_gradient_checkpointing(config.use_gradient_checkpointing)

    # ------------------------------------------------------------------ layout

    def _grid_layout(self, input_shape: list[int], sequence_len: int | None) -> dict[str, Any]:
        config = self.config
        reduced = list(reduce_grid(input_shape, config.temporal_reduction, config.spatial_reduction_hw))
        k = self.num_sequence_axes
        rope = reduced[:k] + [1] * (3 - k)
        positions_per_step = rope[1] * rope[2]
        if sequence_len is not None and sequence_len > math.prod(rope):
            reduced[0] = rope[0] = math.ceil(sequence_len / positions_per_step)
            input_shape = [reduced[0] * config.temporal_reduction, *input_shape[1:]]
        return dict(
            input_shape=tuple(input_shape), reduced_shape=tuple(reduced),
            rope_shape=tuple(rope),  # the grid the backbone's positions walk
            positions_per_step=positions_per_step,  # backbone positions per reduced timestep
            max_positions=math.prod(rope), context_len=sequence_len or math.prod(rope),
        )

    def _set_grid(self, layout: dict[str, Any]) -> None:
        for key, value in layout.items():
            setattr(self, key, value)

    def _num_position_ids(self, rope_shape: tuple[int, int, int]) -> int:
        """One more than the largest position id: per axis for mrope, flat otherwise."""
        return max(rope_shape) if backbone_spec(self.config.trf_class).num_position_axes == 3 else math.prod(rope_shape)

    @property
    def token_shape(self) -> tuple[int, ...]:
        """The axes idx has after (B, S)."""
        return ()

    @property
    def tokens_per_step(self) -> int:
        """Codes per reduced timestep: H' * W' in every variant."""
        return self.positions_per_step * math.prod(self.token_shape)

    def build_embedding_and_head(self) -> tuple[nn.Module, nn.Module]:
        embedding = TokenEmbedding(self.config.vocab_size, self.config.hidden_size)
        return embedding, TiedHead(embedding)

    def position_ids(self, start: int, length: int, batch_size: int, device: torch.device) -> torch.Tensor:
        """(3, B, S) rope-grid coordinates (t, h, w) for mrope backbones, else (B, S) flat indices."""
        index = torch.arange(start, start + length, device=device)
        if self.backbone.num_position_axes == 1:
            return index.expand(batch_size, length)
        _, H, W = self.rope_shape
        coordinates = torch.stack([index // (H * W), index // W % H, index % W])  # (3, S)
        return coordinates[:, None, :].expand(3, batch_size, length)

    def _check_input(self, idx: torch.Tensor, start: int) -> None:
        expected = ("B", "S", *self.token_shape)
        if idx.dim() != len(expected) or tuple(idx.shape[2:]) != self.token_shape:
            raise ValueError(f"{type(self).__name__} takes idx of shape ({', '.join(map(str, expected))}), got {tuple(idx.shape)}")
        if start + idx.size(1) > self.max_positions:
            raise ValueError(f"positions {start}..{start + idx.size(1) - 1} run past the {self.max_positions} positions of the "
                             f"grid {self.rope_shape} (input_shape {self.input_shape}); resize_context to extend it")

    # ---------------------------------------------------------------- forward

    def make_cache(self) -> Any:
        return self.backbone.make_cache()

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache: Any | None = None) -> torch.Tensor:
        """idx in the variant's layout -> logits (idx's shape + (V,)), or the mean cross-entropy
        against targets (idx's shape, -1 ignored). With a cache (make_cache()), idx continues the
        sequence the cache holds and the cache is extended."""
        start = 0 if cache is None else cache.get_seq_length()
        self._check_input(idx, start)
        corruption = self.config.corruption
        if self.training and corruption is not None:
            idx = corrupt_tokens(idx, self.config.vocab_size, corruption["tokens_per_step"] or self.tokens_per_step,
                                 corruption["p_start"], corruption["p_end"], corruption["block_len_steps"])
        embeds = self.embedding(idx, start)  # (B', S, D); B' = B * C for mix_method none
        positions = self.position_ids(start, idx.size(1), embeds.size(0), idx.device)
        hidden = self.backbone(embeds, positions, cache)  # (B', S, D)
        logits = self.head(hidden, start)  # (B, S, ..., V)
        if targets is None:
            return logits
        # fp32 for the softmax: bf16 logits lose too much precision over a large vocabulary
        loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        aux_loss = moe_aux_loss(self.backbone.modules()) if self.training else None
        return loss if aux_loss is None else loss + aux_loss

    # --------------------------------------------------------------- weights

    @torch.no_grad()
    def init_weights(self) -> None:
        """The backbone's HF init; our embeddings and heads get normal(0, initializer_range) like HF's."""
        self.backbone.init_weights()
        std = self.backbone.config.initializer_range
        for name, param in self.named_parameters():
            if not name.startswith("backbone."):
                nn.init.normal_(param, mean=0.0, std=std)

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        self.backbone.set_gradient_checkpointing(enabled)

    def num_params(self, include_embedding: bool = True) -> int:
        num_total = sum(p.numel() for p in self.parameters())
        return num_total if include_embedding else num_total - sum(p.numel() for p in self.embedding.parameters())

    def num_flops_per_token(self) -> int:
        """Training FLOPs per sequence position of idx (a token, site or timestep), nanochat's estimate.

        6 * (parameters a backbone position multiplies by, MoE experts counted for the routed ones,
        plus the head's) + 12 * softmax-attention layers * heads * head_dim * context length (the
        full T x T scores, as gpt.py). A mix_method "none" timestep is C backbone positions.
        """
        config = self.backbone.config
        num_heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
        num_matmul = self.backbone.num_matmul_params_per_position() + self.head.num_matmul_params()
        num_attention = 12 * self.backbone.num_softmax_attention_layers() * num_heads * head_dim * self.context_len
        return (6 * num_matmul + num_attention) * self.backbone_positions_per_position

    @property
    def backbone_positions_per_position(self) -> int:
        return 1

    # ----------------------------------------------------------- tokenizers

    def encode(self, signal_BTC: torch.Tensor) -> torch.Tensor:
        """A raw (B, T, C) signal -> idx, with the flat tokenizer of tok_class."""
        if self.tokenizer is None:
            raise ValueError(f"{type(self).__name__} has no flat tokenizer (tok_class is empty): its codes come tokenized")
        codes = self.tokenizer.encode(signal_BTC)
        return codes if self.token_shape else codes.reshape(codes.size(0), -1)

    def decode(self, idx: torch.Tensor) -> torch.Tensor:
        """idx -> the (B, T, C) signal, with the flat tokenizer of tok_class."""
        if self.tokenizer is None:
            raise ValueError(f"{type(self).__name__} has no flat tokenizer (tok_class is empty)")
        if isinstance(self.tokenizer, AmplitudeTokenizer):
            signal = self.tokenizer.decode(idx)
            return signal if self.token_shape else signal.reshape(idx.size(0), -1, self.tokens_per_step)
        return self.tokenizer.decode(idx)

    # ------------------------------------------------------------- context

    def resize_context(self, *, input_shape: list[int] | None = None, rope_theta: float | None = None,
                       max_position_embeddings: int | None = None) -> None:
        """Extend the temporal context after loading weights (a longer T in input_shape), and/or change
        the rotary base; max_position_embeddings follows the grid unless given. The spatial grid and
        the reductions stay (embeddings and heads depend on them). model.config is updated, so a
        fresh build from it is the same model."""
        new_shape = list(input_shape or self.input_shape)
        if len(new_shape) != 3 or new_shape[1:] != list(self.input_shape[1:]):
            raise ValueError(f"resize_context changes only T: input_shape must be [T, {self.input_shape[1]}, "
                             f"{self.input_shape[2]}], got {new_shape}")
        if new_shape[0] // self.config.temporal_reduction < self.reduced_shape[0]:
            raise ValueError(f"resize_context cannot shrink the grid's T' ({self.reduced_shape[0]}); got input_shape {new_shape}")
        layout = self._grid_layout(new_shape, None)
        num_positions = self._num_position_ids(layout["rope_shape"])
        if max_position_embeddings is None:
            max_position_embeddings = max(self.backbone.config.max_position_embeddings, num_positions)
        if max_position_embeddings < num_positions:
            raise ValueError(f"max_position_embeddings ({max_position_embeddings}) is smaller than the {num_positions} "
                             f"positions of the grid {layout['rope_shape']}")
        self._set_grid(layout)
        self.backbone.set_rope(rope_theta=rope_theta, max_position_embeddings=max_position_embeddings)
        trf_args = {**self.config.trf_args, "max_position_embeddings": max_position_embeddings}
        if rope_theta is not None:
            trf_args["rope_theta"] = float(rope_theta)
        self.config = dataclasses.replace(self.config, input_shape=new_shape, sequence_len=None, trf_args=trf_args)

    # ------------------------------------------------------------- forecast

    def forecast(self, idx: torch.Tensor, num_steps: int, *, temperature: float = 1.0, top_k: int | None = None,
                 generator: torch.Generator | None = None, use_cache: bool | None = None,
                 shift_fraction: float = 0.5) -> torch.Tensor:
        """Roll idx (starting at a grid origin) forward by num_steps reduced timesteps -> idx extended
        by num_steps * positions_per_step positions (see `generate`)."""
        if num_steps < 0:
            raise ValueError(f"num_steps must be >= 0, got {num_steps}")
        return self.generate(idx, num_steps * self.positions_per_step, temperature=temperature, top_k=top_k,
                             generator=generator, use_cache=use_cache, shift_fraction=shift_fraction)

    @torch.inference_mode()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 generator: torch.Generator | None = None, use_cache: bool | None = None,
                 shift_fraction: float = 0.5) -> torch.Tensor:
        """Continue idx (B, S, ...) by max_new_tokens positions -> (B, S + max_new_tokens, ...).

        One position at a time: the window is prefilled once, then each new position runs alone
        on top of the KV cache (use_cache; default: where the backbone's cached decode is exact).
        When the window fills the grid, it drops its oldest shift_fraction of timesteps and is
        prefilled again from grid position 0, so the grid coordinates of what it keeps do not change.
        temperature 0 is greedy; top_k keeps the k likeliest codes of each token.
        """
        if max_new_tokens < 0 or not 0.0 < shift_fraction <= 1.0 or temperature < 0 or (top_k is not None and top_k < 1):
            raise ValueError(f"need max_new_tokens >= 0, 0 < shift_fraction <= 1, temperature >= 0, top_k >= 1; got "
                             f"{max_new_tokens}, {shift_fraction}, {temperature}, {top_k}")
        self._check_input(idx[:, :0], 0)
        if idx.size(1) == 0:
            raise ValueError("generation needs a prompt of at least one position")
        use_cache = self.backbone.is_cache_exact if use_cache is None else use_cache
        shift = max(1, round(shift_fraction * self.rope_shape[0])) * self.positions_per_step
        was_training = self.training
        self.eval()
        sequence, window_start, cache, logits = idx, 0, None, None
        for _ in range(max_new_tokens):
            if logits is None:  # (re)fill the window
                while sequence.size(1) - window_start >= self.max_positions:
                    window_start += shift
                cache = self.make_cache() if use_cache else None
                logits = self(sequence[:, window_start:], cache=cache)[:, -1]  # (B, ..., V)
            new = sample_tokens(logits.reshape(-1, logits.size(-1)), temperature, top_k, generator).view(logits.shape[:-1])
            sequence = torch.cat([sequence, new[:, None]], dim=1)
            if sequence.size(1) - window_start >= self.max_positions:
                logits = None  # the grid is full: shift the window
            elif use_cache:
                logits = self(new[:, None], cache=cache)[:, -1]
            else:
                logits = self(sequence[:, window_start:])[:, -1]
        self.train(was_training)
        return sequence


class FlatGPTEmbeds(FlatGPT):
    """Flat codes of a channels x time grid (T', C, 1), one embedding table per channel; the head
    at channel c scores with channel c + 1's table (the channel of the next token)."""

    def build_embedding_and_head(self):
        if self.reduced_shape[2] != 1:
            raise ValueError(f"FlatGPTEmbeds needs a (T, C, 1) grid (input_shape[2] == 1), got reduced {self.reduced_shape}; "
                             "RVQ levels go to FlatGPTEmbedsRVQ")
        embedding = ListEmbedding(self.reduced_shape[1], self.config.vocab_size, self.config.hidden_size)
        return embedding, ChannelHead(embedding)


class FlatGPTEmbedsRVQ(FlatGPT):
    """Flat codes of a (T', C, Q) grid of RVQ codes, one embedding table per level (optionally
    corrupted while training); the head at level q scores with level q + 1's table."""

    def build_embedding_and_head(self):
        config = self.config
        num_levels = self.reduced_shape[2]
        if config.use_embedding_corruption:
            embedding = EmbeddingCorruptor(num_levels, config.vocab_size, config.hidden_size, self.tokens_per_step,
                                           config.embedding_corruption_p_levels)
        else:
            embedding = ListEmbedding(num_levels, config.vocab_size, config.hidden_size)
        return embedding, ChannelHead(embedding)


class FlatGPTRVQ(FlatGPT):
    """RVQ codes (B, S, Q): a position is one site (t, c) with its Q levels embedded side by side
    (D / Q each); the head predicts the next site's Q levels. Rope grid (T', C, 1)."""

    num_sequence_axes = 2
    tokenizers = (None,)

    @property
    def token_shape(self):
        return (self.reduced_shape[2],)

    def build_embedding_and_head(self):
        config = self.config
        num_levels = self.reduced_shape[2]
        if config.hidden_size % num_levels != 0:
            raise ValueError(f"hidden_size ({config.hidden_size}) must be divisible by the {num_levels} RVQ levels")
        embedding = QuantizerEmbedding(num_levels, config.vocab_size, config.hidden_size // num_levels)
        if config.quantizer_head == "tied":
            return embedding, TiedRVQHead(embedding)
        return embedding, JointRVQHead(config.hidden_size, num_levels, config.vocab_size)


class FlatGPTMix(FlatGPT):
    """Codes of C channels per timestep (B, S, C) mixed into one position per timestep
    (MixEmbedding / MixHead); rope grid (T', 1, 1)."""

    num_sequence_axes = 1
    tokenizers = (None, "AmplitudeTokenizer")

    @property
    def token_shape(self):
        return (self.reduced_shape[1],)

    @property
    def backbone_positions_per_position(self) -> int:
        return self.reduced_shape[1] if self.config.mix_method == "none" else 1

    def build_embedding_and_head(self):
        if self.reduced_shape[2] != 1:
            raise ValueError(f"FlatGPTMix needs a (T, C, 1) grid (input_shape[2] == 1), got reduced {self.reduced_shape}")
        embedding = MixEmbedding(self.config.vocab_size, self.config.hidden_size, self.reduced_shape[1], self.config.mix_method)
        return embedding, MixHead(embedding)


class FlatGPTMixRVQ(FlatGPT):
    """RVQ codes of C channels per timestep (B, S, C, Q): per-level embeddings plus a channel
    embedding, mixed into one position per timestep; rope grid (T', 1, 1)."""

    num_sequence_axes = 1
    tokenizers = (None,)

    @property
    def token_shape(self):
        return self.reduced_shape[1:]

    @property
    def backbone_positions_per_position(self) -> int:
        return self.reduced_shape[1] if self.config.mix_method == "none" else 1

    def build_embedding_and_head(self):
        config = self.config
        _, num_channels, num_levels = self.reduced_shape
        width = num_channels * num_levels if config.mix_method == "mix" else num_levels
        if config.hidden_size % width != 0:
            raise ValueError(f"hidden_size ({config.hidden_size}) must be divisible by {width} "
                             f"({'channels x ' if config.mix_method == 'mix' else ''}RVQ levels)")
        level_dim = config.hidden_size // width
        embedding = MixQuantizerEmbedding(num_levels, config.vocab_size, level_dim, num_channels, config.mix_method)
        if config.quantizer_head == "tied":
            head = TiedRVQHead(embedding.quantizer)
        else:
            head = JointRVQHead(num_levels * level_dim, num_levels, config.vocab_size)
        return embedding, MixRVQHead(head, num_channels, config.mix_method)


# ------------------------------------------------------------------ flavors

DEBUG_BACKBONE = dict(trf_class="Qwen2_5_Video", hidden_size=64,
                      trf_args=dict(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128))
# Qwen2.5-0.5B's shape (24 layers, width 896, 14 query / 2 key-value heads of 64, SwiGLU 4864,
# rope_theta 1e6) as Qwen2.5-VL's text model, i.e. with mrope sections [8, 12, 12] of 32 pairs.
FULL_BACKBONE = dict(trf_class="Qwen2_5_Video", hidden_size=896,
                     trf_args=dict(num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                                   intermediate_size=4864, rope_theta=1e6))
# between the two: 4 layers of width 256 (4 heads of 64, so Qwen2.5-VL's mrope sections fit), trains on a CPU
SMALL_BACKBONE = dict(trf_class="Qwen2_5_Video", hidden_size=256,
                      trf_args=dict(num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, intermediate_size=1024))
AMPLITUDE = dict(tok_class="AmplitudeTokenizer")  # mu-law, num_bins = vocab_size

FLAVORS = {
    "FlatGPT": (FlatGPT, {
        "debug": dict(**DEBUG_BACKBONE, vocab_size=256, input_shape=[4, 4, 4]),
        # 16 frames of 64 x 64 through a 4x8x8 tokenizer: a (4, 8, 8) grid, 256 tokens
        "small": dict(**SMALL_BACKBONE, vocab_size=1024, input_shape=[16, 64, 64], temporal_reduction=4, spatial_reduction=8),
        # video codes: 64 frames of 128 x 128 through a 4x8x8 FSQ tokenizer with a 64000-code
        # vocabulary (Cosmos-DV-like) -> a (16, 16, 16) grid, 4096 tokens
        "full": dict(**FULL_BACKBONE, vocab_size=64000, input_shape=[64, 128, 128], temporal_reduction=4, spatial_reduction=8),
    }),
    "FlatGPTEmbeds": (FlatGPTEmbeds, {
        "debug": dict(**DEBUG_BACKBONE, **AMPLITUDE, vocab_size=256, input_shape=[8, 4, 1]),
        "small": dict(**SMALL_BACKBONE, **AMPLITUDE, vocab_size=256, input_shape=[16, 32, 1]),  # 512 tokens
        # mu-law amplitude tokens of 68 channels x 64 timesteps: 4352 tokens
        "full": dict(**FULL_BACKBONE, **AMPLITUDE, vocab_size=256, input_shape=[64, 68, 1]),
    }),
    "FlatGPTEmbedsRVQ": (FlatGPTEmbedsRVQ, {
        "debug": dict(**DEBUG_BACKBONE, vocab_size=64, input_shape=[4, 4, 4]),
        "small": dict(**SMALL_BACKBONE, vocab_size=1024, input_shape=[128, 16, 4], temporal_reduction=8),  # (16, 16, 4)
        # BrainTokMix codes (seed config): 68 channels x 4 RVQ levels of 16384 codes, 1024 samples
        # reduced 16x in time -> (64, 68, 4), 17408 tokens
        "full": dict(**FULL_BACKBONE, vocab_size=16384, input_shape=[1024, 68, 4], temporal_reduction=16),
    }),
    "FlatGPTRVQ": (FlatGPTRVQ, {
        "debug": dict(**DEBUG_BACKBONE, vocab_size=64, input_shape=[4, 4, 4]),
        "small": dict(**SMALL_BACKBONE, vocab_size=1024, input_shape=[128, 16, 4], temporal_reduction=8),
        # the same codes, one position per (t, channel): 4352 positions of 4 levels
        "full": dict(**FULL_BACKBONE, vocab_size=16384, input_shape=[1024, 68, 4], temporal_reduction=16),
    }),
    "FlatGPTMix": (FlatGPTMix, {
        "debug": dict(**DEBUG_BACKBONE, **AMPLITUDE, vocab_size=256, input_shape=[16, 4, 1]),
        "small": dict(**SMALL_BACKBONE, **AMPLITUDE, vocab_size=256, input_shape=[256, 16, 1]),  # 16 per channel
        # mu-law amplitude tokens of 32 channels (EEG montage), 4096 timesteps; 896 / 32 = 28 per channel
        "full": dict(**FULL_BACKBONE, **AMPLITUDE, vocab_size=256, input_shape=[4096, 32, 1]),
    }),
    "FlatGPTMixRVQ": (FlatGPTMixRVQ, {
        "debug": dict(**DEBUG_BACKBONE, vocab_size=64, input_shape=[16, 2, 4]),
        "small": dict(**SMALL_BACKBONE, vocab_size=1024, input_shape=[256, 8, 4], temporal_reduction=4),  # 8 per level
        # BrainTokMix channel-mix codes: 8 latent channels x 4 levels, 1024 samples reduced 4x ->
        # 256 timesteps; 896 / (8 x 4) = 28 per level
        "full": dict(**FULL_BACKBONE, vocab_size=16384, input_shape=[1024, 8, 4], temporal_reduction=4),
    }),
}

for _name, (_cls, _flavors) in FLAVORS.items():
    register_model(ModelSpec(name=_name, config_cls=FlatGPTConfig, builder=_cls, flavors=_flavors, task="causal_lm"))
