"""Tests of the FlatGPT family (modeling/brain/flatgpt.py), its HF backbones and the flat tokenizers.

Tiny configs in fp32 on CPU. Parity is checked against the HF models themselves: the LM with a
head for 1D backbones, the Qwen-VL text model with HF's own video-grid position ids for mrope.
"""

import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F

from modeling.tokenizers.flat import AmplitudeTokenizer, BPETokenizer, DelimitedTokenizer, build_flat_tokenizer
from modeling.brain.flatgpt_layers import corrupt_tokens
from modeling.layers.hf_backbones import BACKBONES, _import
from modeling.registry import build_model, model_config

VARIANTS = ["FlatGPT", "FlatGPTEmbeds", "FlatGPTEmbedsRVQ", "FlatGPTRVQ", "FlatGPTMix", "FlatGPTMixRVQ"]
# every variant, plus the channel-independent mode of the mix variants
LAYOUTS = [(name, {}) for name in VARIANTS] + [("FlatGPTMix", {"mix_method": "none"}),
                                               ("FlatGPTMixRVQ", {"mix_method": "none", "quantizer_head": "tied"})]
LAYOUT_IDS = VARIANTS + ["FlatGPTMix-none", "FlatGPTMixRVQ-none-tied"]
TINY = {"trf_args": {"num_hidden_layers": 1}}  # one layer is enough where the test is about layout


def make(name: str, overrides: dict | None = None, seed: int = 0):
    torch.manual_seed(seed)
    return build_model(name, "debug", overrides).eval()


def random_idx(model, length: int, batch: int = 2, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (batch, length, *model.token_shape), generator=generator)


# ------------------------------------------------------------------------------------ parity


@pytest.mark.parametrize("trf_class", list(BACKBONES))
def test_logits_equal_the_plain_hf_model(trf_class):
    """Same weights, same tokens: FlatGPT's logits are the HF model's (1D: its *ForCausalLM with a
    tied head; mrope: the VL text model fed HF's own position ids of the video grid)."""
    spec = BACKBONES[trf_class]
    is_mrope = spec.num_position_axes == 3
    # mrope: a (4, 6, 4) video cut by the tokenizer into a (2, 3, 2) grid; 1D: trivial grid
    grid = dict(input_shape=[4, 6, 4], temporal_reduction=2, spatial_reduction=2) if is_mrope else dict(input_shape=[12, 1, 1])
    model = make("FlatGPT", dict(trf_class=trf_class, vocab_size=50, **grid))
    idx = random_idx(model, 12)
    with torch.no_grad():
        logits = model(idx)

        config = model.backbone.config
        if is_mrope:
            reference = _import(spec, "modeling", spec.model_cls)(config).eval()
            vision_model = _import(spec, "modeling", spec.model_cls.replace("TextModel", "Model"))
            positions = vision_model.get_vision_position_ids(None, 0, torch.tensor(grid["input_shape"]), 2, 2)  # (3, 12)
            torch.testing.assert_close(model.position_ids(0, 12, 1, "cpu")[:, 0], positions, rtol=0, atol=0)
            reference.load_state_dict(model.backbone.model.state_dict(), strict=False)
            reference.embed_tokens.weight.copy_(model.embedding.weight)
            hidden = reference(input_ids=idx, position_ids=positions[:, None].expand(3, 2, 12)).last_hidden_state
            expected = F.linear(hidden, model.embedding.weight)
        else:
            reference = _import(spec, "modeling", spec.causal_lm_cls)(config).eval()
            missing, _ = reference.model.load_state_dict(model.backbone.model.state_dict(), strict=False)
            assert missing == ["embed_tokens.weight"]
            reference.model.embed_tokens.weight.copy_(model.embedding.weight)
            reference.lm_head.weight.copy_(model.embedding.weight)
            expected = reference(input_ids=idx).logits
    assert logits.shape == (2, 12, 50)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


