"""Errors that the CLI turns into a one-line message and exit code 2.

A message that tells how to get past it names the option in the caller's terms:
:func:`option` gives ``--force`` while a command runs (inside :func:`command_line`) and
``force=True`` when the same code is called from Python.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

_CLI: contextvars.ContextVar[bool] = contextvars.ContextVar("precision_cli", default=False)


def option(cli: str, python: str) -> str:
    """``cli`` (e.g. ``--force``) under the command line, else ``python`` (``force=True``)."""
    return cli if _CLI.get() else python


def given(cli: str, python: str, value: object) -> str:
    """An option as the user gave it: ``--jobs 0`` under the command line, else
    ``jobs=0`` (``fail_on='bogus'``: a Python value as Python writes it)."""
    return f"{cli} {value}" if _CLI.get() else f"{python}={value!r}"


@contextlib.contextmanager
def command_line() -> Iterator[None]:
    """While this is active, :func:`option` speaks in command-line flags."""
    token = _CLI.set(True)
    try:
        yield
    finally:
        _CLI.reset(token)


class PrecisionError(Exception):
    """Base class: bad input or an environment problem the user can fix.

    The message is a complete sentence that says what is wrong and, where it can,
    what to do about it. The CLI prints it on one line and exits with code 2.
    """


class DumpError(PrecisionError):
    """A dump file is missing, corrupt, incomplete or not a precision dump."""


class DeviceError(PrecisionError):
    """A device is unknown, unavailable, or cannot run the requested dtype."""


class ModelError(PrecisionError):
    """A model directory is missing or cannot be loaded."""


class InputError(PrecisionError):
    """Prompts, replay inputs or options are unusable."""


class OutputError(DumpError):
    """An output cannot be written: no space left on the device, or the like."""
