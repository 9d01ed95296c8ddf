"""TokCom (modeling/text/tokcom.py): the chunk VAE, the flow-matching denoiser, the trainer stages and the CLI modes.

Everything runs in this process on CPU in fp32, on debug-sized models, with one torch thread: the
machine is shared, and on two busy cores a second thread makes these tiny matmuls several times slower.
"""

from __future__ import annotations

import glob
import json
import sysconfig

import pytest
import torch
from safetensors.torch import save_file
from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer

from conftest import write_token_dataset
from launch import cli
from modeling.registry import build_model, get_model_spec, model_config
from modeling.text.tokcom import DenoiserBlock, VAEBlock

VOCAB = 320  # a byte-level BPE: 256 bytes, <|endoftext|> and 63 merges
SEQ_LEN = 32  # 8 chunks of 4


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def tokenizer():
    from sharding.text_tokenizer import train_bpe

    return train_bpe(_stdlib_texts(), vocab_size=VOCAB)


def _stdlib_texts() -> list[str]:
    stdlib = sysconfig.get_paths()["stdlib"]
    return [open(path).read() for path in sorted(glob.glob(f"{stdlib}/json/*.py"))]


@pytest.fixture(scope="module")
def text_batch(tokenizer) -> torch.Tensor:
    """4 sequences of 32 real code tokens: 32 chunks."""
    ids = tokenizer.encode("".join(_stdlib_texts()), add_special_tokens=False)
    return torch.tensor(ids[: 4 * SEQ_LEN]).view(4, SEQ_LEN)


