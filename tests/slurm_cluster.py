"""A real SLURM cluster for tests: slurmctld and two slurmd "nodes" (n1, n2) on this machine, on loopback.

Debian's slurm-wlm 22.05 and munge, installed with apt-get when missing. Everything lives in one
temporary folder: slurm.conf, a munge key and socket of our own (a machine-wide munged may
belong to someone else), state, spool, logs and the job completion log (`sacct --completion`
works without slurmdbd). Each daemon runs in the foreground as our child, so `stop()` cancels
the cluster's jobs and ends exactly those PIDs. Commands reach this cluster through
`env()` (SLURM_CONF). Start it only inside a loopback-only network namespace (tests/conftest.py
runs the session in one; slurmd must not be under `ip netns exec`, which remounts /sys).

    python -m core.netns -- python tests/slurm_cluster.py   # start one, show sinfo, stop
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field

from launch.launchers import free_port
import system_packages  # tests/ is on sys.path (pytest, or `python tests/FILE.py`)

NODES = ("n1", "n2")
START_TIMEOUT_S = 60.0

SLURM_CONF = """ClusterName=tokfleet-test
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# our own munged; cred_expire is also how long a requeued job waits before it may start again (default 120 s)
AuthInfo=socket={root}/munge/munge.socket,cred_expire=5
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
DefMemPerCPU=1000
ReturnToService=2
SlurmdParameters=config_overrides
CommunicationParameters=NoInAddrAny
MpiDefault=none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2
JobCompType=jobcomp/filetxt
JobCompLoc={root}/jobcomp.log
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/run/slurmctld.pid
SlurmdPidFile={root}/run/slurmd-%n.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
MinJobAge=600
KillWait=10
# CPUs=4 on a 2-core machine on purpose: the tests run several 1-CPU-per-node jobs side by side
NodeName=n1 NodeHostname=localhost NodeAddr=127.0.0.1 Port={n1_port} CPUs=4 RealMemory=4000 State=UNKNOWN
NodeName=n2 NodeHostname=localhost NodeAddr=127.0.0.1 Port={n2_port} CPUs=4 RealMemory=4000 State=UNKNOWN
PartitionName=debug Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP
"""


class SlurmClusterError(RuntimeError):
    """The cluster could not be installed or started; the message says which step failed."""


@dataclass
class SlurmCluster:
    """slurmctld + slurmd n1, n2; `start()` returns once both nodes are idle."""

    root: str = ""
    processes: list[subprocess.Popen] = field(default_factory=list)

    @property
    def conf(self) -> str:
        return os.path.join(self.root, "slurm.conf")

    def env(self) -> dict[str, str]:
        """os.environ pointed at this cluster."""
        return {**os.environ, "SLURM_CONF": self.conf}

    def run(self, *argv: str, timeout: float = 30, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run(argv, capture_output=True, text=True, env=self.env(), timeout=timeout)
        if check and result.returncode != 0:
            raise SlurmClusterError(f"{' '.join(argv)} failed: {(result.stderr or result.stdout).strip()[-400:]}")
        return result

    # ------------------------------------------------------------------ start

    def start(self) -> SlurmCluster:
        system_packages.ensure_installed("SLURM")  # SystemPackageError says what is missing
        self.root = tempfile.mkdtemp(prefix="tokfleet-slurm-")
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _spawn(self, name: str, *argv: str, user: str | None = None) -> None:
        log = open(os.path.join(self.root, "log", f"{name}.out"), "wb")
        if user:  # munged refuses to run as root
            argv = ("runuser", "-u", user, "--", *argv)
        self.processes.append(subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                               env=self.env()))
        log.close()

    def _start(self) -> None:
        root = self.root
        for sub in ("munge", "state", "spool", "run", "log"):
            os.makedirs(os.path.join(root, sub))
        # munged insists on a private key owned by its user, in a folder everyone may enter (its socket)
        munge = pwd.getpwnam("munge")
        key = os.path.join(root, "munge", "munge.key")
        with open(key, "wb") as handle:
            handle.write(os.urandom(1024))
        os.chmod(root, 0o755)
        for path, mode in ((os.path.join(root, "munge"), 0o755), (key, 0o400)):
            os.chown(path, munge.pw_uid, munge.pw_gid)
            os.chmod(path, mode)
        self._spawn("munged", "munged", "--foreground", f"--key-file={key}", f"--socket={root}/munge/munge.socket",
                    f"--pid-file={root}/munge/munged.pid", f"--seed-file={root}/munge/munged.seed",
                    f"--log-file={root}/munge/munged.log", user="munge")
        self._wait(lambda: os.path.exists(f"{root}/munge/munge.socket"), "waiting for munged")
        with open(self.conf, "w") as handle:
            handle.write(SLURM_CONF.format(root=root, ctld_port=free_port(), slurmd_port=free_port(),
                                           n1_port=free_port(), n2_port=free_port()))
        self._spawn("slurmctld", "slurmctld", "-D", "-c", "-f", self.conf)
        for node in NODES:
            self._spawn(f"slurmd-{node}", "slurmd", "-D", "-N", node, "-f", self.conf)
        self._wait(self._nodes_idle, "waiting for nodes n1, n2 to be idle")

    def _nodes_idle(self) -> bool:
        result = self.run("sinfo", "--noheader", "--Node", "--format=%N %t", check=False, timeout=10)
        states = dict(line.split() for line in result.stdout.splitlines() if line.strip())
        return result.returncode == 0 and all(states.get(node) == "idle" for node in NODES)

    def _wait(self, is_ready, what: str) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not is_ready():
            for process in self.processes:
                if process.poll() is not None:
                    raise SlurmClusterError(f"{process.args[0]} exited with {process.returncode} while {what}; logs: {self.root}/log")
            if time.monotonic() > deadline:
                raise SlurmClusterError(f"timed out {what} after {START_TIMEOUT_S:.0f} s; logs: {self.root}/log")
            time.sleep(0.3)

    # ------------------------------------------------------------------- stop

    def stop(self) -> None:
        """Cancel the cluster's jobs, end our daemons by PID (slurmd, slurmctld, munged), delete the folder."""
        if any(p.poll() is None for p in self.processes) and os.path.exists(self.conf):
            self.run("scancel", "--full", f"--user={pwd.getpwuid(os.getuid()).pw_name}", check=False, timeout=10)
            deadline = time.monotonic() + 15  # let slurmd end the jobs' processes (KillWait)
            while time.monotonic() < deadline and self.run("squeue", "--noheader", check=False, timeout=10).stdout.strip():
                time.sleep(0.5)
        for process in reversed(self.processes):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in reversed(self.processes):
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.processes.clear()
        if self.root:
            shutil.rmtree(self.root, ignore_errors=True)


def main() -> None:
    cluster = SlurmCluster()
    started = time.perf_counter()
    cluster.start()
    try:
        print(f"SLURM up in {time.perf_counter() - started:.1f} s; export SLURM_CONF={cluster.conf}")
        print(cluster.run("sinfo").stdout)
        print(cluster.run("srun", "--nodes=2", "--ntasks=2", "bash", "-c", "echo $SLURMD_NODENAME $SLURM_PROCID").stdout)
    finally:
        cluster.stop()


if __name__ == "__main__":
    main()
