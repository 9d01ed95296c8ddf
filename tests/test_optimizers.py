"""Which AdamW runs: torch's fused kernel where the device has one, DeepSpeed's CPU Adam when ZeRO
offloads the optimizer (or one line saying why not, and torch's AdamW instead)."""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import torch
from torch import nn

from core.config import OptimConfig
from trainer.optim import build_optimizer, optimizer_name, param_groups


def test_adamw_is_fused_on_cpu_and_steps_like_the_per_tensor_adamw():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(32, 16), nn.Linear(16, 16), nn.LayerNorm(16), nn.Linear(16, 32))
    reference = copy.deepcopy(model)
    cfg = OptimConfig(lr=1e-2)
    fused = build_optimizer(model, cfg)
    assert optimizer_name(fused) == "AdamW fused"
    per_tensor = torch.optim.AdamW(param_groups(reference, cfg), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, foreach=False)
    tokens = torch.randint(0, 32, (4, 8))
    for _ in range(3):
        for net, optimizer in ((model, fused), (reference, per_tensor)):
            optimizer.zero_grad()
            nn.functional.cross_entropy(net(tokens).flatten(0, 1), tokens.flatten()).backward()
            optimizer.step()
    for got, want in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


CONFIG_OF_AN_OFFLOADED_RUN = """
import torch
from core.config import EngineConfig, OptimConfig
from trainer.engines.deepspeed import deepspeed_config
print(deepspeed_config(EngineConfig(kind="deepspeed", zero_stage=2, offload_optimizer=True), OptimConfig(), 1, torch.device("cpu"))["optimizer"]["params"])
"""


def test_offloaded_optimizer_without_a_compiler_says_why_in_one_line_and_runs_torch_adamw(tmp_path):
    """DeepSpeedCPUAdam is a C++ op built on first use: with no compiler (and nothing built before, an
    empty extensions folder) the run logs one line naming the cause and takes torch's fused AdamW."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "TORCH_EXTENSIONS_DIR": str(tmp_path / "extensions"), "CXX": str(tmp_path / "no-g++")}
    result = subprocess.run([sys.executable, "-c", CONFIG_OF_AN_OFFLOADED_RUN], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if "DeepSpeedCPUAdam" in line]
    assert len(lines) == 1 and "no-g++: not found" in lines[0] and "runs torch's AdamW" in lines[0], result.stderr[-2000:]
    assert "'torch_adam': True, 'fused': True" in result.stdout
