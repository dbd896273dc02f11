"""The target's page receiver: one incoming stream's page frames, applied as they arrive.

Shared pages are scattered by the core straight into guest RAM above the helper's area (a shared page aimed
anywhere lower is refused: the host path must never write the helper or the firmware); sealed frames are
received by the core's data loop into a free bank of an MH vCPU's mailbox slots and opened there by the MH
(LOAD) while the next frames arrive, each frame to the first helper with a free bank so they work in
parallel; a sealed frame the loop hands back is refused (or taken) on the Python path,
``MailboxSet.load_stream``. The receiver keeps which GPAs the frames wrote: verify's tables follow them.
"""

from __future__ import annotations

import array
import socket
from collections.abc import Callable
from typing import Protocol

from confplan.core import (
    CoreStatus,
    HostMemory,
    PageCoreError,
    unframe_sealed_pages,
    unframe_shared_pages,
    zeroed,
)
from confplan.core.datapath import DataLoop, Stop
from confplan.core.stream import Frame, FrameReader
from confplan.core.wire import MAX_FRAME_PAGES, FrameType
from confplan.errors import ConfplanError
from confplan.migration.dirty import concat_gpas
from confplan.migration.helper import require_helper
from confplan.migration.mailbox import Mailbox
from confplan.migration.mailbox_layout import PAGE_SIZE, SLOT_SIZE, Op
from confplan.migration.mailbox_set import MailboxSet
from confplan.migration.sealed_path import SealedPath, socket_error
from confplan.migration.source import BANKS
from confplan.vmm import Machine


class PageCounts(Protocol):
    """The totals the receiver adds to (``target.IncomingStatus``)."""

    bytes_received: int
    shared_pages: int
    zero_pages: int
    sealed_pages: int


