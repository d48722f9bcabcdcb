"""The `blip2` command: thin commands over the task API (commands.py), with shared options (options.py)
and output formatting (output.py).

Bad images never stop a run: each gets a one-line error naming the file (or a JSON error line with
--json), the others are still processed, and the exit code is 1. Nothing prints a traceback unless
BLIP2_DEBUG=1 is set.

Output is always valid UTF-8 and one line per record. In --json lines, a file name that is not valid UTF-8
has its undecodable bytes written as \\xNN in "image" and its exact bytes, base64, in "image_bytes". In the
plain (tab-separated) output, backslashes, tabs, newlines and other control characters in names and texts
are written as escapes (\\\\, \\t, \\n, \\xNN), so that a name can break neither a line nor a column.
"""

from __future__ import annotations

import os
import sys

import click

from ..errors import Blip2Error, InputError
from .commands import cli
from .output import message
from .train_command import train_command

cli.add_command(train_command)


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the CLI, turning every error into one line on stderr."""
    try:
        sys.exit(cli.main(args=argv, prog_name="blip2", standalone_mode=False))  # --help, --version: 0
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.ClickException as e:  # usage errors (exit 2) included: one line, pointing to the help
        hint = f" (see '{e.ctx.command_path} --help')" if isinstance(e, click.UsageError) and e.ctx else ""
        click.echo(f"blip2: error: {message(e.format_message())}{hint}", err=True)
        sys.exit(e.exit_code)
    except (click.exceptions.Abort, KeyboardInterrupt):  # click turns Ctrl-C into Abort
        click.echo("blip2: interrupted", err=True)
        sys.exit(130)
    except InputError as e:
        click.echo(f"blip2: error: {message(str(e))}", err=True)
        sys.exit(2)
    except Blip2Error as e:
        click.echo(f"blip2: error: {message(str(e))}", err=True)
        sys.exit(1)
    except Exception as e:  # never a raw traceback, unless asked for
        if os.environ.get("BLIP2_DEBUG"):
            raise
        click.echo(
            f"blip2: internal error: {type(e).__name__}: {message(str(e))} (set BLIP2_DEBUG=1 for the traceback)",
            err=True,
        )
        sys.exit(3)
