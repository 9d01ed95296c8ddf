"""`tokfleet submit local`: run a job on this machine, in the foreground (the debugging path).

Training starts the same launcher the SLURM script starts on each node (launch/launchers.py),
for one node of launch.nproc_per_node ranks; prepare / pretokenize run the stage command
directly. The output is streamed and copied to JOB_DIR/logs/local-<pid>.out, and the
command's exit code is `tokfleet submit`'s. job.json names the pid and the log, so
`tokfleet jobs status|logs|stop JOB_DIR` work from another shell while it runs.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from core.errors import UserError
from launch.jobs import JobRecord, JobSpec
from launch.launchers import free_port, launcher_command, process_env

MARKER_ENV = "TOKFLEET_JOB_DIR"  # set in the job's environment: proves a pid is still our job's
STOP_GRACE_S = 30.0


def command(spec: JobSpec) -> list[str]:
    if spec.stage != "train":
        return spec.stage_command(sys.executable)
    spec.config.launch.nodes = 1  # this machine is the one node
    return [str(arg) for arg in launcher_command(spec, node_rank="0", master_addr="127.0.0.1", master_port=str(free_port()))]


def environment(spec: JobSpec) -> dict[str, str]:
    env = {**os.environ, MARKER_ENV: str(spec.job_dir)}
    if spec.stage == "train":
        # the ranks share this machine's cores
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // spec.config.launch.nproc_per_node))
    return {**env, **process_env(spec)}


def _exit_file(record: JobRecord) -> Path:
    return Path(record.log_path).with_suffix(".exit")


def submit(spec: JobSpec) -> JobRecord | None:
    argv = command(spec)
    if spec.dry_run:
        print(" ".join(argv))
        return None
    logs_dir = spec.job_dir / "logs"
    logs_dir.mkdir(parents=True, exist_ok=True)
    # its own session: `jobs stop` signals the whole group (launcher and ranks), and a Ctrl-C here
    # is handled below instead of reaching the ranks half-way through a collective
    process = subprocess.Popen(argv, env=environment(spec), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               stdin=subprocess.DEVNULL, start_new_session=True)
    record = JobRecord(backend="local", job_id=str(process.pid), stage=spec.stage, job_dir=str(spec.job_dir),
                       log_path=str(logs_dir / f"local-{process.pid}.out"))
    record.save()
    print(f"local job {record.job_id} ({spec.stage}): {' '.join(argv)}\nlog: {record.log_path}", file=sys.stderr, flush=True)
    with open(record.log_path, "wb") as log:
        while True:
            try:
                chunk = os.read(process.stdout.fileno(), 1 << 16)
            except KeyboardInterrupt:
                _signal_group(process.pid, signal.SIGTERM)  # Ctrl-C: stop the job, keep copying its last words
                continue
            if not chunk:
                break
            log.write(chunk)
            log.flush()
            sys.stdout.buffer.write(chunk)
            sys.stdout.flush()
    code = process.wait()
    _exit_file(record).write_text(f"{code}\n")
    return record


def exit_code(record: JobRecord) -> int:
    """The finished job's exit code as a shell reports it (128 + N when signal N ended it)."""
    code = int(_exit_file(record).read_text())
    return 128 - code if code < 0 else code


def _is_ours(record: JobRecord) -> bool:
    try:
        environ = Path(f"/proc/{int(record.job_id)}/environ").read_bytes()
    except (OSError, ValueError):
        return False
    return f"{MARKER_ENV}={record.job_dir}".encode() in environ.split(b"\0")


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass


def status(record: JobRecord) -> str:
    if record.log_path is None:
        raise UserError(f"local job {record.job_id}: its job.json has no log path (not written by tokfleet submit local)")
    stopped = Path(record.log_path).with_suffix(".stopped").exists()
    if _exit_file(record).exists():
        if stopped:
            return "STOPPED"
        return "SUCCEEDED" if exit_code(record) == 0 else "FAILED"
    if _is_ours(record):
        return "RUNNING"
    return "STOPPED" if stopped else "FAILED"  # gone without an exit code: its submitting process was killed


def logs(record: JobRecord) -> str:
    if record.log_path is None or not Path(record.log_path).is_file():
        raise UserError(f"local job {record.job_id}: no log file ({record.log_path})")
    return Path(record.log_path).read_text(errors="replace")


def stop(record: JobRecord) -> None:
    """SIGTERM to the job's process group, SIGKILL after STOP_GRACE_S; only while the pid is still our job."""
    if not _is_ours(record):
        raise UserError(f"local job {record.job_id} is not running")
    Path(record.log_path).with_suffix(".stopped").touch()
    pid = int(record.job_id)
    _signal_group(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_S
    while _is_ours(record) and time.monotonic() < deadline:
        time.sleep(0.2)
    if _is_ours(record):
        _signal_group(pid, signal.SIGKILL)
