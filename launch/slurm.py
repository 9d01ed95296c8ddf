"""`tokfleet submit slurm`: render an sbatch script from slurm/ into the job dir and sbatch it.

Training uses slurm/train.sbatch (one launcher per node under srun, rendezvous on the first
node); prepare / pretokenize use slurm/ray.sbatch (a Ray cluster inside the allocation). The
templates are Python string.Template text with `@@{name}` placeholders (a `$` delimiter would
clash with the shell's own variables). `jobs status|logs|stop` ask scontrol / sacct / scancel.
Every SLURM command runs with a timeout, so a dead controller ends in a clear error, not a hang.

    python -m launch.slurm wait-ray HEAD:PORT NUM_NODES [PID ...]   # used by slurm/ray.sbatch
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import string
import subprocess
import sys
import time
from pathlib import Path

from core.errors import UserError
from launch.jobs import JobRecord, JobSpec
from launch.launchers import ShellVar, launcher_command, process_env, shell_join

TEMPLATES = Path(__file__).resolve().parent.parent / "slurm"
COMMAND_TIMEOUT_S = 30
# SLURM's job states -> launch.jobs.STATES
_STATES = {
    "PENDING": "PENDING", "REQUEUED": "PENDING", "REQUEUE_HOLD": "PENDING", "REQUEUE_FED": "PENDING",
    "CONFIGURING": "PENDING", "RESV_DEL_HOLD": "PENDING",
    "RUNNING": "RUNNING", "COMPLETING": "RUNNING", "SUSPENDED": "RUNNING", "STAGE_OUT": "RUNNING",
    "SIGNALING": "RUNNING", "RESIZING": "RUNNING",
    "COMPLETED": "SUCCEEDED", "CANCELLED": "STOPPED",
}  # anything else (FAILED, TIMEOUT, NODE_FAIL, OUT_OF_MEMORY, PREEMPTED, BOOT_FAIL, DEADLINE) is FAILED


class ScriptTemplate(string.Template):
    delimiter = "@@"


def _run(argv: list[str], what: str, timeout: float = COMMAND_TIMEOUT_S) -> subprocess.CompletedProcess:
    if shutil.which(argv[0]) is None:
        raise UserError(f"{argv[0]} not found on PATH: {what} needs the SLURM client commands (sbatch, squeue, scontrol, scancel)")
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise UserError(f"{argv[0]} did not answer within {timeout:.0f} s ({what}): is slurmctld reachable?") from None


def _slurm_message(result: subprocess.CompletedProcess) -> str:
    """SLURM's own reason, one line: 'sbatch: error: Batch job submission failed: X' -> 'X'."""
    lines = [line.strip() for line in (result.stderr or result.stdout).splitlines() if line.strip()]
    line = lines[-1] if lines else f"exit code {result.returncode}"
    return re.sub(r"^(\w+: )?(error: )?(Batch job submission failed: )?", "", line)


# ------------------------------------------------------------------ render


def _sbatch_lines(spec: JobSpec) -> list[str]:
    launch, slurm = spec.config.launch, spec.config.launch.slurm
    options = [f"--job-name={spec.job_name}", f"--nodes={launch.nodes}", "--ntasks-per-node=1"]
    if launch.gpus_per_node:
        options.append(f"--gres=gpu:{launch.gpus_per_node}")
    if slurm.cpus_per_task:
        options.append(f"--cpus-per-task={slurm.cpus_per_task}")
    for name in ("partition", "time", "account", "qos", "constraint", "mem"):
        value = getattr(slurm, name)
        if value:
            options.append(f"--{name}={value}")
    # a requeued job keeps its id: append, so its log holds every run
    options += [f"--output={spec.job_dir}/logs/slurm-%j.out", "--open-mode=append", f"--chdir={Path.cwd()}"]
    if slurm.requeue:
        # B: the batch shell gets the warning and forwards it to the step (see slurm/train.sbatch),
        # so the script knows to requeue once the trainers have checkpointed
        options += ["--requeue", f"--signal=B:USR1@{slurm.signal_seconds}"]
    for option in slurm.extra_sbatch:
        if not option.startswith("-"):
            raise UserError(f"launch.slurm.extra_sbatch: {option!r} is not an sbatch option (e.g. --exclusive)")
        options.append(option)
    return [f"#SBATCH {option}" for option in options]


