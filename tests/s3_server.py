"""A real S3 server for tests and benchmarks: Ceph radosgw on one in-memory OSD, on loopback.

One monitor, one memstore OSD (pool size 1, cephx) and radosgw (beast frontend), each started in
the foreground as our own child process, so `stop()` ends exactly those PIDs and removes the
temporary folder that holds their config, keys, logs and sockets. OSD heartbeats bind every
address: start it only inside a loopback-only network namespace (tests/conftest.py runs the
session in one). The Debian packages are installed with apt-get when missing; without apt the
server cannot start, which is an error, not a skip.

    python tests/s3_server.py      # start one, print endpoint + keys, stop on Enter
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass, field

from launch.launchers import free_port
import system_packages  # tests/ is on sys.path (pytest, or `python tests/FILE.py`)

START_TIMEOUT_S = 90.0


class S3ServerError(RuntimeError):
    """The server could not be installed or started; the message says which step failed."""


CEPH_CONF = """[global]
fsid = {fsid}
mon host = v2:127.0.0.1:{mon_port}
mon initial members = a
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
keyring = {root}/keyring
public addr = 127.0.0.1
ms bind ipv6 = false
run dir = {root}/run
admin socket = {root}/run/$name.asok
log file = {root}/log/$name.log
mon data = {root}/mon/$cluster-$id
osd data = {root}/osd/$cluster-$id
osd objectstore = memstore
memstore device bytes = 2147483648
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon allow pool size one = true
mon warn on pool no redundancy = false
mon max pg per osd = 1000
osd max object name len = 460
osd max object namespace len = 64
rgw frontends = beast endpoint=127.0.0.1:{rgw_port}
rgw data = {root}/rgw
rgw enable usage log = false

