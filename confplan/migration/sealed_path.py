"""The sealed-page path through the core's data loops (``confplan.core.datapath``), for both engines.

``SealedPath`` wires one side's ``MailboxSet`` to a loop: the banks (as ``save_stream``/``load_stream`` cut
them), the callback that kicks a parked helper or answers the loop's periodic look (a cancelled round, a
guest that died), and the translation of the loop's stop reason into the errors the engines raised before
(``MailboxError`` for a refused page, ``PageCoreError`` for a refused frame, ``ConfplanError`` otherwise).
Design: docs/migration.md, "Session 5".
"""

from __future__ import annotations

import os
import threading

from confplan.core.datapath import LoopMailbox, LoopResult, Stop
from confplan.core.status import raise_for
from confplan.errors import ConfplanError
from confplan.migration.dirty import rearm_error
from confplan.migration.mailbox import no_answer, refusal_error
from confplan.migration.mailbox_layout import RING, MailboxError, Op, status_name
from confplan.migration.mailbox_set import MailboxSet


class SealedPath:
    """One side's helpers as the core's loop sees them; ``cancel`` (source) stops a round at its next look,
    and so does ``sibling`` (parallel streams: another channel's loop failed, its error is the one raised)."""

    def __init__(
        self, mailboxes: MailboxSet, banks: int, *, cancel: threading.Event | None = None,
        sibling: threading.Event | None = None,
    ) -> None:  # fmt: skip
        self.mailboxes = mailboxes
        self._cancel, self._sibling = cancel, sibling
        self._by_index = {mb.mh_index: mb for mb in mailboxes.mailboxes}
        self.loop_mailboxes = []
        for mb, size in zip(mailboxes.mailboxes, mailboxes.bank_sizes(banks), strict=True):
            used = min(banks, RING, mb.batch_pages // size)  # whole banks only, as save_stream
            self.loop_mailboxes.append(
                LoopMailbox(mb.control, mb.slots, mb.batch_pages, size, used, mb.mh_index, mb.kick_fd)
            )

    @property
    def op_timeout(self) -> float:
        return max(mb.timeout for mb in self.mailboxes.mailboxes)

    def poke(self, mh: int) -> int:
        """The loop's callback: kick helper ``mh``, or (-1) say whether to stop; raises the machine's error
        when the guest died (the loop re-raises it after its call)."""
        if mh >= 0:
            self._by_index[mh].kick()
            return 0
        if any(e is not None and e.is_set() for e in (self._cancel, self._sibling)):
            return int(Stop.CANCELLED)
        self.mailboxes.mailboxes[0].check()
        return 0

    def raise_for(self, result: LoopResult, op: Op, *, frame_what: str) -> None:
        """Raise what the engines raised for the same failure on the Python path; nothing for DONE and for
        the stops the caller handles itself (PEER, CANCELLED, TIMEOUT, SOCKET)."""
        stop = result.stop
        if stop is Stop.REFUSED:
            raise refusal_error(
                op, result.bad_mailbox, int(result.error.value), int(result.error.expected), result.bad_slot,
                result.bad_gpa, result.bad_status,
            )  # fmt: skip
        if stop is Stop.OP_FAILED:
            raise MailboxError(
                f"mailbox {op.name} on MH vCPU {result.bad_mailbox} failed: {status_name(result.bad_status)}",
                op=op, mh_index=result.bad_mailbox, status=result.bad_status,
            )  # fmt: skip
        if stop is Stop.OP_TIMEOUT:
            raise no_answer(op, result.bad_mailbox, self.op_timeout)
        if stop is Stop.MACHINE:
            self.mailboxes.mailboxes[0].check()  # raises the machine's error
            raise ConfplanError(f"the guest stopped during a stream of {op.name} ops")
        if stop is Stop.FRAME:
            raise_for(int(result.error.code), result.error, frame_what)
        if stop is Stop.CRYPTO:
            raise ConfplanError(
                "the C core could not load OpenSSL's libcrypto for the frame authentication",
                hint="install libssl3 (Debian) or run with the stream unprotected (tests only)",
            )
        if stop is Stop.DIRTY_LOG:
            raise rearm_error(result.sys_errno, result.bad_gpa)
        if stop is Stop.ARG:
            raise ConfplanError(
                f"the core's data loop refused its arguments ({op.name}): ops were still queued in a mailbox "
                "or a bank does not fit",
                hint="this is a bug in confplan: please report it with the VMM log",
            )


def socket_error(result: LoopResult) -> OSError:
    """The OSError a SOCKET or TIMEOUT stop stands for (as the socket module would have raised it)."""
    if result.stop is Stop.TIMEOUT:
        return TimeoutError("timed out")
    if result.sys_errno:
        return OSError(result.sys_errno, os.strerror(result.sys_errno))
    return ConnectionResetError(0, "the peer closed the stream")

