"""What every command shares: one-line errors, exit codes, output checks, sizes, logging."""

from __future__ import annotations

import contextlib
import math
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any, ClassVar

import click

from ..errors import PrecisionError, command_line

#: what only the capture side needs; the install's [capture] extra brings them
MODEL_SIDE = ("torch", "transformers", "accelerate")
CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
INTERRUPTED = 130  #: exit code after Ctrl-C, as shells report a SIGINT (128 + 2)


def fail(message: str) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(2)


def guard(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn known errors into one-line messages with exit code 2."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            with command_line():  # advice in errors names --flags, not keyword arguments
                return fn(*args, **kwargs)
        except PrecisionError as exc:
            fail(str(exc))
        except ModuleNotFoundError as exc:
            top = (exc.name or "").split(".")[0]
            if top not in MODEL_SIDE:
                raise
            fail(f"this command runs a model and needs {top}, which is not installed: "
                  "pip install 'precision[capture]' (inspect, compare and report do not)")
        except KeyboardInterrupt:
            click.echo("error: interrupted; no output was written", err=True)
            sys.exit(INTERRUPTED)
        except EOFError as exc:  # a file that ended early: click would take it for Ctrl-D
            fail(f"a file ends too early (empty or truncated){f': {exc}' if str(exc) else ''}")
        except OSError as exc:
            fail(f"{exc.strerror or exc}: {exc.filename or ''}".rstrip(": "))
        except MemoryError:
            fail("out of memory: capture fewer modules (--include/--exclude) or use --mode stats")

    return wrapper


@contextlib.contextmanager
def progress_bar(enabled: bool) -> Iterator[Callable[[int, int], None] | None]:
    """A rich progress bar on an interactive terminal; nothing in CI, pipes or with -q."""
    if not (enabled and sys.stderr.isatty() and not os.environ.get("CI")):
        yield None
        return
    from rich.console import Console
    from rich.progress import Progress

    with Progress(console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("comparing", total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update


def check_outputs(force: bool, *paths: str | None, inputs: Sequence[Any] = ()) -> None:
    """Refuse, before any work, outputs that exist (without --force) or have no folder, that
    are one of the ``inputs``, or that two outputs share."""
    from pathlib import Path

    from ..dumps.atomic import check_output_path, check_outputs_apart

    for p in paths:
        if p and p != "-":
            check_output_path(Path(p), force=force)
    check_outputs_apart(inputs, paths)


def write_text(path: str, text: str, force: bool) -> None:
    """Write a text output atomically: whole or not at all, the old file kept on failure
    (:func:`precision.dumps.atomic.write_output`)."""
    from ..dumps.atomic import write_output

    write_output(path, text, force=force)


class ByteSize(click.ParamType):
    """A size in bytes: ``1048576``, ``512K``, ``256M``, ``2G`` (powers of 1024)."""

    name = "size"
    _UNITS: ClassVar[dict[str, int]] = {"": 0, "K": 10, "M": 20, "G": 30, "T": 40}

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        text = str(value).strip().upper().removesuffix("IB").removesuffix("B")
        unit = text[-1:] if text[-1:] in self._UNITS else ""
        try:
            number = float(text[:len(text) - len(unit)])
        except ValueError:
            self.fail(f"{value!r} is not a size: use e.g. 512M or 2G", param, ctx)
        if not (number > 0 and math.isfinite(number)):
            self.fail(f"{value!r}: a size must be positive and finite", param, ctx)
        return int(number * (1 << self._UNITS[unit]))


def stderr_log(quiet: bool) -> Callable[[str], None]:
    def log(message: str) -> None:
        if not quiet:
            click.echo(f"· {message}", err=True)

    return log
