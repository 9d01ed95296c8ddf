"""TokCom (seed: TokCom v5.2): a chunk VAE over text tokens and a flow-matching denoiser over its latents.

Registered as "tokcom_vae" (stage 1) and "tokcom_diffusion" (stage 2). Every transformer stack is
made of HF `transformers` Qwen2 parts (attention with qkv biases, SwiGLU MLP, RMSNorm, RoPE) built
from a `Qwen2Config`, with bidirectional attention: all positions of a chunk (encoder, decoder) or
of a sequence of latents (denoiser) see each other.

Stage 1, TokComVAE. A sequence (B, T) is cut into N = T // C chunks of C = chunk_size tokens (a
tail of T % C tokens is dropped).
  encoder  the C token embeddings of a chunk -> stack -> the LAST position's hidden state is the
           chunk's latent, (B, N, D). The final RMSNorm keeps latents at unit scale.
  decoder  [latent, omni x (C - 1)] -> stack -> lm_head -> logits (B, N, C, V): position i predicts
           token i of the chunk (the seed's layout: the latent itself sits at position 0, learned
           "omni" embeddings fill the other C - 1 slots). omni_token_id is an embedding row the data
           never contains: by default id vocab_size, so the embedding has vocab_size + 1 rows while
           lm_head predicts only the vocab_size real tokens.
  loss     cross-entropy of the reconstruction.
Encoder and decoder share the token embedding (as the seed); lm_head is a separate matrix (the
seed tied it to the embedding, but it has one row less here, and safetensors refuses shared tensors).

Stage 2, TokComDiffusion = the frozen VAE (requires_grad False, always in eval mode) + DenoisedModel.
  x1 = encoder latents (B, N, D), x0 ~ N(0, noise_std^2), t ~ U[min_timestep, 1 - min_timestep]
  x_t = (1 - t) x0 + t x1; the denoiser predicts x1 from (x_t, t): Qwen2 blocks with adaLN-Zero
  (shift, scale and gate of both sub-layers regressed from the timestep embedding, zero-initialised
  so every block starts as the identity, as DiT).
  loss     cross-entropy of the frozen decoder's logits of the predicted x1 (gradients flow through
           the decoder into the denoiser). The latent MSE is computed as well (`losses()`); the seed
           only logged it, so its weight mse_loss_weight defaults to 0.
  sampling Euler from x0 at t = 0 to t = 1 with velocity (x1_pred - x_t) / (1 - t), then decode.
The VAE weights come from the stage-1 checkpoint named by `vae_checkpoint`, loaded in init_weights.

Where the seed's checkpoint fields live in a tokfleet checkpoint (`trainer_state.json`):
  model_args.*                     -> model.args.* (same names; omni_token_id resolved to a number)
  config.max_length                -> model.args.sequence_len
  config.chunk_size, noise_std     -> model.args.chunk_size, model.args.noise_std (stage 2)
  config.tokenizer_path            -> "tokenizer": a folder in the run dir (or inside an export)
  stage ("vae" | "diffusion")      -> model.name "tokcom_vae" | "tokcom_diffusion" (the model's `stage`)
  vae_model_state_dict             -> model.safetensors keys vae.* (stage 2) or all keys (stage 1)
  denoised_model_state_dict        -> model.safetensors keys denoiser.*

Shapes: B batch, T tokens, C chunk_size, N chunks, D hidden_size, V vocab_size, I intermediate_size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import Qwen2Config
from transformers.models.qwen2.modeling_qwen2 import Qwen2Attention, Qwen2MLP, Qwen2RMSNorm, Qwen2RotaryEmbedding

from modeling import reports
from modeling.layers.moe import MoEFields, MoEMLP, moe_aux_loss, num_idle_expert_params
from modeling.reports import Reported
from modeling.registry import ModelSpec, register_model

WEIGHTS_FILE = "model.safetensors"  # what a stage-1 checkpoint folder (or export) holds
INIT_STD = 0.02  # Qwen2's initializer_range


@dataclass(frozen=True)
class TokComConfig:
    sequence_len: int = field(metadata={"help": "tokens per sequence (the seed's max_length); the trainer sets it from the dataset"})
    vocab_size: int = field(metadata={"help": "number of token ids of the data; the trainer sets it from the tokenizer"})
    hidden_size: int = field(metadata={"help": "width of every stack, and the size of one latent (D)"})
    num_hidden_layers: int = field(metadata={"help": "blocks in each of the encoder, the decoder and the denoiser"})
    num_attention_heads: int = field(metadata={"help": "query heads; head_dim = hidden_size / num_attention_heads"})
    num_key_value_heads: int = field(metadata={"help": "key/value heads (GQA); must divide num_attention_heads"})
    intermediate_size: int = field(metadata={"help": "width of the SwiGLU MLP"})
    chunk_size: int = field(default=4, metadata={"help": "tokens compressed into one latent (C)"})
    omni_token_id: int = field(
        default=-1, metadata={"help": "embedding row that fills the decoder's slots; -1: vocab_size, a row the data never contains"}
    )
    rms_norm_eps: float = field(default=1e-6, metadata={"help": "epsilon of the RMSNorms"})
    rope_theta: float = field(default=1_000_000.0, metadata={"help": "RoPE base"})
    use_gradient_checkpointing: bool = field(
        default=False, metadata={"help": "recompute each block in the backward pass to save activation memory"}
    )
    dropout: float = field(
        default=0.0, metadata={"help": "dropout on the attention weights of every stack while it trains (Qwen2's "
                                       "attention_dropout; the seed: 0); 0: none"}
    )

    def __post_init__(self):
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        for name in ("sequence_len", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "intermediate_size", "chunk_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads ({self.num_attention_heads})")
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(f"num_key_value_heads ({self.num_key_value_heads}) must divide num_attention_heads ({self.num_attention_heads})")
        if (self.hidden_size // self.num_attention_heads) % 2 != 0:
            raise ValueError(f"hidden_size / num_attention_heads ({self.hidden_size // self.num_attention_heads}) must be even for RoPE")
        if self.sequence_len < self.chunk_size:
            raise ValueError(f"sequence_len ({self.sequence_len}) must hold at least one chunk of chunk_size ({self.chunk_size})")
        if self.omni_token_id == -1:
            object.__setattr__(self, "omni_token_id", self.vocab_size)  # recorded resolved in the checkpoint
        if not 0 <= self.omni_token_id <= self.vocab_size:
            raise ValueError(f"omni_token_id must be -1 or in [0, vocab_size={self.vocab_size}], got {self.omni_token_id}")

    @property
    def num_embeddings(self) -> int:
        return max(self.vocab_size, self.omni_token_id + 1)

    @property
    def num_chunks(self) -> int:
        """Latents per training sequence (256 for the seed's 1024 tokens in chunks of 4)."""
        return self.sequence_len // self.chunk_size

    def qwen2(self) -> Qwen2Config:
        return Qwen2Config(
            vocab_size=self.num_embeddings, hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers, num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads, rms_norm_eps=self.rms_norm_eps,
            rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta},
            max_position_embeddings=max(self.sequence_len, self.chunk_size), attention_dropout=self.dropout,
            attn_implementation="sdpa",
        )


