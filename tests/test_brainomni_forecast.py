"""BrainOmniCausalForecast (modeling/brain/brainomni_forecast.py): shapes, causality, loss at init, cached and
sliding forecasts, frozen codebooks loaded from a real tokenizer checkpoint, FLOPs, checkpointing.

Debug-sized models in fp32 on CPU with one torch thread (tiny matmuls on two busy cores run slower with two).
"""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import save_file

from modeling.registry import build_model, get_model_spec, model_config

NAME = "BrainOmniCausalForecast"
BRAINOMNI = "BrainOmniCausalTokenizer"
BRAINTOKMIX = "BrainOmniCausalTokenizerSEANetChannelMix"
# the debug forecaster on the codes of each debug tokenizer (BrainTokMix debug has 2 latent channels)
KINDS = {BRAINOMNI: {}, BRAINTOKMIX: {"tokenizer_name": BRAINTOKMIX, "num_channels": 2}}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def make(overrides: dict | None = None, seed: int = 0, randomize: bool = True):
    """The debug forecaster with random frozen codebooks; `randomize` gives the zero-initialised
    output projections and head values, so every path carries signal."""
    torch.manual_seed(seed)
    model = build_model(NAME, "debug", {"tokenizer_path": None, **(overrides or {})})
    if randomize:
        with torch.no_grad():
            for param in model.parameters():
                if param.requires_grad and param.dim() == 2 and not param.any():
                    param.normal_(std=0.1)
    return model.eval()


def random_codes(model, num_steps: int, batch: int = 2, seed: int = 1) -> torch.Tensor:
    config = model.config
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, config.vocab_size, (batch, config.num_channels, num_steps, config.num_quantizers), generator=generator)


# ------------------------------------------------------------------------------------ registry and shapes


def test_registered_as_a_causal_lm_with_a_weight_file_field():
    spec = get_model_spec(NAME)
    assert spec.task == "causal_lm" and spec.weight_file_fields == ("tokenizer_path",)
    assert set(spec.flavors) == {"debug", "small", "full"}
    assert model_config(NAME, "debug").tokenizer_path == ""  # a real run must name its tokenizer
    assert build_model(NAME, "debug", {"tokenizer_path": None}).time_axis == 2


@pytest.mark.parametrize("kind", list(KINDS))
def test_logits_and_loss_shapes(kind):
    model = make(KINDS[kind])
    C = model.config.num_channels
    codes = random_codes(model, 7)  # (2, C, 7, 2)
    assert model(codes).shape == (2, C, 7, 2, 32)
    loss = model(codes[:, :, :-1], targets=codes[:, :, 1:])
    assert loss.shape == () and torch.isfinite(loss)
    # BrainOmni adds its frozen latent queries; BrainTokMix learns a channel embedding
    is_learned = kind == BRAINTOKMIX
    assert model.channel_embedding.requires_grad is is_learned
    assert ("channel_embedding" in dict(model.named_parameters())) is is_learned
    assert not any(p.requires_grad for p in model.quantizer.parameters())

    fewer = make({**KINDS[kind], "num_quantizers_used": 1})
    assert fewer(codes).shape == (2, C, 7, 1, 32)
    # targets may hold every level: only the predicted ones are scored
    assert torch.equal(fewer(codes[:, :, :-1], codes[:, :, 1:]), fewer(codes[:, :, :-1], codes[:, :, 1:, :1]))
    with pytest.raises(ValueError, match="idx must be"):
        model(codes[:, :2] if kind == BRAINOMNI else codes[:, :1])


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="vocab_size .64. does not match the tokenizer's codebook_size .32."):
        model_config(NAME, "debug", {"vocab_size": 64})
    with pytest.raises(ValueError, match="num_channels"):
        model_config(NAME, "debug", {"num_channels": 4})
    with pytest.raises(ValueError, match="lm_head must be even"):
        model_config(NAME, "debug", {"lm_head": 3})
    with pytest.raises(ValueError, match="num_quantizers_used"):
        model_config(NAME, "debug", {"num_quantizers_used": 3})
    with pytest.raises(ValueError, match="tokenizer_name"):
        model_config(NAME, "debug", {"tokenizer_name": "Vidtok"})
    with pytest.raises(ValueError, match="tokenizer_flavor / tokenizer_args.*'n_dims'"):
        model_config(NAME, "debug", {"tokenizer_args": {"n_dims": 8}})


