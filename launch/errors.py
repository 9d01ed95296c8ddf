"""Bad user input ends a command with one clear line and exit code 2 (a traceback only with --debug)."""

from __future__ import annotations

import contextlib
import sys


class UserError(ValueError):
    """Bad input (config, path, data, checkpoint): the message names what is wrong."""


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