@dataclass(frozen=True)
class TokComDiffusionConfig(TokComConfig, MoEFields):
    """The stage-2 model; the MoE fields make the denoiser's MLPs (SwiGLU) routed mixtures of experts."""

    vae_checkpoint: str | None = field(
        default="",
        metadata={"help": "stage-1 (tokcom_vae) checkpoint folder or model.safetensors whose VAE init_weights loads; "
                          "null: a random VAE (set by loaders of a stage-2 checkpoint, which holds the VAE itself)"},
    )
    noise_std: float = field(default=0.05, metadata={"help": "std of the noise x0 that flow matching starts from"})
    min_timestep: float = field(default=1e-4, metadata={"help": "training draws t ~ U[min_timestep, 1 - min_timestep]"})
    timestep_scale: float = field(
        default=1000.0, metadata={"help": "t in [0, 1] is multiplied by this before the sinusoidal embedding (as DiT)"}
    )
    mse_loss_weight: float = field(
        default=0.0, metadata={"help": "weight of the latent MSE (x1_pred vs x1) added to the CE loss; 0: CE only, as the seed"}
    )

    def __post_init__(self):
        super().__post_init__()
        if self.noise_std <= 0:
            raise ValueError(f"noise_std must be > 0, got {self.noise_std}")
        if not 0 <= self.min_timestep < 0.5:
            raise ValueError(f"min_timestep must be in [0, 0.5), got {self.min_timestep}")
        if self.timestep_scale <= 0:
            raise ValueError(f"timestep_scale must be > 0, got {self.timestep_scale}")
        if self.mse_loss_weight < 0:
            raise ValueError(f"mse_loss_weight must be >= 0, got {self.mse_loss_weight}")
        self.check_moe(self.num_hidden_layers)


