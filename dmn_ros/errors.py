"""Exceptions the public API promises; each message names the file or input at fault. Console tools report them
through :func:`console_main`."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable


class DmnError(Exception):
    """Base class of every error dmn_ros raises on purpose."""


class ModelLoadError(DmnError):
    """A model file is missing, truncated, corrupt, or of another architecture."""


class MapError(DmnError):
    """A map file is unreadable, or its contents do not fit the loaded model."""


class FingerprintMismatchError(MapError):
    """A map or context was embedded by a different model than the one loaded."""


USER_ERRORS = (DmnError, ValueError, OSError)
"""What bad input raises: the project's own errors, bad values (``ValueError``) and unreadable files (``OSError``)."""


def console_main(prog: str) -> Callable[[Callable[[list[str] | None], int]], Callable[[list[str] | None], int]]:
    """Decorates a console tool's ``main(argv)``: bad input (:data:`USER_ERRORS`) becomes one line on stderr,
    ``<prog>: error: <message>``, and exit status 2 (argparse's for usage errors), never a traceback."""

    def wrap(main: Callable[[list[str] | None], int]) -> Callable[[list[str] | None], int]:
        @functools.wraps(main)
        def run(argv: list[str] | None = None) -> int:
            try:
                return main(argv)
            except USER_ERRORS as exc:
                message = " ".join(str(exc).split()) or type(exc).__name__
                print(f"{prog}: error: {message}", file=sys.stderr)
                return 2

        return run

    return wrap
