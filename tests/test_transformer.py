"""Tests of the configurable transformer (modeling/transformer/, seed 003) on tiny fp32 configs."""

from __future__ import annotations

import dataclasses
import logging
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from modeling import reports
from modeling.moe import MoEMLP
from modeling.registry import build_model, get_model_spec, model_config
from modeling.transformer import TransformerConfig, TransformerDecoder, TransformerEncoder, TransformerForecaster
from modeling.transformer.attention import sdpa_attention, spectral_tokens, standard_attention
from modeling.transformer.chunked_attention import ChunkedAttention, chunked_attention
from modeling.transformer.norms import AdaptiveNorm

TINY = dict(input_size=3, output_size=2, context_length=12, pred_length=6, d_model=16, nhead=2, num_layers=2,
            dim_feedforward=24)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Models this small only pay for thread hand-offs (a shared 2-core machine): one thread, restored after."""
    num_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(num_threads)


def make_model(seed: int = 0, **overrides) -> TransformerForecaster:
    torch.manual_seed(seed)
    return build_model("TransformerForecaster", "debug", {**TINY, **overrides})


def batch(config: TransformerConfig, batch_size: int = 3, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    context = torch.randn(batch_size, config.context_length, config.input_size, generator=generator)
    target = torch.randn(batch_size, config.pred_length, config.output_size, generator=generator)
    return context, target


@pytest.mark.parametrize("norm_first", [True, False], ids=["pre", "post"])
@pytest.mark.parametrize("norm_type", ["layer", "rms", "adaptive"])
@pytest.mark.parametrize("att_type", ["standard", "xformer", "flash", "frequency"])
def test_shapes_for_every_kernel_norm_and_placement(att_type, norm_type, norm_first):
    model = make_model(att_type=att_type, norm_type=norm_type, norm_first=norm_first, xformer_chunk_size=5, frequency_modes=4)
    context, target = batch(model.config)
    loss = model(context, target)
    assert loss.shape == () and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    memory = model.encoder(context)
    assert memory.shape == (3, 12, 16)
    assert model.decoder(model.decoder_inputs(context, target), memory).shape == (3, 6, 2)
    assert model.predict(context).shape == (3, 6, 2)
    assert model.predict(context, pred_length=9).shape == (3, 9, 2)  # any horizon: positions are computed, not tabled
    assert set(model.last_report) >= {"mse", "mae"}


def test_pre_and_post_norm_differ_only_where_they_should():
    pre, post = make_model(norm_first=True), make_model(norm_first=False)
    assert isinstance(pre.encoder.final_norm, nn.LayerNorm) and isinstance(post.encoder.final_norm, nn.Identity)
    assert not isinstance(make_model(use_final_norm=False).decoder.final_norm, nn.LayerNorm)
    # the same layers and norms: only the final norm (pre-norm only) differs in the parameter count
    final_norms = 2 * 2 * 16  # encoder and decoder, weight and bias
    assert pre.num_params() - post.num_params() == final_norms


@pytest.mark.parametrize("is_causal", [True, False], ids=["causal", "full"])
def test_attention_kernels_agree(is_causal):
    """Explicit, chunked (chunks not dividing T) and SDPA attention: same outputs and gradients."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 37, 8, dtype=torch.float64).float().requires_grad_() for _ in range(3))
    results = []
    for kernel in (lambda: standard_attention(q, k, v, is_causal),
                   lambda: chunked_attention(q, k, v, is_causal, chunk_size=8),
                   lambda: sdpa_attention(q, k, v, is_causal)[0]):
        out = kernel()
        grads = torch.autograd.grad((out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum(), (q, k, v))
        results.append((out, *grads))
    for other in results[1:]:
        for expected, actual in zip(results[0], other):
            torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("is_causal", [True, False], ids=["causal", "full"])
def test_chunked_attention_backward_with_dropout_is_its_gradient(is_causal):
    """gradcheck (fp64) of the hand-written block backward, with dropout: the masks are replayed."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 11, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    assert torch.autograd.gradcheck(lambda q, k, v: ChunkedAttention.apply(q, k, v, is_causal, 4, 0.3, 1234), (q, k, v))
    # the same seed drops the same weights: with dropout 0.3 about 30% of them are gone
    out = ChunkedAttention.apply(q, k, v, is_causal, 4, 0.3, 1234)
    torch.testing.assert_close(out, ChunkedAttention.apply(q, k, v, is_causal, 4, 0.3, 1234))
    assert not torch.allclose(out, standard_attention(q, k, v, is_causal))


def test_standard_xformer_and_flash_models_agree_on_the_same_weights():
    standard = make_model(att_type="standard")
    context, target = batch(standard.config)
    outputs = {}
    for att_type in ("standard", "xformer", "flash"):
        model = make_model(att_type=att_type, xformer_chunk_size=5)
        model.load_state_dict(standard.state_dict())  # the kernel holds no weights: same parameters
        loss = model(context, target)
        loss.backward()
        grads = [p.grad for p in model.parameters()]
        outputs[att_type] = (loss.detach(), model.predict(context), grads)
    for att_type in ("xformer", "flash"):
        loss, prediction, grads = outputs[att_type]
        torch.testing.assert_close(loss, outputs["standard"][0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(prediction, outputs["standard"][1], rtol=1e-5, atol=1e-5)
        for grad, expected in zip(grads, outputs["standard"][2]):
            torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-6)


def test_flash_says_which_kernel_ran(caplog):
    import modeling.transformer.attention as attention

    attention._sdpa_choice.clear()  # probe again, so the log line is written in this test
    model = make_model(att_type="flash")
    with caplog.at_level(logging.INFO, logger="modeling.transformer"):
        model(*batch(model.config))
    assert model.attention_kernel.startswith("sdpa:")  # e.g. sdpa:FLASH_ATTENTION (torch's CPU flash kernel)
    assert any("scaled_dot_product_attention runs the" in r.message for r in caplog.records)
    assert any("attention ran " + model.attention_kernel in r.message for r in caplog.records)
    is_flash = model.attention_kernel == "sdpa:FLASH_ATTENTION"
    assert model.last_report["attention/flash_kernel"].value.item() == float(is_flash)
    # the causal decoder under att_type frequency stays in the time domain, and says so
    model = make_model(att_type="frequency")
    model(*batch(model.config))
    assert model.attention_kernel == "frequency, standard"


def test_share_layers_really_shares():
    separate, shared = make_model(num_layers=3), make_model(num_layers=3, share_layers=True)
    encoder_layer = sum(p.numel() for p in separate.encoder.layers[0].parameters())
    decoder_layer = sum(p.numel() for p in separate.decoder.layers[0].parameters())
    assert separate.num_params() - shared.num_params() == 2 * encoder_layer + 2 * decoder_layer
    assert len(shared.encoder.layers) == 1 and len(shared.decoder.layers) == 1
    assert shared.num_params() == make_model(num_layers=1, share_layers=True).num_params()
    # ...but the one layer is applied three times: three layers' worth of computation
    context, target = batch(shared.config)
    one_pass = make_model(num_layers=1, share_layers=True)
    one_pass.load_state_dict(shared.state_dict())
    assert not torch.allclose(shared(context, target), one_pass(context, target))


@pytest.mark.parametrize("norm_first", [True, False], ids=["pre", "post"])
@pytest.mark.parametrize("att_type", ["standard", "xformer", "flash", "frequency"])
def test_incremental_decoding_equals_the_full_causal_forward(att_type, norm_first):
    model = make_model(att_type=att_type, norm_first=norm_first, share_layers=att_type == "xformer", frequency_modes=4).eval()
    context, target = batch(model.config)
    with torch.no_grad():
        memory = model.encoder(context)
        tgt = model.decoder_inputs(context, target)  # (B, Tp, output_size)
        expected = model.decoder(tgt, memory)
        state, steps = None, []
        for t in range(tgt.size(1)):
            out, state = model.decoder.forward_one_step(tgt[:, t : t + 1], memory, state)
            steps.append(out)
        torch.testing.assert_close(torch.cat(steps, dim=1), expected, rtol=1e-5, atol=1e-5)
        layer_state = state["layers"][1]  # the seed's structure, one cache per depth (shared layers too)
        assert layer_state["self_attn"]["key"].shape == (3, 2, 6, 8)
        num_memory_tokens = 12 if att_type != "frequency" else 4 + 3  # 4 modes: 4 real parts, 3 imaginary
        assert layer_state["cross_attn"]["value"].shape == (3, 2, num_memory_tokens, 8)
        # predict() feeds back its own predictions: the full forward on them reproduces them
        prediction = model.predict(context)
        fed_back = torch.cat([model.start_proj(context[:, -1:]), prediction[:, :-1]], dim=1)
        torch.testing.assert_close(model.decoder(fed_back, memory), prediction, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("att_type", ["standard", "xformer", "flash", "frequency"])
def test_decoder_gradients_are_causal(att_type):
    model = make_model(att_type=att_type, xformer_chunk_size=4).eval()
    context, target = batch(model.config, batch_size=1)
    target.requires_grad_()
    prediction = model.decoder(model.decoder_inputs(context, target), model.encoder(context))  # (1, Tp, output_size)
    for t in range(model.config.pred_length):
        (grad,) = torch.autograd.grad(prediction[0, t].sum(), target, retain_graph=True)
        seen = grad[0].abs().sum(dim=-1)  # (Tp,): how much step t's prediction depends on each target step
        assert torch.all(seen[t:] == 0), (t, seen)  # not on its own target, nor later ones (teacher forcing)
        assert torch.all(seen[:t] > 0), (t, seen)


@pytest.mark.parametrize("att_type", ["standard", "xformer", "flash", "frequency"])
def test_dropout_acts_in_training_only(att_type):
    plain, dropped = make_model(att_type=att_type, xformer_chunk_size=5), make_model(att_type=att_type, xformer_chunk_size=5, dropout=0.3)
    context, target = batch(plain.config)
    with torch.no_grad():
        assert dropped(context, target) != dropped(context, target)  # new masks every call
        torch.testing.assert_close(dropped.eval()(context, target), plain.eval()(context, target), rtol=0, atol=0)


def test_a_short_overfit_lowers_the_loss():
    """A few sine waves of several periods: 80 Adam steps take the MSE to a fraction of its start."""
    model = make_model(norm_type="rms", activation="swish", dropout=0.1)
    steps = torch.arange(18, dtype=torch.float32)
    phases = torch.linspace(0, 3, 8)[:, None]
    waves = torch.stack([torch.sin(0.5 * steps + phases), torch.cos(0.3 * steps + phases), torch.sin(0.8 * steps)[None].expand(8, -1)], -1)
    context, target = waves[:, :12], waves[:, 12:, :2]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    losses = []
    for _ in range(80):
        loss = model(context, target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0], (losses[0], losses[-1])
    model.eval()
    assert F.mse_loss(model.predict(context), target).item() < 0.2 * losses[0]


def test_moe_variant_trains_reports_and_counts_its_experts():
    model = make_model(moe_num_experts=4, moe_top_k=2, activation="swish", moe_layers="all")
    layers = [m for m in model.modules() if isinstance(m, MoEMLP)]
    assert len(layers) == 4 and layers[0].experts.w_gate is not None  # every layer, SwiGLU experts
    context, target = batch(model.config)
    model.train()
    loss = model(context, target)
    assert loss.item() > model.last_report["mse"].value.item()  # + the weighted load-balancing loss
    loss.backward()
    assert layers[0].experts.w_in.grad.abs().sum() > 0
    figures = reports.collect(reports.reporting_modules(model))
    assert {"mse", "mae", "moe/load", "moe/dropped"} <= set(figures)
    assert figures["moe/load"].value.sum().item() == 2 * 3 * (12 + 6) * 2  # top-2 of B x steps, encoder and decoder layers
    assert model.eval().predict(context).shape == (3, 6, 2)
    # FLOPs: a token runs through top_k = 2 experts, so the MoE model costs more than the dense one
    dense = make_model(activation="swish")
    assert model.num_flops_per_token() > dense.num_flops_per_token()
    with pytest.raises(ValueError, match="activation must be swish"):
        model_config("TransformerForecaster", "debug", {**TINY, "moe_num_experts": 2, "activation": "gelu"})


def test_moe_plain_activation_and_shared_layers():
    model = make_model(moe_num_experts=2, moe_top_k=1, use_swiglu=False, activation="relu", share_layers=True)
    assert [m.config.activation for m in model.modules() if isinstance(m, MoEMLP)] == ["relu", "relu"]
    model(*batch(model.config)).backward()


@pytest.mark.parametrize("att_type", ["standard", "xformer"])
def test_gradient_checkpointing_gives_the_same_gradients(att_type):
    grads = []
    for is_checkpointing in (False, True):
        model = make_model(att_type=att_type, xformer_chunk_size=5, dropout=0.1).train()
        model.set_gradient_checkpointing(is_checkpointing)
        torch.manual_seed(7)  # the same dropout masks (checkpointing replays them)
        model(*batch(model.config)).backward()
        grads.append([p.grad for p in model.parameters()])
    for with_checkpointing, without in zip(grads[1], grads[0]):
        torch.testing.assert_close(with_checkpointing, without, rtol=1e-5, atol=1e-7)


def test_flops_per_context_step_are_counted_from_the_layers():
    """The FlopCounterMode count equals the matmuls written out by hand (non-gated, standard)."""
    model = make_model(use_swiglu=False)
    D, F_, Tc, Tp, L = 16, 24, 12, 6, 2
    linear = lambda fan_in, fan_out, steps: 2 * fan_in * fan_out * steps  # noqa: E731
    encoder = linear(3, D, Tc) + L * (4 * linear(D, D, Tc) + linear(D, F_, Tc) + linear(F_, D, Tc) + 2 * 2 * Tc * Tc * D)
    decoder_layer = (4 * linear(D, D, Tp) + 2 * 2 * Tp * Tp * D  # self-attention
                     + 2 * linear(D, D, Tp) + 2 * linear(D, D, Tc) + 2 * 2 * Tp * Tc * D  # cross: q, out on Tp; k, v on Tc
                     + linear(D, F_, Tp) + linear(F_, D, Tp))
    decoder = linear(2, D, Tp) + L * decoder_layer + linear(D, 2, Tp) + linear(3, 2, 1)  # + output and start projections
    assert model.num_flops_per_token() == round(3 * (encoder + decoder) / Tc)
    # the chunked and SDPA kernels compute the same attention: the same count
    assert make_model(use_swiglu=False, att_type="xformer").num_flops_per_token() == model.num_flops_per_token()


def test_init_choices():
    for init in ("xavier", "normal", "depth_scaled"):
        model = make_model(init=init, num_layers=3)
        out_std = [layer.feed_forward.w_out.weight.std().item() for layer in model.encoder.layers]
        if init == "depth_scaled":  # layer l's output projection: 0.02 / sqrt(2 (l + 1))
            for depth, std in enumerate(out_std):
                assert std == pytest.approx(0.02 / math.sqrt(2 * (depth + 1)), rel=0.25)
        elif init == "normal":
            assert all(std == pytest.approx(0.02, rel=0.25) for std in out_std)
        else:  # xavier uniform: std sqrt(2 / (fan_in + fan_out))
            assert all(std == pytest.approx(math.sqrt(2 / (24 + 16)), rel=0.2) for std in out_std)
        assert all(torch.all(layer.self_attn.q_proj.bias == 0) for layer in model.encoder.layers)


def test_adaptive_norm_spans_layer_and_rms_norm():
    norm = AdaptiveNorm(8)
    norm.reset_parameters()
    x = torch.randn(4, 5, 8) + 3.0
    with torch.no_grad():
        norm.alpha.fill_(50.0)  # sigmoid -> 1: re-centred, LayerNorm
        torch.testing.assert_close(norm(x), F.layer_norm(x, (8,), eps=1e-5))
        norm.alpha.fill_(-50.0)  # sigmoid -> 0: RMSNorm
        torch.testing.assert_close(norm(x), F.rms_norm(x, (8,), eps=1e-5))


@pytest.mark.parametrize("length", [10, 11])
def test_spectral_tokens_keep_every_real_degree_of_freedom(length):
    x = torch.randn(2, 3, length, 4)
    assert spectral_tokens(x, num_modes=100).shape == (2, 3, length, 4)  # T real numbers -> T tokens, none always 0
    assert spectral_tokens(x, num_modes=3).shape == (2, 3, 3 + 2, 4)
    # the constant mode is the (orthonormal) sum over time
    torch.testing.assert_close(spectral_tokens(x, 1)[:, :, 0], x.sum(dim=2) / math.sqrt(length))


def test_encoder_and_decoder_are_importable_modules():
    config = model_config("TransformerForecaster", "debug", TINY)
    encoder, decoder = TransformerEncoder(config), TransformerDecoder(config)
    memory = encoder(torch.randn(2, 7, 3))  # any context length
    assert memory.shape == (2, 7, 16)
    assert decoder(torch.randn(2, 4, 2), memory).shape == (2, 4, 2)


def test_flavors_and_bad_configs():
    spec = get_model_spec("TransformerForecaster")
    assert spec.task == "series_forecast" and set(spec.flavors) == {"debug", "small", "full"}
    full = build_model("TransformerForecaster", "full", device="meta")
    assert 400e6 < full.num_params() < 500e6  # the seed's large configuration: 12 + 12 layers of width 1024
    for field, value, message in (("att_type", "sparse", "att_type must be one of"), ("norm_type", "batch", "norm_type must be"),
                                  ("nhead", 3, "nhead .3. must divide d_model"), ("init", "zeros", "init must be one of")):
        with pytest.raises(ValueError, match=message):
            model_config("TransformerForecaster", "debug", {**TINY, field: value})
    model = make_model()
    with pytest.raises(ValueError, match="input_size = 3"):
        model(torch.zeros(2, 12, 4), torch.zeros(2, 6, 2))
    assert dataclasses.asdict(model.config)["num_encoder_layers"] == 2  # resolved from num_layers, recorded


def test_the_family_imports_no_distributed_code():
    """DESIGN.md: model code is architecture only (torch), so every engine, DeepSpeed included, wraps it."""
    import ast
    from pathlib import Path

    import modeling.transformer

    for path in sorted(Path(modeling.transformer.__file__).parent.glob("*.py")):
        tree = ast.parse(path.read_text())
        imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
        assert all(name.split(".")[0] in ("torch", "modeling", "__future__", "dataclasses", "logging", "math", "typing",
                                          "warnings") for name in imported), (path.name, imported)
        assert not any(name.startswith("torch.distributed") for name in imported), path.name