# ----------------------------------------------------------------------------- blocks


def build_mlp(config: Qwen2Config) -> nn.Module:
    """The feed-forward of every block (SwiGLU, D -> I -> D): the one place to swap in an MoE MLP."""
    return Qwen2MLP(config)


def make_bidirectional(attention: Qwen2Attention) -> Qwen2Attention:
    # HF attention is causal when no mask is given; a chunk (or a sequence of latents) is seen whole.
    attention.is_causal = False
    return attention


class VAEBlock(nn.Module):
    """A Qwen2 decoder layer (same parameter names) with bidirectional attention: (B, T, D) -> (B, T, D)."""

    def __init__(self, config: Qwen2Config, layer_idx: int):
        super().__init__()
        self.input_layernorm = Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.self_attn = make_bidirectional(Qwen2Attention(config, layer_idx))
        self.post_attention_layernorm = Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = build_mlp(config)

    def forward(self, x: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), position_embeddings, None)[0]
        return x + self.mlp(self.post_attention_layernorm(x))


class DenoiserBlock(nn.Module):
    """A Qwen2 block with adaLN-Zero: both sub-layers see their normed input shifted and scaled, and
    their output gated, by values regressed from the timestep condition. (B, N, D), (B, D) -> (B, N, D)."""

    def __init__(self, config: Qwen2Config, layer_idx: int, mlp: nn.Module | None = None):
        super().__init__()
        self.input_layernorm = Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.self_attn = make_bidirectional(Qwen2Attention(config, layer_idx))
        self.post_attention_layernorm = Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = build_mlp(config) if mlp is None else mlp  # an MoEMLP in the blocks moe_layers names
        # shift, scale, gate for attention, then for the MLP; zero-initialised (the "Zero" of adaLN-Zero)
        self.adaln_modulation = nn.Linear(config.hidden_size, 6 * config.hidden_size)

    def forward(
        self, x: torch.Tensor, cond_activated: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor]
    ) -> torch.Tensor:
        modulation = self.adaln_modulation(cond_activated).unsqueeze(1)  # (B, 1, 6D)
        shift_attn, scale_attn, gate_attn, shift_mlp, scale_mlp, gate_mlp = modulation.chunk(6, dim=-1)  # (B, 1, D) each
        h = self.input_layernorm(x) * (1 + scale_attn) + shift_attn
        x = x + gate_attn * self.self_attn(h, position_embeddings, None)[0]
        h = self.post_attention_layernorm(x) * (1 + scale_mlp) + shift_mlp
        return x + gate_mlp * self.mlp(h)


def _reset_rotary(rotary: Qwen2RotaryEmbedding) -> None:
    """The inverse frequencies are non-persistent buffers: garbage after a meta build + to_empty."""
    inv_freq, _ = rotary.compute_default_rope_parameters(rotary.config)
    rotary.inv_freq.copy_(inv_freq)
    rotary.original_inv_freq.copy_(inv_freq)


def _init_linears_and_norms(module: nn.Module) -> None:
    """Qwen2's init: normal(0, 0.02) matrices and embeddings, zero biases, unit norm gains."""
    for sub in module.modules():
        if isinstance(sub, (nn.Linear, nn.Embedding)):
            nn.init.normal_(sub.weight, mean=0.0, std=INIT_STD)
            if getattr(sub, "bias", None) is not None:
                nn.init.zeros_(sub.bias)
        elif isinstance(sub, Qwen2RMSNorm):
            nn.init.ones_(sub.weight)
        elif isinstance(sub, Qwen2RotaryEmbedding):
            _reset_rotary(sub)


def _attention_flops(config: TokComConfig, seq_len: int) -> int:
    """Forward FLOPs per position of QK^T and AV over one stack (2 matmuls x 2 flops x seq_len x D per layer)."""
    return 4 * config.num_hidden_layers * config.hidden_size * seq_len


