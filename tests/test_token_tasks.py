"""Token grids and the sequence models that read them (sharding/token_grid.py, trainer/token_tasks.py):
canonical grids of every tokenizer layout, each family's layout and its next-step pairs, model args
taken from the grid, the one-line refusals of models that cannot hold it, `model.init_from`."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import write_grid_dataset
from core.errors import UserError
from sharding.manifest import Manifest
from sharding.token_grid import TokenGrid

BRAINTOKMIX = {"model": "BrainOmniCausalTokenizerSEANetChannelMix", "flavor": "debug", "args": {}, "checkpoint": "",
               "sha256": "0" * 64}
TOTEM = {"model": "totem", "flavor": "debug", "args": {}, "checkpoint": "", "sha256": "1" * 64}
VIDTOK = {"model": "Vidtok", "flavor": "debug", "args": {}, "checkpoint": "", "sha256": "2" * 64}
LAYOUTS = {  # tokenizer -> stored axes, shape
    "totem": (("channel", "time"), (4, 6)),
    "braintokmix": (("channel", "time", "level"), (2, 6, 2)),
    "vidtok": (("time", "height", "width"), (3, 2, 2)),
    "vidtok_rvq": (("time", "height", "width", "level"), (3, 2, 2, 2)),
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_canonical_grid_round_trips_every_tokenizer_layout(layout):
    axes, shape = LAYOUTS[layout]
    grid = TokenGrid(axes, shape, 16)
    codes = torch.randint(0, 16, (2, *shape))
    canonical = grid.to_canonical(codes)
    assert canonical.shape[1:] == grid.canonical_shape and len(grid.canonical_shape) == 4
    assert torch.equal(grid.from_canonical(canonical), codes)
    # the time axis is canonical axis 0 whatever the layout
    time = list(axes).index("time")
    torch.testing.assert_close(canonical[:, 1].flatten(1).sort().values, codes.select(1 + time, 1).flatten(1).sort().values)


def test_grid_of_a_manifest_and_of_an_old_manifest_without_axes(tmp_path):
    root = write_grid_dataset(tmp_path / "a", axes=("channel", "time"), shape=(3, 6), vocab_size=16, tokenizer=TOTEM)
    manifest = Manifest.read(root)
    assert TokenGrid.from_manifest(manifest) == TokenGrid(("channel", "time"), (3, 6), 16)
    del manifest.fields["tokens.npy"]["axes"]  # written before the axes were recorded: the tokenizer says
    assert TokenGrid.from_manifest(manifest).axes == ("channel", "time")
    manifest.tokenizer = {"model": "mystery"}
    with pytest.raises(UserError, match="names no axes"):
        TokenGrid.from_manifest(manifest)


def grid_run(tmp_path, name: str, dataset: str, args: dict | None = None, steps: int = 2, **overrides):
    from core.config import (CheckpointConfig, DataConfig, EngineConfig, EvalConfig, LoggingConfig, ModelConfig,
                               OptimConfig, RunConfig, TrainConfig)

    return TrainConfig(
        data=DataConfig(dataset=dataset, num_streams=2),
        run=RunConfig(name=name, output_dir=str(tmp_path / f"run-{name}"), max_steps=steps, seed=0, device="cpu"),
        model=ModelConfig(name=name, flavor="debug", args=args or {}, **overrides),
        optim=OptimConfig(lr=1e-2, warmup_steps=1, micro_batch_size=2, schedule="constant"),
        engine=EngineConfig(peak_flops=1e12), checkpoint=CheckpointConfig(every_steps=0),
        logging=LoggingConfig(every_steps=1, progress=False, wandb=False), eval=EvalConfig(every_steps=steps, num_batches=1),
    )


# family, tokenizer layout, args the grid must set
CASES = [
    ("gpt", "totem", {"vocab_size": 16, "sequence_len": 6}),
    ("gpt", "vidtok", {"vocab_size": 16, "sequence_len": 3}),
    ("FlatGPT", "vidtok", {"vocab_size": 16, "input_shape": [3, 2, 2], "tok_class": None}),
    ("FlatGPTEmbeds", "totem", {"vocab_size": 16, "input_shape": [6, 4, 1]}),
    ("FlatGPTEmbedsRVQ", "braintokmix", {"vocab_size": 16, "input_shape": [6, 2, 2]}),
    ("FlatGPTRVQ", "braintokmix", {"vocab_size": 16, "input_shape": [6, 2, 2]}),
    ("FlatGPTRVQ", "vidtok_rvq", {"vocab_size": 16, "input_shape": [3, 4, 2]}),  # sites of a frame on H
    ("FlatGPTMix", "totem", {"vocab_size": 16, "input_shape": [6, 4, 1]}),
    ("FlatGPTMixRVQ", "braintokmix", {"vocab_size": 16, "input_shape": [6, 2, 2]}),
]


@pytest.mark.parametrize("name, layout, expected", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_every_family_trains_on_a_grid_with_args_from_the_manifest(tmp_path, name, layout, expected):
    """The trainer takes vocab_size and the grid from the manifest; the layout round-trips; each
    target is the code one time step after its input; a real step trains."""
    from trainer.loop import Trainer

    axes, shape = LAYOUTS[layout]
    tokenizer = {"totem": TOTEM, "braintokmix": BRAINTOKMIX}.get(layout, VIDTOK)
    dataset = write_grid_dataset(tmp_path / "data", axes=axes, shape=shape, vocab_size=16, tokenizer=tokenizer,
                                 kind="video_tokens" if "vidtok" in layout else "meg_tokens")
    trainer = Trainer(grid_run(tmp_path, name, dataset))
    assert {key: trainer.model_args[key] for key in expected} == expected
    task, grid = trainer.to_batch, TokenGrid(axes, shape, 16)
    codes = torch.randint(0, 16, (2, *shape))
    canonical = grid.to_canonical(codes)
    sequence = task.layout.to_sequence(canonical)
    assert torch.equal(task.layout.to_grid(sequence, like=canonical), canonical)
    # a time index grid through the same layout: every target sits one time step after its input
    times = torch.arange(shape[list(axes).index("time")]).view(1, -1, 1, 1, 1).expand(canonical.shape)
    pairs = task.pairs(times)
    assert torch.equal(pairs["targets"], pairs["idx"] + 1) or name.startswith("FlatGPT")
    if name.startswith("FlatGPT"):  # positions walk the grid in (t, h, w) order: a target is at the same or the next step
        assert bool(((pairs["targets"] - pairs["idx"]) >= 0).all()) and int((pairs["targets"] - pairs["idx"]).max()) == 1
    batch = task({"tokens": codes}, torch.device("cpu"))
    loss = trainer.engine.model(**batch)
    assert math.isfinite(loss.item()) and loss.item() == pytest.approx(math.log(16), abs=0.5)
    summary = trainer.train()
    state = json.loads((tmp_path / f"run-{name}" / "checkpoints" / "step-00000002" / "trainer_state.json").read_text())
    assert summary["finished"] and state["token_grid"]["axes"] == list(axes) and state["token_grid"]["shape"] == list(shape)
    assert state["token_grid"]["tokenizer"]["model"] == tokenizer["model"]


def test_brainomni_forecast_takes_channels_levels_and_tokenizer_from_the_manifest(tmp_path):
    from safetensors.torch import save_file

    from modeling.registry import build_model
    from trainer.loop import Trainer

    tokenizer_dir = tmp_path / "tokenizer"
    tokenizer_dir.mkdir()
    tokenizer = build_model("BrainOmniCausalTokenizer", "debug")
    save_file(tokenizer.state_dict(), str(tokenizer_dir / "model.safetensors"))
    provenance = {"model": "BrainOmniCausalTokenizer", "flavor": "debug", "args": {}, "checkpoint": str(tokenizer_dir),
                  "sha256": "3" * 64}
    # debug BrainOmni: 3 latent channels, 2 levels of 32 codes
    dataset = write_grid_dataset(tmp_path / "data", axes=("channel", "time", "level"), shape=(3, 8, 2), vocab_size=32,
                                 tokenizer=provenance)
    trainer = Trainer(grid_run(tmp_path, "BrainOmniCausalForecast", dataset))
    args = trainer.model_args
    assert (args["num_channels"], args["num_quantizers"], args["vocab_size"], args["sequence_len"]) == (3, 2, 32, 8)
    assert args["tokenizer_path"] == str(tokenizer_dir) and args["tokenizer_name"] == "BrainOmniCausalTokenizer"
    batch = trainer.to_batch({"tokens": torch.randint(0, 32, (2, 3, 8, 2))}, torch.device("cpu"))
    assert batch["idx"].shape == (2, 3, 7, 2) and trainer.count_positions(None, batch) == 2 * 3 * 7
    assert trainer.train()["finished"]


@pytest.mark.parametrize("name, layout, args, message", [
    ("gpt", "braintokmix", {}, "reads one code per position; the dataset's codes (channel 2, time 6, level 2) hold 2 RVQ levels"),
    ("gpt", "totem", {"vocab_size": 8}, "model.args.vocab_size=8 cannot hold the dataset's vocabulary of 16"),
    ("gpt", "totem", {"sequence_len": 4}, "model.args.sequence_len=4 cannot hold the dataset's series of 6 codes"),
    ("FlatGPTEmbedsRVQ", "braintokmix", {"input_shape": [4, 2, 2]},
     "model.args.input_shape [4, 2, 2] with temporal_reduction 1 and spatial_reduction [1, 1] gives a code grid (4, 2, 2) "
     "that cannot hold the dataset's grid (6, 2, 2)"),
    ("FlatGPTEmbedsRVQ", "braintokmix", {"input_shape": [24, 2, 2], "temporal_reduction": 4}, None),  # (6, 2, 2): fits
    ("FlatGPTEmbeds", "braintokmix", {}, "FlatGPTEmbeds needs a (T, C, 1) grid"),
    ("BrainOmniCausalForecast", "totem", {}, "reads the (channel, time, level) codes of BrainOmniCausalTokenizer"),
    ("totem", "totem", {}, "model.name 'totem' does not train on token grids"),
])
def test_a_model_that_cannot_hold_the_grid_is_refused_in_one_line(tmp_path, name, layout, args, message):
    from trainer.loop import Trainer

    axes, shape = LAYOUTS[layout]
    tokenizer = {"totem": TOTEM, "braintokmix": BRAINTOKMIX}[layout]
    dataset = write_grid_dataset(tmp_path / "data", axes=axes, shape=shape, vocab_size=16, tokenizer=tokenizer)
    if message is None:
        assert Trainer(grid_run(tmp_path, name, dataset, args)).model_args["input_shape"] == [24, 2, 2]
        return
    with pytest.raises(UserError) as error:
        Trainer(grid_run(tmp_path, name, dataset, args))
    assert message in str(error.value) and "\n" not in str(error.value)


def test_token_dataset_without_val_split_is_refused(tmp_path):
    from trainer.loop import Trainer

    dataset = write_grid_dataset(tmp_path / "data", axes=("channel", "time"), shape=(3, 6), vocab_size=16, tokenizer=TOTEM,
                                 num_val=0)
    with pytest.raises(UserError, match="data.val_split 'val': .* has no 'val' samples"):
        Trainer(grid_run(tmp_path, "gpt", dataset))
    cfg = grid_run(tmp_path, "gpt", dataset)
    cfg.data.val_split = ""  # asked to train without validation
    assert Trainer(cfg).train()["finished"]


def test_init_from_copies_every_weight_and_starts_a_fresh_optimizer(tmp_path, token_dataset):
    """model.init_from: the weights equal the source checkpoint's at step 0; optimizer and schedule fresh;
    a model of another shape is refused naming the tensors."""
    from safetensors.torch import load_file

    from core.config import DataConfig
    from trainer.loop import Trainer

    source = grid_run(tmp_path, "gpt", token_dataset, steps=3)
    source.data = DataConfig(dataset=token_dataset, num_streams=4)
    Trainer(source).train()
    (weights,) = (tmp_path / "run-gpt" / "checkpoints").glob("step-*/model.safetensors")
    saved = load_file(str(weights))

    tuned = grid_run(tmp_path, "gpt", token_dataset, steps=2, init_from=str(tmp_path / "run-gpt"))
    tuned.data = DataConfig(dataset=token_dataset, num_streams=4)
    tuned.run.output_dir = str(tmp_path / "tuned")
    trainer = Trainer(tuned)
    assert trainer.step == 0 and trainer.engine.lr == pytest.approx(1e-2)
    state = trainer.engine.model.state_dict()
    assert set(saved) == set(state) and all(torch.equal(saved[k], state[k]) for k in saved)
    assert not trainer.engine.optimizer.state  # no Adam moments yet
    assert trainer.train()["finished"]

    other = grid_run(tmp_path, "gpt", token_dataset, {"n_embd": 32}, init_from=str(tmp_path / "run-gpt"))
    other.data = DataConfig(dataset=token_dataset, num_streams=4)
    other.run.output_dir = str(tmp_path / "other")
    with pytest.raises(UserError) as error:
        Trainer(other)
    assert "does not fit this model: shapes differ: wte.weight (128, 64) (model: (128, 32))" in str(error.value)
    other.model.args, other.model.init_from = {}, str(tmp_path / "nothing-here")
    with pytest.raises(UserError, match="model.init_from: not found"):
        Trainer(other)
