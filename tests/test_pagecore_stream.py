"""Frames over a real socket pair: a whole small migration stream, a lost frame, a peer that hangs up."""

from __future__ import annotations

import array
import random
import socket
import threading
from collections.abc import Callable, Iterator

import pytest

from confplan.core import CoreStatus, PageCoreError, frame_shared_pages, unframe_shared_pages, wire
from confplan.core.stream import FrameReader, FrameWriter
from confplan.errors import ConfplanError

PAGE = wire.PAGE_SIZE


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    with a, b:
        yield a, b


def in_thread(fn: Callable[[], None]) -> threading.Thread:
    thread = threading.Thread(target=fn, daemon=True)
    thread.start()
    return thread


def test_a_small_stream_moves_pages_and_control_frames(pair: tuple[socket.socket, socket.socket]) -> None:
    src_sock, dst_sock = pair
    npages = 600  # > 2 MiB of frames: more than a socket buffer, so both sides must make progress
    src = bytearray(random.Random(5).randbytes(npages * PAGE))
    src[PAGE : 2 * PAGE] = bytes(PAGE)
    hello = wire.Hello(
        ram_size=len(src), migration_id=bytes(16), helper_mode=wire.HelperMode.AUX_VCPU, vcpus=1
    )

    def source() -> None:
        writer = FrameWriter(src_sock)
        writer.send_control(hello)
        gpas = array.array("Q", range(0, len(src), PAGE))
        frame = bytearray(wire.shared_frame_capacity(256))
        for start in range(0, npages, 256):
            info = frame_shared_pages(src, memoryview(gpas)[start : start + 256], frame, seq=writer.seq)
            writer.send(memoryview(frame)[: info.frame_len])
        writer.send_control(wire.Done(rounds=1, shared_pages=npages, sealed_pages=0))

    thread = in_thread(source)
    reader = FrameReader(dst_sock, "source")
    dst = bytearray(len(src))
    first = reader.recv()
    _, got_hello = wire.decode(first.data)
    assert got_hello == hello
    pages = zero = 0
    while True:
        frame = reader.recv()
        if frame.header.type is not wire.FrameType.SHARED_PAGES:
            break
        info = unframe_shared_pages(frame.data, dst)
        pages, zero = pages + info.count, zero + info.zero_pages
    assert wire.decode(frame.data)[1] == wire.Done(rounds=1, shared_pages=npages, sealed_pages=0)
    thread.join(timeout=10)
    assert (pages, zero, reader.seq) == (npages, 1, 5)
    assert dst == src


def test_the_reader_grows_for_a_bigger_frame_and_keeps_the_frame_before(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    """The receive buffer starts at 1 MiB and grows to the largest frame (each frame is valid until the next
    recv, as before)."""
    src_sock, dst_sock = pair
    sizes = (10, 700, 10)  # 41 KiB, then 2.9 MiB (beyond the first buffer), then small again
    src = bytearray(random.Random(9).randbytes(sum(sizes) * PAGE))

    def source() -> None:
        writer, start = FrameWriter(src_sock), 0
        for n in sizes:
            frame = bytearray(wire.shared_frame_capacity(n))
            gpas = array.array("Q", range(start * PAGE, (start + n) * PAGE, PAGE))
            info = frame_shared_pages(src, gpas, frame, seq=writer.seq)
            writer.send(memoryview(frame)[: info.frame_len])
            start += n

    thread = in_thread(source)
    reader = FrameReader(dst_sock, "source")
    dst = bytearray(len(src))
    assert [unframe_shared_pages(reader.recv().data, dst).count for _ in sizes] == list(sizes)
    thread.join(timeout=10)
    assert dst == src


def test_a_lost_frame_is_refused(pair: tuple[socket.socket, socket.socket]) -> None:
    src_sock, dst_sock = pair
    done = wire.Done(rounds=0, shared_pages=0, sealed_pages=0)
    src_sock.sendall(wire.encode(done, 0) + wire.encode(done, 2))
    reader = FrameReader(dst_sock, "source 10.0.0.1")
    reader.recv()
    with pytest.raises(PageCoreError) as info:
        reader.recv()
    assert info.value.code is CoreStatus.SEQUENCE
    assert "has seq 2, expected 1" in info.value.message


def test_writer_refuses_a_frame_with_the_wrong_seq(pair: tuple[socket.socket, socket.socket]) -> None:
    writer = FrameWriter(pair[0])
    with pytest.raises(ValueError, match="seq 3, the stream is at 0"):
        writer.send(wire.encode(wire.Done(rounds=0, shared_pages=0, sealed_pages=0), 3))


def test_peer_hanging_up_mid_frame_is_a_clear_error(pair: tuple[socket.socket, socket.socket]) -> None:
    src_sock, dst_sock = pair
    frame = wire.encode(wire.VcpuState(vcpu=0, format_version=1, blob=bytes(1000)), 0)
    src_sock.sendall(frame[:500])
    src_sock.close()
    with pytest.raises(
        ConfplanError, match="source closed the migration stream while the payload of frame 0"
    ):
        FrameReader(dst_sock, "source").recv()
