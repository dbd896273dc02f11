"""The target engine: receives one migration stream into a machine booted MH-only.

A thread reads frames (``FrameReader`` checks header and sequence) and applies each once it is checked
completely: shared pages are scattered by the core straight into guest RAM above the helper's area (a
shared page aimed anywhere lower is refused: the host path must never write the helper or the firmware);
sealed records are copied by the core into the next MH vCPU's mailbox slots and opened there by the MH
(LOAD), round robin so the helpers work in parallel. vCPU states and the encryption bitmap are kept until
resume. Any refusal ends the stream: the source is told why (an ERROR frame) and nothing more is applied.
"""

from __future__ import annotations

import array
import collections
import contextlib
import enum
import socket
import threading
from dataclasses import dataclass, field
from typing import Any

from confplan.core import HostMemory, unframe_sealed_pages, unframe_shared_pages
from confplan.core.stream import Frame, FrameReader, FrameWriter
from confplan.core.wire import (
    MAX_FRAME_PAGES,
    DeviceState,
    Done,
    ErrorReport,
    FrameType,
    Hello,
    RoundEnd,
    VcpuState,
    decode,
)
from confplan.errors import ConfplanError
from confplan.migration.dirty import concat_gpas
from confplan.migration.helper import require_helper
from confplan.migration.mailbox import raise_for_refusals
from confplan.migration.mailbox_layout import SLOT_SIZE, Op
from confplan.migration.mailbox_set import MailboxSet
from confplan.migration.session import ENC_BITMAP_DEVICE, ENC_BITMAP_FORMAT, SavedVcpu, vcpu_from_blob
from confplan.migration.source import BANKS
from confplan.vmm import Machine

DRAIN_SECONDS = 5.0


class IncomingState(enum.StrEnum):
    LISTENING = "listening"
    RECEIVING = "receiving"
    COMPLETE = "complete"
    FAILED = "failed"


@dataclass
class IncomingStatus:
    state: IncomingState = IncomingState.LISTENING
    error: str | None = None
    rounds: int = 0
    shared_pages: int = 0
    zero_pages: int = 0
    sealed_pages: int = 0
    bytes_received: int = 0
    vcpus: dict[int, SavedVcpu] = field(default_factory=dict)
    enc_bitmap: bytes | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "state": self.state.value, "error": self.error, "rounds": self.rounds,
            "shared_pages": self.shared_pages, "zero_pages": self.zero_pages,
            "sealed_pages": self.sealed_pages, "bytes_received": self.bytes_received,
        }  # fmt: skip


