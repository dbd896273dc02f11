"""The core's data loops (``datapath.c``): a round's sealed pages in one call per side, the GIL released.

``send_sealed`` (source) posts SAVE ops into the helpers' mailboxes, sends each done bank's records from
the slots as a SEALED_PAGES frame (checked, authenticated like ``FrameKey.protect``) and reposts, re-arming
the dirty log of the pages ahead first where it is given a ``Rearm`` (docs/dirty-log.md);
``recv_sealed`` (target) receives SEALED_PAGES frames straight into free banks, checks each (tag, CRC,
records) and posts LOAD, and returns at the first other frame with its header. Python is called back only
to kick a parked helper and every ~10 ms to ask whether to stop (``Poke``). Design: docs/migration.md,
"Session 5". The mailboxes are described by ``LoopMailbox``: this layer knows the mailbox layout only as
the C side does (firmware/include/cp_mailbox.h), not the migration layer's classes.
"""

from __future__ import annotations

import array
import ctypes
import enum
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass

from confplan.core._buffers import Memory, pinned
from confplan.core._lib import POKE_C, ErrorC, lib
from confplan.core.rearm import Rearm, RearmC
from confplan.core.wire import HEADER_SIZE

# mh >= 0: kick that helper; mh == -1: 0 to go on, Stop.CANCELLED or Stop.MACHINE to stop.
Poke = Callable[[int], int]


class Stop(enum.IntEnum):
    """enum cp_dp_stop: why a loop returned."""

    DONE = 0
    REFUSED = 1
    OP_FAILED = 2
    OP_TIMEOUT = 3
    PEER = 4
    CANCELLED = 5
    MACHINE = 6
    TIMEOUT = 7
    SOCKET = 8
    FRAME = 9
    CRYPTO = 10
    ARG = 11
    DIRTY_LOG = 12


class _MailboxC(ctypes.Structure):
    _fields_ = (
        ("ctl", ctypes.c_void_p),
        ("slots", ctypes.c_void_p),
        ("batch_pages", ctypes.c_uint32),
        ("bank_slots", ctypes.c_uint32),
        ("banks", ctypes.c_uint32),
        ("mh_index", ctypes.c_uint32),
        ("kick_fd", ctypes.c_int32),
        ("reserved", ctypes.c_uint32),
    )


class StreamC(ctypes.Structure):
    """struct cp_dp_stream."""

    _fields_ = (
        ("fd", ctypes.c_int32),
        ("n_mailboxes", ctypes.c_uint32),
        ("mailboxes", ctypes.POINTER(_MailboxC)),
        ("gpas", ctypes.c_void_p),
        ("count", ctypes.c_uint64),
        ("gpa_base", ctypes.c_uint64),
        ("ram_size", ctypes.c_uint64),
        ("generation", ctypes.c_uint32),
        ("protect", ctypes.c_uint32),
        ("key", ctypes.c_uint8 * 32),
        ("direction", ctypes.c_uint8 * 4),
        ("op_timeout", ctypes.c_double),
        ("io_timeout", ctypes.c_double),
        ("bandwidth", ctypes.c_double),
        ("pace_t0", ctypes.c_double),
        ("pace_sent", ctypes.c_uint64),
        ("rearm", ctypes.POINTER(RearmC)),
        ("seq", ctypes.c_uint64),
        ("pages", ctypes.c_uint64),
        ("bytes", ctypes.c_uint64),
        ("frames", ctypes.c_uint64),
        ("ops", ctypes.c_uint64),
        ("kicks", ctypes.c_uint64),
        ("stop", ctypes.c_int32),
        ("sys_errno", ctypes.c_int32),
        ("bad_mailbox", ctypes.c_uint32),
        ("bad_slot", ctypes.c_uint32),
        ("bad_status", ctypes.c_uint32),
        ("reserved", ctypes.c_uint32),
        ("bad_gpa", ctypes.c_uint64),
        ("next_header", ctypes.c_uint8 * HEADER_SIZE),
        ("err", ErrorC),
    )


@dataclass(frozen=True)
class LoopMailbox:
    """One helper's mailbox for a loop: writable views of its control page and data slots, its banks."""

    control: memoryview
    slots: memoryview
    batch_pages: int
    bank_slots: int
    banks: int
    mh_index: int
    kick_fd: int = -1  # an eventfd the loop writes 1 to when the helper must wake (-1: the poke kicks it)