def _randomize(model: torch.nn.Module, names: tuple[str, ...]) -> None:
    """Give the zero-initialised parameters (adaLN, output projection) values, so every path carries signal."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if any(part in name for part in names):
                param.normal_(std=0.02)


@pytest.fixture(scope="module")
def trained_vae(text_batch):
    """Stage 1 overfit on the text batch until it reconstructs every token."""
    torch.manual_seed(0)
    vae = build_model("tokcom_vae", "debug", {"vocab_size": VOCAB, "sequence_len": SEQ_LEN})
    optimizer = torch.optim.AdamW(vae.parameters(), lr=3e-3, weight_decay=0.0)
    accuracy = 0.0
    for step in range(1, 201):
        loss = vae(text_batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 10 == 0:
            accuracy = (vae.reconstruct(text_batch) == text_batch).float().mean().item()
            if accuracy == 1.0:
                break
    return vae.eval(), accuracy, loss.item()


def test_vae_round_trips_text_chunks(trained_vae, text_batch):
    vae, accuracy, loss = trained_vae
    assert accuracy == 1.0 and loss < 1.0
    latents = vae.encode(text_batch)
    assert latents.shape == (4, SEQ_LEN // 4, 64)
    assert torch.equal(vae.decode(latents), text_batch)
    # the omni token is an extra embedding row: no data id collides with it, lm_head never predicts it
    assert vae.config.omni_token_id == VOCAB and vae.embed_tokens.num_embeddings == VOCAB + 1
    assert vae.lm_head.out_features == VOCAB
    # a tail shorter than a chunk is dropped
    assert vae.reconstruct(text_batch[:, :30]).shape == (4, 28)


def test_diffusion_loss_falls_with_frozen_vae(trained_vae, text_batch, tmp_path):
    vae = trained_vae[0]
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, tmp_path / "model.safetensors")
    torch.manual_seed(0)
    model = build_model("tokcom_diffusion", "debug", {"vocab_size": VOCAB, "sequence_len": SEQ_LEN,
                                                      "vae_checkpoint": str(tmp_path)})  # a checkpoint folder
    vae_before = {k: v.clone() for k, v in model.vae.state_dict().items()}
    torch.testing.assert_close(vae_before, vae.state_dict(), rtol=0, atol=0)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(name.startswith("denoiser.") for name in trainable)

    def fixed_ce() -> float:  # the same t and noise draws every time
        torch.manual_seed(123)
        with torch.no_grad():
            return torch.stack([model.losses(text_batch)["ce"] for _ in range(4)]).mean().item()

    model.eval()
    before = fixed_ce()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3, weight_decay=0.0)
    model.train()
    assert model.denoiser.training and not model.vae.training  # the VAE stays in eval mode
    for _ in range(40):
        loss = model(text_batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert all(p.grad is None for p in model.vae.parameters())
    model.eval()
    after = fixed_ce()
    assert after < 0.5 * before, (before, after)
    for key, value in model.vae.state_dict().items():
        assert torch.equal(value, vae_before[key]), key
    losses = model.losses(text_batch)
    assert set(losses) == {"ce", "mse"} and losses["mse"].item() > 0
    ids = model.generate(num_chunks=3, num_steps=4, batch_size=2, generator=torch.Generator().manual_seed(0))
    assert ids.shape == (2, 12) and ids.max() < VOCAB


def _block_params(D: int, H: int, K: int, I: int) -> int:
    kv_dim = K * (D // H)
    attention = (D * D + D) + 2 * (D * kv_dim + kv_dim) + D * D  # q, k, v with biases; o without
    return attention + 3 * D * I + 2 * D  # SwiGLU, two RMSNorm gains


def expected_num_params(args: dict, is_diffusion: bool) -> int:
    D, L, H, K, I, V = (args[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                          "num_key_value_heads", "intermediate_size", "vocab_size"))
    stack = L * _block_params(D, H, K, I) + D  # + final norm
    vae = (V + 1) * D + 2 * stack + D * V  # embedding with the omni row, encoder, decoder, lm_head
    if not is_diffusion:
        return vae
    time_mlp = (D * 4 * D + 4 * D) + (4 * D * D + D)
    blocks = L * (_block_params(D, H, K, I) + D * 6 * D + 6 * D)  # + adaLN modulation
    return vae + time_mlp + blocks + D + (D * D + D)  # final norm, output projection


@pytest.mark.parametrize("name", ["tokcom_vae", "tokcom_diffusion"])
def test_full_flavor_on_meta_matches_the_seed(name):
    model = build_model(name, "full", device="meta")
    args = dict(get_model_spec(name).flavors["full"])
    seed_args = dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                     intermediate_size=4864, sequence_len=1024, chunk_size=4)
    assert {k: args[k] for k in seed_args} == seed_args
    assert model.num_params() == expected_num_params(args, name == "tokcom_diffusion")
    assert model.config.num_chunks == 256 and model.config.omni_token_id == args["vocab_size"]
    assert 0 < model.num_flops_per_token() < 6 * model.num_params() + 10**9
    if name == "tokcom_diffusion":
        assert model.config.noise_std == 0.05
        assert model._no_split_modules == ["VAEBlock", "DenoiserBlock"]
        assert not any(p.requires_grad for p in model.vae.parameters())


def _grads(model: torch.nn.Module, batch: torch.Tensor, use_checkpointing: bool) -> dict[str, torch.Tensor]:
    model.set_gradient_checkpointing(use_checkpointing)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(5)  # the diffusion loss draws t and noise
    model(batch).backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", ["tokcom_vae", "tokcom_diffusion"])
def test_gradient_checkpointing_gives_the_same_grads(name, text_batch):
    torch.manual_seed(1)
    overrides = {"vocab_size": VOCAB, "sequence_len": SEQ_LEN}
    if name == "tokcom_diffusion":
        overrides["vae_checkpoint"] = None  # random VAE
    model = build_model(name, "debug", overrides).train()
    _randomize(model, ("adaln_modulation", "output_proj"))
    plain = _grads(model, text_batch, use_checkpointing=False)
    checkpointed = _grads(model, text_batch, use_checkpointing=True)
    assert plain.keys() == checkpointed.keys() and len(plain) > 10
    torch.testing.assert_close(checkpointed, plain, rtol=1e-5, atol=1e-6)


def test_blocks_match_hf_qwen2_and_start_as_identity():
    """A VAE block is HF's Qwen2DecoderLayer without the causal mask; a denoiser block starts as the identity."""
    torch.manual_seed(0)
    config = model_config("tokcom_vae", "debug").qwen2()
    block, reference = VAEBlock(config, 0), Qwen2DecoderLayer(config, 0)
    reference.self_attn.is_causal = False
    reference.load_state_dict(block.state_dict())
    x = torch.randn(3, 4, config.hidden_size)
    rotary = build_model("tokcom_vae", "debug").encoder.rotary_emb
    position_embeddings = rotary(x, torch.arange(4)[None])
    with torch.no_grad():
        torch.testing.assert_close(block(x, position_embeddings), reference(x, position_embeddings=position_embeddings))
        # every position sees the last token (bidirectional)
        changed = x.clone()
        changed[:, -1] += 1.0
        assert not torch.allclose(block(changed, position_embeddings)[:, 0], block(x, position_embeddings)[:, 0])

    denoiser = build_model("tokcom_diffusion", "debug", {"vae_checkpoint": None}).denoiser
    cond = torch.randn(3, config.hidden_size)
    with torch.no_grad():
        assert isinstance(denoiser.layers[0], DenoiserBlock)
        assert torch.equal(denoiser.layers[0](x, cond, position_embeddings), x)
        assert torch.equal(denoiser(x, torch.rand(3)), torch.zeros_like(x))  # zero output projection


