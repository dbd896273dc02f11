"""The core's data loops (confplan/core/datapath.c) between two host-built helpers over a real socket pair.

Each guest is a ``HostGuest`` (the MH's C engine in threads, real mailboxes); the source loop seals and
sends, the target loop receives into the banks and LOADs, as the engines drive them (the booted-guest path
is covered by test_migration_engine.py). The frames are checked by the reader as on the Python path.
"""

from __future__ import annotations

import array
import contextlib
import ctypes
import errno
import os
import socket
import threading
from collections.abc import Iterator

import pytest
from hostpair import PRIVATE, RAM, host_pair

from confplan.core import CoreStatus, PageCoreError
from confplan.core.datapath import DataLoop, LoopResult, Stop
from confplan.core.frameauth import Direction, FrameKey
from confplan.core.rearm import Memslot, Rearm
from confplan.core.stream import FrameReader
from confplan.core.wire import FrameType, RoundEnd, encode
from confplan.errors import ConfplanError
from confplan.migration.host_mh import HostGuest, build_host_library
from confplan.migration.mailbox_layout import MailboxError, Op
from confplan.migration.sealed_path import SealedPath

KEY = FrameKey(os.urandom(32), Direction.SOURCE_TO_TARGET, 2)


@pytest.fixture(scope="module")
def lib(tmp_path_factory: pytest.TempPathFactory) -> ctypes.CDLL:
    return build_host_library(tmp_path_factory.mktemp("datapath"))


def _loop(sock: socket.socket, path: SealedPath, seq: int) -> DataLoop:
    return DataLoop(sock.fileno(), path.loop_mailboxes, key=KEY.for_core(), seq=seq, op_timeout=10,
                    io_timeout=10, poke=path.poke, ram_size=RAM)  # fmt: skip


def _send(src: HostGuest, sock: socket.socket, gpas: array.array[int], gen: int) -> LoopResult:
    result = _loop(sock, SealedPath(src.mailboxes, 4), 2).send(gpas, generation=gen)
    sock.sendall(encode(RoundEnd(gen, 0, 0, len(gpas)), result.seq))  # what ends the target's loop
    return result


def test_pages_sealed_sent_received_and_opened_in_c(lib: ctypes.CDLL) -> None:
    with host_pair(lib, 2) as (src, dst), _socketpair() as (a, b):
        gpas = array.array("Q", PRIVATE)
        sent: list[LoopResult] = []
        sender = threading.Thread(target=lambda: sent.append(_send(src, a, gpas, 1)))
        sender.start()
        got = array.array("Q", bytes(8 * len(gpas)))
        result = _loop(b, SealedPath(dst.mailboxes, 4), 2).receive(got)
        sender.join(10)
        assert sent[0].stop is Stop.DONE and sent[0].pages == len(gpas)
        assert result.stop is Stop.DONE and result.pages == len(gpas) and result.seq == sent[0].seq
        assert sorted(got) == list(gpas)
        assert int.from_bytes(result.next_header[6:8], "little") == FrameType.ROUND_END
        assert dst.ram[PRIVATE.start : PRIVATE.stop] == src.ram[PRIVATE.start : PRIVATE.stop]
        assert src.mailboxes.mailboxes[0].queued == dst.mailboxes.mailboxes[0].queued == 0


def test_a_changed_record_header_fails_the_tag_and_is_never_loaded(lib: ctypes.CDLL) -> None:
    with host_pair(lib, 1) as (src, dst), _socketpair() as (a, b), _socketpair() as (c, d):
        gpas = array.array("Q", PRIVATE[:16])
        sender = threading.Thread(target=lambda: _send(src, a, gpas, 1))
        sender.start()
        wire = _read_all(b)
        sender.join(10)
        tampered = bytearray(wire)
        tampered[32 + 8 + 8] ^= 0x01  # the first record's generation: covered by the frame's GMAC
        c.sendall(tampered)
        c.shutdown(socket.SHUT_WR)
        result = _loop(d, SealedPath(dst.mailboxes, 4), 2).receive(array.array("Q", bytes(8 * 16)))
        assert result.stop is Stop.FRAME and result.error.code == CoreStatus.AUTH_TAG
        assert dst.mailboxes.mailboxes[0].counters()["pages_opened"] == 0
        with pytest.raises(PageCoreError, match="tag does not verify"):
            SealedPath(dst.mailboxes, 4).raise_for(result, Op.LOAD, frame_what="SEALED_PAGES frame 2 refused")


