"""Tests of the tokenizer models (TOTEM, BrainOmni, BrainTokMix, Vidtok, VidtokRVQ) and their shared
parts: quantisers, causal encoders/decoders, RevIN, registry flavors, and short overfits on
synthetic MEG-like signals (1/f noise + alpha rhythm) and a synthetic moving-blob video."""

import dataclasses
import math

import pytest
import torch

from modeling.tokenizers.brainomni import CausalTokenSequence
from modeling.layers.causal_conv import CausalConv1d, CausalConv3d, CausalConvTranspose1d
from modeling.tokenizers.quantizers import (
    FiniteScalarQuantizer,
    ResidualVectorQuantizer,
    VectorQuantizer,
    code_histogram,
    perplexity_from_counts,
    set_quantizer_all_reduce,
)
from modeling.registry import build_model, get_model_spec, list_models, model_config
from modeling.tokenizers.totem import RevIN
from modeling.tokenizers.vidtok import model_output_to_video, video_to_model_input

SIGNAL_MODELS = ["totem", "BrainOmniCausalTokenizer", "BrainOmniCausalTokenizerSEANetChannelMix"]
BRAINOMNI_MODELS = SIGNAL_MODELS[1:]
VIDEO_MODELS = ["Vidtok", "VidtokRVQ"]
ALL_MODELS = SIGNAL_MODELS + VIDEO_MODELS


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small convs run faster on one thread than on two contended ones (the machine is shared)."""
    num_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(num_threads)


def synthetic_meg(batch: int, channels: int, length: int, fs: float = 100.0, num_sources: int = 3, seed: int = 0):
    """Channels mix a few sources, each 1/f (pink) noise plus a 10 Hz alpha rhythm; z-scored per channel."""
    g = torch.Generator().manual_seed(seed)
    white = torch.randn(batch, num_sources, length, generator=g)
    freqs = torch.fft.rfftfreq(length, d=1 / fs)
    pink = torch.fft.irfft(torch.fft.rfft(white) / freqs.clamp_min(freqs[1]).sqrt(), n=length)
    t = torch.arange(length) / fs
    phase = torch.rand(batch, num_sources, 1, generator=g) * 2 * math.pi
    sources = pink / pink.std(dim=-1, keepdim=True) + 2.0 * torch.sin(2 * math.pi * 10.0 * t + phase)
    mixing = torch.randn(channels, num_sources, generator=g)
    x = mixing @ sources + 0.1 * torch.randn(batch, channels, length, generator=g)
    return (x - x.mean(-1, keepdim=True)) / x.std(-1, keepdim=True)


def synthetic_video(batch: int, frames: int, size: int, seed: int = 0) -> torch.Tensor:
    """uint8 (B, T, H, W, 3): an orange blob moving diagonally over a horizontal gradient."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    video = torch.zeros(batch, frames, size, size, 3)
    for b in range(batch):
        start = torch.randint(0, size, (2,), generator=g)
        for f in range(frames):
            cy, cx = (start[0] + f) % size, (start[1] + 2 * f) % size
            blob = torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 6.0)
            video[b, f] = 0.2 * (xx / size)[..., None] + blob[..., None] * torch.tensor([1.0, 0.6, 0.2])
    return (video.clamp(0, 1) * 255).round().to(torch.uint8)


