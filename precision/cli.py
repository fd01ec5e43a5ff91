"""The ``precision`` command line: the command group and its commands.

Exit codes: 0 success (nothing flagged that you asked to fail on), 1 flagged,
2 bad input or usage, 130 interrupted. Errors print one line, never a traceback. Heavy
libraries (torch, transformers) are imported only by the commands that run a model, so
``compare`` starts fast. The commands live in :mod:`precision.commands`.
"""

from __future__ import annotations

import sys
from typing import Any

import click

from ._version import __version__
from .commands import capture, compare, doctor, port
from .commands.common import CONTEXT, INTERRUPTED, MODEL_SIDE, ByteSize

__all__ = ["INTERRUPTED", "MODEL_SIDE", "ByteSize", "main"]


class _Main(click.Group):
    """The command group, with usage errors on one line (``error: ...``) and Ctrl-C exit 130."""

    def main(self, args: Any = None, prog_name: str | None = None,
             complete_var: str | None = None, standalone_mode: bool = True,
             **extra: Any) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            code = super().main(args, prog_name, complete_var, False, **extra)
        except click.ClickException as exc:
            ctx = getattr(exc, "ctx", None)
            hint = f" (see '{ctx.command_path} -h')" if ctx is not None else ""
            click.echo(f"error: {exc.format_message()}{hint}", err=True)
            sys.exit(exc.exit_code)
        except click.Abort:  # Ctrl-C or end of input while click itself was reading
            click.echo("error: interrupted", err=True)
            sys.exit(INTERRUPTED)
        sys.exit(code if isinstance(code, int) else 0)


@click.group(cls=_Main, context_settings=CONTEXT)
@click.version_option(__version__, prog_name="precision")
def main() -> None:
    """Find where and why a model's numbers change between devices and dtypes.

    \b
    Typical session (baseline on CPU fp32 with its fp16 reference, target on an accelerator
    in fp16; without --expect, compare judges by fixed limits, which a healthy deep model
    can exceed):
      precision capture --model ./flan-t5-base --device cpu --dtype fp32 --expect fp16 \\
                        -o base.st
      precision capture --model ./flan-t5-base --device npu --dtype fp16 \\
                        --replay base.st -o npu.st
      precision compare base.st npu.st
    """


for command in (capture.capture, capture.inspect, compare.compare, compare.report,
                doctor.scan, doctor.suggest, doctor.isolate, doctor.consistency,
                doctor.check, port.port):
    main.add_command(command)


if __name__ == "__main__":
    main()