def test_bad_config_values_name_the_field():
    with pytest.raises(ValueError, match="omni_token_id"):
        model_config("tokcom_vae", "debug", {"omni_token_id": 1000})
    with pytest.raises(ValueError, match="noise_std"):
        model_config("tokcom_diffusion", "debug", {"noise_std": 0.0})
    with pytest.raises(ValueError, match="model.args.vae_checkpoint is not set"):
        build_model("tokcom_diffusion", "debug")


# ------------------------------------------------------------------ trainer + CLI


@pytest.fixture(scope="module")
def dataset_with_tokenizer(tmp_path_factory, tokenizer) -> str:
    """Token shards (a Markov chain over the BPE's ids) next to the BPE folder, as `tokfleet prepare` leaves them."""
    root = tmp_path_factory.mktemp("datasets") / "tokcom-toy"
    write_token_dataset(root, num_shards=2, samples_per_shard=8, val_samples=4, seq_len=SEQ_LEN, vocab_size=VOCAB)
    tokenizer.save_pretrained(str(root / "tokenizer"))
    return str(root)


def _train(config: str, run_dir, dataset: str, *extra: str) -> None:
    cli.main(["train", config, "--set", f"data.dataset={dataset}", "--set", f"run.output_dir={run_dir}",
              "--set", "run.max_steps=4", "--set", "run.device=cpu", "--set", "data.num_streams=2",
              "--set", "optim.micro_batch_size=4", "--set", "optim.warmup_steps=1", "--set", "checkpoint.every_steps=0",
              "--set", "eval.every_steps=0", "--set", "eval.num_batches=1", "--set", "logging.every_steps=1",
              "--set", "logging.wandb=false", "--set", "logging.progress=false", "--set", "engine.peak_flops=1e12",
              *extra])


@pytest.fixture(scope="module")
def trained_runs(tmp_path_factory, dataset_with_tokenizer):
    """Stage 1 then stage 2 with the repo's debug configs, 4 steps each."""
    tmp = tmp_path_factory.mktemp("tokcom-runs")
    _train("configs/text/tokcom_vae_debug.yaml", tmp / "vae", dataset_with_tokenizer)
    vae_checkpoint = tmp / "vae" / "checkpoints" / "step-00000004"
    _train("configs/text/tokcom_diffusion_debug.yaml", tmp / "diffusion", dataset_with_tokenizer,
           "--set", f"model.args.vae_checkpoint={vae_checkpoint}")
    return tmp / "vae", tmp / "diffusion"


def test_trainer_runs_both_stages(trained_runs):
    from safetensors.torch import load_file

    vae_run, diffusion_run = trained_runs
    for run in trained_runs:
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in records] == [1, 2, 3, 4] and all(r["loss"] > 0 for r in records)
    state = json.loads((diffusion_run / "checkpoints" / "step-00000004" / "trainer_state.json").read_text())
    args = state["model"]["args"]
    assert state["model"]["name"] == "tokcom_diffusion" and state["tokenizer"] == "tokenizer"
    assert (args["sequence_len"], args["chunk_size"], args["noise_std"], args["omni_token_id"]) == (SEQ_LEN, 4, 0.05, VOCAB)
    # stage 2 trained the denoiser only: its VAE is stage 1's, bit for bit
    stage1 = load_file(vae_run / "checkpoints" / "step-00000004" / "model.safetensors")
    stage2 = load_file(diffusion_run / "checkpoints" / "step-00000004" / "model.safetensors")
    assert all(torch.equal(stage2[f"vae.{k}"], v) for k, v in stage1.items())


