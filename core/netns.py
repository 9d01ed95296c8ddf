"""Run a command inside a loopback-only network namespace.

Ray binds every address and talks to itself over the machine's external address.
On shared machines (and in CI) everything that starts Ray must stay on 127.0.0.0/8, so
commands that start Ray re-run themselves inside a fresh namespace that has only `lo`
(with 127.0.0.2 added, without which "localhost" does not resolve). This needs root
and `ip`/`nsenter`; elsewhere (a user's workstation) commands run unconfined.

    python -m core.netns -- pytest tests      # run any command confined
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time

ENV_NAME = "TOKFLEET_NETNS"


def is_confined() -> bool:
    """True when this process's network namespace has no interface but loopback."""
    return all(name == "lo" for _, name in socket.if_nameindex())


def can_confine() -> bool:
    return os.geteuid() == 0 and shutil.which("ip") is not None and shutil.which("nsenter") is not None


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _kill_namespace_processes(name: str) -> None:
    """Stop what the command left behind in the namespace (e.g. Ray daemons), by PID."""
    result = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True)
    pids = [int(p) for p in result.stdout.split()]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        alive = []
        for pid in pids:
            try:
                os.kill(pid, sig)
                alive.append(pid)
            except ProcessLookupError:
                pass
        if not alive:
            return
        time.sleep(1.0)
        pids = alive


def _is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_namespaces() -> None:
    """Namespaces `tokfleet-PID` whose PID is gone (a SIGKILLed command could not delete its own):
    stop what still runs in them (e.g. a Ray worker), then delete them."""
    result = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    for line in result.stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        prefix, _, pid = name.partition("-")
        if prefix == "tokfleet" and pid.isdigit() and not _is_alive(int(pid)):
            _kill_namespace_processes(name)
            subprocess.run(["ip", "netns", "delete", name], stderr=subprocess.DEVNULL)


def run_confined(argv: list[str]) -> int:
    """Run `argv` in a new loopback-only namespace; delete the namespace afterwards.

    The command runs in its own process group, so a terminal's Ctrl-C reaches it once, through this
    process (which forwards SIGINT and SIGTERM), not twice; and it dies with this process.
    """
    remove_stale_namespaces()
    name = f"tokfleet-{os.getpid()}"
    _ip("netns", "add", name)
    try:
        _ip("netns", "exec", name, "ip", "link", "set", "lo", "up")
        _ip("netns", "exec", name, "ip", "addr", "add", "127.0.0.2/8", "dev", "lo")
        env = dict(os.environ, **{ENV_NAME: name})
        # nsenter, not `ip netns exec`: the latter remounts /sys, which breaks slurmd
        child = subprocess.Popen(["nsenter", f"--net=/var/run/netns/{name}", *argv], env=env, process_group=0,
                                 preexec_fn=_die_with_parent)
        forward = lambda signum, frame: child.send_signal(signum)  # noqa: E731
        previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            return child.wait()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
    finally:
        _kill_namespace_processes(name)
        subprocess.run(["ip", "netns", "delete", name], stderr=subprocess.DEVNULL)


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL when the process that started it dies (Linux prctl PR_SET_PDEATHSIG)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG = 1


def ensure_confined() -> None:
    """Re-run this process confined when it is not and can be; returns only when it should go on."""
    if is_confined() or not can_confine() or os.environ.get(ENV_NAME):
        return
    sys.stdout.flush()
    sys.stderr.flush()
    sys.exit(run_confined([sys.executable, *sys.orig_argv[1:]]))


def main() -> None:
    argv = sys.argv[1:]
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        sys.exit("usage: python -m core.netns -- COMMAND [ARGS...]")
    if is_confined() or not can_confine():
        os.execvp(argv[0], argv)
    sys.exit(run_confined(argv))


if __name__ == "__main__":
    main()
