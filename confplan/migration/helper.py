"""The one seam between the migration engines and the in-guest migration helper (MH).

Private pages only ever move through the MH's mailboxes (``confplan.migration.mailbox_set.MailboxSet``):
the VMM never seals or opens a page itself. ``helper_mailboxes`` asks the machine for them; a machine
whose guest has no helper wired in yet answers None, and the engines refuse private pages with
``HelperUnavailable`` rather than send them any other way.
"""

from __future__ import annotations

from typing import Any

from confplan.errors import ConfplanError
from confplan.migration.mailbox_set import MailboxSet


class HelperUnavailable(ConfplanError):
    """Private pages need the guest's migration helper, and this guest has none to talk to."""


def helper_mailboxes(machine: Any) -> MailboxSet | None:
    """The machine's MH mailboxes (``machine.mailboxes()``), or None when the VMM has no such thing yet."""
    getter = getattr(machine, "mailboxes", None)
    return getter() if callable(getter) else None


def require_helper(mailboxes: MailboxSet | None, side: str, pages: int) -> MailboxSet:
    if mailboxes is None:
        raise HelperUnavailable(
            f"{pages} private pages must go through the {side} guest's migration helper, but this VMM "
            "cannot reach one (the in-guest helper is not wired into the machine: no Machine.mailboxes())",
            hint="private pages are never sent without the helper; use a confplan whose firmware serves "
            "the mailbox protocol",
        )
    return mailboxes
