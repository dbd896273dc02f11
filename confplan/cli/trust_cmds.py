"""``confplan identity`` and ``confplan trust``: who this host is, which peers it trusts (docs/channel.md).

Enrolling works like ssh's authorized_keys: copy a peer's certificate (``confplan identity show --pem`` on
the peer) into this host's trust store (``confplan trust add``). An agent obeys only the orchestrators
enrolled on it; an orchestrator drives an agent the plan pins by fingerprint, or one enrolled on it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from confplan.cli.formats import TextOrJson as Output
from confplan.errors import ConfplanError
from confplan.transport.identity import Identity, Role, default_home
from confplan.transport.tls import home_option
from confplan.transport.trust import TrustedCert, TrustStore

_HOME_HELP = (
    "The folder holding this host's identities and trust store (default: $CONFPLAN_HOME, else "
    "$XDG_STATE_HOME/confplan, else ~/.local/state/confplan)."
)
Home = Annotated[Path | None, typer.Option("--home", metavar="DIR", help=_HOME_HELP)]

trust_app = typer.Typer(
    help=(
        "The peers this host trusts on the control channel, by certificate fingerprint.\n\n"
        "On an agent host, enrol each orchestrator that may drive it: 'confplan trust add --orchestrator "
        "FILE'. On the orchestrator, enrol the agents (or pin them in the plan): 'confplan trust add "
        "--agent FILE'. FILE is what 'confplan identity show --role ROLE --pem' prints on the peer; '-' "
        "reads it from stdin, so 'confplan identity show --role orchestrator --pem | ssh AGENT-HOST "
        "confplan trust add --orchestrator -' enrols this orchestrator on an agent host."
    ),
    no_args_is_help=True,
    rich_markup_mode=None,
)

identity_app = typer.Typer(
    help=(
        "This host's identity on the control channel: a key and a self-signed certificate per role, made "
        "on first use. Peers know it by its fingerprint (sha256:...)."
    ),
    no_args_is_help=True,
    rich_markup_mode=None,
)


def _home(home: Path | None) -> Path:
    return home if home is not None else default_home()


@trust_app.command("add")
def add_cmd(
    source: Annotated[
        str, typer.Argument(metavar="FILE", help="The peer's certificate (PEM); '-' reads it from stdin.")
    ],
    agent: Annotated[
        bool, typer.Option("--agent", help="It is an agent this orchestrator may drive.")
    ] = False,
    orchestrator: Annotated[
        bool, typer.Option("--orchestrator", help="It is an orchestrator this agent obeys.")
    ] = False,
    home: Home = None,
) -> None:
    """Trust a peer's certificate, as an agent or as an orchestrator."""
    if agent == orchestrator:
        raise ConfplanError(
            "say what the peer is: --agent or --orchestrator (one of them)",
            hint="--orchestrator on an agent host, --agent on the orchestrator's host",
        )
    role = Role.AGENT if agent else Role.ORCHESTRATOR
    store = TrustStore.at_home(_home(home))
    if source == "-":
        entry, new = store.add(role, sys.stdin.read(), source="stdin")
    else:
        entry, new = store.add_file(role, Path(source))
    if not new:
        typer.echo(f"already trusted: {role} {entry.fingerprint} ({entry.subject}), since {entry.added_at}")
        return
    typer.echo(f"trusted {role} {entry.fingerprint} ({entry.subject})")
    typer.echo(f"stored in {entry.path}", err=True)
    if role is Role.ORCHESTRATOR:
        typer.echo(
            "a running `confplan agent` using this folder accepts it from its next connection", err=True
        )


@trust_app.command("list")
def list_cmd(
    output: Annotated[
        Output, typer.Option("--output", "-o", help="text (a table) or json (for scripts).")
    ] = Output.TEXT,
    home: Home = None,
) -> None:
    """Show the trusted peers: fingerprint, role, subject and when each was added."""
    store = TrustStore.at_home(_home(home))
    entries = store.list()
    if output is Output.JSON:
        typer.echo(json.dumps([entry.to_json() for entry in entries], indent=2))
        return
    if not entries:
        typer.echo(f"no trusted peers in {store.folder}; add one with `confplan trust add`")
        return
    for line in _table(entries):
        typer.echo(line)


def _table(entries: list[TrustedCert]) -> list[str]:
    rows = [("FINGERPRINT", "ROLE", "SUBJECT", "ADDED")]
    rows += [(e.fingerprint, e.role.value, e.subject, e.added_at) for e in entries]
    widths = [max(len(row[column]) for row in rows) for column in range(3)]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, [*widths, 0], strict=True)).rstrip()
            for row in rows]  # fmt: skip


@trust_app.command("remove")
def remove_cmd(
    fingerprint: Annotated[
        str,
        typer.Argument(
            metavar="FINGERPRINT",
            help="The peer's fingerprint, or enough of its first hex digits to name it.",
        ),
    ],
    home: Home = None,
) -> None:
    """Stop trusting a peer. A running agent refuses it from its next connection."""
    entry = TrustStore.at_home(_home(home)).remove(fingerprint)
    typer.echo(f"removed {entry.role} {entry.fingerprint} ({entry.subject})")


@identity_app.command("show")
def show_cmd(
    role: Annotated[
        Role,
        typer.Option("--role", help="agent (for `confplan agent`) or orchestrator (for `confplan apply`)."),
    ] = Role.ORCHESTRATOR,
    pem: Annotated[
        bool, typer.Option("--pem", help="Print only the certificate, for `confplan trust add` on the peer.")
    ] = False,
    home: Home = None,
) -> None:
    """Print this host's identity for ROLE (made now if there is none yet): its fingerprint, or its
    certificate with --pem."""
    identity = Identity.load_or_create(_home(home), role)
    if pem:
        typer.echo(identity.pem, nl=False)
        return
    typer.echo(f"{role} identity {identity.fingerprint}")
    typer.echo(f"  subject      {identity.subject}")
    typer.echo(f"  certificate  {identity.cert_path}")
    typer.echo(f"  key          {identity.key_path} (private, mode 0600)")
    show = f"confplan identity show --role {role} --pem{home_option(identity)}"
    if role is Role.ORCHESTRATOR:
        typer.echo(
            f"enrol it on each agent host: `{show} | ssh AGENT-HOST confplan trust add --orchestrator -`"
        )
    else:
        typer.echo(
            f"on the orchestrator's host, pin it in the plan (`fingerprint: {identity.fingerprint}`) or "
            f"enrol it: `confplan trust add --agent FILE` with FILE the output of `{show}` here"
        )


def register(app: typer.Typer) -> None:
    """Add ``confplan trust ...`` and ``confplan identity ...`` to the root app."""
    app.add_typer(trust_app, name="trust")
    app.add_typer(identity_app, name="identity")