def test_cli_generate_reconstruct_encode(trained_runs, tmp_path, capsys):
    from trainer.inference import load_model
    from trainer.latent_inference import seed_config

    vae_run, diffusion_run = trained_runs
    texts = tmp_path / "generated.txt"
    cli.main(["generate", "--checkpoint", str(diffusion_run), "--mode", "generate", "--num_steps", "3",
              "--num_chunks", "5", "--batch_size", "2", "--device", "cpu", "--output_file", str(texts)])
    out = capsys.readouterr()
    assert "[Sequence 1]" in out.out and "[Sequence 2]" in out.out and texts.read_text().count("[Sequence") == 2
    assert "stage diffusion" in out.err and "noise_std 0.05" in out.err

    cli.main(["generate", "--checkpoint", str(diffusion_run), "--mode", "reconstruct", "--input_text",
              "def encode(obj):", "--device", "cpu"])
    out = capsys.readouterr().out
    assert "Reconstructed:" in out and "Token accuracy:" in out

    latents = tmp_path / "latents.pt"
    cli.main(["generate", "--checkpoint", str(vae_run), "--mode", "encode", "--input_text", "import json",
              "--output_file", str(latents), "--device", "cpu"])
    assert torch.load(latents).shape == (1, SEQ_LEN // 4, 64)  # EOS-padded to max_length: 8 chunks

    model, state, tokenizer_dir = load_model(diffusion_run)
    assert seed_config(model, state, tokenizer_dir) == {
        "stage": "diffusion", "tokenizer_path": str(diffusion_run / "tokenizer"), "max_length": SEQ_LEN,
        "chunk_size": 4, "noise_std": 0.05}

    # a stage-2 checkpoint holds its VAE: an export moved away from the stage-1 files still generates
    exported = tmp_path / "export"
    cli.main(["export", str(diffusion_run), "--out", str(exported)])
    state_file = exported / "trainer_state.json"
    state = json.loads(state_file.read_text())
    state["model"]["args"]["vae_checkpoint"] = str(tmp_path / "moved-away")
    state_file.write_text(json.dumps(state))
    capsys.readouterr()
    cli.main(["generate", "--checkpoint", str(exported), "--num_steps", "2", "--device", "cpu"])  # default mode: generate
    assert "[Sequence 1]" in capsys.readouterr().out


def _exit_code_and_error(capsys, argv: list[str]) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    return exit_info.value.code, capsys.readouterr().err.strip()


def test_bad_inputs_exit_2_with_one_line(trained_runs, dataset_with_tokenizer, tmp_path, capsys):
    vae_run, _ = trained_runs
    missing = tmp_path / "no-such-vae"
    code, error = _exit_code_and_error(capsys, [
        "train", "configs/text/tokcom_diffusion_debug.yaml", "--set", f"data.dataset={dataset_with_tokenizer}",
        "--set", f"run.output_dir={tmp_path / 'run'}", "--set", "run.device=cpu", "--set", "logging.wandb=false",
        "--set", f"model.args.vae_checkpoint={missing}"])
    assert code == 2 and len(error.splitlines()) == 1
    assert "model.args.vae_checkpoint" in error and str(missing) in error

    code, error = _exit_code_and_error(capsys, ["generate", "--checkpoint", str(vae_run), "--mode", "generate", "--device", "cpu"])
    assert code == 2 and "supports reconstruct, encode" in error and len(error.splitlines()) == 1
    code, error = _exit_code_and_error(capsys, ["generate", "--checkpoint", str(vae_run), "--mode", "reconstruct", "--device", "cpu"])
    assert code == 2 and "--input_text is required" in error