def test_mrope_positions_walk_the_reduced_grid():
    model = make("FlatGPT", dict(TINY, input_shape=[4, 6, 4], temporal_reduction=2, spatial_reduction=[3, 2]))
    assert model.reduced_shape == model.rope_shape == (2, 2, 2)
    positions = model.position_ids(3, 4, 1, "cpu")[:, 0]  # sequence indices 3..6
    assert positions.tolist() == [[0, 1, 1, 1], [1, 0, 0, 1], [1, 0, 1, 0]]  # t, h, w
    rvq = make("FlatGPTRVQ", TINY)  # (4, 4, 4) grid: positions over (t, channel), levels stacked
    assert rvq.rope_shape == (4, 4, 1) and rvq.position_ids(5, 1, 1, "cpu")[:, 0, 0].tolist() == [1, 1, 0]
    mix = make("FlatGPTMix", TINY)
    assert mix.rope_shape == (16, 1, 1) and mix.position_ids(5, 1, 1, "cpu")[:, 0, 0].tolist() == [5, 0, 0]


# ------------------------------------------------------------------------- autoregression


@pytest.mark.parametrize("name, overrides", LAYOUTS, ids=LAYOUT_IDS)
def test_gradients_are_causal(name, overrides):
    model = make(name, overrides)
    captured = {}
    model.embedding.register_forward_hook(lambda module, inputs, output: captured.setdefault("embeds", output))
    S = model.max_positions
    logits = model(random_idx(model, S, batch=1))  # (1, S, ..., V)
    embeds = captured["embeds"]  # (B', S, D), B' = C for mix_method none
    assert logits.shape[:2] == (1, S) and embeds.shape[1] == S
    for s in (0, S // 2, S - 1):
        (grad,) = torch.autograd.grad(logits[:, s].sum(), embeds, retain_graph=True)
        per_position = grad.abs().sum(dim=(0, 2))  # (S,)
        assert torch.all(per_position[s + 1:] == 0), f"position {s} sees the future"
        assert torch.all(per_position[: s + 1] > 0), f"position {s} ignores part of its past"


@pytest.mark.parametrize("name, overrides", LAYOUTS, ids=LAYOUT_IDS)
def test_forecast_with_kv_cache_equals_uncached_argmax_loop(name, overrides):
    model = make(name, {**overrides, **TINY})
    steps = max(1, 6 // model.positions_per_step)  # 6 to 16 new positions after a one-timestep prompt
    prompt = random_idx(model, model.positions_per_step)
    out = model.forecast(prompt, steps, temperature=0.0)
    assert out.shape == (2, (steps + 1) * model.positions_per_step, *model.token_shape)

    expected = prompt
    with torch.no_grad():
        for _ in range(steps * model.positions_per_step):
            expected = torch.cat([expected, model(expected)[:, -1:].argmax(dim=-1)], dim=1)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


@pytest.mark.parametrize("name", VARIANTS)
def test_trainer_causal_lm_batches_train_every_variant(name):
    """A sample one position longer than the context, cut along axis 1 by the trainer's causal_lm task."""
    from trainer.data import causal_lm_batch

    model = make(name, TINY).train()
    samples = random_idx(model, model.max_positions + 1)  # (B, S + 1, ...)
    batch = causal_lm_batch({"tokens": samples}, torch.device("cpu"))
    loss = model(**batch)
    loss.backward()
    assert loss.item() == pytest.approx(math.log(model.config.vocab_size), abs=0.1)  # near uniform at init
    assert all(p.grad is not None for p in model.parameters())


def test_forecast_slides_its_window_past_the_grid_and_samples_reproducibly():
    model = make("FlatGPT", dict(TINY, input_shape=[3, 2, 2]))  # 12 positions, 4 per timestep
    prompt = random_idx(model, 4)
    cached = model.forecast(prompt, 5, temperature=0.0, shift_fraction=0.4)  # 24 positions: two shifts
    uncached = model.forecast(prompt, 5, temperature=0.0, shift_fraction=0.4, use_cache=False)
    assert cached.shape == (2, 24)
    torch.testing.assert_close(cached, uncached, rtol=0, atol=0)
    top1 = model.forecast(prompt, 2, temperature=0.8, top_k=1, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(top1, cached[:, :12], rtol=0, atol=0)
    first, second = (model.forecast(prompt, 2, temperature=1.0, generator=torch.Generator().manual_seed(3)) for _ in range(2))
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    torch.testing.assert_close(model.generate(prompt, 8, temperature=0.0), cached[:, :12], rtol=0, atol=0)


def test_grid_overflow_is_a_clear_error():
    model = make("FlatGPT", TINY)
    with pytest.raises(ValueError, match="run past the 64 positions"):
        model(torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(ValueError, match=r"takes idx of shape \(B, S, 4\)"):
        make("FlatGPTMix", TINY)(torch.zeros(1, 3, dtype=torch.long))


@pytest.mark.parametrize("trf_class", ["Qwen2_5_Video", "Llama"])
def test_resize_context_keeps_logits_of_the_original_positions(trf_class):
    model = make("FlatGPT", dict(TINY, trf_class=trf_class))  # grid (4, 4, 4)
    idx = random_idx(model, 64)
    with torch.no_grad():
        before = model(idx)
        model.resize_context(input_shape=[10, 4, 4])
        assert model.max_positions == 160 and model.config.input_shape == [10, 4, 4]
        expected_budget = 10 if trf_class == "Qwen2_5_Video" else 160  # largest position id + 1
        assert model.backbone.config.max_position_embeddings == model.config.trf_args["max_position_embeddings"] == expected_budget
        torch.testing.assert_close(model(idx), before, rtol=1e-5, atol=1e-5)
        longer = random_idx(model, 160)
        model(longer)

        # a new rotary base: the same model as one built with it from the start
        model.resize_context(rope_theta=5e4)
        fresh = build_model("FlatGPT", "debug", dataclasses.asdict(model.config)).eval()
        fresh.load_state_dict(model.state_dict())
        torch.testing.assert_close(model(longer), fresh(longer), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(model(idx), before, atol=1e-4)
    with pytest.raises(ValueError, match="changes only T"):
        model.resize_context(input_shape=[10, 8, 4])
    with pytest.raises(ValueError, match="cannot shrink"):
        model.resize_context(input_shape=[2, 4, 4])
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model.resize_context(input_shape=[12, 4, 4], max_position_embeddings=8)
    assert model.max_positions == 160  # a refused resize changes nothing


def test_token_corruption_only_in_train_mode():
    cfg = {"p_start": 0.5, "p_end": 0.5, "block_len_steps": 1}
    model = make("FlatGPT", dict(TINY, token_corruption_cfg=cfg))
    seen = []
    model.embedding.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    idx = random_idx(model, 64, batch=8)
    model(idx)
    torch.testing.assert_close(seen[-1], idx, rtol=0, atol=0)
    model.train()
    model(idx)
    changed = (seen[-1] != idx).view(8, 4, 16)  # (B, timesteps, tokens per timestep)
    assert changed.any() and not changed.all()
    assert torch.all(changed.all(dim=-1) == changed.any(dim=-1)), "corruption covers whole timesteps"
    # blocks of 2 timesteps start so that a timestep is covered with probability 0.3 (from the
    # second timestep on: the first has no earlier block start to cover it)
    codes = torch.randint(0, 10, (4000, 64))
    rate = (corrupt_tokens(codes, 10, 16, 0.3, 0.3, 2) != codes)[:, 16:].float().mean().item()
    assert abs(rate - 0.3) < 0.02

    rvq = make("FlatGPTEmbedsRVQ", dict(TINY, use_embedding_corruption=True))
    idx = random_idx(rvq, 64)
    eval_embeds = rvq.embedding(idx)
    torch.testing.assert_close(eval_embeds, F.embedding(idx + torch.arange(64) % 4 * 64, rvq.embedding.weight.flatten(0, 1)))
    assert not torch.equal(rvq.train().embedding(idx), eval_embeds)


# --------------------------------------------------------------------------- tokenizers


@pytest.mark.parametrize("method", ["mu_law", "uniform"])
def test_amplitude_tokenizer_round_trip_error_bound(method):
    tokenizer = AmplitudeTokenizer(num_bins=256, method=method, max_abs=3.0)
    signal = torch.cat([torch.linspace(-3, 3, 5000), torch.randn(5000).clamp(-3, 3)]).view(2, -1, 5)
    codes = tokenizer.encode(signal)
    assert codes.shape == signal.shape and codes.dtype == torch.long
    assert codes.min() == 0 and codes.max() == 255
    error = (tokenizer.decode(codes) - signal).abs()
    if method == "uniform":
        bound = torch.full_like(signal, 3.0 / 256)
    else:  # half a bin in mu-law units, mapped back: relative near full scale, absolute near 0
        bound = (signal.abs() + 3.0 / 255) * ((1 + 255) ** (1 / 256) - 1)
    assert torch.all(error <= bound * (1 + 1e-4) + 1e-6)
    small = signal.abs() < 0.1
    if method == "mu_law":  # finer than uniform bins near zero
        assert error[small].max() < 3.0 / 256 / 4
    assert torch.equal(tokenizer.encode(torch.tensor([-100.0, 100.0])), torch.tensor([0, 255]))  # clipped


def test_delimited_tokenizer_layout_and_round_trip():
    signal = torch.randn(2, 5, 3)
    amplitude = AmplitudeTokenizer(num_bins=16)
    tokenizer = DelimitedTokenizer(num_bins=16)
    tokens = tokenizer.encode(signal)
    assert tokens.shape == (2, 20) and tokenizer.vocab_size == 17
    assert torch.all(tokens.view(2, 5, 4)[..., -1] == 16) and torch.equal(tokens.view(2, 5, 4)[..., :3], amplitude.encode(signal))
    torch.testing.assert_close(tokenizer.decode(tokens), amplitude.decode(amplitude.encode(signal)))

    with_channels = DelimitedTokenizer(num_bins=16, use_channel_delimiter=True)
    tokens = with_channels.encode(signal)
    assert tokens[0, :6].tolist()[1::2] == [17, 17, 16] and with_channels.vocab_size == 18
    assert torch.equal(with_channels.strip(tokens), amplitude.encode(signal))
    with pytest.raises(ValueError, match="delimiters"):
        with_channels.strip(tokens.roll(2, dims=1))
    with pytest.raises(ValueError, match="collides"):
        DelimitedTokenizer(num_bins=16, delimiter_id=3)


def test_bpe_tokenizer_compresses_and_round_trips(tmp_path):
    generator = torch.Generator().manual_seed(0)
    time = torch.arange(64.0)
    # slow oscillations with a little noise: runs of repeated bins that BPE can merge
    signals = [torch.sin(time[:, None] / (4 + torch.rand(1, 4, generator=generator) * 4) + torch.rand(1, 4, generator=generator) * 6)
               + 0.01 * torch.randn(64, 4, generator=generator) for _ in range(20)]
    tokenizer = BPETokenizer(num_bins=32, group_size=8).train(signals, vocab_size=200)
    assert tokenizer.vocab_size == 200 and tokenizer.num_channels == 4
    batch = torch.stack(signals[:3])  # (3, 64, 4)
    ids = tokenizer.encode(batch)
    assert ids.size(1) < 64 * 4 / 2, "BPE should at least halve the amplitude tokens here"
    quantised = tokenizer.amplitude.encode(batch)
    assert torch.equal(tokenizer.decode_codes(ids), quantised)  # lossless beyond the quantisation
    torch.testing.assert_close(tokenizer.decode(ids), tokenizer.amplitude.decode(quantised))

    folder = tokenizer.save(tmp_path / "bpe")
    loaded = build_flat_tokenizer("BPETokenizer", {}, vocab_size=256, tokenizer_path=str(folder))
    assert torch.equal(loaded.encode(batch), ids)
    model = make("FlatGPT", dict(TINY, tok_class="BPETokenizer", tokenizer_path=str(folder), vocab_size=256, input_shape=[256, 1, 1]))
    assert torch.equal(model.decode(model.encode(batch)), tokenizer.decode(ids))
    with pytest.raises(ValueError, match="smaller than"):
        build_flat_tokenizer("BPETokenizer", {}, vocab_size=100, tokenizer_path=str(folder))


def test_models_encode_and_decode_signals_with_their_tokenizer():
    signal = torch.randn(2, 8, 4).clamp(-1, 1)
    mix = make("FlatGPTMix", TINY)  # (T, C) grid: idx (B, T, C)
    embeds = make("FlatGPTEmbeds", TINY)  # flat idx (B, T * C)
    assert mix.encode(signal).shape == (2, 8, 4) and embeds.encode(signal).shape == (2, 32)
    torch.testing.assert_close(embeds.decode(embeds.encode(signal)), mix.decode(mix.encode(signal)))
    assert (mix.decode(mix.encode(signal)) - signal).abs().max() < 0.05
    with pytest.raises(ValueError, match="does not fit FlatGPTRVQ"):
        make("FlatGPTRVQ", dict(TINY, tok_class="AmplitudeTokenizer"))


# ------------------------------------------------------------------------- configs, sizes


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match=r"trf_args: unknown key 'num_layers'.*'num_hidden_layers'"):
        model_config("FlatGPT", "debug", {"trf_args": {"num_layers": 3}})
    with pytest.raises(ValueError, match="mrope_section"):
        model_config("FlatGPT", "debug", {"trf_args": {"mrope_section": [4, 4, 4]}})  # head_dim 16: 8 pairs
    with pytest.raises(ValueError, match="1D positions"):
        model_config("FlatGPT", "debug", {"trf_class": "Llama", "trf_args": {"mrope_section": [2, 3, 3]}})
    with pytest.raises(ValueError, match="Did you mean 'Qwen3_Video'"):
        model_config("FlatGPT", "debug", {"trf_class": "Qwen3_video"})
    with pytest.raises(ValueError, match="intermediate_size.*expected int"):
        model_config("FlatGPT", "debug", {"trf_args": {"intermediate_size": "wide"}})
    with pytest.raises(ValueError, match="input_shape"):
        model_config("FlatGPT", "debug", {"input_shape": [4, 4]})
    with pytest.raises(ValueError, match="token_corruption_cfg"):
        model_config("FlatGPT", "debug", {"token_corruption_cfg": {"p": 0.1}})
    with pytest.raises(ValueError, match="mix_method does not apply to FlatGPT "):
        build_model("FlatGPT", "debug", {"mix_method": "none"}, device="meta")
    with pytest.raises(ValueError, match="max_position_embeddings"):
        build_model("FlatGPT", "debug", {"trf_class": "Llama", "trf_args": {"max_position_embeddings": 32}}, device="meta")
    # a trf_args override keeps the flavor's other keys; a longer sequence_len grows the grid's T
    config = model_config("FlatGPT", "debug", {"trf_args": {"num_hidden_layers": 3}, "sequence_len": 100})
    assert config.trf_args == {**model_config("FlatGPT", "debug").trf_args, "num_hidden_layers": 3}
    model = build_model("FlatGPT", "debug", dataclasses.asdict(config), device="meta")
    assert model.reduced_shape == (7, 4, 4) and model.input_shape == (7, 4, 4) and model.context_len == 100


def qwen2_5_backbone_params(D: int, trf_args: dict) -> int:
    L, H, K, I = (trf_args[k] for k in ("num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size"))
    hd = D // H
    attention = D * H * hd + H * hd + 2 * (D * K * hd + K * hd) + H * hd * D  # q, k, v with biases; o without
    return L * (attention + 3 * D * I + 2 * D) + D  # SwiGLU, two norms per layer, final norm


def embedding_and_head_params(name: str, V: int, D: int, grid: tuple[int, int, int]) -> int:
    _, C, Q = grid
    if name == "FlatGPT":
        return V * D  # head tied
    if name == "FlatGPTEmbeds":
        return C * V * D  # a table per channel, heads tied
    if name == "FlatGPTEmbedsRVQ":
        return Q * V * D  # a table per level, heads tied
    if name == "FlatGPTRVQ":
        return Q * V * (D // Q) + D * Q * V  # per-level tables of D / Q, joint head
    if name == "FlatGPTMix":
        return V * (D // C) + C * (D // C)  # token and channel tables of D / C, head tied
    d = D // (C * Q)
    return Q * V * d + C * Q * d + (Q * d) * (Q * V)  # flatgpt_mix_rvq: tables, channel table, joint head per channel


@pytest.mark.parametrize("name", VARIANTS)
def test_full_flavor_on_meta_device_parameter_count(name):
    model = build_model(name, "full", device="meta")
    assert all(p.is_meta for p in model.parameters())
    config = model_config(name, "full")
    assert config.trf_args["num_hidden_layers"] == 24
    D, V = config.hidden_size, config.vocab_size
    backbone = qwen2_5_backbone_params(D, config.trf_args)
    expected = backbone + embedding_and_head_params(name, V, D, config.reduced_shape)
    print(f"{name}/full: {model.num_params():,} parameters ({backbone:,} in the backbone), grid {config.reduced_shape}, "
          f"{model.max_positions} positions")
    assert model.num_params() == expected
    assert model.num_flops_per_token() > 6 * backbone


def test_gradient_checkpointing_matches_plain_backward():
    model = make("FlatGPTRVQ", TINY).train()
    idx = random_idx(model, 16)

    def loss_and_grads():
        model.zero_grad()
        loss = model(idx[:, :-1], idx[:, 1:])
        loss.backward()
        return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}

    plain = loss_and_grads()
    model.set_gradient_checkpointing(True)
    checkpointed = loss_and_grads()
    torch.testing.assert_close(checkpointed, plain, rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------------ trainer


def test_trainer_trains_flatgpt_on_token_shards(tmp_path, token_dataset):
    from core.config import (CheckpointConfig, DataConfig, EngineConfig, EvalConfig, LoggingConfig, ModelConfig,
                               OptimConfig, RunConfig, TrainConfig)
    from trainer.loop import Trainer

    cfg = TrainConfig(
        data=DataConfig(dataset=token_dataset, num_streams=4),
        run=RunConfig(name="flat", output_dir=str(tmp_path / "run"), max_steps=5, seed=0, device="cpu"),
        model=ModelConfig(name="FlatGPT", flavor="debug"),
        optim=OptimConfig(lr=1e-2, warmup_steps=1, micro_batch_size=8, schedule="constant"),
        engine=EngineConfig(peak_flops=1e12), checkpoint=CheckpointConfig(every_steps=0),
        logging=LoggingConfig(every_steps=1, progress=False, wandb=False), eval=EvalConfig(every_steps=0, num_batches=1),
    )
    result = Trainer(cfg).train()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records]
    assert result["finished"] and len(losses) == 5 and all(math.isfinite(x) for x in losses)
    assert losses[0] == pytest.approx(math.log(128), abs=0.05)  # uniform at init over the data's 128 codes
    assert losses[-1] < losses[0]
    state = json.loads((tmp_path / "run" / "checkpoints" / "step-00000005" / "trainer_state.json").read_text())
    assert state["model"]["args"]["vocab_size"] == 128 and state["model"]["args"]["sequence_len"] == 32


@pytest.mark.parametrize("name", ["FlatGPT", "FlatGPTEmbedsRVQ", "FlatGPTRVQ", "FlatGPTMixRVQ"])
def test_num_flops_per_token_matches_flop_counter(name):
    from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

    aten = torch.ops.aten
    model = make(name).train()
    S = model.context_len
    # CPU SDPA runs as the flash_attention_for_cpu ops, which FlopCounterMode does not know: map
    # them to torch's SDPA formulas (full S x S scores, as num_flops_per_token)
    cpu_sdpa = {
        aten._scaled_dot_product_flash_attention_for_cpu:
            lambda q, k, v, *args, out_shape=None, **kwargs: sdpa_flop_count(q, k, v),
        aten._scaled_dot_product_flash_attention_for_cpu_backward:
            lambda grad, q, k, v, *args, out_shape=None, **kwargs: sdpa_backward_flop_count(grad, q, k, v),
    }
    idx = random_idx(model, S, batch=1)
    with FlopCounterMode(display=False, custom_mapping=cpu_sdpa) as counter:
        model(idx, targets=idx).backward()
    counts = counter.get_flop_counts()["Global"]
    assert any(op in counts for op in cpu_sdpa), sorted(map(str, counts))
    config = model.backbone.config
    head_dim = config.hidden_size // config.num_attention_heads
    # torch's backward formula also recomputes Q K^T (flash attention keeps no scores): one more
    # S x S x head_dim matmul per layer and head that the model-FLOPs convention leaves out
    num_recompute = 2 * config.num_hidden_layers * config.num_attention_heads * head_dim * S
    assert counter.get_total_flops() == (model.num_flops_per_token() + num_recompute) * S
