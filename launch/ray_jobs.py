"""`tokfleet submit ray` and `tokfleet jobs status|logs|stop` for Ray: jobs through the Ray Jobs API.

What the job runs on the cluster (its driver, on the head node):
- train: `python -m trainer.ray_train CONFIG --num-workers N`, a Ray Train `TorchTrainer` with one
  worker per rank (launch.nodes x launch.nproc_per_node, or `--nproc`), each running the trainer
  of `python -m trainer` into the same run directory;
- prepare / pretokenize: `python -m launch.cli STAGE CONFIG`, whose Ray Data pipeline joins the
  cluster the job runs on (`ray.address: auto`) instead of starting one.

Where paths point: the job's working directory is a copy of this checkout, uploaded as the
runtime env's `working_dir` (the cluster runs the code that was submitted; .venv, .git, data,
runs, jobs, demo and every data path the config names are left out), not the directory
`tokfleet submit` ran in. So the config's relative paths are made absolute against the
submitting directory (core/config_paths.py) and that resolved config, written to
JOB_DIR/ray-job.yaml, is what the job reads: on a filesystem the cluster shares, every path means
there what it meant here. Like every saved config it holds no credentials (core/redact.py):
the job takes them from its environment (launch.env, launch.ray.runtime_env's env_vars, or the
cluster's AWS_* / ~/.aws).

Every call first probes the address with a short HTTP timeout: the Jobs API client itself would
wait minutes on a dead address. Clusters with token authentication (Ray's default once a token
exists) get the token Ray's own tools use: RAY_AUTH_TOKEN, the file RAY_AUTH_TOKEN_PATH names, or
~/.ray/auth_token.
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from core.config import save_config
from core.config_paths import absolute_paths, local_paths
from core.errors import UserError
from launch.jobs import STATES, JobRecord, JobSpec
from core.redact import public_dict
from core.schema import to_dict

PROBE_TIMEOUT_S = 5.0
STOP_TIMEOUT_S = 60.0  # Ray sends SIGTERM, then SIGKILL after RAY_JOB_STOP_WAIT_TIME_S (3 s)
RESOLVED_CONFIG = "ray-job.yaml"
log = logging.getLogger("tokfleet")
# never uploaded with the code: environments, history, data and outputs
UPLOAD_EXCLUDES = ["/.venv", "/.git", "/data", "/runs", "/jobs", "/demo", "/wandb", "/build",
                   "__pycache__", "*.egg-info", ".pytest_cache", "/tests/bench/results"]


# ------------------------------------------------------------------ connecting


def normalize_address(address: str | None) -> str:
    """The Jobs API's base URL: http://HOST:PORT (a bare HOST:PORT gets http://)."""
    if not address:
        raise UserError("a Ray job needs the cluster's Jobs API address: --address http://HEAD:8265 or launch.ray.address")
    if "://" not in address:
        address = "http://" + address
    if not address.startswith(("http://", "https://")):
        raise UserError(f"Ray address {address!r}: expected the Jobs API's http://HEAD:8265 (the dashboard port), "
                        "not a GCS or ray:// client address")
    return address.rstrip("/")


def _auth_token() -> str | None:
    """The cluster token where Ray's own tools look for it."""
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if token:
        return token
    token_path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    if token_path.is_file():
        return token_path.read_text().strip() or None
    return None


def probe(address: str, timeout_s: float = PROBE_TIMEOUT_S) -> dict[str, str]:
    """Check that a Ray Jobs API answers at `address` within `timeout_s`; the HTTP headers it needs."""
    headers: dict[str, str] = {}
    while True:
        request = urllib.request.Request(f"{address}/api/version", headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=timeout_s) as response:
                response.read()
            return headers
        except urllib.error.HTTPError as error:
            if error.code == 401 and not headers and (token := _auth_token()):
                headers = {"Authorization": f"Bearer {token}"}
                continue
            if error.code == 401:
                hint = "a token it did not accept" if headers else "no token"
                raise UserError(f"Ray cluster at {address} requires token authentication and got {hint}: set RAY_AUTH_TOKEN "
                                "(or RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token) to the cluster's token") from None
            raise UserError(f"{address} does not look like a Ray Jobs API (GET /api/version: HTTP {error.code})") from None
        except (urllib.error.URLError, OSError, ValueError) as error:
            reason = getattr(error, "reason", None) or error or type(error).__name__
            raise UserError(f"Ray cluster at {address} is not reachable ({reason}): is its head running, with the "
                            "dashboard (Jobs API) on that port?") from None


def connect(address: str | None):
    """A JobSubmissionClient for `address`, after the probe says something answers there."""
    address = normalize_address(address)
    headers = probe(address)
    from ray.job_submission import JobSubmissionClient

    # packaging the working_dir logs every file it skips and the default excludes it applies
    logging.getLogger("ray._private.runtime_env").setLevel(logging.ERROR)
    logging.getLogger("ray.dashboard.modules.dashboard_sdk").setLevel(logging.WARNING)
    return JobSubmissionClient(address, headers=headers)


# ------------------------------------------------------------------ submit