class Incoming:
    """Accepts one connection on ``listener`` and applies its stream to ``machine`` in a thread."""

    def __init__(
        self, machine: Machine, listener: socket.socket, *, hello: Hello, mailboxes: MailboxSet | None,
        accept_timeout: float = 60.0,
    ) -> None:  # fmt: skip
        self.machine, self.listener, self.hello, self.mailboxes = machine, listener, hello, mailboxes
        self.accept_timeout = accept_timeout
        self.status = IncomingStatus()
        self._done = threading.Event()
        self._conn: socket.socket | None = None
        self._gpas = array.array("Q", bytes(8 * MAX_FRAME_PAGES))
        # GPAs written since take_changed_gpas() began tracking (the shared CRC table drops them)
        self._written: list[array.array[int]] | None = None
        self._shared_written: list[array.array[int]] = []  # GPAs of every shared-page frame (see below)
        self._shared_taken = 0  # how many of those take_shared_gpas() has handed out
        self._bank_order: list[tuple[int, int, int]] = []
        self._next_bank = 0
        self._posted: collections.deque[tuple[int, int, int, int]] = collections.deque()  # LOADs in flight
        low = int(machine.layout.mh_end)
        self._shared_ram = HostMemory(machine.ram.address + low, machine.config.memory - low)
        self._shared_base = low
        self._thread = threading.Thread(target=self._main, name="incoming-stream", daemon=True)
        self._thread.start()

    # ---- control ----
    def wait(self, timeout: float) -> IncomingStatus:
        """Wait until the stream completed or failed (or ``timeout`` passed); the status either way."""
        self._done.wait(timeout)
        return self.status

    def close(self) -> None:
        """Stop receiving (the stream and the listener close; the thread ends)."""
        for sock in (self._conn, self.listener):
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()
        self._thread.join(timeout=5.0)

    # ---- the thread ----
    def _main(self) -> None:
        try:
            self.listener.settimeout(self.accept_timeout)
            conn, addr = self.listener.accept()
            conn.settimeout(None)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._conn = conn
            self.status.state = IncomingState.RECEIVING
            self._receive(FrameReader(conn, f"the source at {addr[0]}:{addr[1]}"))
            self.status.state = IncomingState.COMPLETE
        except BaseException as err:  # the thread's end: record it for the orchestrator, tell the source
            self.status.error = (
                err.message if isinstance(err, ConfplanError) else f"{type(err).__name__}: {err}"
            )
            self.status.state = IncomingState.FAILED
            self._done.set()
            self._tell_source(self.status.error)
        finally:
            self._done.set()

    def _tell_source(self, message: str) -> None:
        """Send an ERROR frame, then stop reading: the source sees it before its next frame and stops."""
        conn = self._conn
        if conn is None:
            return
        with contextlib.suppress(OSError, ConfplanError):
            FrameWriter(conn).send_control(ErrorReport(2, message))
        with contextlib.suppress(OSError):
            conn.shutdown(socket.SHUT_WR)
            conn.settimeout(DRAIN_SECONDS)
            while conn.recv(1 << 16):  # discard what was in flight until the source hangs up
                pass
        conn.close()

    def _receive(self, reader: FrameReader) -> None:
        first = reader.recv()
        _, hello = decode(first.data)
        if not isinstance(hello, Hello):
            raise ConfplanError(f"the stream starts with a {first.header.type.name} frame, not HELLO")
        hello.require_match(self.hello)
        while True:
            frame = reader.recv()
            self.status.bytes_received += len(frame.data)
            if self._apply(frame):
                return

    def _apply(self, frame: Frame) -> bool:
        """Apply one frame; True at DONE."""
        kind = frame.header.type
        if kind is FrameType.SHARED_PAGES:
            gpas = self._gpas
            info = unframe_shared_pages(
                frame.data, self._shared_ram, gpa_base=self._shared_base, gpas_out=gpas
            )
            self._wrote(info.count)
            self._shared_written.append(gpas[: info.count])
            self.status.shared_pages += info.count
            self.status.zero_pages += info.zero_pages
            return False
        if kind is FrameType.SEALED_PAGES:
            self._load_sealed(frame)
            return False
        _, msg = decode(frame.data)
        if isinstance(msg, RoundEnd):
            self._drain()
            self.status.rounds += 1
        elif isinstance(msg, VcpuState):
            self.status.vcpus[msg.vcpu] = vcpu_from_blob(msg.vcpu, msg.format_version, msg.blob)
        elif isinstance(msg, DeviceState):
            self._device(msg)
        elif isinstance(msg, Done):
            self._check_done(msg)
            return True
        elif isinstance(msg, ErrorReport):
            raise ConfplanError(f"the source gave up: {msg.message}")
        return False

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

    def _banks(self, mailboxes: MailboxSet) -> list[tuple[int, int, int]]:
        """(mailbox, first slot, slots) of every bank, in the round-robin order they are used."""
        order = []
        for bank in range(BANKS):
            for i, mb in enumerate(mailboxes.mailboxes):
                size = mb.batch_pages // BANKS or 1
                if (bank + 1) * size <= mb.batch_pages:
                    order.append((i, bank * size, size))
        return order

    def _load_sealed(self, frame: Frame) -> None:
        """Copy the records into the next free bank and post its LOAD; the oldest LOAD is awaited only
        when its bank comes round again, so the MHs open while the next frames arrive."""
        mailboxes = require_helper(self.mailboxes, "target", 1)
        if not self._bank_order:
            self._bank_order = self._banks(mailboxes)
        index, first, size = self._bank_order[self._next_bank]
        self._next_bank = (self._next_bank + 1) % len(self._bank_order)
        if len(self._posted) == len(self._bank_order):
            self._finish_oldest()
        mailbox = mailboxes.mailboxes[index]
        bank = mailbox.slots[first * SLOT_SIZE : (first + size) * SLOT_SIZE]
        info = unframe_sealed_pages(
            frame.data, bank, ram_size=self.machine.config.memory, gpas_out=self._gpas
        )
        self._wrote(info.count)
        self._posted.append((index, mailbox.post_load(info.count, first=first), info.count, first))
        self.status.sealed_pages += info.count

    def _finish_oldest(self) -> None:
        index, seq, count, first = self._posted.popleft()
        assert self.mailboxes is not None
        mailbox = self.mailboxes.mailboxes[index]
        raise_for_refusals(Op.LOAD, mailbox.mh_index, mailbox.finish(Op.LOAD, seq, count, first=first))

    def _drain(self) -> None:
        while self._posted:
            self._finish_oldest()

    def _device(self, msg: DeviceState) -> None:
        if msg.name != ENC_BITMAP_DEVICE:
            raise ConfplanError(f"DEVICE_STATE for device {msg.name!r}: this VMM has no such device")
        want = self.machine.enc_bitmap.bitmap.nbytes
        if msg.format_version != ENC_BITMAP_FORMAT or len(msg.blob) != want:
            raise ConfplanError(
                f"the encryption bitmap is format {msg.format_version}, {len(msg.blob)} bytes; "
                f"expected format {ENC_BITMAP_FORMAT}, {want} bytes"
            )
        self.status.enc_bitmap = msg.blob

    def _check_done(self, done: Done) -> None:
        self._drain()
        got = (self.status.rounds, self.status.shared_pages, self.status.sealed_pages)
        want = (done.rounds, done.shared_pages, done.sealed_pages)
        if got != want or self.status.enc_bitmap is None:
            raise ConfplanError(
                f"the stream ended with totals rounds/shared/sealed {want}, but {got} arrived"
                + ("" if self.status.enc_bitmap is not None else " and no encryption bitmap"),
                hint="frames were lost: rerun the migration",
            )
        missing = [r.index for r in self.machine.vcpus if r.index not in self.status.vcpus]
        if missing:
            raise ConfplanError(f"the stream ended without the state of vCPUs {missing}")
        # Installed now, while the guest's vCPUs are still parked: verify reads which pages are shared.
        apply_enc_bitmap(self.machine, self.status.enc_bitmap)


def apply_enc_bitmap(machine: Machine, blob: bytes) -> None:
    """Install the source's encryption bitmap (which pages are shared) before the guest runs here."""
    view = machine.enc_bitmap.bitmap.view()
    view[: len(blob)] = blob
