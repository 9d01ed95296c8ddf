"""Bad user input and OS faults end a command with one clear line and exit code 2 (a traceback only with --debug)."""

from __future__ import annotations

import contextlib
import errno
import os
import sys

LOW_SPACE_BYTES = 64 << 20  # a write failing with less than this free is taken for a full disk
# the top-level modules of pyproject.toml's optional extras -> (distribution, extra); tests/test_packaging.py keeps them in step
OPTIONAL_MODULES = {
    "s3fs": ("s3fs", "s3"),
    "deepspeed": ("deepspeed", "distributed"),
    "accelerate": ("accelerate", "distributed"),
    "mne": ("mne", "meg"),
    "edfio": ("edfio", "meg"),
    "av": ("av", "video"),
    "skvideo": ("scikit-video", "video"),
}


class UserError(ValueError):
    """Bad input (config, path, data, checkpoint): the message names what is wrong."""


def os_error_line(error: OSError) -> str:
    """"PATH: what failed" for an OSError (paths first when it names them)."""
    what = error.strerror or str(error) or type(error).__name__
    names = [str(name) for name in (error.filename, error.filename2) if name]
    return f"{' -> '.join(names)}: {what}" if names else what


def disk_fault(error: BaseException, directory: str) -> str | None:
    """What went wrong when writing under `directory` failed with `error`, if it was the disk rather
    than the program: an OSError's reason (no space, read-only, permission, ...), or any writer's error
    (torch's zip writer, safetensors) while the filesystem has next to no space left. None otherwise."""
    if isinstance(error, OSError) and error.errno is not None:
        return error.strerror or os.strerror(error.errno)
    text = str(error)
    if "No space left" in text or "StorageFull" in text:
        return os.strerror(errno.ENOSPC)
    try:
        stats = os.statvfs(directory)
    except OSError:
        return None
    if stats.f_bavail * stats.f_frsize < LOW_SPACE_BYTES:
        return os.strerror(errno.ENOSPC)
    return None


def stop_at_once(line: str, code: int = 130) -> None:
    """Print `line` and end the process now, skipping every cleanup: what a second Ctrl-C (or a first one
    in prepare) does. Safe from a signal handler, and quick (this module imports nothing heavy)."""
    try:
        sys.stdout.flush()
        print(line, file=sys.stderr, flush=True)
    finally:
        os._exit(code)


@contextlib.contextmanager
def exit_on_user_error(debug: bool = False, program: str = "tokfleet"):
    # ConfigError and the data layer's errors are ValueErrors too: all are the user's input
    try:
        yield
    except ValueError as error:
        if debug:
            raise
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        print(f"{program}: error: {message}", file=sys.stderr)
        sys.exit(2)
    except OSError as error:  # a path the user gave: missing, not writable, a file for a folder, a full disk
        if debug:
            raise
        print(f"{program}: error: {os_error_line(error)}", file=sys.stderr)
        sys.exit(2)


def missing_optional_module(error: BaseException | None) -> str | None:
    """The optional module (OPTIONAL_MODULES) that `error` says is not installed, or that it was raised from
    (fsspec turns a missing s3fs into its own ImportError); None for any other error (a submodule missing
    from an installed package is a version problem, not a missing package)."""
    while error is not None:
        if isinstance(error, ModuleNotFoundError) and error.name in OPTIONAL_MODULES:
            return error.name
        error = error.__cause__
    return None


@contextlib.contextmanager
def exit_on_missing_package(command: str, debug: bool = False):
    """An optional package that is not installed ends `command` with one line naming it and its extra, exit 2.
    Imports of optional packages stay lazy, so this wraps a whole command, not each import."""
    try:
        yield
    except ImportError as error:
        module = missing_optional_module(error)
        if module is None or debug:
            raise
        distribution, extra = OPTIONAL_MODULES[module]
        print(f"tokfleet: error: `{command}` needs {distribution}, which is not installed: pip install 'tokfleet[{extra}]'",
              file=sys.stderr)
        sys.exit(2)