def code_root() -> Path | None:
    """This checkout (uploaded as the job's working_dir); None for an installed package."""
    root = Path(__file__).resolve().parent.parent
    return root if (root / "pyproject.toml").is_file() else None


def job_command(spec: JobSpec, config_path: Path, python: str) -> list[str]:
    if spec.stage == "train":
        launch = spec.config.launch
        return [python, "-m", "trainer.ray_train", str(config_path),
                "--num-workers", str(launch.nodes * launch.nproc_per_node), *spec.stage_args]
    return [python, "-m", "launch.cli", spec.stage, str(config_path), *spec.stage_args]


def runtime_env(config: Any, job_dir: Path) -> dict[str, Any]:
    """launch.ray.runtime_env plus launch.env as env_vars and, unless it names its own, this checkout as working_dir."""
    job_env = {key: (dict(value) if isinstance(value, dict) else value) for key, value in config.launch.ray.runtime_env.items()}
    job_env["env_vars"] = {**{k: str(v) for k, v in config.launch.env.items()}, **job_env.get("env_vars", {})}
    job_env["env_vars"].setdefault("PYTHONUNBUFFERED", "1")  # logs reach `tokfleet jobs logs` as they are written
    root = code_root()
    if "working_dir" in job_env:
        if not job_env["working_dir"]:
            del job_env["working_dir"]  # '' asks for no upload: the cluster's installed tokfleet runs
        return job_env
    if root is None:
        return job_env
    data = [path for path in [*local_paths(config), job_dir] if path != root and path.is_relative_to(root)]
    job_env["working_dir"] = str(root)
    job_env["excludes"] = [*job_env.get("excludes", []), *UPLOAD_EXCLUDES, *("/" + str(p.relative_to(root)) for p in data)]
    return job_env


def submission_id(job_name: str) -> str:
    """Readable and unique: tokfleet-NAME-YYYYmmdd-HHMMSS-XXXX."""
    name = re.sub(r"[^A-Za-z0-9_-]+", "-", job_name).strip("-")[:40] or "job"
    return f"tokfleet-{name}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:4]}"


def submit(spec: JobSpec) -> JobRecord:
    ray_cfg = spec.config.launch.ray
    client = connect(ray_cfg.address)  # before anything is written: a dead address leaves no trace
    address = normalize_address(ray_cfg.address)
    config = absolute_paths(spec.config, Path.cwd())
    if spec.stage != "train":
        config.ray.address = "auto"  # the job's Ray Data joins the cluster it runs on (RAY_ADDRESS)
    if public_dict(config) != to_dict(config):
        log.warning("the job's config is saved without the storage_options credentials it had: the job reads them from "
                    "its environment (launch.env, or the cluster's AWS_* / ~/.aws)")
    config_path = spec.job_dir / RESOLVED_CONFIG
    save_config(config, config_path)
    entrypoint = shlex.join(job_command(spec, config_path, ray_cfg.python))
    try:
        job_id = client.submit_job(
            entrypoint=entrypoint, runtime_env=runtime_env(config, spec.job_dir), submission_id=submission_id(spec.job_name),
            metadata={"tokfleet_stage": spec.stage, "tokfleet_job_dir": str(spec.job_dir)},
            entrypoint_num_cpus=ray_cfg.entrypoint_num_cpus or None,
        )
    except (RuntimeError, ValueError) as error:  # the cluster refused it (e.g. a bad runtime_env)
        raise UserError(f"Ray cluster at {address} refused the job: {str(error).splitlines()[0]}") from None
    record = JobRecord(backend="ray", job_id=job_id, stage=spec.stage, job_dir=str(spec.job_dir), address=address)
    record.save()
    return record


# ------------------------------------------------------------------ jobs status / logs / stop


def _status(client, record: JobRecord) -> str:
    try:
        state = client.get_job_status(record.job_id)
    except RuntimeError as error:
        if "does not exist" in str(error) or "404" in str(error):
            raise UserError(f"no Ray job {record.job_id!r} at {record.address}") from None
        raise
    # Ray's JobStatus values are our STATES, name for name
    assert state.value in STATES, state
    return state.value


def status(record: JobRecord) -> str:
    return _status(connect(record.address), record)


def logs(record: JobRecord) -> str:
    client = connect(record.address)
    _status(client, record)  # a clear error for an unknown job id
    return client.get_job_logs(record.job_id)


def stop(record: JobRecord, timeout_s: float = STOP_TIMEOUT_S) -> str:
    """Stop the job (SIGTERM to its driver, then SIGKILL; Ray Train's workers end with it); its final state."""
    client = connect(record.address)
    state = _status(client, record)
    if state in ("SUCCEEDED", "FAILED", "STOPPED"):
        return state
    client.stop_job(record.job_id)
    deadline = time.monotonic() + timeout_s
    while (state := _status(client, record)) in ("PENDING", "RUNNING"):
        if time.monotonic() > deadline:
            raise UserError(f"Ray job {record.job_id} is still {state} {timeout_s:.0f} s after the stop request")
        time.sleep(0.5)
    return state
