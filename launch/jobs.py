"""What `tokfleet submit` hands a backend (JobSpec) and what it leaves behind (JobRecord).

Every backend (local, SLURM, Ray) takes one JobSpec: the stage, the config file and its
`--set` overrides, the typed config (whose `launch:` section already holds the command
line's flags) and a job dir. It returns a JobRecord, saved as `JOB_DIR/job.json`, which
`tokfleet jobs status|logs|stop` reads back: JOB is that folder (a train run dir), the
json file, or `BACKEND:ID` (e.g. `slurm:42`, `ray:raysubmit_x --address URL`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from core.errors import UserError

Stage = Literal["train", "prepare", "pretokenize"]
Backend = Literal["local", "slurm", "ray"]
BACKENDS = ("local", "slurm", "ray")
# states every backend maps its own onto
STATES = ("PENDING", "RUNNING", "SUCCEEDED", "FAILED", "STOPPED")


@dataclass
class JobSpec:
    stage: Stage
    config_path: Path  # absolute
    overrides: list[str]  # the `--set KEY=VALUE` items, passed on to the stage's command
    config: Any  # TrainConfig | PrepareConfig | PretokenizeConfig, `launch` updated from the flags
    job_dir: Path  # absolute: the rendered script, job.json and logs go here
    job_name: str
    dry_run: bool = False
    stage_args: list[str] = field(default_factory=list)  # extra flags for the stage command (e.g. --resume auto)

    def stage_command(self, python: str = "python") -> list[str]:
        """The command one process (one rank, or the Ray driver) runs: `python -m launch.cli STAGE CONFIG ...`."""
        command = [python, "-m", "launch.cli", self.stage, str(self.config_path)]
        for item in self.overrides:
            command += ["--set", item]
        return command + self.stage_args


@dataclass
class JobRecord:
    backend: Backend
    job_id: str
    stage: Stage
    job_dir: str
    address: str | None = None  # Ray Jobs API address
    log_path: str | None = None  # where the backend writes the job's output, when it is a file

    @property
    def path(self) -> Path:
        return Path(self.job_dir) / "job.json"

    def save(self) -> Path:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(asdict(self), indent=1) + "\n")
        tmp.replace(self.path)
        return self.path

    @classmethod
    def load(cls, spec: str, address: str | None = None) -> "JobRecord":
        """From a job dir, its job.json, or `BACKEND:ID` (Ray needs `address` then)."""
        path = Path(spec)
        if path.is_dir():
            path = path / "job.json"
        if path.is_file():
            try:
                record = cls(**json.loads(path.read_text()))
            except (ValueError, TypeError) as error:
                raise UserError(f"{path}: not a tokfleet job record ({error})") from None
            if address:
                record.address = address
            return record
        backend, _, job_id = spec.partition(":")
        if backend not in BACKENDS or not job_id:
            raise UserError(f"job {spec!r}: not a job dir, a job.json or BACKEND:ID with BACKEND one of {', '.join(BACKENDS)}")
        if backend == "ray" and not address:
            raise UserError(f"job {spec!r}: a Ray job needs --address http://HEAD:8265")
        return cls(backend=backend, job_id=job_id, stage="train", job_dir=".", address=address)
