"""The ``confplan`` command line: one module per area, each adding its commands to ``app``.

Areas: ``plan_cmds`` (validate, schema), ``apply_cmds`` (apply, vmm, agent), ``stage_cmds`` (status),
``report_cmds`` (report: HTML and JUnit),
``machine_cmds`` (launch), ``owner_cmds`` (the guest owner's key broker), ``trust_cmds`` (identity, trust).
``main`` is the console-script entry: it turns a ``ConfplanError`` into a clean message and its exit code,
and any other exception into a one-line internal error (exit 1), never a traceback.
"""

from __future__ import annotations

import os
import sys
from typing import Annotated

import typer

from confplan import __version__
from confplan.errors import ConfplanError

app = typer.Typer(
    name="confplan",
    help=(
        "Live-migrate a confidential VM so no host sees its private memory.\n\n"
        "Write a YAML plan, check it with 'confplan validate PLAN', run it with 'confplan apply PLAN'."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"confplan {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version_callback, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """Live-migrate a confidential VM so no host sees its private memory."""


def _register_areas() -> None:
    # Imported here, not at the top, so each area module can import ``app`` from this one.
    from confplan.cli import (
        apply_cmds,
        machine_cmds,
        owner_cmds,
        plan_cmds,
        report_cmds,
        stage_cmds,
        trust_cmds,
    )

    for area in (plan_cmds, apply_cmds, stage_cmds, report_cmds, machine_cmds, owner_cmds, trust_cmds):
        area.register(app)


_register_areas()


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; return the exit code (the console script exits with it)."""
    try:
        # standalone mode: typer prints usage errors itself and exits (SystemExit) with their code.
        app(args=argv, prog_name="confplan")
    except ConfplanError as err:
        typer.echo(err.render(), err=True)
        return err.exit_code
    except SystemExit as ex:
        return ex.code if isinstance(ex.code, int) else (0 if ex.code is None else 1)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        return 130
    except Exception as err:  # the last line of defence: no traceback for users
        if os.environ.get("CONFPLAN_DEBUG"):
            raise
        typer.echo(
            f"internal error: {type(err).__name__}: {err}\n"
            "hint: this is a bug in confplan; rerun with CONFPLAN_DEBUG=1 for the traceback and report it",
            err=True,
        )
        return 1
    return 0


def console_main() -> None:  # pragma: no cover - thin wrapper for the console script
    sys.exit(main())
