"""The per-node launcher command line (torchrun, deepspeed, `accelerate launch`), for every backend.

`tokfleet submit local` runs it once with real values; `tokfleet submit slurm` renders it into
the job script once for all nodes, with the node's rank and the rendezvous address left as
shell variables (`ShellVar`) that each node expands. The command lines are the ones
tests/test_distributed.py runs on CPU; multi-node adds only the node count, this node's rank
and the first node's address.
"""

from __future__ import annotations

import shlex
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

from core.errors import UserError
from launch.jobs import JobSpec

LAUNCHERS = ("torchrun", "deepspeed", "accelerate")


@dataclass(frozen=True)
class ShellVar:
    """A value the job script's shell fills in on each node, e.g. ShellVar("SLURM_NODEID")."""

    name: str


Arg = str | ShellVar


def free_port() -> int:
    """A TCP port free on loopback now (a single-node rendezvous; the test services' ports)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def shell_join(args: list[Arg]) -> str:
    """A shell command line: literal args quoted, ShellVars as "${NAME}"."""
    return " ".join(f'"${{{a.name}}}"' if isinstance(a, ShellVar) else shlex.quote(a) for a in args)


def choose_launcher(spec: JobSpec) -> str:
    """launch.launcher, or for `auto` the engine's own: deepspeed / accelerate launch / torchrun."""
    cfg = spec.config
    launcher = cfg.launch.launcher
    if launcher == "auto":
        launcher = {"deepspeed": "deepspeed", "accelerate": "accelerate"}.get(cfg.engine.kind, "torchrun")
    world_size = cfg.launch.nodes * cfg.launch.nproc_per_node
    if cfg.engine.kind == "single" and world_size > 1:
        raise UserError(f"engine.kind 'single' runs one process, but launch asks for {cfg.launch.nodes} node(s) x "
                        f"{cfg.launch.nproc_per_node} process(es): set engine.kind to accelerate or deepspeed")
    return launcher


def trainer_program(spec: JobSpec) -> list[str]:
    """What every rank runs after the launcher's own flags: the trainer module, the config, --set, --resume."""
    program = [str(spec.config_path)]
    for item in spec.overrides:
        program += ["--set", item]
    return [*program, *spec.stage_args]


def _bin(name: str, python: str) -> str:
    # the console script installed beside the interpreter that runs the job (the same venv)
    return str(Path(python).parent / name)


def launcher_command(spec: JobSpec, *, node_rank: Arg, master_addr: Arg, master_port: Arg,
                     hostfile: Arg | None = None, python: str = sys.executable) -> list[Arg]:
    """One node's launcher: it starts launch.nproc_per_node ranks of `python -m trainer CONFIG ...`.

    `hostfile` (deepspeed over several nodes): a file listing every node with its slots;
    DeepSpeed's runner needs it to count the world even with --no_ssh (one runner per node).
    """
    launch = spec.config.launch
    nodes, nproc = launch.nodes, launch.nproc_per_node
    launcher = choose_launcher(spec)
    program = trainer_program(spec)
    if launcher == "torchrun":
        return [python, "-m", "torch.distributed.run", f"--nnodes={nodes}", f"--nproc_per_node={nproc}",
                "--node_rank", node_rank, "--master_addr", master_addr, "--master_port", master_port,
                "-m", "trainer", *program]
    if launcher == "deepspeed":
        command: list[Arg] = [_bin("deepspeed", python), "--num_gpus", str(nproc), "--master_port", master_port]
        if nodes > 1:
            if hostfile is None:
                raise AssertionError("deepspeed over several nodes needs a hostfile")
            command += ["--num_nodes", str(nodes), "--hostfile", hostfile, "--no_ssh", "--node_rank", node_rank,
                        "--master_addr", master_addr]
        return [*command, "--module", "trainer", *program]
    if launcher == "accelerate":
        multi = ["--multi_gpu"] if nodes * nproc > 1 else []
        return [_bin("accelerate", python), "launch", *multi, "--num_machines", str(nodes),
                "--num_processes", str(nodes * nproc), "--machine_rank", node_rank, "--main_process_ip", master_addr,
                "--main_process_port", master_port, "--mixed_precision", "no", "--dynamo_backend", "no",
                "-m", "trainer", *program]
    raise AssertionError(f"unknown launcher {launcher!r}")  # the config schema admits no other


def process_env(spec: JobSpec) -> dict[str, str]:
    """Environment every process of the job gets: launch.env over our defaults.

    OMP_NUM_THREADS (ranks on a node share its CPUs) is each backend's to add: only it knows the CPUs.
    """
    launch = spec.config.launch
    env = {"PYTHONUNBUFFERED": "1"}  # logs arrive as they are written, not at exit
    if spec.stage == "train" and launch.gpus_per_node == 0 and spec.config.run.device != "cuda":
        env["DS_ACCELERATOR"] = "cpu"  # the deepspeed launcher counts devices itself, before the trainer sets this
    return {**env, **launch.env}