class PageReceiver:
    """Applies one stream's page frames to ``machine`` and adds them to ``status``; an ERROR frame goes to
    ``control`` the moment it arrives (which raises: the source gave up)."""

    def __init__(self, machine: Machine, status: PageCounts, control: Callable[[Frame], object]) -> None:
        self.machine, self.status, self._control = machine, status, control
        self._gpas = zeroed("Q", MAX_FRAME_PAGES)
        # GPAs written since take_changed_gpas() began tracking (the shared CRC table drops them)
        self._written: list[array.array[int]] | None = None
        self._shared_written: list[array.array[int]] = []  # GPAs of every shared-page frame (see below)
        self._shared_taken = 0  # how many of those take_shared_gpas() has handed out
        low = int(machine.layout.mh_end)
        self._shared_ram = HostMemory(machine.ram.address + low, machine.ram.top - low)
        self._shared_base = low
        self._path: SealedPath | None = None  # the main channel's helpers as the core's data loop sees them
        self._loop_gpas = array.array("Q")  # the GPAs one loop call received (a round's at most)

    def receive(self, reader: FrameReader, conn: socket.socket | None, helpers: MailboxSet | None) -> Frame:
        """Apply page frames from ``reader`` (on ``conn``) up to the next other frame and return that one,
        once every LOAD of the sealed pages before it is done (``helpers``: the main channel's; None: no
        helper, a sealed frame is refused). Sealed frames go through the core's data loop (straight into the
        helpers' banks, LOAD posted, GIL released); it hands back the first other frame's header, and this
        side applies a shared-page frame and calls the loop again, or returns the frame."""
        if helpers is None:
            frame = self._next_frame(reader)
            if frame.header.type is FrameType.SEALED_PAGES:
                require_helper(helpers, "target", 1)  # raises: no helper to open them
            return frame
        path = self._sealed_path(helpers)
        while True:
            self._receive_sealed(reader, path, conn)
            kind = int.from_bytes(reader.pending_header()[6:8], "little")
            if kind == FrameType.SHARED_PAGES:
                frame = reader.recv()
                self.status.bytes_received += len(frame.data)
                self._apply_shared(frame)
            elif kind == FrameType.SEALED_PAGES:  # one the loop would not take: refused (or too big) here
                return self._receive_pages_python(reader, helpers)
            else:
                return self._next_frame(reader)

    def _next_frame(self, reader: FrameReader) -> Frame:
        """The next frame that is neither shared pages (applied as they come) nor ERROR (raised at once,
        whatever LOADs are in flight)."""
        while True:
            frame = reader.recv()
            self.status.bytes_received += len(frame.data)
            kind = frame.header.type
            if kind is FrameType.SHARED_PAGES:
                self._apply_shared(frame)
            elif kind is FrameType.ERROR:
                self._control(frame)  # raises: the source gave up
            else:
                return frame

    def _sealed_path(self, mailboxes: MailboxSet) -> SealedPath:
        if self._path is None:
            self._path = SealedPath(mailboxes, BANKS)
            self._loop_gpas = zeroed("Q", self.machine.config.memory // PAGE_SIZE)
        return self._path

    def _receive_sealed(self, reader: FrameReader, path: SealedPath, conn: socket.socket | None) -> None:
        """The core's loop until a frame that is not a well-formed SEALED_PAGES one; its header is then the
        reader's next."""
        if conn is None:
            raise ConfplanError("no source is connected")
        key = reader.key
        loop = DataLoop(
            conn.fileno(), path.loop_mailboxes, key=key.for_core() if key is not None else None,
            seq=reader.seq, op_timeout=path.op_timeout, io_timeout=conn.gettimeout(), poke=path.poke,
            ram_size=self.machine.ram.top,
        )  # fmt: skip
        result = loop.receive(self._loop_gpas)
        reader.seq = result.seq
        self.status.bytes_received += result.nbytes
        self.status.sealed_pages += result.pages
        if result.pages and self._written is not None:
            self._written.append(self._loop_gpas[: result.pages])
        if result.stop is Stop.SOCKET and not result.sys_errno:
            raise ConfplanError(
                f"{reader.peer} closed the migration stream while a frame was expected: the stream is "
                "truncated",
                hint="see the peer's log for why it stopped",
            )
        if result.stop in (Stop.SOCKET, Stop.TIMEOUT):
            raise socket_error(result)
        path.raise_for(result, Op.LOAD, frame_what=f"SEALED_PAGES frame {result.seq} refused")
        reader.push_header(result.next_header)

    def _receive_pages_python(self, reader: FrameReader, mailboxes: MailboxSet) -> Frame:
        """The Python path for sealed frames the core's loop hands back (it refuses them as it always did):
        ``fill`` unframes each sealed frame into the bank ``load_stream`` hands it and says how many
        records, or 0 at the first other frame."""
        ended: list[Frame] = []

        def fill(mailbox: Mailbox, bank: memoryview) -> int:
            frame = self._next_frame(reader)
            if frame.header.type is not FrameType.SEALED_PAGES:
                ended.append(frame)
                return 0
            return self._unframe_sealed(frame, mailbox, bank)

        mailboxes.load_stream(fill, banks=BANKS)  # a refused record raises, once its LOAD is done
        return ended[0]

    def _apply_shared(self, frame: Frame) -> None:
        gpas = self._gpas
        info = unframe_shared_pages(frame.data, self._shared_ram, gpa_base=self._shared_base, gpas_out=gpas)
        self._wrote(info.count)
        self._shared_written.append(gpas[: info.count])
        self.status.shared_pages += info.count
        self.status.zero_pages += info.zero_pages

    def _unframe_sealed(self, frame: Frame, mailbox: Mailbox, bank: memoryview) -> int:
        """Check a sealed frame and copy its records into ``bank`` (of ``mailbox``'s slots); the count."""
        slots = len(bank) // SLOT_SIZE
        try:
            info = unframe_sealed_pages(
                frame.data, bank, ram_size=self.machine.ram.top, gpas_out=self._gpas
            )
        except PageCoreError as err:  # the core checks the whole frame before it looks at the room
            if err.code is not CoreStatus.SPACE or err.value <= slots:
                raise
            raise ConfplanError(
                f"SEALED_PAGES frame {frame.header.seq} holds {err.value} records, more than the {slots} "
                f"slots of a LOAD bank of MH vCPU {mailbox.mh_index}'s mailbox",
                hint="the source's helper seals larger batches than this target's opens: give both sides the "
                "same helper batch_pages",
            ) from None
        self._wrote(info.count)
        self.status.sealed_pages += info.count
        return info.count

    def track(self, gpas: array.array[int]) -> None:
        """Keep ``gpas`` as written (a channel's part of a round), once verify has asked for them."""
        if len(gpas) and self._written is not None:
            self._written.append(gpas)

    def _wrote(self, count: int) -> None:
        """Keep the GPAs a frame wrote (one array copy per frame), once verify has asked for them."""
        written = self._written
        if count and written is not None:
            written.append(self._gpas[:count])

    def shared_written(self) -> array.array[int]:
        """Every GPA a shared-page frame has written so far (duplicates possible): what verify's shared
        table fills on this side, before the encryption bitmap arrives. Same calling rule as below."""
        return concat_gpas(self._shared_written)

    def take_shared_gpas(self) -> array.array[int]:
        """The GPAs shared-page frames wrote since the last call (duplicates possible): the pages whose MH
        MAC table entries the LOADs did not set (mailbox v4). Same calling rule as below."""
        taken, self._shared_taken = self._shared_written[self._shared_taken :], len(self._shared_written)
        return concat_gpas(taken)

    def take_changed_gpas(self) -> array.array[int]:
        """The GPAs written since the last call (duplicates possible), and track from now on. Call it
        while no frame is being applied (every round applied) or with the stream complete."""
        taken, self._written = self._written or [], []
        return concat_gpas(taken)