def test_a_refused_page_stops_the_source_loop_with_the_helpers_reason(lib: ctypes.CDLL) -> None:
    with host_pair(lib, 1) as (src, _dst), _socketpair() as (a, _b):
        path = SealedPath(src.mailboxes, 4)
        result = _loop(a, path, 2).send(array.array("Q", [PRIVATE.start, 0x1001]), generation=1)
        assert result.stop is Stop.REFUSED and result.bad_gpa == 0x1001
        with pytest.raises(MailboxError, match=r"SAVE on MH vCPU 0: 1 of 2 pages refused; .*GPA_ALIGN"):
            path.raise_for(result, Op.SAVE, frame_what="")
        assert src.mailboxes.mailboxes[0].queued == 0  # the loop left the ring idle


def test_a_cancel_stops_the_source_loop_at_its_next_look(lib: ctypes.CDLL) -> None:
    with host_pair(lib, 1) as (src, _dst), _socketpair() as (a, _b):
        cancel = threading.Event()
        cancel.set()
        path = SealedPath(src.mailboxes, 4, cancel=cancel)
        # nobody reads the other end: the socket fills and the loop waits in poll, looking every 10 ms
        result = _loop(a, path, 2).send(array.array("Q", PRIVATE), generation=1)
        assert result.stop is Stop.CANCELLED and result.pages < len(PRIVATE)
        assert src.mailboxes.mailboxes[0].queued == 0


def test_a_dirty_log_kvm_refuses_to_rearm_stops_the_source_loop_before_any_save(lib: ctypes.CDLL) -> None:
    """The loop re-arms the source's dirty log before its helpers read a page; when KVM refuses (here the
    descriptor is a pipe's, not a VM's), no page is read or sent and the error says what to do."""
    with host_pair(lib, 1) as (src, _dst), _socketpair() as (a, _b):
        read_end, write_end = os.pipe()
        try:
            path = SealedPath(src.mailboxes, 4)
            loop = DataLoop(a.fileno(), path.loop_mailboxes, key=KEY.for_core(), seq=2, op_timeout=10,
                            io_timeout=10, poke=path.poke, ram_size=RAM,
                            rearm=Rearm(write_end, [Memslot(0, 0, RAM)]))  # fmt: skip
            result = loop.send(array.array("Q", PRIVATE), generation=1)
        finally:
            os.close(read_end)
            os.close(write_end)
        assert result.stop is Stop.DIRTY_LOG and result.sys_errno == errno.ENOTTY
        assert result.pages == result.ops == 0 and result.bad_gpa == PRIVATE.start
        with pytest.raises(ConfplanError, match=r"refused to re-arm the source's dirty log at GPA 0x400000"):
            path.raise_for(result, Op.SAVE, frame_what="")
        assert src.mailboxes.mailboxes[0].queued == 0


def test_the_reader_takes_over_at_the_header_the_loop_hands_back(lib: ctypes.CDLL) -> None:
    with host_pair(lib, 1) as (src, dst), _socketpair() as (a, b):
        sender = threading.Thread(target=lambda: _send(src, a, array.array("Q", PRIVATE[:8]), 1))
        sender.start()
        result = _loop(b, SealedPath(dst.mailboxes, 4), 2).receive(array.array("Q", bytes(64)))
        sender.join(10)
        reader = FrameReader(b, "the source", None)
        reader.seq = result.seq
        reader.push_header(result.next_header)
        frame = reader.recv()
        assert frame.header.type is FrameType.ROUND_END and frame.header.seq == result.seq


@contextlib.contextmanager
def _socketpair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    try:
        yield a, b
    finally:
        a.close()
        b.close()


def _read_all(sock: socket.socket) -> bytes:
    sock.settimeout(2)
    out = bytearray()
    with contextlib.suppress(TimeoutError):
        while chunk := sock.recv(1 << 20):
            out += chunk
            if len(out) > 16 * 4200 + 200:
                break
    return bytes(out)