def make_batch(name: str, batch: int = 2, num_windows: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    """A batch as the trainer would feed it: the shards' field stems as keywords."""
    if name in VIDEO_MODELS:
        return {"video": synthetic_video(batch, 4, 16, seed)}
    config = model_config(name, "debug")
    channels = getattr(config, "num_sensors", 8)
    length = getattr(config, "window_length", 32) * num_windows
    g = torch.Generator().manual_seed(seed)
    return {
        "signal": synthetic_meg(batch, channels, length, seed=seed),
        "pos": torch.randn(batch, channels, 3, generator=g),
        "sensor_type": torch.randint(0, 3, (batch, channels), generator=g),
    }


# ------------------------------------------------------------------------------ registry, shapes


@pytest.mark.parametrize("name", ALL_MODELS)
def test_registered_with_flavors_and_task(name):
    assert name in list_models()
    spec = get_model_spec(name)
    assert set(spec.flavors) == {"debug", "small", "full"}
    assert spec.task == ("video_reconstruction" if name in VIDEO_MODELS else "signal_reconstruction")
    for field in dataclasses.fields(spec.config_cls):
        assert field.metadata["help"], field.name


@pytest.mark.parametrize("name", ALL_MODELS)
def test_debug_forward_returns_a_scalar_loss_that_reaches_every_parameter(name):
    torch.manual_seed(0)
    model = build_model(name, "debug")
    loss = model(**make_batch(name))
    assert loss.shape == () and torch.isfinite(loss) and loss.requires_grad
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"parameters without gradient: {missing}"
    assert model.last_metrics and all(torch.isfinite(v) for v in model.last_metrics.values())
    assert model.num_params() > 0 and model.num_flops_per_token() > 0


def test_totem_tokenize_decode_and_metrics():
    torch.manual_seed(0)
    model = build_model("totem", "debug").eval()
    signal = 5.0 * make_batch("totem")["signal"] + 3.0  # not normalised: decode must restore the scale
    codes = model.tokenize(signal)
    assert codes.shape == (2, 8, 64 // 4) and codes.dtype == torch.int64
    for series_per_chunk in (1, 3, 16, 100):  # the CPU's cache-sized chunks (uneven, one, more than all) change no code
        assert torch.equal(model.tokenize(signal, series_per_chunk), codes)
    assert model.series_per_chunk_for_cache(64, 1) == 1
    assert model.series_per_chunk_for_cache(64, 32 * (64 // 2) * 4 * 5) == 5  # block_hidden_size 32 at half the length
    assert 0 <= int(codes.min()) and int(codes.max()) < model.config.codebook_size
    stats = model.normalization_stats(signal)
    assert stats.mean.shape == stats.std.shape == (2, 8, 1)
    decoded = model.decode(codes, stats)
    assert decoded.shape == signal.shape and decoded.dtype == torch.float32
    assert model.decode(codes).shape == signal.shape  # normalised space
    metrics = model.metrics(signal)
    assert set(metrics) == {"codebook_utilization", "perplexity", "token_entropy_bits", "reconstruction_mse", "scale_error"}
    assert 0 < metrics["codebook_utilization"] <= 1 and 1 <= metrics["perplexity"] <= model.config.codebook_size
    assert metrics["token_entropy_bits"] == pytest.approx(math.log2(metrics["perplexity"]), rel=1e-4)
    assert metrics["reconstruction_mse"] >= 0 and metrics["scale_error"] >= 0


@pytest.mark.parametrize("name", BRAINOMNI_MODELS)
def test_brainomni_tokenize_decode_shapes(name):
    torch.manual_seed(0)
    model = build_model(name, "debug").eval()
    config = model.config
    batch = make_batch(name, batch=2, num_windows=2)
    tokens = model.tokenize(**batch)
    tokens_per_window = config.window_length // math.prod(config.ratios)
    num_tokens = 2 * tokens_per_window
    token_dim = config.n_dim // config.n_neuro if "ChannelMix" in name else config.n_dim
    assert tokens.embeddings.shape == (2, config.n_neuro, num_tokens, token_dim)
    assert tokens.indices.shape == (2, config.n_neuro, num_tokens, config.num_quantizers)
    assert tokens.indices.dtype == torch.int64 and int(tokens.indices.max()) < config.codebook_size
    assert (tokens.tokens_per_window, tokens.num_windows, tokens.overlap_ratio) == (tokens_per_window, 2, 0.0)
    with torch.no_grad():
        from_embeddings = model.decode(tokens, batch["pos"], batch["sensor_type"])
        from_indices = model.decode(tokens.indices, batch["pos"], batch["sensor_type"])
        # a partial last window and fewer RVQ levels decode too
        partial = model.decode(tokens.indices[:, :, :-3, :1], batch["pos"], batch["sensor_type"])
    assert from_embeddings.shape == batch["signal"].shape and from_embeddings.dtype == torch.float32
    torch.testing.assert_close(from_indices, from_embeddings, atol=1e-4, rtol=1e-4)
    assert partial.shape == (2, batch["signal"].shape[1], (num_tokens - 3) * math.prod(config.ratios))
    # pos with orientation (6 values) works as well as positions only (3 values)
    pos_with_orientation = torch.randn(2, batch["signal"].shape[1], 6)
    assert model.tokenize(batch["signal"], pos_with_orientation, batch["sensor_type"]).indices.shape == tokens.indices.shape


def test_brainomni_source_space_and_short_windows():
    """'source' space embeds channels by index (no pos needed); a short signal can be one window."""
    torch.manual_seed(0)
    model = build_model("BrainOmniCausalTokenizer", "debug", {"sensor_space": "source"}).eval()
    signal = synthetic_meg(1, 5, 16)  # 5 of num_sensors=8 channels, half a window
    with pytest.raises(ValueError, match="window_length"):
        model.tokenize(signal)
    tokens = model.tokenize(signal, allow_shorter_windows=True)
    assert (tokens.num_windows, tokens.tokens_per_window) == (1, 16 // math.prod(model.config.ratios))
    assert model.decode(tokens, num_channels=5).shape == signal.shape
    loss = model.train()(signal=synthetic_meg(2, 5, 64))
    assert torch.isfinite(loss)


@pytest.mark.parametrize("name", VIDEO_MODELS)
def test_vidtok_tokenize_decode_shapes(name):
    torch.manual_seed(0)
    model = build_model(name, "debug").eval()
    video = synthetic_video(2, 3, 16)  # 3 frames: padded to 4 at the start, cut back after decoding
    indices = model.tokenize(video)
    expected = (2, 2, 8, 8) if name == "Vidtok" else (2, 2, 8, 8, model.config.num_quantizers)
    assert indices.shape == expected and indices.dtype == torch.int64
    assert 0 <= int(indices.min()) and int(indices.max()) < model.codebook_size
    assert torch.equal(model.tokenize(video, 1), indices)  # the CPU's cache-sized chunks change no code
    assert model.clips_per_chunk_for_cache(3, 16, 16, 1) == 1
    assert model.clips_per_chunk_for_cache(3, 16, 16, 8 * 3 * 16 * 16 * 4 * 5) == 5  # base_channels 8 at full size
    with torch.no_grad():
        decoded = model.decode(indices, num_frames=3)
    assert decoded.shape == (2, 3, 3, 16, 16) and decoded.dtype == torch.float32
    assert model_output_to_video(decoded).shape == video.shape


def test_video_input_conversion_round_trips():
    video = synthetic_video(1, 2, 8)
    x = video_to_model_input(video)
    assert x.shape == (1, 3, 2, 8, 8) and float(x.min()) >= -1 and float(x.max()) <= 1
    assert torch.equal(model_output_to_video(x), video)
    assert torch.equal(video_to_model_input(x), x)  # float (B, C, T, H, W) passes through


@pytest.mark.parametrize("name", ALL_MODELS)
def test_init_weights_sets_every_parameter_and_buffer(name):
    model = build_model(name, "debug", device="meta")
    model.to_empty(device="cpu")
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            tensor.fill_(float("nan") if tensor.is_floating_point() else -1)
        model.init_weights()
    for tensor_name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        assert torch.isfinite(tensor).all() and (tensor.is_floating_point() or (tensor >= 0).all()), tensor_name
    torch.manual_seed(7)
    first = build_model(name, "debug")
    torch.manual_seed(7)
    second = build_model(name, "debug")
    for (key, a), b in zip(first.state_dict().items(), second.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("name", ALL_MODELS)
def test_full_flavor_builds_on_meta(name):
    model = build_model(name, "full", device="meta")
    assert all(p.is_meta for p in model.parameters()) and all(b.is_meta for b in model.buffers())
    num_params, num_flops = model.num_params(), model.num_flops_per_token()
    print(f"{name} full: {num_params / 1e6:.2f}M parameters (incl. codebooks), "
          f"{num_params - model.num_params(include_codebooks=False):,} codebook entries' values, "
          f"{num_flops:,} training FLOPs per input element")
    assert num_params > (1e5 if name == "totem" else 1e7)
    assert num_flops > 0


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="window_length"):
        model_config("BrainOmniCausalTokenizer", "debug", {"window_length": 30})
    with pytest.raises(ValueError, match="sensor_space"):
        model_config("BrainOmniCausalTokenizer", "debug", {"sensor_space": "scalp"})
    with pytest.raises(ValueError, match="compression_factor"):
        model_config("totem", "debug", {"compression_factor": 3})
    with pytest.raises(ValueError, match="temporal_downsample_levels"):
        model_config("Vidtok", "debug", {"temporal_downsample_levels": [5]})
    with pytest.raises(ValueError, match="n_neuro"):
        build_model("BrainOmniCausalTokenizerSEANetChannelMix", "debug", {"n_neuro": 3}, device="meta")
    model = build_model("BrainOmniCausalTokenizer", "debug")
    with pytest.raises(ValueError, match="window_length"):
        model(signal=torch.randn(1, 8, 40), pos=torch.randn(1, 8, 3), sensor_type=torch.zeros(1, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="sensor_type"):
        model(signal=torch.randn(1, 8, 32), pos=torch.randn(1, 8, 3), sensor_type=torch.full((1, 8), 5))


# ------------------------------------------------------------------------------------- causality


def _assert_depends_only_on_past(grad: torch.Tensor, first: int, end: int, time_dim: int = -1):
    """grad along time_dim is zero outside [first, end) and not zero inside."""
    grad = grad.abs().movedim(time_dim, -1).sum(dim=tuple(range(grad.dim() - 1)))
    assert grad[end:].eq(0).all(), f"depends on the future: {grad[end:]}"
    assert grad[:first].eq(0).all(), f"depends on another window: {grad[:first]}"
    assert grad[first:end].gt(0).any()


def test_causal_conv_layers():
    torch.manual_seed(0)
    x = torch.randn(1, 2, 16, requires_grad=True)
    CausalConv1d(2, 3, kernel_size=4, stride=2)(x)[..., 3].sum().backward()  # output 3 <- inputs < 8
    _assert_depends_only_on_past(x.grad, 0, 8)
    z = torch.randn(1, 3, 4, requires_grad=True)
    CausalConvTranspose1d(3, 2, kernel_size=4, stride=2)(z)[..., 5].sum().backward()  # sample 5 <- frames <= 2
    _assert_depends_only_on_past(z.grad, 0, 3)
    v = torch.randn(1, 2, 6, 5, 5, requires_grad=True)
    y = CausalConv3d(2, 2, 3, stride=(2, 1, 1))(v)
    assert y.shape == (1, 2, 3, 5, 5)
    y[:, :, 1].sum().backward()  # latent frame 1 <- frames < 4
    _assert_depends_only_on_past(v.grad, 0, 4, time_dim=2)


@pytest.mark.parametrize("name", BRAINOMNI_MODELS)
def test_brainomni_encoder_and_decoder_are_causal(name):
    torch.manual_seed(0)
    model = build_model(name, "debug").eval()
    batch = make_batch(name, batch=1, num_windows=2)
    hop = math.prod(model.config.ratios)
    window = model.config.window_length
    signal = batch["signal"].clone().requires_grad_(True)
    tokens = model.tokenize(signal, batch["pos"], batch["sensor_type"])
    for token in (1, tokens.embeddings.shape[2] - 3):  # one token in each window
        signal.grad = None
        tokens.embeddings[:, :, token].sum().backward(retain_graph=True)
        window_start = token * hop // window * window
        _assert_depends_only_on_past(signal.grad, window_start, (token + 1) * hop)

    embeddings = tokens.embeddings.detach().requires_grad_(True)
    sequence = CausalTokenSequence(embeddings, tokens.indices, tokens.tokens_per_window, tokens.num_windows)
    decoded = model.decode(sequence, batch["pos"], batch["sensor_type"])
    sample = window + 5  # second window, token 5 // hop
    decoded[..., sample].sum().backward()
    _assert_depends_only_on_past(embeddings.grad, window // hop, sample // hop + 1, time_dim=2)


@pytest.mark.parametrize("name", VIDEO_MODELS)
def test_vidtok_encoder_and_decoder_are_causal(name):
    torch.manual_seed(0)
    model = build_model(name, "debug").eval()
    with torch.no_grad():  # move zero-initialised layers off zero, so that every path carries gradient
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    video = video_to_model_input(synthetic_video(1, 4, 16)).requires_grad_(True)
    latents = model.encode(video, update=False).quantized  # (1, z, 2, 8, 8): temporal factor 2
    latents[:, :, 0].sum().backward()
    _assert_depends_only_on_past(video.grad, 0, 2, time_dim=2)

    latents = latents.detach().requires_grad_(True)
    model.decoder(latents)[:, :, 1].sum().backward()  # output frame 1 <- latent frame 0
    _assert_depends_only_on_past(latents.grad, 0, 1, time_dim=2)


# ------------------------------------------------------------------------------------ quantisers


def test_vq_codes_in_range_and_straight_through_gradient():
    torch.manual_seed(0)
    vq = VectorQuantizer(dim=8, codebook_size=16, dead_code_threshold=0.0)
    vq.reset_parameters()
    z = torch.randn(5, 7, 8, requires_grad=True)
    out = vq(z, update=False)
    assert out.indices.shape == (5, 7) and int(out.indices.min()) >= 0 and int(out.indices.max()) < 16
    torch.testing.assert_close(out.quantized, vq.codebook[out.indices])
    assert torch.equal(out.indices, vq.encode(z))
    weights = torch.randn_like(z)
    (out.quantized * weights).sum().backward()
    torch.testing.assert_close(z.grad, weights)  # straight-through: the identity

    rotating = VectorQuantizer(dim=8, codebook_size=16, use_rotation_trick=True, dead_code_threshold=0.0)
    rotating.load_state_dict(vq.state_dict())
    z.grad = None
    out = rotating(z, update=False)
    torch.testing.assert_close(out.quantized, vq.codebook[out.indices], atol=1e-5, rtol=1e-5)
    (out.quantized * weights).sum().backward()
    assert torch.isfinite(z.grad).all() and not torch.allclose(z.grad, weights)
    # the rotation keeps the gradient's size up to the norm ratio |code| / |z|
    ratio = vq.codebook[out.indices].norm(dim=-1) / z.detach().norm(dim=-1)
    torch.testing.assert_close(z.grad.norm(dim=-1), weights.norm(dim=-1) * ratio, atol=1e-4, rtol=1e-4)


def test_fsq_round_trip_is_exact_on_the_grid():
    fsq = FiniteScalarQuantizer(levels=[3, 4, 5])  # odd and even levels
    assert fsq.codebook_size == 60
    indices = torch.arange(60)
    codes = fsq.indices_to_codes(indices)  # (60, 3)
    assert torch.equal(fsq.codes_to_indices(codes), indices)
    assert len({tuple(c.tolist()) for c in codes}) == 60  # distinct codes
    digits = codes * fsq._half_width()
    assert torch.equal(digits, digits.round())  # on the integer grid
    # latents that bound exactly onto grid points quantise to them exactly
    half_l = (fsq._levels.float() - 1) * (1 + 1e-3) / 2
    offset = torch.where(fsq._levels % 2 == 0, 0.5, 0.0)
    latents = torch.atanh((digits + offset) / half_l) - torch.atanh(offset / half_l)
    assert torch.equal(fsq.quantize(latents), codes)
    # and any latent lands on the grid, with a straight-through gradient
    z = (3 * torch.randn(4, 10, 3)).requires_grad_(True)
    out = fsq(z)
    assert int(out.indices.min()) >= 0 and int(out.indices.max()) < 60
    assert torch.equal(fsq.indices_to_codes(out.indices), out.quantized.detach())
    out.quantized.sum().backward()
    assert (z.grad > 0).all()  # d tanh > 0 passes through the rounding


def test_rvq_error_decreases_with_more_levels():
    torch.manual_seed(0)
    rvq = ResidualVectorQuantizer(num_quantizers=4, dim=8, codebook_size=16)
    for layer in rvq.layers:
        layer.reset_parameters()
    data = torch.randn(512, 8)
    for _ in range(10):  # EMA training passes
        rvq(data, update=True)
    indices = rvq.encode(data)
    assert indices.shape == (512, 4)
    errors = [float((rvq.decode(indices[:, :q]) - data).pow(2).mean()) for q in range(1, 5)]
    assert all(later < earlier for earlier, later in zip(errors, errors[1:])), errors
    assert errors[-1] < 0.5 * errors[0]
    torch.testing.assert_close(rvq.decode(indices), rvq(data, update=False).quantized)


def _clustered_data(num_clusters: int = 16, per_cluster: int = 32, dim: int = 4, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    centers = 3 * torch.randn(num_clusters, dim, generator=g)
    return (centers[:, None] + 0.05 * torch.randn(num_clusters, per_cluster, dim, generator=g)).reshape(-1, dim)


def test_dead_codes_are_revived_from_the_batch():
    data = _clustered_data()
    vq = VectorQuantizer(dim=4, codebook_size=16, dead_code_threshold=0.1)
    vq.reset_parameters()
    with torch.no_grad():
        vq.codebook.fill_(100.0)  # every code far from the data: all but one are never chosen
    assert vq.encode(data).unique().numel() == 1
    torch.manual_seed(0)
    for _ in range(8):
        vq(data, update=True)
    assert vq.last_num_revived == 0  # all codes in use now
    counts = code_histogram(vq.encode(data), 16)
    assert (counts > 0).all() and float(perplexity_from_counts(counts)) > 12
    # a revived code is one of the batch's vectors
    with torch.no_grad():
        vq.codebook[3] = 1e3
        vq.ema_cluster_size[3] = 0.0
        vq.ema_embed_sum[3] = 0.0
    vq(data, update=True)
    assert vq.last_num_revived >= 1
    assert float((vq.codebook[3] - data).norm(dim=-1).min()) < 1e-5  # exact, not cdist's matmul form


def test_dead_code_revival_is_deterministic_given_the_seed():
    data = _clustered_data(seed=1)

    def train(seed: int) -> torch.Tensor:
        torch.manual_seed(0)
        vq = VectorQuantizer(dim=4, codebook_size=16)
        vq.reset_parameters()
        torch.manual_seed(seed)
        for _ in range(3):
            vq(data, update=True)
        return vq.codebook.clone()

    assert torch.equal(train(1), train(1))
    assert not torch.equal(train(1), train(2))


def test_quantizer_all_reduce_hook_sums_statistics():
    data = _clustered_data(seed=2)
    torch.manual_seed(0)
    alone, synced = (VectorQuantizer(dim=4, codebook_size=16, dead_code_threshold=0.0) for _ in range(2))
    alone.reset_parameters()
    synced.load_state_dict(alone.state_dict())
    set_quantizer_all_reduce(synced, lambda tensor: 2 * tensor)  # two ranks holding the same batch
    for _ in range(3):
        alone(torch.cat([data, data]), update=True)
        synced(data, update=True)
    torch.testing.assert_close(synced.codebook, alone.codebook)
    torch.testing.assert_close(synced.ema_cluster_size, alone.ema_cluster_size)


def test_perplexity_of_code_histograms():
    assert float(perplexity_from_counts(torch.ones(8))) == pytest.approx(8.0)
    assert float(perplexity_from_counts(torch.tensor([5.0, 0, 0, 0]))) == pytest.approx(1.0)
    assert torch.equal(code_histogram(torch.tensor([[0, 2], [2, 2]]), 4), torch.tensor([1.0, 0, 3, 0]))


@pytest.mark.parametrize("affine", [False, True])
def test_revin_denormalize_inverts_normalize(affine):
    torch.manual_seed(0)
    revin = RevIN(affine=affine)
    revin.reset_parameters()
    if affine:
        with torch.no_grad():
            revin.weight.fill_(1.7)
            revin.bias.fill_(-0.4)
    x = 10 * torch.randn(3, 5, 64) + 2.0
    stats = revin.statistics(x)
    normalized = revin.normalize(x, stats)
    torch.testing.assert_close(revin.undo_affine(normalized).mean(-1), torch.zeros(3, 5), atol=1e-4, rtol=0)
    torch.testing.assert_close(revin.undo_affine(normalized).std(-1, unbiased=False), torch.ones(3, 5), atol=1e-3, rtol=0)
    torch.testing.assert_close(revin.denormalize(normalized, stats), x)


# ------------------------------------------------------------------------------ training behaviour


def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    batch = make_batch("BrainOmniCausalTokenizer")
    grads = []
    for use_checkpointing in (False, True):
        torch.manual_seed(0)
        model = build_model("BrainOmniCausalTokenizer", "debug", {"use_gradient_checkpointing": use_checkpointing})
        model(**batch).backward()
        grads.append([p.grad for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


# (model, steps, learning rate, metric, required final / initial ratio): a tiny model overfits one batch.
OVERFITS = [
    ("totem", 40, 3e-3, "reconstruction_mse", 0.5),
    # the slowest: sensors reach the latents only through attention, which starts out uniform
    ("BrainOmniCausalTokenizer", 100, 1e-2, "l1", 0.8),
    ("BrainOmniCausalTokenizerSEANetChannelMix", 50, 1e-2, "l1", 0.75),
    ("Vidtok", 25, 3e-3, "l1", 0.35),
    ("VidtokRVQ", 25, 3e-3, "l1", 0.35),
]


@pytest.mark.parametrize("name, num_steps, lr, metric, max_ratio", OVERFITS, ids=[o[0] for o in OVERFITS])
def test_short_overfit_lowers_the_reconstruction_loss(name, num_steps, lr, metric, max_ratio):
    torch.manual_seed(0)
    model = build_model(name, "debug")
    batch = make_batch(name, batch=4 if name in SIGNAL_MODELS else 2)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    history = []
    for _ in range(num_steps):
        loss = model(**batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        history.append(float(model.last_metrics[metric]))
    model.eval()
    with torch.no_grad():
        model(**batch)
    final = float(model.last_metrics[metric])
    assert final < max_ratio * history[0], (name, history[::5], final)
    if name in BRAINOMNI_MODELS:
        assert float(model.last_metrics["pcc"]) > 0.5
    if name == "totem":
        metrics = model.metrics(batch["signal"])
        assert metrics["reconstruction_mse"] < max_ratio * history[0] and metrics["codebook_utilization"] > 0.3
