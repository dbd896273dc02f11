"""Migration: the VMM side of the in-guest migration helper's mailbox (``mailbox``), and a host build of the
helper's C engine for tests and benchmarks (``host_mh``). Source/target engines come with integration."""

from __future__ import annotations

from confplan.migration.mailbox import (
    BatchResult,
    InitInfo,
    Mailbox,
    MailboxError,
    MailboxSet,
    MhStatus,
    Op,
)

__all__ = ["BatchResult", "InitInfo", "Mailbox", "MailboxError", "MailboxSet", "MhStatus", "Op"]