class BidirectionalStack(nn.Module):
    """num_hidden_layers VAEBlocks and a final RMSNorm: (B, T, D) -> (B, T, D), positions 0 .. T-1."""

    def __init__(self, config: Qwen2Config):
        super().__init__()
        self.layers = nn.ModuleList(VAEBlock(config, layer_idx) for layer_idx in range(config.num_hidden_layers))
        self.norm = Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = Qwen2RotaryEmbedding(config)
        self.use_gradient_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        position_ids = torch.arange(x.size(1), device=x.device)[None]  # (1, T)
        position_embeddings = self.rotary_emb(x, position_ids)  # cos, sin: (1, T, head_dim) each
        is_checkpointing = self.use_gradient_checkpointing and self.training and torch.is_grad_enabled()
        for layer in self.layers:
            if is_checkpointing:
                x = checkpoint(layer, x, position_embeddings, use_reentrant=False)
            else:
                x = layer(x, position_embeddings)
        return self.norm(x)


# ----------------------------------------------------------------------------- stage 1


class TokComVAE(nn.Module):
    """Stage 1: chunks of C tokens <-> one latent each. forward(input_ids) -> reconstruction CE."""

    _no_split_modules = ["VAEBlock"]  # the units engines shard or wrap one by one (FSDP)
    stage = "vae"
    inference_modes = ("reconstruct", "encode")  # what `tokfleet generate --mode` can do with it

    def __init__(self, config: TokComConfig):
        super().__init__()
        self.config = config
        qwen = config.qwen2()
        self.embed_tokens = nn.Embedding(config.num_embeddings, config.hidden_size)  # data tokens + the omni row
        self.encoder = BidirectionalStack(qwen)
        self.decoder = BidirectionalStack(qwen)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.set_gradient_checkpointing(config.use_gradient_checkpointing)

    @torch.no_grad()
    def init_weights(self) -> None:
        _init_linears_and_norms(self)

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        self.encoder.use_gradient_checkpointing = enabled
        self.decoder.use_gradient_checkpointing = enabled

    def num_params(self, include_embedding: bool = True) -> int:
        num_total = sum(p.numel() for p in self.parameters())
        return num_total if include_embedding else num_total - self.embed_tokens.weight.numel()

    def flops_per_token_parts(self) -> tuple[int, int]:
        """(encoder, decoder) forward FLOPs per token: matmuls (2 x parameters, the embedding lookup
        excluded) plus attention over the C positions of a chunk."""
        config = self.config
        encoder = 2 * sum(p.numel() for p in self.encoder.parameters()) + _attention_flops(config, config.chunk_size)
        decoder = 2 * sum(p.numel() for p in self.decoder.parameters()) + 2 * self.lm_head.weight.numel()
        return encoder, decoder + _attention_flops(config, config.chunk_size)

    def num_flops_per_token(self) -> int:
        """Training FLOPs per token: forward + backward (3x the forward) of both stacks."""
        return 3 * sum(self.flops_per_token_parts())

    def chunk(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, T) -> (B, N, C), dropping a tail of T % C tokens."""
        C = self.config.chunk_size
        B, T = input_ids.shape
        if T < C:
            raise ValueError(f"a sequence of {T} tokens holds no chunk of chunk_size {C}")
        return input_ids[:, : T - T % C].reshape(B, T // C, C)

    def encode_chunks(self, chunks: torch.Tensor) -> torch.Tensor:
        """(B, N, C) token ids -> latents (B, N, D): the last position's output of the encoder."""
        B, N, C = chunks.shape
        h = self.encoder(self.embed_tokens(chunks.reshape(B * N, C)))  # (B*N, C, D)
        return h[:, -1].reshape(B, N, -1)

    def decode_logits(self, latents: torch.Tensor) -> torch.Tensor:
        """latents (B, N, D) -> logits (B, N, C, V): the latent, then C - 1 omni embeddings, through the decoder."""
        B, N, D = latents.shape
        C = self.config.chunk_size
        omni = self.embed_tokens(torch.full((1, 1), self.config.omni_token_id, device=latents.device))  # (1, 1, D)
        z = latents.reshape(B * N, 1, D)
        h = torch.cat([z, omni.to(z.dtype).expand(B * N, C - 1, D)], dim=1)  # (B*N, C, D)
        return self.lm_head(self.decoder(h)).reshape(B, N, C, -1)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids (B, T) -> mean reconstruction cross-entropy over all B * N * C tokens."""
        chunks = self.chunk(input_ids)
        logits = self.decode_logits(self.encode_chunks(chunks))
        # fp32 for the softmax: bf16 logits lose too much precision over a large vocabulary
        return F.cross_entropy(logits.float().flatten(0, 2), chunks.flatten())

    # ------------------------------------------------------------------- inference

    @torch.no_grad()
    def encode(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token ids (B, T) -> latents (B, T // C, D)."""
        return self.encode_chunks(self.chunk(input_ids))

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (B, N, D) -> the most likely token ids (B, N * C)."""
        return self.decode_logits(latents).argmax(dim=-1).flatten(1)

    @torch.no_grad()
    def reconstruct(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token ids (B, T) -> encoded and decoded again, (B, T - T % C)."""
        return self.decode(self.encode(input_ids))