@dataclass(frozen=True)
class LoopKey:
    """A direction's frame key as the core needs it (``FrameKey.for_core``); None = unprotected frames."""

    key: bytes
    direction: bytes


@dataclass(frozen=True)
class LoopResult:
    """What a loop did and why it stopped. ``next_header``: the header that ended a target loop."""

    stop: Stop
    seq: int
    pages: int
    nbytes: int
    frames: int
    ops: int
    kicks: int
    sys_errno: int
    bad_mailbox: int
    bad_slot: int
    bad_status: int
    bad_gpa: int
    error: ErrorC
    next_header: bytes


class DataLoop:
    """One call of a data loop. ``pages``/``nbytes`` may be read from another thread while it runs."""

    def __init__(
        self, fd: int, mailboxes: Sequence[LoopMailbox], *, key: LoopKey | None, seq: int, op_timeout: float,
        io_timeout: float | None, poke: Poke, gpa_base: int = 0, ram_size: int, rearm: Rearm | None = None,
    ) -> None:  # fmt: skip
        self._mailboxes = list(mailboxes)
        self.rearm = rearm  # source: the dirty log re-armed ahead of the SAVEs (kept: the loop points at it)
        self._poke = poke
        self._error: BaseException | None = None
        s = self.stream = StreamC()
        s.fd, s.n_mailboxes, s.seq = fd, len(self._mailboxes), seq
        s.gpa_base, s.ram_size = gpa_base, ram_size
        s.op_timeout, s.io_timeout = op_timeout, io_timeout or 0.0
        if rearm is not None:
            s.rearm = ctypes.pointer(rearm.c)
        if key is not None:
            s.protect = 1
            ctypes.memmove(s.key, key.key, 32)
            ctypes.memmove(s.direction, key.direction, 4)

    @property
    def pages(self) -> int:
        return int(self.stream.pages)

    @property
    def nbytes(self) -> int:
        return int(self.stream.bytes)

    def _poke_c(self, mh: int) -> int:
        try:
            return self._poke(mh)
        except BaseException as err:  # raised again after the call: a callback must not raise into C
            self._error = err
            return int(Stop.MACHINE)

    def _run(self, fn_name: str, gpas: Memory, count: int, writable: bool) -> LoopResult:
        s = self.stream
        poke = POKE_C(self._poke_c)
        with ExitStack() as pins:
            boxes = (_MailboxC * len(self._mailboxes))()
            for c, mb in zip(boxes, self._mailboxes, strict=True):
                c.ctl = pins.enter_context(pinned(mb.control, writable=True, what="mailbox control page"))[0]
                c.slots = pins.enter_context(pinned(mb.slots, writable=True, what="mailbox slots"))[0]
                c.batch_pages, c.bank_slots, c.banks = mb.batch_pages, mb.bank_slots, mb.banks
                c.mh_index, c.kick_fd = mb.mh_index, mb.kick_fd
            s.mailboxes = boxes
            s.gpas = pins.enter_context(pinned(gpas, writable=writable, what="GPA list"))[0]
            s.count = count
            getattr(lib(), fn_name)(ctypes.byref(s), poke)
        if self._error is not None:
            raise self._error
        return LoopResult(
            Stop(s.stop), int(s.seq), int(s.pages), int(s.bytes), int(s.frames), int(s.ops), int(s.kicks),
            int(s.sys_errno), int(s.bad_mailbox), int(s.bad_slot), int(s.bad_status), int(s.bad_gpa),
            s.err, bytes(s.next_header),
        )  # fmt: skip

    def send(
        self, gpas: array.array[int], *, generation: int, bandwidth: float | None = None,
        pace_t0: float = 0.0, pace_sent: int = 0,
    ) -> LoopResult:  # fmt: skip
        """Source: seal and send every page of ``gpas``. ``pace_t0`` is ``time.monotonic()`` when the
        stream's pacing began and ``pace_sent`` the bytes sent since, for the plan's bandwidth cap."""
        s = self.stream
        s.generation, s.bandwidth, s.pace_t0, s.pace_sent = generation, bandwidth or 0.0, pace_t0, pace_sent
        return self._run("cp_dp_send_sealed", gpas, len(gpas), writable=False)

    def receive(self, gpas_out: array.array[int]) -> LoopResult:
        """Target: receive sealed frames into the banks and LOAD them until another frame's header;
        the GPAs received go into ``gpas_out`` (its length is the capacity)."""
        return self._run("cp_dp_recv_sealed", gpas_out, len(gpas_out), writable=True)
