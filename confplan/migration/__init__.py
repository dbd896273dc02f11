"""Migration: moving a running guest from one VMM to another.

- The in-guest migration helper's mailbox, VMM side: its layout and statuses (``mailbox_layout``), one
  helper's protocol (``mailbox.Mailbox``), the scheduling across all helpers of a side
  (``mailbox_set.MailboxSet``), and the wiring to a machine's helper vCPUs (``helper``).
- The engines: what a round sends (``dirty``, ``precopy``), the source and target streams (``source``,
  ``target``), what verify compares (``verify``), and the state carried across (``session``).
- A host build of the helper's C engine for tests and benchmarks (``host_mh``).
"""

from __future__ import annotations

from confplan.migration.mailbox import BatchResult, InitInfo, Mailbox
from confplan.migration.mailbox_layout import MailboxError, MhStatus, Op
from confplan.migration.mailbox_set import MailboxSet

__all__ = ["BatchResult", "InitInfo", "Mailbox", "MailboxError", "MailboxSet", "MhStatus", "Op"]