# ------------------------------------------------------------------------------------ causality


def _input_gradient(model, embeddings: torch.Tensor, c: int, w: int) -> torch.Tensor:
    """|d logits[0, c, w] / d embeddings| summed over the token width: (C, W)."""
    embeddings = embeddings.clone().requires_grad_(True)
    model.logits_from_embeddings(embeddings)[0, c, w].sum().backward()
    return embeddings.grad[0].abs().sum(-1)


@pytest.mark.parametrize("kind", list(KINDS))
def test_logits_at_time_w_see_only_times_up_to_w(kind):
    model = make(KINDS[kind])
    C, W = model.config.num_channels, 6
    embeddings = model.embed(random_codes(model, W, batch=1))  # (1, C, W, D)
    for c in range(C):
        for w in range(W):
            grad = _input_gradient(model, embeddings, c, w)
            assert grad[:, w + 1 :].eq(0).all(), (c, w)
            assert grad[:, : w + 1].gt(0).all(), (c, w)  # two blocks reach every channel of every earlier step


def test_channels_mix_only_within_a_time_step():
    """One block: channel attention within step w, time attention within channel c, nothing diagonal."""
    model = make({"lm_depth": 1})
    C, W = 3, 5
    embeddings = model.embed(random_codes(model, W, batch=1))
    for c in range(C):
        for w in range(W):
            grad = _input_gradient(model, embeddings, c, w)
            reaches = torch.zeros(C, W, dtype=torch.bool)
            reaches[c, : w + 1] = True  # its own channel's past
            reaches[:, w] = True  # every channel of its own step
            assert grad[reaches].gt(0).all() and grad[~reaches].eq(0).all(), (c, w)


# ------------------------------------------------------------------------------------ training


