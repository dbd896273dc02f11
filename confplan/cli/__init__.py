"""The ``confplan`` command line: one module per area, each adding its commands to ``app``.

Areas: ``plan_cmds`` (validate, schema), ``apply_cmds`` (apply, vmm, agent), ``stage_cmds`` (status),
``report_cmds`` (report: HTML and JUnit),
``machine_cmds`` (launch), ``owner_cmds`` (the guest owner's key broker), ``owner_attest_cmds`` (the owner's
offline attestation checks, in ``confplan owner``), ``trust_cmds`` (identity, trust).
``main`` is the console-script entry: it turns a ``ConfplanError`` into a clean message and its exit code,
and any other exception into a one-line internal error (exit 1), never a traceback.
"""

from __future__ import annotations

import io
import os
import sys
from typing import Annotated

import typer

from confplan import __version__
from confplan.errors import EXIT_CODE_MEANINGS, ConfplanError, environment_problem


def _exit_codes() -> str:
    """The root help's list of exit codes, from ``errors.ExitCode`` (one source; docs/cli.md)."""
    lines = [f"  {int(code):>3}  {text}" for code, text in EXIT_CODE_MEANINGS.items()]
    return "\b\nExit codes:\n" + "\n".join(lines)


app = typer.Typer(
    name="confplan",
    help=(
        "Live-migrate a confidential VM so no host sees its private memory.\n\n"
        "Write a YAML plan, check it with 'confplan validate PLAN', check the hosts with 'confplan "
        "preflight PLAN', run it with 'confplan apply PLAN'."
    ),
    epilog=_exit_codes(),
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
        owner_attest_cmds,
        owner_cmds,
        plan_cmds,
        preflight_cmds,
        report_cmds,
        stage_cmds,
        trust_cmds,
    )

    for area in (plan_cmds, preflight_cmds, apply_cmds, stage_cmds, report_cmds, machine_cmds, owner_cmds,
                 owner_attest_cmds, trust_cmds):
        area.register(app)
    _full_summaries()


def _full_summaries() -> None:
    """Each command's summary in `confplan --help` is its docstring's first sentence, whole: typer would
    cut it at the terminal's width with "..." (the formatter wraps it instead)."""
    for command in app.registered_commands:
        if command.short_help is None and command.callback is not None:
            command.short_help = _first_sentence(command.help or command.callback.__doc__ or "")
    for group in app.registered_groups:  # typer keeps unset options as Default placeholders, not None
        info = group.typer_instance.info if group.typer_instance is not None else None
        text = group.help if isinstance(group.help, str) else (info.help if info else None)
        if not isinstance(group.short_help, str) and isinstance(text, str):
            group.short_help = _first_sentence(text)


def _first_sentence(text: str) -> str:
    paragraph = " ".join(text.strip().split("\n\n")[0].split())
    end = paragraph.find(". ")
    return paragraph if end < 0 else paragraph[: end + 1]


_register_areas()


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; return the exit code (the console script exits with it)."""
    if isinstance(sys.stdout, io.TextIOWrapper):  # a pipe gets each line as it is printed, not at the end
        sys.stdout.reconfigure(line_buffering=True)
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
        problem = environment_problem(err)  # a full disk, a read-only filesystem: the host's, not a bug
        if problem is not None:
            typer.echo(problem.render(), err=True)
            return problem.exit_code
        typer.echo(
            f"internal error: {type(err).__name__}: {err}\n"
            "hint: this is a bug in confplan; rerun with CONFPLAN_DEBUG=1 for the traceback and report it",
            err=True,
        )
        return 1
    return 0


def console_main() -> None:  # pragma: no cover - thin wrapper for the console script
    sys.exit(main())
