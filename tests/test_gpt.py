"""Tests of the nanochat-style GPT (modeling/text/gpt.py) and its shared layers, on debug-sized configs."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from modeling.layers.transformer import KVCache, RMSNorm, apply_rotary, precompute_rotary
from modeling.text.gpt import GPT
from modeling.registry import build_model, get_model_spec, list_models, model_config

aten = torch.ops.aten


def make_model(overrides: dict | None = None, seed: int = 0) -> GPT:
    """A debug GPT whose zero-initialised projections are randomised, so every path carries signal.

    (With nanochat's init, lm_head and the c_proj weights start at zero: logits would all be equal
    and gradients to earlier layers zero, which would make the tests below vacuous.)
    """
    torch.manual_seed(seed)
    model = build_model("gpt", "debug", overrides)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("c_proj.weight") or name == "lm_head.weight":
                nn.init.normal_(param, std=1.0 / math.sqrt(param.size(1)))
    return model.eval()


@pytest.mark.parametrize("num_kv_heads", [2, 4], ids=["gqa", "mha"])
def test_kv_cache_decoding_matches_full_forward(num_kv_heads):
    model = make_model({"n_kv_head": num_kv_heads})
    idx = torch.randint(0, 256, (2, 20))
    with torch.no_grad():
        expected = model(idx)  # (B, T, V)

        # Prefill 7 tokens, then one token at a time.
        cache = model.make_kv_cache(batch_size=2, max_len=20)
        pieces = [model(idx[:, :7], kv_cache=cache)]
        for t in range(7, 20):
            pieces.append(model(idx[:, t : t + 1], kv_cache=cache))
        torch.testing.assert_close(torch.cat(pieces, dim=1), expected, rtol=1e-5, atol=1e-5)
        assert cache.pos == 20

        # Multi-token chunks on top of a non-empty cache (the masked path), then a single token.
        cache = model.make_kv_cache(batch_size=2)
        pieces = [model(idx[:, :5], kv_cache=cache), model(idx[:, 5:12], kv_cache=cache)]
        pieces += [model(idx[:, 12:19], kv_cache=cache), model(idx[:, 19:], kv_cache=cache)]
        torch.testing.assert_close(torch.cat(pieces, dim=1), expected, rtol=1e-5, atol=1e-5)


def test_kv_cache_overflow_is_a_clear_error():
    model = make_model()
    cache = model.make_kv_cache(batch_size=1, max_len=4)
    with pytest.raises(ValueError, match="KV cache holds 4"):
        model(torch.zeros(1, 5, dtype=torch.long), kv_cache=cache)
    with pytest.raises(ValueError, match="sequence_len"):
        model(torch.zeros(1, 65, dtype=torch.long))


def test_generate_greedy_equals_uncached_argmax_loop():
    model = make_model()
    prompt = torch.randint(0, 256, (3, 6))
    out = model.generate(prompt, max_new_tokens=12, temperature=0.0)
    assert out.shape == (3, 18) and out.dtype == torch.long

    expected = prompt
    with torch.no_grad():
        for _ in range(12):
            next_token = model(expected)[:, -1].argmax(dim=-1, keepdim=True)
            expected = torch.cat([expected, next_token], dim=1)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_sampling_top1_is_greedy_and_seeded_sampling_reproduces():
    model = make_model()
    prompt = torch.randint(0, 256, (2, 4))
    greedy = model.generate(prompt, 10, temperature=0.0)
    top1 = model.generate(prompt, 10, temperature=0.7, top_k=1, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(top1, greedy, rtol=0, atol=0)

    first = model.generate(prompt, 10, temperature=1.0, top_k=50, generator=torch.Generator().manual_seed(3))
    second = model.generate(prompt, 10, temperature=1.0, top_k=50, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    other_seeds = [
        model.generate(prompt, 10, temperature=1.0, generator=torch.Generator().manual_seed(seed)) for seed in (4, 5)
    ]
    assert any(not torch.equal(first, other) for other in other_seeds), "sampling ignores the generator"


def test_generate_slides_its_window_past_sequence_len():
    """Past sequence_len (64) the window drops its oldest half and is prefilled again: the cached
    generation equals the uncached one that recomputes the window at every step."""
    model = make_model()
    with pytest.raises(ValueError, match="sequence_len"):
        model.generate(torch.zeros(1, 65, dtype=torch.long), max_new_tokens=1)
    prompt = torch.randint(0, 256, (2, 60), generator=torch.Generator().manual_seed(0))
    cached = model.generate(prompt, max_new_tokens=50, temperature=0.0)
    recomputed = model.generate(prompt, max_new_tokens=50, temperature=0.0, use_cache=False)
    assert cached.shape == (2, 110)
    torch.testing.assert_close(cached, recomputed, rtol=0, atol=0)
    # the first tokens, before the window fills, are those of a plain argmax loop over the full prefix
    expected = prompt
    for _ in range(4):
        expected = torch.cat([expected, model(expected)[:, -1:].argmax(dim=-1)], dim=1)
    torch.testing.assert_close(cached[:, :64], expected, rtol=0, atol=0)


def test_dropout_only_in_training():
    model = make_model({"dropout": 0.5})
    idx = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    model.eval()
    torch.testing.assert_close(model(idx), model(idx))
    model.train()
    assert not torch.equal(model(idx), model(idx))
    with pytest.raises(ValueError, match="dropout"):
        build_model("gpt", "debug", {"dropout": 1.0}, device="meta")


def test_unset_dropouts_take_dropout():
    assert model_config("gpt", "debug").attn_dropout == 0.0
    config = model_config("gpt", "debug", {"dropout": 0.1, "attn_dropout": 0.0})
    assert (config.attn_dropout, config.resid_dropout, config.embd_dropout) == (0.0, 0.1, 0.1)
    for name in ("attn_dropout", "resid_dropout", "embd_dropout"):
        with pytest.raises(ValueError, match=name):
            model_config("gpt", "debug", {name: 1.0})


def zeroed_fractions(model: GPT, idx: torch.Tensor) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """One forward: the fraction of block 0's entries zeroed where a dropout may act on the residual stream
    (the embeddings entering it; the attention and MLP outputs joining it), and the tensors seen there."""
    block, seen = model.blocks[0], {}
    hooks = [
        block.register_forward_pre_hook(lambda module, args: seen.update(x=args[0])),
        block.attn.register_forward_hook(lambda module, args, out: seen.update(attn=out)),
        block.mlp.register_forward_hook(lambda module, args, out: seen.update(mlp=out)),
        block.register_forward_hook(lambda module, args, out: seen.update(out=out)),
    ]
    with torch.no_grad():
        model(idx)
    for hook in hooks:
        hook.remove()
    x, attn, mlp = seen["x"], seen["attn"], seen["mlp"]
    mlp_joined = seen["out"] - x - attn  # the MLP output as it joined: 0 where dropped, mlp / (1 - p) where kept
    return {
        "embd": (x == 0).float().mean().item(),
        "attn_out": (attn == 0).float().mean().item(),
        "mlp_out": (mlp_joined.abs() < 0.5 * mlp.abs()).float().mean().item(),
    }, seen


@pytest.mark.parametrize("place", ["embd", "attn", "resid"])
def test_each_dropout_acts_in_its_place(place):
    """One of the three at 0.5, the others 0: zeros appear only where it acts (attention-weight dropout
    leaves none, but changes the attention output); eval mode is the model without dropout."""
    model = make_model({f"{place}_dropout": 0.5}).train()
    idx = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    fractions, seen = zeroed_fractions(model, idx)
    for site, is_dropped in {"embd": place == "embd", "attn_out": place == "resid", "mlp_out": place == "resid"}.items():
        assert (0.4 < fractions[site] < 0.6) if is_dropped else fractions[site] < 0.02, (site, fractions)
    if place == "attn":  # the same block input, another attention output: the attention weights were dropped
        _, again = zeroed_fractions(model, idx)
        assert torch.equal(seen["x"], again["x"]) and not torch.equal(seen["attn"], again["attn"])

    reference = make_model()  # the same weights (seed 0), no dropout
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(idx), reference(idx), rtol=0, atol=0)
        torch.testing.assert_close(model(idx), reference(idx), rtol=0, atol=0)


def test_mlp_ratio_sets_the_mlp_width():
    # debug: 2 blocks of n_embd 64; an MLP holds c_fc (64 x hidden) and c_proj (hidden x 64)
    counts = {ratio: build_model("gpt", "debug", {"mlp_ratio": ratio}, device="meta").num_params() for ratio in (4, 2.5, 1)}
    assert counts[4] - counts[2.5] == 2 * 2 * 64 * (256 - 160)
    assert counts[4] - counts[1] == 2 * 2 * 64 * (256 - 64)
    model = build_model("gpt", "debug", {"mlp_ratio": 2.5}, device="meta")
    assert model.blocks[0].mlp.c_fc.weight.shape == (160, 64) and model.blocks[1].mlp.c_proj.weight.shape == (64, 160)
    moe = build_model("gpt", "debug", {"mlp_ratio": 2.5, "moe_num_experts": 2}, device="meta")
    assert all(tuple(p.shape)[1:] in {(64, 160), (160, 64)} for p in moe.blocks[1].mlp.experts.parameters())
    with pytest.raises(ValueError, match="mlp_ratio"):
        model_config("gpt", "debug", {"mlp_ratio": 1 / 3})  # 21.33 units


def test_every_model_family_states_its_dropout():
    for name in list_models():
        config_cls = get_model_spec(name).config_cls
        dropouts = [f for f in dataclasses.fields(config_cls) if f.name.endswith("dropout")]
        assert dropouts, f"{config_cls.__name__} ({name}) has no dropout field"
        assert all(f.default in (0.0, None) and f.metadata["help"] for f in dropouts), name


FAMILY_INPUTS = {  # a forward of the debug flavor that dropout changes in training
    "tokcom_vae": lambda model: model(torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))),
    "FlatGPT": lambda model: model(torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(0))),
    "totem": lambda model: model.encoder(torch.randn(4, 1, 64, generator=torch.Generator().manual_seed(0))),  # the codebook's EMA moves too
}


@pytest.mark.parametrize("name", sorted(FAMILY_INPUTS))
def test_family_dropout_acts_in_training_only(name):
    run = FAMILY_INPUTS[name]
    torch.manual_seed(0)
    plain = build_model(name, "debug").train()
    with torch.no_grad():
        torch.testing.assert_close(run(plain), run(plain), rtol=0, atol=0)
        torch.manual_seed(0)
        dropped = build_model(name, "debug", {"dropout": 0.5}).train()
        assert not torch.equal(run(dropped), run(dropped))
        torch.testing.assert_close(run(dropped.eval()), run(plain.eval()), rtol=0, atol=0)


def test_flatgpt_dropout_is_one_field():
    args = {"trf_args": {"num_hidden_layers": 1, "num_attention_heads": 4, "intermediate_size": 64, "attention_dropout": 0.1}}
    with pytest.raises(ValueError, match="set the model's own dropout field"):
        model_config("FlatGPT", "debug", args)


def test_gqa_shapes():
    model = make_model()  # debug: 4 query heads, 2 kv heads, head_dim 16
    attn = model.blocks[0].attn
    assert attn.c_q.weight.shape == (4 * 16, 64)
    assert attn.c_k.weight.shape == (2 * 16, 64)
    assert attn.c_v.weight.shape == (2 * 16, 64)
    cache = model.make_kv_cache(batch_size=3, max_len=10)
    assert cache.k.shape == cache.v.shape == (2, 3, 2, 10, 16)  # (n_layer, B, n_kv_head, max_len, head_dim)
    with torch.no_grad():
        model(torch.zeros(3, 4, dtype=torch.long), kv_cache=cache)
    assert cache.pos == 4 and cache.k[:, :, :, :4].abs().sum() > 0 and cache.k[:, :, :, 4:].abs().sum() == 0


def test_gradients_are_causal():
    model = make_model()
    captured = {}

    def keep_embedding_output(module, inputs, output):
        captured["embeddings"] = output  # (B, T, D), part of the graph since wte.weight requires grad

    model.wte.register_forward_hook(keep_embedding_output)
    idx = torch.randint(0, 256, (1, 16))
    logits = model(idx)  # (1, T, V)
    for t in (0, 5, 15):
        (grad,) = torch.autograd.grad(logits[0, t].sum(), captured["embeddings"], retain_graph=True)
        grad_norm_per_position = grad[0].abs().sum(dim=-1)  # (T,)
        assert torch.all(grad_norm_per_position[t + 1 :] == 0), f"position {t} sees the future"
        assert torch.all(grad_norm_per_position[: t + 1] > 0), f"position {t} ignores part of its past"


def test_no_biases_parameter_free_norms_untied_head():
    model = make_model()
    for module in model.modules():
        if isinstance(module, nn.Linear):
            assert module.bias is None
        if isinstance(module, RMSNorm):
            assert not list(module.parameters())
    expected_names = {"wte.weight", "lm_head.weight"}
    for layer in range(2):
        expected_names |= {f"blocks.{layer}.attn.{name}.weight" for name in ("c_q", "c_k", "c_v", "c_proj")}
        expected_names |= {f"blocks.{layer}.mlp.{name}.weight" for name in ("c_fc", "c_proj")}
    assert {name for name, _ in model.named_parameters()} == expected_names  # no gains, no position table
    assert model.lm_head.weight is not model.wte.weight
    assert model.lm_head.weight.data_ptr() != model.wte.weight.data_ptr()
    assert sum(1 for m in model.modules() if isinstance(m, RMSNorm)) == 2 + 4 * 2  # emb, final, 4 per block


def test_fresh_model_predicts_uniform():
    torch.manual_seed(0)
    model = build_model("gpt", "debug")  # zero lm_head: all logits equal
    idx = torch.randint(0, 256, (2, 64))
    loss = model(idx, targets=idx)
    torch.testing.assert_close(loss, torch.tensor(math.log(256)), rtol=1e-5, atol=1e-5)
    targets = idx.clone()
    targets[:, ::2] = -1  # ignored positions do not count
    torch.testing.assert_close(model(idx, targets=targets), loss)


def test_gradient_checkpointing_matches_plain_backward():
    model = make_model().train()
    idx = torch.randint(0, 256, (2, 32))
    targets = torch.randint(0, 256, (2, 32))
    num_block_calls = [0]
    for block in model.blocks:
        block.register_forward_pre_hook(lambda *args: num_block_calls.__setitem__(0, num_block_calls[0] + 1))

    def loss_and_grads():
        model.zero_grad()
        num_block_calls[0] = 0
        loss = model(idx, targets)
        loss.backward()
        return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}, num_block_calls[0]

    plain_loss, plain_grads, plain_calls = loss_and_grads()
    model.set_gradient_checkpointing(True)
    ckpt_loss, ckpt_grads, ckpt_calls = loss_and_grads()
    assert (plain_calls, ckpt_calls) == (2, 4)  # each block recomputed once in the backward
    torch.testing.assert_close(ckpt_loss, plain_loss, rtol=0, atol=0)
    torch.testing.assert_close(ckpt_grads, plain_grads, rtol=1e-6, atol=1e-7)


def test_num_flops_per_token_matches_flop_counter():
    model = make_model().train()
    config = model.config
    T = config.sequence_len
    # On CPU, SDPA runs as aten._scaled_dot_product_flash_attention_for_cpu(_backward), which
    # FlopCounterMode does not know (it would count 0). Map those ops to torch's own SDPA formulas.
    # Both count the full T x T score matrix (causal masking is not discounted), as our formula does.
    def forward_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
        return sdpa_flop_count(query_shape, key_shape, value_shape)

    def backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
        return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)

    cpu_sdpa = {
        aten._scaled_dot_product_flash_attention_for_cpu: forward_flops,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: backward_flops,
    }
    idx = torch.randint(0, config.vocab_size, (1, T))
    with FlopCounterMode(display=False, custom_mapping=cpu_sdpa) as counter:
        model(idx, targets=idx).backward()
    counts = counter.get_flop_counts()["Global"]
    num_measured = counter.get_total_flops()

    # Matmuls of the linear layers: exactly 6 flops per parameter and token (2 forward, 4 backward;
    # even the first block computes input gradients, since the embedding table trains).
    num_linear = sum(num_flops for op, num_flops in counts.items() if op not in cpu_sdpa)
    assert num_linear == 6 * model.num_params(include_embedding=False) * T

    # Attention: torch's backward formula also counts recomputing QK^T (flash attention keeps no
    # scores), one more T x T x Dh matmul = 2 * n_layer * n_head * head_dim * T flops per token that
    # nanochat's convention (model FLOPs, no recompute) leaves out. Account for it exactly...
    num_recompute_per_token = 2 * config.n_layer * config.n_head * config.head_dim * T
    assert num_measured == (model.num_flops_per_token() + num_recompute_per_token) * T
    # ...which makes the estimate a few percent low of what torch counts. Elementwise work (norms,
    # rotary, softmax, ReLU^2, cross-entropy) is ignored by both FlopCounterMode and the formula.
    relative_gap = 1 - model.num_flops_per_token() * T / num_measured
    assert 0 < relative_gap < 0.03, relative_gap


def test_overfits_one_batch():
    torch.manual_seed(0)
    model = build_model("gpt", "debug").train()  # nanochat's init, zero output projections included
    idx = torch.randint(0, 256, (8, 65))  # 512 random next-token pairs to memorise
    inputs, targets = idx[:, :-1], idx[:, 1:]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.0)
    for step in range(100):
        loss = model(inputs, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if loss.item() < 0.5:
            break
    assert loss.item() < 0.5, f"loss {loss.item():.3f} after {step + 1} steps"


def test_full_flavor_on_meta_device_parameter_count():
    model = build_model("gpt", "full", device="meta")
    assert all(p.is_meta for p in model.parameters())
    config = model_config("gpt", "full")
    V, D, L = config.vocab_size, config.n_embd, config.n_layer
    kv_dim = config.n_kv_head * config.head_dim
    num_attention = D * D + 2 * D * kv_dim + D * D  # q, k and v, output projection
    num_mlp = 8 * D * D  # D -> 4D -> D
    num_expected = V * D + V * D + L * (num_attention + num_mlp)  # embedding, lm_head, blocks
    print(f"gpt/full: {model.num_params():,} parameters ({model.num_params(include_embedding=False):,} non-embedding)")
    assert model.num_params() == num_expected == 560_988_160
    assert model.num_params(include_embedding=False) == num_expected - V * D


def test_rotary_matches_transformers_llama():
    from transformers.models.llama import modeling_llama as llama

    B, T, H, Dh = 2, 10, 3, 8
    cos, sin = precompute_rotary(T, Dh)  # (T, Dh / 2)
    q, k = torch.randn(B, T, H, Dh), torch.randn(B, T, H, Dh)
    # HF expects (B, H, T, Dh) and cos/sin duplicated over the two halves: (B, T, Dh).
    cos_hf, sin_hf = torch.cat([cos, cos], dim=-1)[None], torch.cat([sin, sin], dim=-1)[None]
    q_hf, k_hf = llama.apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos_hf, sin_hf)
    torch.testing.assert_close(apply_rotary(q, cos, sin), q_hf.transpose(1, 2))
    torch.testing.assert_close(apply_rotary(k, cos, sin), k_hf.transpose(1, 2))


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="n_head"):
        model_config("gpt", "debug", {"n_head": 3})  # 64 % 3 != 0
    with pytest.raises(ValueError, match="n_kv_head"):
        model_config("gpt", "debug", {"n_kv_head": 3})
    with pytest.raises(ValueError, match="head_dim"):
        model_config("gpt", "debug", {"n_embd": 36, "n_head": 4})  # head_dim 9
    with pytest.raises(ValueError, match="n_layer"):
        model_config("gpt", "debug", {"n_layer": 0})


def test_kv_cache_is_plain_preallocated_storage():
    cache = KVCache(num_layers=2, batch_size=1, num_kv_heads=2, max_len=8, head_dim=4)
    k = torch.ones(1, 2, 3, 4)
    k_all, v_all = cache.insert(1, k, 2 * k)
    assert k_all.shape == (1, 2, 3, 4) and cache.pos == 0  # the model advances pos after all layers
    cache.advance(3)
    k_all, _ = cache.insert(1, k, k)
    assert k_all.shape == (1, 2, 6, 4)
    cache.reset()
    assert cache.pos == 0


def test_causal_attention_matches_explicit_softmax():
    """The model's attention against a hand-written masked softmax, on repeated kv heads."""
    model = make_model()
    attn = model.blocks[0].attn
    x = torch.randn(2, 9, 64)
    cos, sin = model.rotary(0, 9)
    with torch.no_grad():
        out = attn(x, cos, sin)
        q = F.rms_norm(apply_rotary(attn.c_q(x).view(2, 9, 4, 16), cos, sin), (16,)).transpose(1, 2)
        k = F.rms_norm(apply_rotary(attn.c_k(x).view(2, 9, 2, 16), cos, sin), (16,)).transpose(1, 2)
        v = attn.c_v(x).view(2, 9, 2, 16).transpose(1, 2)
        k, v = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)  # (B, H, T, Dh)
        scores = q @ k.transpose(-1, -2) / math.sqrt(16)  # (B, H, T, T)
        scores = scores.masked_fill(~torch.ones(9, 9, dtype=torch.bool).tril(), float("-inf"))
        y = (scores.softmax(dim=-1) @ v).transpose(1, 2).reshape(2, 9, 64)
        torch.testing.assert_close(out, attn.c_proj(y), rtol=1e-5, atol=1e-5)