def _environment(spec: JobSpec) -> str:
    env = process_env(spec)
    bad = [name for name in env if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name)]
    if bad:
        raise UserError(f"launch.env: {bad[0]!r} is not an environment variable name")
    lines = [f"export {name}={shlex.quote(value)}" for name, value in env.items()]
    if spec.stage == "train" and "OMP_NUM_THREADS" not in env:
        # the node's ranks share the CPUs SLURM gave it
        nproc = spec.config.launch.nproc_per_node
        lines.append(f"THREADS=$(( ${{SLURM_CPUS_ON_NODE:-{nproc}}} / {nproc} )); export OMP_NUM_THREADS=$(( THREADS > 0 ? THREADS : 1 ))")
    return "\n".join(lines)


def _ray_start_args(spec: JobSpec) -> str:
    ray = spec.config.ray
    # without --num-cpus Ray would count the whole machine, not what SLURM allocated
    cpus = str(ray.num_cpus) if ray.num_cpus else "${SLURM_CPUS_ON_NODE}"
    return f"--num-cpus={cpus} --object-store-memory={ray.object_store_mb * (1 << 20)} --disable-usage-stats"


def render(spec: JobSpec) -> str:
    """The job script for `spec` from its template (launch.slurm.template, or slurm/'s for the stage)."""
    slurm = spec.config.launch.slurm
    default = "train.sbatch" if spec.stage == "train" else "ray.sbatch"
    path = Path(slurm.template) if slurm.template else TEMPLATES / default
    try:
        template = ScriptTemplate(path.read_text())
    except OSError as error:
        raise UserError(f"launch.slurm.template: cannot read {path}: {error.strerror}") from None
    python = sys.executable  # the interpreter running tokfleet, i.e. this environment's
    values = {
        "sbatch": "\n".join(_sbatch_lines(spec)),
        "setup": "\n".join(slurm.setup),
        "environment": _environment(spec),
        "job_dir": str(spec.job_dir),
        "num_nodes": str(spec.config.launch.nodes),
        "nproc_per_node": str(spec.config.launch.nproc_per_node),
        "requeue": "1" if slurm.requeue else "0",
        "python": shlex.quote(python),
        "python_bin": shlex.quote(str(Path(python).parent)),
    }
    if spec.stage == "train":
        values["launcher"] = shell_join(launcher_command(
            spec, node_rank=ShellVar("SLURM_NODEID"), master_addr=ShellVar("MASTER_ADDR"),
            master_port=ShellVar("MASTER_PORT"), hostfile=ShellVar("HOSTFILE"), python=python))
    else:
        values["stage_command"] = shell_join(spec.stage_command(python))
        values["ray_start_args"] = _ray_start_args(spec)
    try:
        return template.substitute(values)
    except KeyError as error:
        raise UserError(f"{path}: unknown placeholder @@{{{error.args[0]}}}; known: {', '.join(sorted(values))}") from None
    except ValueError as error:
        raise UserError(f"{path}: {error}") from None


# ------------------------------------------------------------------ backend


def submit(spec: JobSpec) -> JobRecord | None:
    script = render(spec)
    if spec.dry_run:
        print(script, end="")
        return None
    (spec.job_dir / "logs").mkdir(parents=True, exist_ok=True)
    path = spec.job_dir / "job.sbatch"
    path.write_text(script)
    result = _run(["sbatch", "--parsable", str(path)], "tokfleet submit slurm", timeout=60)
    if result.returncode != 0:
        raise UserError(f"sbatch refused {path}: {_slurm_message(result)}")
    job_id = result.stdout.strip().split(";")[0]
    record = JobRecord(backend="slurm", job_id=job_id, stage=spec.stage, job_dir=str(spec.job_dir),
                       log_path=str(spec.job_dir / "logs" / f"slurm-{job_id}.out"))
    record.save()
    return record