# ----------------------------------------------------------------------------- stage 2


class TimestepEmbedding(nn.Module):
    """t (B,) in [0, 1] -> sinusoidal features (B, D) of t * scale, then an MLP D -> 4D -> D."""

    def __init__(self, hidden_size: int, scale: float, max_period: float = 10000.0):
        super().__init__()
        self.hidden_size = hidden_size
        self.scale = scale
        self.max_period = max_period
        self.mlp = nn.Sequential(nn.Linear(hidden_size, 4 * hidden_size), nn.SiLU(), nn.Linear(4 * hidden_size, hidden_size))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.hidden_size // 2
        freqs = torch.exp(-math.log(self.max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        angles = (t.float() * self.scale)[:, None] * freqs[None, :]  # (B, D / 2)
        features = torch.cat([angles.cos(), angles.sin()], dim=-1)  # (B, 2 * (D // 2))
        if self.hidden_size % 2:
            features = F.pad(features, (0, 1))
        weight = self.mlp[0].weight
        return self.mlp(features.to(weight.dtype))


class DenoisedModel(nn.Module):
    """x_t (B, N, D) and t (B,) -> predicted clean latents x1 (B, N, D). Bidirectional over the N chunks."""

    def __init__(self, config: TokComDiffusionConfig):
        super().__init__()
        qwen = config.qwen2()
        self.timestep_embedding = TimestepEmbedding(config.hidden_size, config.timestep_scale)
        moe_blocks = config.moe_block_indices(config.num_hidden_layers)
        self.layers = nn.ModuleList(
            DenoiserBlock(qwen, layer_idx, MoEMLP(config.hidden_size, config.intermediate_size, config.moe_config("swiglu"))
                          if layer_idx in moe_blocks else None)
            for layer_idx in range(config.num_hidden_layers))
        self.norm = Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.output_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.rotary_emb = Qwen2RotaryEmbedding(qwen)
        self.use_gradient_checkpointing = False

    @torch.no_grad()
    def init_weights(self) -> None:
        _init_linears_and_norms(self)
        for layer in self.layers:
            if isinstance(layer.mlp, MoEMLP):
                layer.mlp.init_weights(in_std=INIT_STD, out_std=INIT_STD)  # the router is a Linear: done above
        # adaLN-Zero: every block starts as the identity; the output projection starts at zero (DiT)
        for layer in self.layers:
            nn.init.zeros_(layer.adaln_modulation.weight)
            nn.init.zeros_(layer.adaln_modulation.bias)
        nn.init.zeros_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        cond_activated = F.silu(self.timestep_embedding(t))  # (B, D); the SiLU of DiT's adaLN_modulation, once for all blocks
        position_ids = torch.arange(x_t.size(1), device=x_t.device)[None]  # (1, N)
        position_embeddings = self.rotary_emb(x_t, position_ids)
        is_checkpointing = self.use_gradient_checkpointing and self.training and torch.is_grad_enabled()
        x = x_t
        for layer in self.layers:
            if is_checkpointing:
                x = checkpoint(layer, x, cond_activated, position_embeddings, use_reentrant=False)
            else:
                x = layer(x, cond_activated, position_embeddings)
        return self.output_proj(self.norm(x))


def load_vae_weights(vae: TokComVAE, path: str) -> None:
    """Copy a stage-1 VAE's weights from `path` (a checkpoint/export folder or its model.safetensors).

    A stage-2 file works too (its VAE sits under "vae."). Raises ValueError naming the path when the
    file is missing, unreadable or holds another architecture.
    """
    from safetensors.torch import load_file

    file = Path(path)
    if file.is_dir():
        file = file / WEIGHTS_FILE
    if not file.is_file():
        hint = " (a checkpoint of a sharded engine? `tokfleet export` it first)" if Path(path).is_dir() else ""
        raise ValueError(f"model.args.vae_checkpoint {path}: no stage-1 weights there: expected a tokcom_vae checkpoint "
                         f"folder holding {WEIGHTS_FILE}, or the file itself{hint}")
    device = vae.embed_tokens.weight.device
    try:
        tensors = load_file(file, device=str(device))
    except Exception as error:  # a torn or foreign file: name it
        raise ValueError(f"model.args.vae_checkpoint {file}: unreadable: {str(error).splitlines()[0]}") from None
    expected = vae.state_dict()
    if all(f"vae.{key}" in tensors for key in expected):
        tensors = {key: tensors[f"vae.{key}"] for key in expected}
    missing = sorted(set(expected) - set(tensors))
    wrong = [f"{k} {tuple(tensors[k].shape)} (model: {tuple(v.shape)})" for k, v in expected.items()
             if k in tensors and tensors[k].shape != v.shape]
    if missing or wrong:
        raise ValueError(f"model.args.vae_checkpoint {file}: not a VAE of this architecture "
                         f"(missing {missing[:3]}, wrong shapes {wrong[:3]}): use the stage-1 model args")
    vae.load_state_dict({key: tensors[key] for key in expected})


class TokComDiffusion(nn.Module):
    """Stage 2: the frozen VAE + the denoiser. forward(input_ids) -> flow-matching loss (CE through the decoder)."""

    _no_split_modules = ["VAEBlock", "DenoiserBlock"]
    stage = "diffusion"
    inference_modes = ("generate", "reconstruct", "encode")

    def __init__(self, config: TokComDiffusionConfig):
        super().__init__()
        self.config = config
        self.vae = TokComVAE(config)
        self.vae.requires_grad_(False)
        self.denoiser = DenoisedModel(config)
        self.set_gradient_checkpointing(config.use_gradient_checkpointing)
        self._last_losses: dict[str, Reported] = {}

    def train(self, mode: bool = True) -> "TokComDiffusion":
        super().train(mode)
        self.vae.eval()  # frozen: always in inference mode, whatever the engine asks
        return self

    @torch.no_grad()
    def init_weights(self) -> None:
        """A random denoiser; the VAE from config.vae_checkpoint (random when it is None)."""
        self.denoiser.init_weights()
        self.vae.init_weights()
        path = self.config.vae_checkpoint
        if path == "":
            raise ValueError("model.args.vae_checkpoint is not set: tokcom_diffusion (stage 2) starts from a trained "
                             "tokcom_vae checkpoint folder (or its model.safetensors)")
        if path is not None:
            load_vae_weights(self.vae, path)
        self.vae.requires_grad_(False)

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        self.vae.set_gradient_checkpointing(enabled)  # the decoder runs a backward pass (to the denoiser)
        self.denoiser.use_gradient_checkpointing = enabled

    def num_params(self, include_embedding: bool = True) -> int:
        return self.vae.num_params(include_embedding) + sum(p.numel() for p in self.denoiser.parameters())

    def num_flops_per_token(self) -> int:
        """Training FLOPs per token: the encoder forward only (frozen, no grad); the decoder forward and
        the backward to its input (2x the forward, no weight gradients); the denoiser's forward and
        backward (3x) over N = sequence_len / C latents, spread over the C tokens of each."""
        config = self.config
        encoder, decoder = self.vae.flops_per_token_parts()
        num_active = sum(p.numel() for p in self.denoiser.parameters()) - num_idle_expert_params(l.mlp for l in self.denoiser.layers)
        denoiser = 2 * num_active + _attention_flops(config, config.num_chunks)
        return encoder + 3 * decoder + 3 * denoiser // config.chunk_size

    def losses(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """{"ce": CE of the decoded prediction (the seed's training loss), "mse": MSE of x1_pred vs x1}.

        t and x0 are drawn from the global RNG (the trainer seeds it and checkpoints its state).
        """
        config = self.config
        chunks = self.vae.chunk(input_ids)  # (B, N, C)
        with torch.no_grad():
            x1 = self.vae.encode_chunks(chunks)  # (B, N, D), clean latents
        B = x1.size(0)
        t = config.min_timestep + (1 - 2 * config.min_timestep) * torch.rand(B, device=x1.device)  # (B,)
        x0 = torch.randn_like(x1) * config.noise_std
        t_ = t[:, None, None].to(x1.dtype)
        x_t = (1 - t_) * x0 + t_ * x1
        x1_pred = self.denoiser(x_t, t)
        logits = self.vae.decode_logits(x1_pred)  # (B, N, C, V); gradients reach x1_pred, not the frozen decoder
        ce = F.cross_entropy(logits.float().flatten(0, 2), chunks.flatten())
        mse = F.mse_loss(x1_pred.float(), x1.float())
        self._last_losses = {"ce": reports.mean(ce, chunks.numel()), "mse": reports.mean(mse, x1.numel())}
        return {"ce": ce, "mse": mse}

    @property
    def last_report(self) -> dict[str, Reported]:
        """The two parts of the last training loss, ce over tokens and mse over latent elements (modeling/reports.py)."""
        return self._last_losses

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        losses = self.losses(input_ids)
        loss = losses["ce"]
        if self.config.mse_loss_weight > 0:
            loss = loss + self.config.mse_loss_weight * losses["mse"]
        aux_loss = moe_aux_loss(layer.mlp for layer in self.denoiser.layers) if self.training else None
        return loss if aux_loss is None else loss + aux_loss

    # ------------------------------------------------------------------- inference

    @torch.no_grad()
    def sample_latents(
        self, num_chunks: int | None = None, num_steps: int = 50, batch_size: int = 1,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Euler integration of the flow from noise x0 (t = 0) to latents x1 (t = 1): (B, N, D)."""
        config = self.config
        num_chunks = config.num_chunks if num_chunks is None else num_chunks
        if num_chunks < 1 or num_steps < 1 or batch_size < 1:
            raise ValueError(f"num_chunks, num_steps and batch_size must be >= 1, got {num_chunks}, {num_steps}, {batch_size}")
        weight = self.denoiser.output_proj.weight
        x = torch.randn(batch_size, num_chunks, config.hidden_size, generator=generator, device=weight.device) * config.noise_std
        x = x.to(weight.dtype)
        dt = 1.0 / num_steps
        for step in range(num_steps):
            t = step * dt
            x1_pred = self.denoiser(x, torch.full((batch_size,), t, device=x.device))
            x = x + (x1_pred - x) / (1.0 - t) * dt  # velocity of the straight path through x_t and x1_pred
        return x

    @torch.no_grad()
    def generate(
        self, num_chunks: int | None = None, num_steps: int = 50, batch_size: int = 1,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Token ids (batch_size, num_chunks * C) decoded from sampled latents (num_chunks default: sequence_len / C)."""
        return self.vae.decode(self.sample_latents(num_chunks, num_steps, batch_size, generator))

    def encode(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(input_ids)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents)

    def reconstruct(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.vae.reconstruct(input_ids)


# ----------------------------------------------------------------------------- registry

TOKCOM_FLAVORS = {
    "debug": dict(sequence_len=32, vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=128, chunk_size=4),
    # Trains in minutes on a CPU.
    "small": dict(sequence_len=256, vocab_size=8192, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=768, chunk_size=4),
    # The seed's model_args: Qwen2.5-0.5B layers (per stack); the CodeLlama-7b tokenizer's 32016 ids.
    "full": dict(sequence_len=1024, vocab_size=32016, hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, intermediate_size=4864, chunk_size=4, rms_norm_eps=1e-6, rope_theta=1_000_000.0),
}
DIFFUSION_FLAVORS = {name: {**values, "noise_std": 0.05} for name, values in TOKCOM_FLAVORS.items()}

register_model(ModelSpec(name="tokcom_vae", config_cls=TokComConfig, builder=TokComVAE, flavors=TOKCOM_FLAVORS,
                         task="token_chunks"))
register_model(ModelSpec(name="tokcom_diffusion", config_cls=TokComDiffusionConfig, builder=TokComDiffusion,
                         flavors=DIFFUSION_FLAVORS, task="token_chunks", weight_file_fields=("vae_checkpoint",)))
