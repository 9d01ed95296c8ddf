"""engine.compile: each block compiled in place (trainer/compile.py), trained for real on CPU.

Compiling costs ~20-30 s of CPU per distinct block graph here, so the runs are few and tiny: one
eager reference run, the same run compiled (its checkpoint resumed by an eager run), 2 ZeRO-2
ranks compiled against 1 eager rank with their global batch, and a block whose compilation fails.
"""

from __future__ import annotations

import logging

import pytest
import torch
from safetensors.torch import load_file

from core.config import EngineConfig, TrainConfig, load_config
from modeling.registry import build_model
from test_distributed import losses, run, write_config
from trainer.compile import compile_model, find_blocks, is_compile_on
from trainer.loop import Trainer

STEPS = 3
MICRO = 8
RTOL = 1e-5  # compiled kernels fuse and reorder float ops: same losses up to fp32 rounding
RANKS_RTOL = 1e-4  # as test_distributed: 2 ranks average their gradients in another order
NO_VALIDATION = {"val_split": ""}  # an eval would compile a second (no-grad) graph of the blocks


def train(tmp_path, dataset: str, name: str, is_compiled: bool, micro: int = MICRO, resume: str | None = None):
    config = write_config(tmp_path, dataset, name, {"compile": is_compiled}, micro=micro, steps=STEPS,
                          checkpoint={"every_steps": 1, "keep_last": STEPS}, data=NO_VALIDATION)
    trainer = Trainer(load_config(str(config), TrainConfig, []), resume=resume)
    trainer.train()
    return tmp_path / name


@pytest.fixture(scope="module")
def eager_run(tmp_path_factory, token_dataset):
    return train(tmp_path_factory.mktemp("compile"), token_dataset, "eager", False)


def test_compile_defaults_to_cuda_only():
    assert EngineConfig().compile is None
    assert not is_compile_on(EngineConfig(), torch.device("cpu"))
    assert is_compile_on(EngineConfig(), torch.device("cuda"))
    assert is_compile_on(EngineConfig(compile=True), torch.device("cpu"))
    assert not is_compile_on(EngineConfig(compile=False), torch.device("cuda"))


def test_blocks_are_the_layers_of_each_family():
    gpt = build_model("gpt", "debug", device="meta")
    assert find_blocks(gpt) == list(gpt.blocks)
    totem = build_model("totem", "debug", device="meta")  # conv stacks, not the EMA quantizer
    assert totem.compile_units() == [totem.encoder, totem.decoder]


def test_compiled_run_trains_as_eager_and_checkpoints_interchange(eager_run, tmp_path, token_dataset, caplog):
    caplog.set_level(logging.INFO, logger="tokfleet.compile")
    compiled_run = train(tmp_path, token_dataset, "compiled", True)
    assert "engine.compile: GPT: 3 blocks compiled (Block, TokenCrossEntropy)" in caplog.text  # 2 layers and the loss
    eager_losses, compiled_losses = losses(eager_run), losses(compiled_run)
    assert list(compiled_losses) == [1, 2, 3]
    assert list(compiled_losses.values()) == pytest.approx(list(eager_losses.values()), rel=RTOL)

    # the same tensor names as an eager model's: the compiled run's checkpoint resumes eagerly
    saved = load_file(compiled_run / "checkpoints" / "step-00000002" / "model.safetensors")
    assert sorted(saved) == sorted(build_model("gpt", "debug", {"vocab_size": 128, "sequence_len": 32}, device="meta").state_dict())
    resumed = train(tmp_path, token_dataset, "eager-from-compiled", False,
                    resume=str(compiled_run / "checkpoints" / "step-00000002"))
    assert losses(resumed)[3] == pytest.approx(eager_losses[3], rel=RTOL)


