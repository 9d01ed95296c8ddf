"""nanochat-style GPT, registered as "gpt".

Architecture (after karpathy/nanochat's gpt.py):
- rotary position embeddings, no learned positional embeddings
- parameter-free RMSNorm: after the token embedding, before attention and MLP (pre-norm),
  on the final hidden state, and on q and k after rotary (QK norm)
- grouped-query attention (n_kv_head divides n_head), causal, via scaled_dot_product_attention
- ReLU^2 MLP of width mlp_ratio * n_embd (4 * n_embd by default), or in the blocks `moe_layers` names
  (when moe_num_experts > 0) a top-k routed mixture of such MLPs (modeling/layers/moe.py); the training loss
  then includes the weighted load-balancing loss
- no biases; token embedding and lm_head untied
- dropout (nanoGPT's three places, 0 by default): on the normed token embeddings (embd_dropout), on the
  attention weights (attn_dropout) and on each block's attention and MLP outputs (resid_dropout)
- a preallocated KV cache for generation

Shapes: B batch, T tokens in this call, D = n_embd, H = n_head, K = n_kv_head, Dh = head_dim,
V = vocab_size, S = positions held by a KV cache.
"""

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from modeling.layers.transformer import KVCache, RMSNorm, RotaryEmbedding, apply_rotary, sample_tokens
from modeling.layers.moe import MoEFields, MoEMLP, moe_aux_loss, num_idle_expert_params
from modeling.registry import ModelSpec, register_model

DROPOUTS = ("dropout", "attn_dropout", "resid_dropout", "embd_dropout")  # the three places take `dropout` when unset


