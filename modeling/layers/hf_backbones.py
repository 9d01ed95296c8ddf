"""HF `transformers` decoder stacks as causal backbones, chosen by a string and built from configs.

A backbone maps input embeddings (B, S, D) to hidden states (B, S, D) under a causal mask in
sequence order. It never sees token ids: the models that use it (FlatGPT) own their embeddings
and heads, so the HF embedding table is dropped. Position ids are

- (3, B, S): (temporal, height, width) grid coordinates, for the mrope backbones (the text
  models of Qwen2.5-VL and Qwen3-VL, which rotate separate sections of each head by each axis);
- (B, S): one flat index per position, for the others (1D RoPE; SmolLM3 skips RoPE in every
  4th layer).

Weights are random (no hub downloads): `build_backbone` builds from a config, `init_weights`
re-runs the HF model's own per-module init (needed after a meta-device build and `to_empty`,
which leaves parameters and buffers, e.g. rotary frequencies, uninitialised).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import importlib
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from modeling.layers.moe import MoEConfig, MoEMLP, num_idle_expert_params


@dataclass(frozen=True)
class BackboneSpec:
    package: str  # transformers.models.<package>
    config_cls: str
    model_cls: str  # the decoder stack without a head
    causal_lm_cls: str | None  # the same stack with an LM head (a reference for tests); None for VL text models
    num_position_axes: int  # 3: mrope (t, h, w) grid positions; 1: flat positions
    defaults: dict = field(default_factory=dict)  # config values unless trf_args sets them
    cache_cls: str = "DynamicCache"  # KV cache class, from transformers.cache_utils or the model's module
    # False where the model's one-token cached decode does not reproduce its full forward: forecasts
    # then recompute the window without a cache unless told otherwise
    is_cache_exact: bool = True


# Values every backbone gets unless trf_args overrides them. No special token ids: the
# vocabulary is the tokenizer's codes, and HF warns about ids outside it.
COMMON_DEFAULTS = dict(
    hidden_act="silu", initializer_range=0.02, rms_norm_eps=1e-6,
    bos_token_id=None, eos_token_id=None, pad_token_id=None, use_cache=True, rope_theta=10000.0,
)

BACKBONES = {
    # Qwen2.5-VL's text model: Qwen2 layers (qkv biases) with 3-section mrope.
    "Qwen2_5_Video": BackboneSpec("qwen2_5_vl", "Qwen2_5_VLTextConfig", "Qwen2_5_VLTextModel", None, 3,
                                  dict(rope_theta=1e6)),
    # Qwen3-VL's text model: Qwen3 layers (q/k norms, no biases) with interleaved mrope.
    "Qwen3_Video": BackboneSpec("qwen3_vl", "Qwen3VLTextConfig", "Qwen3VLTextModel", None, 3,
                                dict(rope_theta=5e6)),
    "Qwen2": BackboneSpec("qwen2", "Qwen2Config", "Qwen2Model", "Qwen2ForCausalLM", 1, dict(rope_theta=1e6)),
    "Qwen3": BackboneSpec("qwen3", "Qwen3Config", "Qwen3Model", "Qwen3ForCausalLM", 1, dict(rope_theta=1e6)),
    # SmolLM and SmolLM2 are Llama architectures.
    "Llama": BackboneSpec("llama", "LlamaConfig", "LlamaModel", "LlamaForCausalLM", 1, dict(rope_theta=1e5)),
    "SmoLLM3": BackboneSpec("smollm3", "SmolLM3Config", "SmolLM3Model", "SmolLM3ForCausalLM", 1,
                            dict(rope_theta=2e6)),
    # Lightning (linear) attention in every other layer, softmax attention in the rest, MoE MLPs.
    # transformers 5.23: its one-token cached decode drifts from the full forward (lightning
    # attention's block-decay prefill vs per-token recurrence), so forecasts recompute by default.
    "MiniMax": BackboneSpec("minimax", "MiniMaxConfig", "MiniMaxModel", "MiniMaxForCausalLM", 1,
                            dict(rope_theta=1e6, num_local_experts=4, num_experts_per_tok=2),
                            cache_cls="MiniMaxCache", is_cache_exact=False),
}

# trf_args keys that are ours, not fields of the HF config: folded into rope_parameters.
ROPE_KEYS = ("rope_theta", "mrope_section", "rope_parameters")
REQUIRED_KEYS = ("num_hidden_layers", "num_attention_heads", "intermediate_size")


def _nearest(bad: str, valid) -> str:
    close = difflib.get_close_matches(bad, sorted(valid), n=1, cutoff=0.5)
    return f" Did you mean {close[0]!r}?" if close else ""


def backbone_spec(trf_class: str) -> BackboneSpec:
    if trf_class not in BACKBONES:
        raise ValueError(f"trf_class: unknown backbone {trf_class!r}.{_nearest(trf_class, BACKBONES)} "
                         f"Valid: {', '.join(BACKBONES)}")
    return BACKBONES[trf_class]


def _import(spec: BackboneSpec, kind: str, name: str) -> Any:
    return getattr(importlib.import_module(f"transformers.models.{spec.package}.{kind}_{spec.package}"), name)


def default_mrope_section(trf_class: str, half_head_dim: int) -> list[int]:
    """Frequency pairs per axis (t, h, w), in the proportions of the released models.

    Qwen2.5-VL: [16, 24, 24] of 64 pairs (contiguous sections); Qwen3-VL: [24, 20, 20] of 64
    (interleaved t, h, w, with t taking the remainder).
    """
    if trf_class == "Qwen3_Video":
        spatial = half_head_dim * 20 // 64
        return [half_head_dim - 2 * spatial, spatial, spatial]
    temporal = half_head_dim // 4
    height = (half_head_dim - temporal) // 2
    return [temporal, height, half_head_dim - temporal - height]


def backbone_config(trf_class: str, trf_args: dict, *, hidden_size: int, vocab_size: int,
                    num_positions: int, attention_dropout: float = 0.0) -> Any:
    """The HF config of `trf_class` with `trf_args` on top of the defaults; errors name the key.

    trf_args holds HF config fields (num_hidden_layers, num_attention_heads, num_key_value_heads,
    intermediate_size, head_dim where the model has one, ...) plus `rope_theta`, `mrope_section`
    (mrope backbones: frequency pairs per t/h/w axis, summing to head_dim / 2) and
    `rope_parameters` (extra HF rope settings, e.g. a scaling type). `num_positions` is one more
    than the largest position id the caller will use; max_position_embeddings defaults to it and
    may not be smaller. `attention_dropout` is the HF field of that name (the model's `dropout`).
    """
    spec = backbone_spec(trf_class)
    config_cls = _import(spec, "configuration", spec.config_cls)
    config_fields = {f.name for f in dataclasses.fields(config_cls)}
    own_fields = {"hidden_size": "hidden_size", "vocab_size": "vocab_size", "attention_dropout": "dropout"}  # HF -> ours
    valid = (config_fields | set(ROPE_KEYS)) - set(own_fields)
    for key in trf_args:
        if key in own_fields:
            raise ValueError(f"trf_args.{key}: set the model's own {own_fields[key]} field instead (the backbone gets it from there)")
        if key not in valid:
            raise ValueError(f"trf_args: unknown key {key!r} for trf_class {trf_class!r}.{_nearest(key, valid)}")
    for key in REQUIRED_KEYS:
        if key not in trf_args:
            raise ValueError(f"trf_args.{key} is required (the HF default describes a multi-billion-parameter model)")
    args = {**COMMON_DEFAULTS, **spec.defaults, **trf_args, "attention_dropout": attention_dropout}
    args = {key: value for key, value in args.items() if key in config_fields or key in ROPE_KEYS}

    num_heads = args["num_attention_heads"]
    if num_heads < 1 or hidden_size % num_heads != 0 and "head_dim" not in trf_args:
        raise ValueError(f"trf_args.num_attention_heads ({num_heads}) must divide hidden_size ({hidden_size})")
    head_dim = trf_args.get("head_dim") or hidden_size // num_heads
    if "head_dim" in config_fields:
        args["head_dim"] = head_dim  # Qwen3's default is 128 whatever the width
    num_kv_heads = args.setdefault("num_key_value_heads", num_heads)
    if num_kv_heads < 1 or num_heads % num_kv_heads != 0:
        raise ValueError(f"trf_args.num_key_value_heads ({num_kv_heads}) must divide num_attention_heads ({num_heads})")
    if head_dim % 2 != 0:
        raise ValueError(f"head_dim ({head_dim}) must be even for rotary embeddings")

    rope = {"rope_type": "default", **args.pop("rope_parameters", {}), "rope_theta": float(args.pop("rope_theta"))}
    if rope["rope_theta"] <= 0:
        raise ValueError(f"trf_args.rope_theta must be > 0, got {rope['rope_theta']}")
    section = args.pop("mrope_section", None)
    if spec.num_position_axes == 3:
        section = list(section) if section is not None else default_mrope_section(trf_class, head_dim // 2)
        if len(section) != 3 or sum(section) != head_dim // 2 or min(section) < 0:
            raise ValueError(f"trf_args.mrope_section {section} must be 3 counts (t, h, w) summing to "
                             f"head_dim / 2 = {head_dim // 2}")
        rope["mrope_section"] = section
    elif section is not None:
        raise ValueError(f"trf_args.mrope_section: trf_class {trf_class!r} has 1D positions (mrope: "
                         f"{', '.join(k for k, s in BACKBONES.items() if s.num_position_axes == 3)})")
    max_positions = args.setdefault("max_position_embeddings", num_positions)
    if max_positions < num_positions:
        raise ValueError(f"trf_args.max_position_embeddings ({max_positions}) is smaller than the {num_positions} "
                         "positions the token grid needs")
    from huggingface_hub.errors import StrictDataclassError  # HF configs check field types

    try:
        return config_cls(hidden_size=hidden_size, vocab_size=vocab_size, rope_parameters=rope, **args)
    except (TypeError, ValueError, StrictDataclassError) as error:
        raise ValueError(f"trf_args for {trf_class!r}: {' '.join(str(error).split())}") from None


class HFBackbone(nn.Module):
    """An HF decoder stack without its token embedding: (B, S, D) embeddings -> (B, S, D) hidden states."""

    def __init__(self, trf_class: str, config: Any):
        super().__init__()
        spec = backbone_spec(trf_class)
        self.trf_class = trf_class
        self.num_position_axes = spec.num_position_axes
        self.is_cache_exact = spec.is_cache_exact
        self._spec = spec
        self.model = _import(spec, "modeling", spec.model_cls)(config)
        self.model.embed_tokens = None  # the FlatGPT variants embed tokens themselves

    @property
    def config(self) -> Any:
        return self.model.config

    @property
    def layer_class_name(self) -> str:
        return type(self.model.layers[0]).__name__

    def forward(self, embeds_BSD: torch.Tensor, position_ids: torch.Tensor, cache: Any | None = None) -> torch.Tensor:
        """position_ids: (3, B, S) for mrope backbones, else (B, S). With a cache, it is appended to."""
        output = self.model(inputs_embeds=embeds_BSD, position_ids=position_ids, past_key_values=cache,
                            use_cache=cache is not None)
        return output.last_hidden_state

    def make_cache(self) -> Any:
        """An empty KV cache; it sizes itself on the first forward."""
        if self._spec.cache_cls == "DynamicCache":
            from transformers.cache_utils import DynamicCache

            return DynamicCache(config=self.config)
        return _import(self._spec, "modeling", self._spec.cache_cls)()

    def use_moe_mlp(self, layer_index: int, moe: MoEConfig) -> None:
        """Replace a decoder layer's MLP by a routed mixture of experts as wide (modeling/layers/moe.py)."""
        layer = self.model.layers[layer_index]
        if not isinstance(getattr(layer, "mlp", None), nn.Module):
            raise ValueError(f"moe_num_experts: trf_class {self.trf_class!r} has no dense MLP to replace (it may route its own experts)")
        layer.mlp = MoEMLP(self.config.hidden_size, self.config.intermediate_size, moe)

    @torch.no_grad()
    def init_weights(self) -> None:
        """The HF model's own init, module by module: normal(0, initializer_range) matrices and
        embeddings, zero biases, unit norm gains, recomputed rotary frequencies (and MiniMax's
        decay tables); MoE experts normal(0, initializer_range) too."""
        for module in self.model.modules():
            self.model._init_weights(module)
            if isinstance(module, MoEMLP):
                std = self.config.initializer_range
                module.init_weights(in_std=std, out_std=std, router_std=std)

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        # HF's public switch also hooks the input embedding, which this stack does not have
        self.model._set_gradient_checkpointing(enable=enabled,
                                               gradient_checkpointing_func=functools.partial(checkpoint, use_reentrant=False))

    @torch.no_grad()
    def set_rope(self, rope_theta: float | None = None, max_position_embeddings: int | None = None) -> None:
        """Change the rotary base and/or the position budget, and recompute the rotary frequencies."""
        config = self.config
        if rope_theta is not None:
            config.rope_parameters["rope_theta"] = float(rope_theta)
        if max_position_embeddings is not None:
            config.max_position_embeddings = int(max_position_embeddings)
        for module in self.model.modules():
            if hasattr(module, "original_inv_freq"):  # the rotary embeddings
                module.config = config
                self.model._init_weights(module)
                module.max_seq_len_cached = module.original_max_seq_len = config.max_position_embeddings

    def num_matmul_params_per_position(self) -> int:
        """Matrix entries one position multiplies by (biases and norm gains are not matmuls), MoE
        experts counted for the experts a token is routed to."""
        ours = {id(param) for module in self.model.modules() if isinstance(module, MoEMLP) for param in module.parameters()}
        total = 0
        for param in self.model.parameters():
            if param.dim() == 3 and id(param) not in ours:  # the backbone's own fused experts (experts, out, in)
                total += param.numel() * self.config.num_experts_per_tok // param.size(0)
            elif param.dim() >= 2:
                total += param.numel()
        return total - num_idle_expert_params(self.model.modules())

    def num_softmax_attention_layers(self) -> int:
        layer_types = getattr(self.config, "layer_types", None) or ["full_attention"] * self.config.num_hidden_layers
        return sum(1 for kind in layer_types if kind != "linear_attention")
