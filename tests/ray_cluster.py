"""A real Ray cluster head for the tests: `ray start --head --block` with the dashboard's Jobs API.

Token authentication is on, as on a Ray 2.5x+ cluster once a token exists; clients and drivers
need the same token in RAY_AUTH_TOKEN (conftest.py sets it for the session). The head runs in
its own process group and its processes carry a marker variable, so `stop()` ends exactly them:
`ray stop` would end every Ray process on the machine, other people's included.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil

from launch.launchers import free_port

MARKER = "TOKFLEET_TEST_RAY_HEAD"
BIN = Path(sys.executable).parent


class RayHead:
    def __init__(self, token: str | None = None, num_cpus: int = 2, object_store_bytes: int = 300_000_000):
        self.num_cpus, self.object_store_bytes = num_cpus, object_store_bytes
        self.token = token or secrets.token_hex(32)
        self.gcs_port, self.dashboard_port = free_port(), free_port()
        self.address = f"http://127.0.0.1:{self.dashboard_port}"  # the Jobs API
        self.gcs_address = f"127.0.0.1:{self.gcs_port}"  # what ray.init joins
        # short: Ray's unix socket paths under it are limited to ~100 characters
        self.temp_dir = tempfile.mkdtemp(prefix="tfray-", dir="/tmp")
        self.process: subprocess.Popen | None = None

    def env(self) -> dict[str, str]:
        """Where the head's processes find tokfleet's venv, as after `. .venv/bin/activate; ray start`."""
        return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "RAY_AUTH_MODE": "token",
                "RAY_AUTH_TOKEN": self.token, "RAY_USAGE_STATS_ENABLED": "0", MARKER: self.temp_dir,
                # stop at once: a SIGTERMed head otherwise waits 30 s for its node to drain
                "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}

    def start(self, timeout_s: float = 90.0) -> "RayHead":
        command = [str(BIN / "ray"), "start", "--head", "--block", f"--num-cpus={self.num_cpus}",
                   f"--object-store-memory={self.object_store_bytes}", "--node-ip-address=127.0.0.1",
                   f"--port={self.gcs_port}", "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
                   f"--dashboard-agent-listen-port={free_port()}", f"--ray-client-server-port={free_port()}",
                   "--disable-usage-stats", f"--temp-dir={self.temp_dir}"]
        self.log = open(Path(self.temp_dir) / "head.log", "w")
        self.process = subprocess.Popen(command, env=self.env(), stdout=self.log, stderr=subprocess.STDOUT,
                                        start_new_session=True, cwd=Path(__file__).resolve().parent.parent)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ray start exited with {self.process.returncode}:\n{self.head_log()}")
            try:
                request = urllib.request.Request(f"{self.address}/api/version", headers={"Authorization": f"Bearer {self.token}"})
                urllib.request.urlopen(request, timeout=2).read()
                return self
            except (urllib.error.URLError, OSError):
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"Ray head not up after {timeout_s} s:\n{self.head_log()}")

    def head_log(self) -> str:
        return (Path(self.temp_dir) / "head.log").read_text()[-3000:]

    def _own_processes(self) -> list[psutil.Process]:
        found = []
        for process in psutil.process_iter():
            try:
                if process.environ().get(MARKER) == self.temp_dir:
                    found.append(process)
            except (psutil.Error, OSError):
                pass
        return found

    def stop(self) -> None:
        """SIGTERM to `ray start --block` (it ends what it started), then SIGKILL to whatever of ours is left."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
        for process in self._own_processes():
            try:
                process.kill()
            except psutil.Error:
                pass
        self.log.close()
        shutil.rmtree(self.temp_dir, ignore_errors=True)