@dataclass(frozen=True)
class GPTConfig(MoEFields):
    sequence_len: int = field(metadata={"help": "maximum tokens per sequence (context length, rotary table size)"})
    vocab_size: int = field(metadata={"help": "number of token ids; the trainer sets it from the tokenizer"})
    n_layer: int = field(metadata={"help": "number of transformer blocks"})
    n_head: int = field(metadata={"help": "number of query heads"})
    n_kv_head: int = field(metadata={"help": "number of key/value heads (GQA); must divide n_head"})
    n_embd: int = field(metadata={"help": "width of the residual stream; head_dim = n_embd / n_head"})
    use_gradient_checkpointing: bool = field(
        default=False, metadata={"help": "recompute each block in the backward pass to save activation memory"}
    )
    dropout: float = field(
        default=0.0, metadata={"help": "training-time dropout on the embeddings, attention weights and each block's "
                                       "residual branches (the seed's NanoGPT, TOTEM stage 2: 0.1); 0: none. "
                                       "attn_dropout, resid_dropout and embd_dropout set one place each"}
    )
    attn_dropout: float | None = field(default=None, metadata={"help": "dropout on the attention weights; empty: dropout"})
    resid_dropout: float | None = field(
        default=None, metadata={"help": "dropout on each block's attention and MLP outputs, before they join the residual "
                                        "stream; empty: dropout"}
    )
    embd_dropout: float | None = field(default=None, metadata={"help": "dropout on the (normed) token embeddings; empty: dropout"})
    mlp_ratio: float = field(default=4.0, metadata={"help": "MLP width = mlp_ratio x n_embd (each MoE expert's too)"})

    def __post_init__(self):
        for name in ("sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in DROPOUTS:
            if getattr(self, name) is None:
                object.__setattr__(self, name, self.dropout)  # recorded resolved in the checkpoint
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        width = self.mlp_ratio * self.n_embd
        if width < 1 or abs(width - round(width)) > 1e-6:
            raise ValueError(f"mlp_ratio x n_embd must be a whole width >= 1, got {self.mlp_ratio} x {self.n_embd} = {width:g}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.n_head % self.n_kv_head != 0:
            raise ValueError(f"n_kv_head ({self.n_kv_head}) must divide n_head ({self.n_head})")
        if self.head_dim % 2 != 0:
            raise ValueError(f"n_embd / n_head (head_dim = {self.head_dim}) must be even for rotary embeddings")
        self.check_moe(self.n_layer)

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def mlp_hidden_size(self) -> int:
        return round(self.mlp_ratio * self.n_embd)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.n_head
        self.num_kv_heads = config.n_kv_head
        self.head_dim = config.head_dim
        self.c_q = nn.Linear(config.n_embd, self.num_heads * self.head_dim, bias=False)
        self.c_k = nn.Linear(config.n_embd, self.num_kv_heads * self.head_dim, bias=False)
        self.c_v = nn.Linear(config.n_embd, self.num_kv_heads * self.head_dim, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.q_norm = RMSNorm()
        self.k_norm = RMSNorm()
        self.attn_dropout = config.attn_dropout  # a probability: scaled_dot_product_attention applies it
        self.resid_dropout = nn.Dropout(config.resid_dropout)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_cache: KVCache | None = None
    ) -> torch.Tensor:
        B, T, D = x.shape
        q = self.c_q(x).view(B, T, self.num_heads, self.head_dim)  # (B, T, H, Dh)
        k = self.c_k(x).view(B, T, self.num_kv_heads, self.head_dim)  # (B, T, K, Dh)
        v = self.c_v(x).view(B, T, self.num_kv_heads, self.head_dim)  # (B, T, K, Dh)
        # QK norm after rotary, as nanochat: bounds the attention logits, which keeps training stable.
        q = self.q_norm(apply_rotary(q, cos, sin))
        k = self.k_norm(apply_rotary(k, cos, sin))
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H or K, T, Dh)

        num_cached = 0
        if kv_cache is not None:
            num_cached = kv_cache.pos
            k, v = kv_cache.insert(self.layer_idx, k, v)  # (B, K, S, Dh) with S = num_cached + T
            # The cache may be kept in another precision than the activations (e.g. under autocast).
            k, v = k.to(q.dtype), v.to(q.dtype)

        use_gqa = self.num_kv_heads != self.num_heads
        if num_cached == 0:
            # Training, or a prefill into an empty cache: plain causal attention.
            dropout_p = self.attn_dropout if self.training else 0.0
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p, enable_gqa=use_gqa)
        elif T == 1:
            # One new token: it may see every cached position, so no mask.
            y = F.scaled_dot_product_attention(q, k, v, enable_gqa=use_gqa)
        else:
            # A chunk on top of a cache: query i sits at position num_cached + i and sees keys up to
            # there. (is_causal would align the mask top-left, which is wrong when S > T.)
            query_pos = num_cached + torch.arange(T, device=q.device)  # (T,)
            key_pos = torch.arange(k.size(2), device=q.device)  # (S,)
            attn_mask = key_pos[None, :] <= query_pos[:, None]  # (T, S), True = attend
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, enable_gqa=use_gqa)
        y = y.transpose(1, 2).reshape(B, T, D)  # (B, T, H * Dh)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, config.mlp_hidden_size, bias=False)
        self.c_proj = nn.Linear(config.mlp_hidden_size, config.n_embd, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.relu(self.c_fc(x)).square())  # (B, T, mlp_ratio * D) inside


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.mlp_dropout = nn.Dropout(config.resid_dropout)
        self.attn_norm = RMSNorm()
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp_norm = RMSNorm()
        if layer_idx in config.moe_block_indices(config.n_layer):
            self.mlp = MoEMLP(config.n_embd, config.mlp_hidden_size, config.moe_config("relu2"))  # experts as wide as the dense MLP
        else:
            self.mlp = MLP(config)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_cache: KVCache | None = None
    ) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, kv_cache)
        return x + self.mlp_dropout(self.mlp(self.mlp_norm(x)))


class TokenCrossEntropy(nn.Module):
    """The language-modelling loss over logits (B, T, V), in fp32 (bf16 logits lose too much precision over
    a large vocabulary). A module without parameters, so engine.compile can compile it on its own: fused,
    the fp32 cast, log-softmax and its backward pass over the logits once instead of four times."""

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-1)


