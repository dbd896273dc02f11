"""The one seam between the migration engines and the in-guest migration helper (MH).

Private pages only ever move through the MH's mailboxes (``confplan.migration.mailbox_set.MailboxSet``):
the VMM never seals or opens a page itself. ``open_mailboxes`` wires a machine's helper vCPUs to mailboxes
from what the VMM offers (``Machine.helpers``, its mailbox doorbells, views of guest RAM, the TSC rate);
the VMM knows nothing of the protocol. ``helper_mailboxes`` answers None for a machine without helper vCPUs,
and the engines refuse private pages with ``HelperUnavailable`` rather than send them any other way.
"""

from __future__ import annotations

import weakref
from functools import partial

from confplan.errors import ConfplanError
from confplan.migration.mailbox import Mailbox
from confplan.migration.mailbox_set import MailboxSet
from confplan.vmm import Machine
from confplan.vmm.aux_vcpu import HelperVcpu

# One MailboxSet per machine: its Mailbox objects learn the helper's speed and track the queued ops, so
# every caller must share them. Dropped when the machine closes (the views go with its RAM).
_OPEN: weakref.WeakKeyDictionary[Machine, MailboxSet] = weakref.WeakKeyDictionary()


class HelperUnavailable(ConfplanError):
    """Private pages need the guest's migration helper, and this guest has none to talk to."""


def open_mailboxes(machine: Machine, *, timeout: float = 30.0, ready_timeout: float = 10.0) -> MailboxSet:
    """The migration helper's mailboxes, one per MH vCPU (aux vCPUs or the mirror VM's alike), ready
    for INIT/SAVE/LOAD/DIGEST/RESET: views of guest RAM (control page + slots, never the secret
    page), a kick per MH vCPU, and a wait that sleeps until that mailbox's doorbell rings.
    Waits up to ``ready_timeout`` s for the helpers' serve loops; ``timeout`` bounds each op. The same
    set for every call on one machine."""
    opened = _OPEN.get(machine)
    if opened is not None:
        return opened
    if not machine.helpers:
        raise ConfplanError(
            "this machine has no migration helper vCPUs, so no mailboxes",
            hint="use helper mode aux-vcpu with aux_vcpus >= 1, or mirror-vm",
        )
    if not machine.started:
        raise ConfplanError("the machine's helper is not running yet", hint="call start() first")
    machine.wait_helpers_ready(ready_timeout)
    boxes = [_mailbox(machine, h, timeout) for h in sorted(machine.helpers, key=lambda h: h.index)]
    not_ready = [mb.mh_index for mb in boxes if not mb.ready]
    if not_ready:
        raise ConfplanError(
            f"MH vCPUs {not_ready} announced themselves but their mailbox protocol block is missing",
            hint="the firmware and this VMM disagree on the mailbox protocol: rebuild the firmware",
        )
    opened = _OPEN[machine] = MailboxSet(boxes)
    machine.on_close(partial(_forget, machine))
    return opened


def _forget(machine: Machine) -> None:
    _OPEN.pop(machine, None)


def _mailbox(machine: Machine, helper: HelperVcpu, timeout: float) -> Mailbox:
    index, doorbells = helper.index, machine.mailbox_doorbells

    def wait(seq: int, seconds: float) -> None:
        doorbells.wait(index, seq, seconds, machine.check)

    return Mailbox(
        machine.view(helper.control_gpa, machine.layout.mailbox_stride), mh_index=index,
        batch_pages=machine.config.batch_pages, kick=helper.kick, wait=wait, timeout=timeout,
        tsc_khz=machine.host.tsc_khz, waker=helper.runner.waker,
    )  # fmt: skip


def helper_mailboxes(machine: Machine) -> MailboxSet | None:
    """The machine's MH mailboxes (``open_mailboxes``), or None when it has no helper vCPUs (helper mode
    none)."""
    return open_mailboxes(machine) if machine.helpers else None


def require_helper(mailboxes: MailboxSet | None, side: str, pages: int) -> MailboxSet:
    if mailboxes is None:
        raise HelperUnavailable(
            f"{pages} private pages must go through the {side} guest's migration helper, but this VMM "
            "cannot reach one (the machine has no migration helper vCPUs)",
            hint="private pages are never sent without the helper; give the guest helper vCPUs (helper "
            "mode aux-vcpu or mirror-vm)",
        )
    return mailboxes