[osd]
keyring = {root}/osd/$cluster-$id/keyring
"""


@dataclass
class RadosGateway:
    """radosgw on a one-OSD Ceph cluster; `start()` returns once S3 requests succeed."""

    access_key: str = field(default_factory=lambda: "TF" + secrets.token_hex(9).upper())
    secret_key: str = field(default_factory=lambda: secrets.token_urlsafe(30))
    root: str = ""
    port: int = 0
    processes: list[subprocess.Popen] = field(default_factory=list)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def storage_options(self) -> dict:
        """fsspec/s3fs options for this server."""
        return {"key": self.access_key, "secret": self.secret_key, "client_kwargs": {"endpoint_url": self.endpoint}}

    def env(self) -> dict[str, str]:
        """The usual AWS variables pointing boto/s3fs at this server."""
        return {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key,
                "AWS_ENDPOINT_URL": self.endpoint, "AWS_DEFAULT_REGION": "us-east-1"}

    # ------------------------------------------------------------------ start

    def _run(self, *argv: str, step: str) -> str:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        if result.returncode != 0:
            raise S3ServerError(f"{step} failed ({' '.join(argv[:3])} ...): {(result.stderr or result.stdout).strip()[-400:]}")
        return result.stdout

    def _ceph(self, *args: str, step: str) -> str:
        return self._run("ceph", "-c", self.conf, "--connect-timeout", "20", *args, step=step)

    def _spawn(self, *argv: str) -> None:
        log = open(os.path.join(self.root, "log", f"{os.path.basename(argv[0])}.out"), "wb")
        self.processes.append(subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL))
        log.close()

    def _check_alive(self, what: str) -> None:
        for process in self.processes:
            if process.poll() is not None:
                raise S3ServerError(f"{os.path.basename(process.args[0])} exited with {process.returncode} while {what}; "
                                    f"logs: {self.root}/log")

    def start(self) -> RadosGateway:
        system_packages.ensure_installed("Ceph radosgw")  # SystemPackageError says what is missing
        self.root = tempfile.mkdtemp(prefix="tokfleet-rgw-")
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        root, fsid = self.root, str(uuid.uuid4())
        for sub in ("run", "log", "mon/ceph-a", "osd/ceph-0", "rgw"):
            os.makedirs(os.path.join(root, sub))
        self.port = free_port()
        self.conf = os.path.join(root, "ceph.conf")
        with open(self.conf, "w") as handle:
            handle.write(CEPH_CONF.format(fsid=fsid, root=root, mon_port=free_port(), rgw_port=self.port))
        keyring = os.path.join(root, "keyring")
        self._run("ceph-authtool", "--create-keyring", keyring, "--gen-key", "-n", "mon.", "--cap", "mon", "allow *", step="mon key")
        self._run("ceph-authtool", keyring, "--gen-key", "-n", "client.admin", "--cap", "mon", "allow *",
                  "--cap", "osd", "allow *", "--cap", "mgr", "allow *", step="admin key")
        monmap = os.path.join(root, "monmap")
        mon_addr = open(self.conf).read().split("mon host = ")[1].split()[0]
        self._run("monmaptool", "--create", "--addv", "a", f"[{mon_addr}]", "--fsid", fsid, monmap, step="monmap")
        self._run("ceph-mon", "-c", self.conf, "--mkfs", "-i", "a", "--monmap", monmap, "--keyring", keyring, step="mon mkfs")
        self._spawn("ceph-mon", "-f", "-c", self.conf, "-i", "a")

        osd_uuid = str(uuid.uuid4())
        osd_id = self._ceph("osd", "new", osd_uuid, step="osd new").strip()
        osd_dir = os.path.join(root, "osd", f"ceph-{osd_id}")
        os.makedirs(osd_dir, exist_ok=True)
        self._run("ceph-osd", "-c", self.conf, "-i", osd_id, "--mkfs", "--mkkey", "--osd-uuid", osd_uuid,
                  "--no-mon-config", step="osd mkfs")
        self._ceph("auth", "add", f"osd.{osd_id}", "osd", "allow *", "mon", "allow profile osd",
                   "-i", os.path.join(osd_dir, "keyring"), step="osd key")
        self._spawn("ceph-osd", "-f", "-c", self.conf, "-i", osd_id)
        self._wait(lambda: '"num_up_osds":1' in self._ceph("osd", "stat", "-f", "json", step="osd stat").replace(" ", ""),
                   "waiting for the OSD to come up")

        self._spawn("radosgw", "-f", "-c", self.conf, "-n", "client.admin")
        self._wait(self._is_serving, "waiting for radosgw to answer")
        self._run("radosgw-admin", "-c", self.conf, "user", "create", "--uid=tokfleet", "--display-name=tokfleet",
                  f"--access-key={self.access_key}", f"--secret-key={self.secret_key}", step="rgw user create")

    def _is_serving(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return True
        except OSError:
            return False

    def _wait(self, is_ready, what: str) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            self._check_alive(what)
            try:
                if is_ready():
                    return
            except S3ServerError:
                pass
            if time.monotonic() > deadline:
                raise S3ServerError(f"timed out {what} after {START_TIMEOUT_S:.0f} s; logs: {self.root}/log")
            time.sleep(0.3)

    # ------------------------------------------------------- restart the gateway

    def stop_gateway(self) -> None:
        """Kill radosgw alone (the S3 endpoint goes away; the stored objects stay in the OSD)."""
        gateway = next(p for p in self.processes if os.path.basename(p.args[0]) == "radosgw")
        gateway.kill()
        gateway.wait()
        self.processes.remove(gateway)

    def start_gateway(self) -> None:
        """Start radosgw again on the same port; returns once it answers."""
        self._spawn("radosgw", "-f", "-c", self.conf, "-n", "client.admin")
        self._wait(self._is_serving, "waiting for the restarted radosgw to answer")

    # ------------------------------------------------------------------- stop

    def stop(self) -> None:
        """End our daemons by PID (radosgw first), then delete their folder."""
        for process in reversed(self.processes):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 2.0  # memory-only data, deleted below: no need for a slow clean shutdown
        for process in reversed(self.processes):
            try:
                process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.processes.clear()
        if self.root:
            shutil.rmtree(self.root, ignore_errors=True)

    def make_bucket(self, name: str) -> str:
        """Create bucket `name`; returns `s3://name`."""
        import s3fs

        fs = s3fs.S3FileSystem(**self.storage_options())
        fs.mkdir(name)
        return f"s3://{name}"


def main() -> None:
    server = RadosGateway()
    started = time.perf_counter()
    server.start()
    print(f"radosgw up in {time.perf_counter() - started:.1f} s at {server.endpoint}")
    for name, value in server.env().items():
        print(f"export {name}={value}")
    try:
        input("Enter stops it ")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