class GPT(nn.Module):
    _no_split_modules = ["Block"]  # the unit engines shard or wrap one by one (FSDP), as in HF models

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.embedding_norm = RMSNorm()
        self.embedding_dropout = nn.Dropout(config.embd_dropout)
        self.blocks = nn.ModuleList(Block(config, layer_idx) for layer_idx in range(config.n_layer))
        self.final_norm = RMSNorm()
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.cross_entropy = TokenCrossEntropy()
        self.rotary = RotaryEmbedding(config.head_dim, config.sequence_len)
        self.use_gradient_checkpointing = config.use_gradient_checkpointing

    def compile_units(self) -> list[nn.Module]:
        """What engine.compile compiles: each block, and the loss over the logits (the lm_head stays an eager
        module call, so engines that gather or shard its weight in hooks keep doing so)."""
        return [*self.blocks, self.cross_entropy]

    @torch.no_grad()
    def init_weights(self) -> None:
        """nanochat's init. Draws from the global RNG of the parameters' device, so it is seeded."""
        # Embedding rows start at unit RMS, which the embedding norm then keeps.
        nn.init.normal_(self.wte.weight, mean=0.0, std=1.0)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                # std 1/sqrt(fan_in), shrunk for layers that narrow (https://arxiv.org/abs/2310.17813)
                fan_out, fan_in = module.weight.shape
                std = 1.0 / math.sqrt(fan_in) * min(1.0, math.sqrt(fan_out / fan_in))
                nn.init.normal_(module.weight, mean=0.0, std=std)
        # Zero output projections: every block starts as the identity on the residual stream, and
        # the first prediction is uniform (loss = ln V). Gradients still reach them through their
        # inputs, so they move off zero on the first step.
        for block in self.blocks:
            nn.init.zeros_(block.attn.c_proj.weight)
            if isinstance(block.mlp, MoEMLP):
                # as the dense MLP: input matrices like c_fc (fan_in D, fan_out mlp_ratio D), outputs zero
                block.mlp.init_weights(in_std=1.0 / math.sqrt(self.config.n_embd), out_std=0.0)
            else:
                nn.init.zeros_(block.mlp.c_proj.weight)
        nn.init.zeros_(self.lm_head.weight)
        self.rotary.reset_buffers()

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        self.use_gradient_checkpointing = enabled

    def num_params(self, include_embedding: bool = True) -> int:
        num_total = sum(p.numel() for p in self.parameters())
        return num_total if include_embedding else num_total - self.wte.weight.numel()

    def num_flops_per_token(self) -> int:
        """Training FLOPs per token (forward + backward), nanochat's estimate_flops.

        6 * (every parameter but the embedding table, which is a lookup, not a matmul) plus the
        attention matmuls QK^T and AV: 2 matmuls * 2 flops * T * Dh per head and layer in the
        forward, times 3 for forward + backward. T is the full sequence_len: the count is for the
        full T x T score matrix, causal masking is not discounted (as PaLM's MFU convention).
        """
        config = self.config
        num_attention_flops = 12 * config.n_layer * config.n_head * config.head_dim * config.sequence_len
        num_active = self.num_params(include_embedding=False) - num_idle_expert_params(block.mlp for block in self.blocks)
        return 6 * num_active + num_attention_flops

    def make_kv_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        """An empty cache on the model's device, for up to max_len (default sequence_len) positions."""
        weight = self.lm_head.weight
        device_type = weight.device.type
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else weight.dtype
        return KVCache(
            num_layers=self.config.n_layer,
            batch_size=batch_size,
            num_kv_heads=self.config.n_kv_head,
            max_len=self.config.sequence_len if max_len is None else max_len,
            head_dim=self.config.head_dim,
            device=weight.device,
            dtype=dtype,
        )

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None, kv_cache: KVCache | None = None
    ) -> torch.Tensor:
        """idx (B, T) int64 -> logits (B, T, V), or the mean cross-entropy if targets (B, T) are given
        (plus, in training mode, the weighted MoE load-balancing loss).

        Target -1 is ignored. With kv_cache, idx continues the sequence the cache holds: its
        tokens sit at positions kv_cache.pos .. kv_cache.pos + T - 1.
        """
        B, T = idx.shape
        start_pos = 0
        if kv_cache is not None:
            start_pos = kv_cache.pos
            if start_pos + T > kv_cache.max_len:
                raise ValueError(f"KV cache holds {kv_cache.max_len} positions; {start_pos} + {T} do not fit")
        cos, sin = self.rotary(start_pos, T)  # (T, Dh / 2) each; raises past sequence_len

        x = self.embedding_dropout(self.embedding_norm(self.wte(idx)))  # (B, T, D)
        is_checkpointing = self.use_gradient_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.blocks:
            if is_checkpointing and kv_cache is None:
                x = checkpoint(block, x, cos, sin, use_reentrant=False)
            else:
                x = block(x, cos, sin, kv_cache)
        x = self.final_norm(x)
        if kv_cache is not None:
            kv_cache.advance(T)

        logits = self.lm_head(x)  # (B, T, V)
        if targets is None:
            return logits
        loss = self.cross_entropy(logits, targets)
        # training only: an eval loss stays the plain cross-entropy, comparable with dense models
        aux_loss = moe_aux_loss(block.mlp for block in self.blocks) if self.training else None
        return loss if aux_loss is None else loss + aux_loss

    @torch.inference_mode()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
        use_cache: bool = True,
        shift_fraction: float = 0.5,
    ) -> torch.Tensor:
        """Continue idx (B, T) by max_new_tokens tokens -> (B, T + max_new_tokens).

        The prompt is run once to fill a KV cache, then one token per step (use_cache False runs the
        whole window again at every step: the reference the cache is measured against). Past
        sequence_len the window slides: it drops its oldest shift_fraction of positions and is
        prefilled again, so the rotary positions of what it keeps restart at 0 (as in training,
        where every sample starts at position 0). temperature 0 picks the argmax; top_k keeps only
        the k most likely tokens before sampling.
        """
        B, T = idx.shape
        window = self.config.sequence_len
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if not 1 <= T <= window:
            raise ValueError(f"prompt of {T} tokens: need 1 to sequence_len ({window}) tokens; rotary tables end there")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
        if not 0.0 < shift_fraction <= 1.0:
            raise ValueError(f"shift_fraction must be in (0, 1], got {shift_fraction}")
        shift = max(1, round(shift_fraction * window))
        sequence, start, kv_cache, logits = idx, 0, None, None
        for step in range(max_new_tokens):
            if logits is None:  # (re)fill the window
                while sequence.size(1) - start > window:
                    start += shift
                kv_cache = self.make_kv_cache(B, max_len=window) if use_cache else None
                logits = self(sequence[:, start:], kv_cache=kv_cache)[:, -1, :]  # (B, V)
            next_token = sample_tokens(logits, temperature, top_k, generator)  # (B, 1)
            sequence = torch.cat([sequence, next_token], dim=1)
            if step == max_new_tokens - 1:
                break
            if sequence.size(1) - start > window:
                logits = None  # the window is full: slide it
            elif use_cache:
                logits = self(next_token, kv_cache=kv_cache)[:, -1, :]
            else:
                logits = self(sequence[:, start:])[:, -1, :]
        return sequence


GPT_FLAVORS = {
    "debug": dict(sequence_len=64, vocab_size=256, n_layer=2, n_head=4, n_kv_head=2, n_embd=64),
    # Trains in a few minutes on a CPU.
    "small": dict(sequence_len=256, vocab_size=8192, n_layer=4, n_head=4, n_kv_head=4, n_embd=256),
    # nanochat d20 (about 561M parameters with a 65536 vocabulary).
    "full": dict(sequence_len=2048, vocab_size=65536, n_layer=20, n_head=10, n_kv_head=10, n_embd=1280),
}

register_model(ModelSpec(name="gpt", config_cls=GPTConfig, builder=GPT, flavors=GPT_FLAVORS, task="causal_lm"))
