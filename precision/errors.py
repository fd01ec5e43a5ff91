"""Errors that the CLI turns into a one-line message and exit code 2."""

from __future__ import annotations


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