def test_two_ranks_zero2_compiled_train_as_one_rank_eager(tmp_path, token_dataset):
    """2 ranks x MICRO (the blocks' graph of the compiled run above: Inductor's cache has it) against 1 rank x 2 MICRO."""
    eager_run = train(tmp_path, token_dataset, "eager-one-rank", False, micro=2 * MICRO)
    config = write_config(tmp_path, token_dataset, "zero2-compiled", {"kind": "deepspeed", "zero_stage": 2, "compile": True},
                          micro=MICRO, steps=STEPS, data=NO_VALIDATION)
    result = run("torchrun", 2, config)
    assert "engine.compile: GPT: 3 blocks compiled (Block, TokenCrossEntropy)" in result.stdout + result.stderr
    assert list(losses(tmp_path / "zero2-compiled").values()) == pytest.approx(list(losses(eager_run).values()), rel=RANKS_RTOL)


def test_a_block_that_cannot_compile_runs_eager_with_one_log_line(monkeypatch, caplog):
    """A node without a working C++ compiler: Inductor cannot build the blocks' CPU kernels."""
    import torch._inductor.config as inductor_config

    monkeypatch.setattr(inductor_config.cpp, "cxx", ("/nonexistent/c++",))
    monkeypatch.setattr(inductor_config, "fx_graph_cache", False)  # a cached kernel would need no compiler
    caplog.set_level(logging.INFO, logger="tokfleet.compile")
    args = {"vocab_size": 40, "sequence_len": 8, "n_embd": 24, "n_head": 2, "n_kv_head": 2}
    tokens = torch.randint(0, 40, (2, 9), generator=torch.Generator().manual_seed(0))
    losses_by_mode = {}
    for is_compiled in (False, True):
        torch.manual_seed(0)
        model = build_model("gpt", "debug", args)
        compile_model(model, EngineConfig(compile=is_compiled), torch.device("cpu"))
        for _ in range(2):  # the second step runs the eager forward the fallback restored
            loss = model(tokens[:, :-1], tokens[:, 1:])
            loss.backward()
        losses_by_mode[is_compiled] = (loss.item(), model.blocks[0].attn.c_q.weight.grad.clone())
    assert not any("forward" in vars(block) for block in [*model.blocks, model.cross_entropy])  # eager forwards again
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2, warnings  # one line per block class: the layers, the loss
    assert warnings[0].startswith("engine.compile: GPT Block (blocks.0 and 1 more) could not compile and runs eager: ")
    assert warnings[1].startswith("engine.compile: GPT TokenCrossEntropy (cross_entropy) could not compile and runs eager: ")
    assert all("C++ compiler" in warning for warning in warnings)
    assert losses_by_mode[True][0] == losses_by_mode[False][0]
    torch.testing.assert_close(losses_by_mode[True][1], losses_by_mode[False][1], rtol=0, atol=0)


class PoolingBlock(torch.nn.Module):
    """A conv and a ceil_mode average pool, as the classifiers' DownBlock: (B, 2, T) -> (B, 2, ceil(T / 2))."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv1d(2, 2, 3, padding=1)
        self.skip = torch.nn.AvgPool1d(2, ceil_mode=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip(torch.tanh(self.conv(x)))


class PoolingStack(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList([PoolingBlock()])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks[0](x)


def test_an_op_inductor_gets_wrong_runs_eager_inside_the_compiled_block(caplog):
    caplog.set_level(logging.INFO, logger="tokfleet.compile")
    """pytorch/pytorch#198119: Inductor's gradient of a ceil_mode average pool is wrong at the last window."""
    x = torch.randn(2, 2, 7)  # odd length: the last window overhangs (eager divides it by 1, Inductor by 2)
    grads = []
    for is_compiled in (False, True):
        torch.manual_seed(0)
        model = PoolingStack()
        compile_model(model, EngineConfig(compile=is_compiled), torch.device("cpu"))
        model(x).pow(2).sum().backward()
        grads.append(model.blocks[0].conv.weight.grad)  # the last window holds 1 of 2 positions
    torch.testing.assert_close(grads[1], grads[0])
    assert "engine.compile: PoolingStack AvgPool1d(ceil_mode=True) (blocks.0.skip) runs eager" in caplog.text