def test_loss_is_ln_k_at_init_and_falls_when_training():
    model = make(randomize=False).train()
    codes = random_codes(model, 9)
    idx, targets = codes[:, :, :-1], codes[:, :, 1:].clone()
    loss = model(idx, targets)
    assert loss.item() == pytest.approx(math.log(32), abs=1e-5)
    targets[:, 0] = -1  # ignored entries
    assert model(idx, targets).item() == pytest.approx(math.log(32), abs=1e-5)

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    codebooks = [layer.codebook.clone() for layer in model.quantizer.layers]
    for _ in range(15):
        loss = model(idx, codes[:, :, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.8 * math.log(32)
    for layer, before in zip(model.quantizer.layers, codebooks):
        assert torch.equal(layer.codebook, before)


def test_gradient_checkpointing_gives_the_same_gradients():
    codes = None
    gradients = []
    for enabled in (False, True):
        model = make().train()
        model.set_gradient_checkpointing(enabled)
        codes = random_codes(model, 8) if codes is None else codes
        model(codes[:, :, :-1], codes[:, :, 1:]).backward()
        gradients.append({name: p.grad for name, p in model.named_parameters() if p.requires_grad})
    assert gradients[0].keys() == gradients[1].keys()
    for name, grad in gradients[0].items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(gradients[1][name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_bf16_autocast_trains_and_forecasts():
    model = make().train()
    codes = random_codes(model, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(codes[:, :, :-1], codes[:, :, 1:])
        loss.backward()
        forecast = model.forecast(codes[:, :, :4], 3, temperature=0)
    assert torch.isfinite(loss) and forecast.shape == (2, 3, 7, 2)
    assert model.training  # forecast puts the model back in the mode it found


# ------------------------------------------------------------------------------------ forecasting


@pytest.mark.parametrize("kind", list(KINDS))
def test_cached_forecast_equals_uncached_greedy_and_sampling_is_seeded(kind):
    model = make(KINDS[kind])
    context = random_codes(model, 5)
    cached = model.forecast(context, 10, temperature=0)
    assert cached.shape == (2, model.config.num_channels, 15, 2)
    assert torch.equal(cached[:, :, :5], context)
    assert torch.equal(cached, model.forecast(context, 10, temperature=0, use_cache=False))
    assert cached[:, :, 5:].unique().numel() > 2  # not a constant forecast

    def sample(seed: int, **kwargs) -> torch.Tensor:
        return model.forecast(context, 10, temperature=1.0, top_k=8, generator=torch.Generator().manual_seed(seed), **kwargs)

    assert torch.equal(sample(3), sample(3))
    assert not torch.equal(sample(3), sample(4))
    assert torch.equal(sample(3, use_cache=False), sample(3, use_cache=False))
    assert torch.equal(model.forecast(context, 0), context)


def test_unpredicted_levels_repeat_the_last_known_code():
    model = make({"num_quantizers_used": 1})
    context = random_codes(model, 4)
    forecast = model.forecast(context, 6, temperature=0)
    assert forecast.shape == (2, 3, 10, 2)
    assert torch.equal(forecast[:, :, :4], context)
    assert torch.equal(forecast[:, :, 4:, 1], context[:, :, -1:, 1].expand(2, 3, 6))
    assert torch.equal(forecast, model.forecast(context, 6, temperature=0, use_cache=False))
    # the level-0 codes are what the model predicts from level 0 alone
    assert torch.equal(forecast[..., :1], model.forecast(context[..., :1], 6, temperature=0))


def test_forecast_slides_its_window_past_sequence_len():
    L, shift = 8, 4  # shift_fraction 0.5
    model = make({"sequence_len": L})
    context = random_codes(model, 6)
    forecast = model.forecast(context, 14, temperature=0)
    assert forecast.shape == (2, 3, 20, 2)
    assert torch.equal(forecast, model.forecast(context, 14, temperature=0, use_cache=False))
    with torch.no_grad():
        for n in range(6, 20):  # step n is the argmax after the window forecast[start:n], start a multiple of shift
            start = max(0, math.ceil((n - L) / shift) * shift)
            expected = model(forecast[:, :, start:n])[:, :, -1].argmax(-1)
            assert torch.equal(forecast[:, :, n], expected), n
    with pytest.raises(ValueError, match="sequence_len"):
        model(forecast[:, :, : L + 1])
    long_context = model.forecast(random_codes(model, 11), 3, temperature=0)  # a context longer than the window
    assert long_context.shape == (2, 3, 14, 2)


# ------------------------------------------------------------------------------------ tokenizer weights


def _trained_tokenizer(name: str, seed: int = 5):
    """A debug tokenizer after one training step: its codebooks are revived from encoder outputs."""
    torch.manual_seed(seed)
    tokenizer = build_model(name, "debug").train()
    tokenizer(**tokenizer.example_inputs(batch_size=2, device="cpu")).backward()
    return tokenizer.eval()


@pytest.mark.parametrize("kind", list(KINDS))
def test_frozen_codebooks_load_from_a_tokenizer_checkpoint(kind, tmp_path):
    tokenizer = _trained_tokenizer(kind)
    save_file(tokenizer.state_dict(), tmp_path / "model.safetensors")
    torch.manual_seed(0)
    model = build_model(NAME, "debug", {**KINDS[kind], "tokenizer_path": str(tmp_path)})
    for layer, reference in zip(model.quantizer.layers, tokenizer.quantizer.layers):
        assert torch.equal(layer.codebook, reference.codebook)
    codes = random_codes(model, 6)
    assert torch.equal(model.embed(codes), tokenizer.quantizer.decode(codes))
    if kind == BRAINOMNI:
        assert torch.equal(model.channel_embedding, tokenizer.encoder.neuros)
    # the file itself works too
    from_file = build_model(NAME, "debug", {**KINDS[kind], "tokenizer_path": str(tmp_path / "model.safetensors")})
    assert torch.equal(from_file.quantizer.layers[0].codebook, tokenizer.quantizer.layers[0].codebook)

    # frozen: no gradient reaches them, the optimizer never sees them, and training leaves them in eval mode
    model.train()
    assert not model.quantizer.training
    model(codes[:, :, :-1], codes[:, :, 1:]).backward()
    assert all(layer.codebook.grad is None for layer in model.quantizer.layers)
    assert all(not p.requires_grad and p.grad is None for p in model.quantizer.parameters())
    assert (model.channel_embedding.grad is not None) is (kind == BRAINTOKMIX)

    # a whole checkpoint of the forecaster is self-contained: load_model builds with tokenizer_path None
    state = model.state_dict()
    assert {key for key in state if key.startswith("quantizer.")} == {f"quantizer.layers.{i}.codebook" for i in range(2)}
    reloaded = build_model(NAME, "debug", {**KINDS[kind], "tokenizer_path": None})
    reloaded.load_state_dict(state)
    model.eval()
    torch.testing.assert_close(reloaded(codes), model(codes), rtol=0, atol=0)


def test_tokenizer_path_errors_name_the_path(tmp_path):
    with pytest.raises(ValueError, match="model.args.tokenizer_path is not set"):
        build_model(NAME, "debug")
    missing = tmp_path / "missing"
    with pytest.raises(ValueError, match=f"tokenizer_path {missing}: no tokenizer weights"):
        build_model(NAME, "debug", {"tokenizer_path": str(missing)})
    # a BrainTokMix checkpoint is not the BrainOmni tokenizer the debug forecaster expects
    other = tmp_path / "braintokmix"
    other.mkdir()
    save_file(_trained_tokenizer(BRAINTOKMIX).state_dict(), other / "model.safetensors")
    with pytest.raises(ValueError, match=f"tokenizer_path {other / 'model.safetensors'}: not a {BRAINOMNI} of this architecture"):
        build_model(NAME, "debug", {"tokenizer_path": str(other)})
    torn = tmp_path / "torn"
    torn.mkdir()
    (torn / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match=f"tokenizer_path {torn / 'model.safetensors'}: unreadable"):
        build_model(NAME, "debug", {"tokenizer_path": str(torn)})


# ------------------------------------------------------------------------------------ sizes


@pytest.mark.parametrize("kind", list(KINDS))
def test_num_flops_per_token_matches_flop_counter(kind):
    from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

    aten = torch.ops.aten
    model = make(KINDS[kind]).train()
    config = model.config
    C, W = config.num_channels, config.sequence_len
    # CPU SDPA runs as the flash_attention_for_cpu ops, which FlopCounterMode does not know: map them to
    # torch's SDPA formulas (full scores, as num_flops_per_token)
    cpu_sdpa = {
        aten._scaled_dot_product_flash_attention_for_cpu:
            lambda q, k, v, *args, out_shape=None, **kwargs: sdpa_flop_count(q, k, v),
        aten._scaled_dot_product_flash_attention_for_cpu_backward:
            lambda grad, q, k, v, *args, out_shape=None, **kwargs: sdpa_backward_flop_count(grad, q, k, v),
    }
    codes = random_codes(model, W + 1, batch=1)
    with FlopCounterMode(display=False, custom_mapping=cpu_sdpa) as counter:
        model(codes[:, :, :-1], codes[:, :, 1:]).backward()
    assert any(op in counter.get_flop_counts()["Global"] for op in cpu_sdpa)
    # torch's backward formula also recomputes Q K^T (flash attention keeps no scores): one more
    # keys x head_dim matmul per site, layer and head, which the model-FLOPs convention leaves out
    num_recompute = 2 * config.lm_depth * (config.lm_dim // 2) * (W + C)
    assert counter.get_total_flops() == (model.num_flops_per_token() + num_recompute) * C * W


def test_full_flavor_parameter_count_on_meta():
    model = build_model(NAME, "full", device="meta")
    assert all(t.is_meta for t in [*model.parameters(), *model.buffers()])
    d, half, L, Q, K, C = 1024, 512, 12, 4, 16384, 8
    attention = 2 * (half * 3 * half + 3 * half + half * half + half)  # time and channel halves, with biases
    mlp = d * 4 * d + 4 * d + 4 * d * d + d
    trainable = L * (attention + mlp) + d * Q * K + Q * K  # blocks, head; no projection (D == lm_dim), norms have no gains
    assert model.num_params(include_embedding=False) == trainable == 193_114_112
    assert model.num_params() == trainable + Q * K * d + C * d  # + frozen codebooks and neuros
    assert isinstance(model.projection, torch.nn.Identity)
