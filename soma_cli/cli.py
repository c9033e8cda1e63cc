"""The ``soma`` command line. Thin: parses options, calls the library, shows progress and tables.

Every expected failure is a :class:`soma_cli.errors.SomaError` and becomes one red line on stderr
and a non-zero exit code, never a traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from . import __version__
from .errors import SomaError

app = typer.Typer(
    name="soma",
    help="SOMA: sub-pixel co-registration of SAR and optical satellite images.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err_console = Console(stderr=True)


def _version(value: bool):
    if value:
        typer.echo(f"soma {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        Optional[bool], typer.Option("--version", callback=_version, is_eager=True, help="Show the version and exit.")
    ] = None,
):
    """SOMA: sub-pixel co-registration of SAR and optical satellite images."""


# ---- commands are added below, one section each ------------------------------------------------


def main() -> None:
    """Entry point: run the Typer app, turning SomaError into a one-line message."""
    try:
        app(standalone_mode=False)
    except SomaError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        err_console.print("[bold red]interrupted[/]")
        sys.exit(130)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        sys.exit(1)
    except Exception as exc:  # click usage errors etc.
        import click

        if isinstance(exc, click.exceptions.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        raise


if __name__ == "__main__":
    main()
