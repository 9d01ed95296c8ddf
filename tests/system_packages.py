"""The Debian packages of the test services (SLURM, Ceph radosgw), installed with apt-get when missing.

apt-get needs the network, which the tests' loopback-only namespace does not have, so
`make test` runs `python tests/system_packages.py` before it confines the suite; the services'
fixtures call `ensure_installed` again (then ~0 s) and say what to run if it was not done.

    python tests/system_packages.py     # install what is missing (root, apt-get; ~30 s the first time)
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

from core.netns import is_confined

SERVICES = {
    # what: (packages, the binaries the tests run)
    "SLURM": (("slurm-wlm", "slurmctld", "slurmd", "slurm-client", "munge"),
              ("slurmctld", "slurmd", "sbatch", "srun", "squeue", "scontrol", "scancel", "sacct", "munged")),
    "Ceph radosgw": (("ceph-mon", "ceph-osd", "ceph-common", "radosgw"),
                     ("ceph-mon", "ceph-osd", "ceph", "ceph-authtool", "monmaptool", "radosgw", "radosgw-admin")),
}
APT_TIMEOUT_S = 600


class SystemPackageError(RuntimeError):
    """A service's packages are missing and could not be installed; the message says why."""


def ensure_installed(what: str) -> None:
    """apt-get install `what`'s packages unless every binary it needs is on PATH."""
    packages, binaries = SERVICES[what]
    if all(shutil.which(b) for b in binaries):
        return
    command = f"apt-get install -y --no-install-recommends {' '.join(packages)}"
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        raise SystemPackageError(f"{what} is not installed and cannot be: needs root and apt-get ({command})")
    if is_confined():
        raise SystemPackageError(f"{what} is not installed, and apt-get has no network in this loopback-only "
                                 f"namespace: run `python tests/system_packages.py` outside it first (make test does)")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *packages]
    if subprocess.run(install, env=env, capture_output=True, timeout=APT_TIMEOUT_S).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, timeout=APT_TIMEOUT_S)  # stale lists
        result = subprocess.run(install, env=env, capture_output=True, text=True, timeout=APT_TIMEOUT_S)
        if result.returncode != 0:
            raise SystemPackageError(f"{command} failed: {result.stderr.strip()[-500:]}")
    missing = [b for b in binaries if not shutil.which(b)]
    if missing:
        raise SystemPackageError(f"after {command}, still missing: {', '.join(missing)}")


def main() -> None:
    try:
        for what in SERVICES:
            ensure_installed(what)
    except SystemPackageError as error:
        sys.exit(f"system_packages: {error}")


if __name__ == "__main__":
    main()