def _job_fields(job_id: str) -> dict[str, str] | None:
    """scontrol's view of the job (None once it has left slurmctld's memory, MinJobAge after the end)."""
    result = _run(["scontrol", "show", "job", "--oneliner", job_id], "tokfleet jobs")
    if result.returncode != 0:
        if "Invalid job id" in (result.stderr + result.stdout):
            return None
        raise UserError(f"scontrol show job {job_id}: {_slurm_message(result)}")
    return dict(re.findall(r"(\w+)=(\S*)", result.stdout))


def _finished_state(job_id: str) -> str | None:
    """The final state from the job completion log (JobCompType=jobcomp/filetxt; works without slurmdbd)."""
    if shutil.which("sacct") is None:
        return None
    result = _run(["sacct", "--completion", "--jobs", job_id, "--noheader", "--parsable2", "--format=State"], "tokfleet jobs")
    states = [line.split()[0] for line in result.stdout.splitlines() if line.strip()] if result.returncode == 0 else []
    return states[-1] if states else None  # a requeued job has a line per run: the last is its fate


def status(record: JobRecord) -> str:
    fields = _job_fields(record.job_id)
    state = fields["JobState"] if fields else _finished_state(record.job_id)
    if state is None:
        raise UserError(f"slurm job {record.job_id}: unknown to scontrol and to the job completion log")
    return _STATES.get(state, "FAILED")


def logs(record: JobRecord) -> str:
    path = record.log_path
    if path is None:  # `slurm:ID`: ask where its output goes
        fields = _job_fields(record.job_id)
        path = fields.get("StdOut") if fields else None
    if path is None or not Path(path).is_file():
        raise UserError(f"slurm job {record.job_id}: no output file yet ({path or 'unknown'})")
    return Path(path).read_text(errors="replace")


def stop(record: JobRecord) -> None:
    result = _run(["scancel", record.job_id], "tokfleet jobs stop")
    if result.returncode != 0:
        raise UserError(f"scancel {record.job_id}: {_slurm_message(result)}")


# ------------------------------------------------------------------ inside the job


def _has_exited(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] in "ZX"  # a zombie has exited too
    except OSError:
        return True


def wait_for_ray(address: str, num_nodes: int, step_pids: list[int], timeout_s: float = 180.0) -> None:
    """Return once the Ray cluster at `address` has `num_nodes` live nodes (slurm/ray.sbatch).

    `step_pids`: the srun processes running `ray start`; when one has exited, Ray will not come up.
    """
    import ray

    deadline = time.monotonic() + timeout_s

    def check_alive(what: str) -> None:
        if any(_has_exited(pid) for pid in step_pids):
            sys.exit(f"tokfleet: a `ray start` step exited while {what}; see its output above")
        if time.monotonic() > deadline:
            sys.exit(f"tokfleet: timed out after {timeout_s:.0f} s while {what}")
        time.sleep(1.0)

    while True:
        try:
            ray.init(address=address, logging_level="ERROR", log_to_driver=False)
            break
        except (ConnectionError, RuntimeError):
            check_alive(f"waiting for the Ray head at {address}")
    try:
        while sum(node["Alive"] for node in ray.nodes()) < num_nodes:
            check_alive(f"waiting for {num_nodes} Ray nodes at {address}")
    finally:
        ray.shutdown()


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) < 3 or argv[0] != "wait-ray":
        sys.exit("usage: python -m launch.slurm wait-ray HEAD:PORT NUM_NODES [PID_OF_RAY_START_STEP ...]")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    wait_for_ray(argv[1], int(argv[2]), [int(pid) for pid in argv[3:]])


if __name__ == "__main__":
    main()
