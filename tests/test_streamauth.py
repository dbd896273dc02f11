"""Wire v2 over real sockets: the handshake (confplan.core.streamauth) and frame protection (frameauth,
stream). Strangers, wrong keys, wrong migration ids, replays of recorded bytes, reordering, truncation and a
flipped byte anywhere are each refused with their own error; an honest stream round-trips exactly."""

from __future__ import annotations

import array
import os
import random
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from confplan.core import (
    CoreStatus,
    PageCoreError,
    crc32c,
    frame_sealed_pages,
    frame_shared_pages,
    unframe_sealed_pages,
    unframe_shared_pages,
    wire,
)
from confplan.core.frameauth import Direction
from confplan.core.stream import FrameReader, send_parts
from confplan.core.streamauth import (
    AuthFailure,
    SessionKeys,
    StreamAuthError,
    client_handshake,
    key_schedule,
    server_handshake,
)
from confplan.core.wire import (
    HEADER_SIZE,
    PAGE_SIZE,
    SEALED_PAGE_SIZE,
    TAG_SIZE,
    DeviceState,
    Done,
    ErrorReport,
    FrameType,
    Hello,
    HelperMode,
    RoundEnd,
    VcpuState,
)
from confplan.errors import ConfplanError

RAM = 64 * PAGE_SIZE
MIGRATION_ID = bytes.fromhex("00112233445566778899aabbccddeeff")
HELLO = Hello(RAM, MIGRATION_ID, HelperMode.AUX_VCPU, 2)
TRANSPORT_KEY = bytes(range(32))  # the helpers' key: the sealed records are AES-GCM under it


def in_thread(fn: Callable[[], Any]) -> dict[str, Any]:
    """Run ``fn`` in a thread; the dict gets "result" or "error" once "done" is set."""
    out: dict[str, Any] = {"done": threading.Event()}

    def run() -> None:
        try:
            out["result"] = fn()
        except BaseException as err:
            out["error"] = err
        out["done"].set()

    threading.Thread(target=run, daemon=True).start()
    return out


def joined(out: dict[str, Any]) -> Any:
    assert out["done"].wait(20), "the thread did not finish"
    if "error" in out:
        raise out["error"]
    return out["result"]


@dataclass
class Session:
    source: SessionKeys
    target: SessionKeys
    peer_hello: Hello


def handshake(
    src: socket.socket, dst: socket.socket, *, src_key: bytes, dst_key: bytes | None = None,
    src_hello: Hello = HELLO, dst_hello: Hello = HELLO, timeout: float = 10.0,
) -> tuple[dict[str, Any], dict[str, Any]]:  # fmt: skip
    target = in_thread(lambda: server_handshake(dst, dst_key or src_key, dst_hello, timeout=timeout))
    source = in_thread(lambda: client_handshake(src, src_key, src_hello, timeout=timeout))
    return source, target


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    with a, b:
        yield a, b


@pytest.fixture
def session(pair: tuple[socket.socket, socket.socket]) -> Session:
    source, target = handshake(*pair, src_key=os.urandom(32))
    keys, peer = joined(target)
    return Session(joined(source), keys, peer)


# ---------------------------------------------------------------------------------------------------------
# Frames a migration sends: shared pages, sealed records, control


def guest_ram() -> bytearray:
    ram = bytearray(random.Random(1).randbytes(RAM))
    ram[5 * PAGE_SIZE : 6 * PAGE_SIZE] = bytes(PAGE_SIZE)  # one zero page
    return ram


def seal(gpa: int, generation: int, plaintext: bytes) -> bytes:
    nonce = gpa.to_bytes(8, "little") + generation.to_bytes(4, "little")
    sealed = AESGCM(TRANSPORT_KEY).encrypt(nonce, plaintext, wire.sealed_aad(gpa, generation, MIGRATION_ID))
    return wire.pack_sealed_header(gpa, generation, nonce, sealed[-16:]) + sealed[:-16]


def opens(record: bytes) -> bool:
    """What the target helper does with a record: AES-GCM open under the transport key."""
    gpa, generation = int.from_bytes(record[:8], "little"), int.from_bytes(record[8:12], "little")
    nonce, tag, ct = record[16:28], record[32:48], record[64:SEALED_PAGE_SIZE]
    try:
        AESGCM(TRANSPORT_KEY).decrypt(nonce, ct + tag, wire.sealed_aad(gpa, generation, MIGRATION_ID))
    except InvalidTag:
        return False
    return True


def record(area: bytearray, index: int) -> bytes:
    return bytes(area[index * SEALED_PAGE_SIZE : (index + 1) * SEALED_PAGE_SIZE])


def shared_frame(ram: bytearray, seq: int) -> bytearray:
    gpas = array.array("Q", [p * PAGE_SIZE for p in range(2, 10)])
    out = bytearray(wire.shared_frame_capacity(len(gpas)))
    info = frame_shared_pages(ram, gpas, out, seq=seq)
    return out[: info.frame_len]


def sealed_frame(ram: bytearray, seq: int) -> bytearray:
    pages = [20, 21, 30]
    area = b"".join(seal(p * PAGE_SIZE, 3, bytes(ram[p * PAGE_SIZE : (p + 1) * PAGE_SIZE])) for p in pages)
    out = bytearray(wire.sealed_frame_size(len(pages)))
    info = frame_sealed_pages(area, len(pages), out, seq=seq, ram_size=RAM)
    return out[: info.frame_len]


def stream_frames(ram: bytearray) -> list[bytes]:
    """A small stream in the order the source sends it, starting at seq 2 (after the handshake)."""
    frames = [bytes(shared_frame(ram, 2)), bytes(sealed_frame(ram, 3))]
    controls = [
        RoundEnd(1, 8, 1, 3, final=True),
        VcpuState(0, 1, b"regs.rax=" + bytes(200)),
        DeviceState("enc-bitmap", 1, bytes(range(64))),
        Done(1, 8, 3),
    ]
    frames += [bytes(wire.encode(msg, 4 + i)) for i, msg in enumerate(controls)]
    return frames


def capture(keys: SessionKeys, frames: list[bytes]) -> list[bytes]:
    """The bytes a protected writer puts on the wire for each frame."""
    a, b = socket.socketpair()
    with a, b:
        writer = keys.writer(a)
        wired = []
        for frame in frames:
            writer.send(frame)
            size = len(frame) + TAG_SIZE
            got = bytearray()
            while len(got) < size:
                got += b.recv(size - len(got))
            wired.append(bytes(got))
        return wired


def feed(keys: SessionKeys, data: bytes) -> FrameReader:
    """A protected reader (seq from 2) over a socket holding ``data`` and then EOF."""
    a, b = socket.socketpair()
    a.sendall(data)
    a.close()
    return FrameReader(b, "the source", keys.receive)


# ---------------------------------------------------------------------------------------------------------
# The handshake


def test_handshake_agrees_and_frames_round_trip_exactly(
    pair: tuple[socket.socket, socket.socket], session: Session
) -> None:
    assert session.peer_hello.migration_id == MIGRATION_ID
    assert session.peer_hello.nonce != bytes(32)  # a fresh nonce was drawn
    ram = guest_ram()
    frames = stream_frames(ram)
    src, dst = pair
    writer, reader = session.source.writer(src), session.target.reader(dst, "the source")
    assert writer.seq == reader.seq == 2
    sender = in_thread(lambda: [writer.send(f) for f in frames])
    dst_ram, records = bytearray(RAM), bytearray(4 * SEALED_PAGE_SIZE)
    for sent in frames:
        frame = reader.recv()
        got = bytes(frame.data)
        assert got[HEADER_SIZE:] == sent[HEADER_SIZE:]  # the payload, decrypted, is exactly what was sent
        assert frame.header.type is FrameType(sent[6])
        assert frame.header.seq == int.from_bytes(sent[16:24], "little")
        if frame.header.type is FrameType.SHARED_PAGES:
            assert frame.header.payload_crc32c == 0  # no CRC of a secret payload in the clear header
            unframe_shared_pages(frame.data, dst_ram)
        elif frame.header.type is FrameType.SEALED_PAGES:
            assert frame.header.payload_crc32c == 0  # wire v3: tags cover it (the frame's, the helper's)
            info = unframe_sealed_pages(frame.data, records, ram_size=RAM)
            assert all(opens(record(records, i)) for i in range(info.count))
        else:
            assert wire.decode(frame.data)[1] == wire.decode(sent)[1]
    joined(sender)
    assert dst_ram[2 * PAGE_SIZE : 10 * PAGE_SIZE] == ram[2 * PAGE_SIZE : 10 * PAGE_SIZE]


def test_big_frames_cross_socket_buffers_in_pieces_and_grow_the_reader() -> None:
    """A socket with a timeout sends in pieces (sendmsg returns short counts); the reader's buffer grows past
    1 MiB for a 2.4 MiB frame and its tag."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        key, port = os.urandom(32), listener.getsockname()[1]
        ram = bytearray(random.Random(4).randbytes(600 * PAGE_SIZE))
        gpas = array.array("Q", [p * PAGE_SIZE for p in range(600)])
        frame = bytearray(wire.shared_frame_capacity(600))
        frame = frame[: frame_shared_pages(ram, gpas, frame, seq=2).frame_len]
        sealed = sealed_frame(guest_ram(), 3)

        def target() -> list[bytes]:
            conn, _ = listener.accept()
            with conn:
                keys, _ = server_handshake(conn, key, HELLO)
                reader = keys.reader(conn, "the source")
                return [bytes(reader.recv().data) for _ in range(2)]

        received = in_thread(target)
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
            sock.settimeout(10)  # a socket with a timeout is non-blocking underneath: short sends happen
            writer = client_handshake(sock, key, HELLO).writer(sock)
            writer.send(frame)
            writer.send(sealed)
        big, records = joined(received)
    assert big[HEADER_SIZE:] == frame[HEADER_SIZE:] and records[HEADER_SIZE:] == sealed[HEADER_SIZE:]


def test_send_parts_finishes_short_sends() -> None:
    parts = [os.urandom(n) for n in (32, 3 << 20, 16)]
    a, b = socket.socketpair()
    with a, b:
        a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16 * 1024)
        a.settimeout(10)
        drained = in_thread(lambda: b.recv(sum(map(len, parts)), socket.MSG_WAITALL))
        send_parts(a, parts)
        assert joined(drained) == b"".join(parts)


def test_handshake_over_tcp_loopback_and_the_target_answers_errors_protected() -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        key = os.urandom(32)
        port = listener.getsockname()[1]
        target = in_thread(lambda: _accept_and_refuse(listener, key))
        with socket.create_connection(("127.0.0.1", port)) as sock:
            keys = client_handshake(sock, key, HELLO)
            frame = keys.reader(sock, "the target").recv()  # the target's ERROR: protected, seq 1
            assert frame.header.protected and frame.header.seq == 1
            assert wire.decode(frame.data)[1] == ErrorReport(2, "no room for this guest")
        joined(target)


def _accept_and_refuse(listener: socket.socket, key: bytes) -> None:
    conn, _ = listener.accept()
    with conn:
        keys, _ = server_handshake(conn, key, HELLO)
        keys.writer(conn).send_control(ErrorReport(2, "no room for this guest"))


def test_wrong_key_is_refused_on_both_sides(pair: tuple[socket.socket, socket.socket]) -> None:
    source, target = handshake(*pair, src_key=os.urandom(32), dst_key=os.urandom(32))
    with pytest.raises(StreamAuthError) as at_source:
        joined(source)
    assert at_source.value.failure is AuthFailure.BAD_KEY
    assert "CHALLENGE does not prove this migration's stream key" in at_source.value.message
    pair[0].close()  # the source gives up without AUTH
    with pytest.raises(StreamAuthError) as at_target:
        joined(target)
    assert at_target.value.failure is AuthFailure.CLOSED


class Stranger:
    """A peer without the key that plays the handshake as far as it can."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def hello(self, hello: Hello = HELLO) -> wire.Challenge:
        self.sock.sendall(wire.encode(replace(hello, nonce=os.urandom(32)), 0))
        head = self.sock.recv(HEADER_SIZE, socket.MSG_WAITALL)
        body = self.sock.recv(wire.parse_header(head).payload_len, socket.MSG_WAITALL)
        msg = wire.decode(head + body)[1]
        assert isinstance(msg, wire.Challenge)
        return msg


def test_a_strangers_forged_auth_is_refused(pair: tuple[socket.socket, socket.socket]) -> None:
    src, dst = pair
    target = in_thread(lambda: server_handshake(dst, os.urandom(32), HELLO))
    challenge = Stranger(src).hello()
    src.sendall(wire.encode(wire.Auth(challenge.proof), 1))  # the target's own proof, reflected
    with pytest.raises(StreamAuthError) as refused:
        joined(target)
    assert refused.value.failure is AuthFailure.BAD_KEY
    assert "a stranger, a replayed recording, or a source given another key" in refused.value.message


def test_wrong_migration_id_is_refused_before_any_answer(pair: tuple[socket.socket, socket.socket]) -> None:
    other = replace(HELLO, migration_id=bytes(16))
    source, target = handshake(*pair, src_key=os.urandom(32), src_hello=other)
    with pytest.raises(StreamAuthError) as at_target:
        joined(target)
    assert at_target.value.failure is AuthFailure.MIGRATION_ID
    assert f"waits for {MIGRATION_ID.hex()}" in at_target.value.message
    pair[1].close()
    with pytest.raises(StreamAuthError) as at_source:
        joined(source)
    assert at_source.value.failure is AuthFailure.CLOSED


def test_geometry_is_compared_after_auth_and_told_to_the_source_only(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    source, target = handshake(*pair, src_key=os.urandom(32), src_hello=replace(HELLO, vcpus=4))
    keys = joined(source)
    with pytest.raises(PageCoreError, match="vcpus: peer 4, here 2"):
        joined(target)
    msg = wire.decode(keys.reader(pair[0], "the target").recv().data)[1]
    assert isinstance(msg, ErrorReport) and "vcpus: peer 4, here 2" in msg.message


def test_a_v1_peer_is_refused_by_version(pair: tuple[socket.socket, socket.socket]) -> None:
    src, dst = pair
    target = in_thread(lambda: server_handshake(dst, os.urandom(32), HELLO))
    v1 = bytearray(wire.encode(HELLO, 0))
    v1[4:6] = (1).to_bytes(2, "little")
    v1[28:32] = crc32c(bytes(v1[:28])).to_bytes(4, "little")
    src.sendall(v1)
    with pytest.raises(StreamAuthError) as refused:
        joined(target)
    assert refused.value.failure is AuthFailure.VERSION
    assert "wire version 1, this confplan speaks 4" in refused.value.message


def test_garbage_is_refused_at_once(pair: tuple[socket.socket, socket.socket]) -> None:
    src, dst = pair
    target = in_thread(lambda: server_handshake(dst, os.urandom(32), HELLO, timeout=30))
    src.sendall(b"GET / HTTP/1.1\r\nHost: target\r\n\r\n")
    with pytest.raises(StreamAuthError) as refused:
        joined(target)
    assert refused.value.failure is AuthFailure.PROTOCOL and "not a confplan stream" in refused.value.message


def test_a_data_frame_before_auth_is_refused(pair: tuple[socket.socket, socket.socket]) -> None:
    src, dst = pair
    target = in_thread(lambda: server_handshake(dst, os.urandom(32), HELLO))
    Stranger(src).hello()
    src.sendall(wire.encode(Done(1, 2, 3), 1))
    with pytest.raises(StreamAuthError, match="sent a DONE frame 1 where AUTH frame 1 belongs"):
        joined(target)


def test_a_silent_peer_times_out(pair: tuple[socket.socket, socket.socket]) -> None:
    target = in_thread(lambda: server_handshake(pair[1], os.urandom(32), HELLO, timeout=0.3))
    with pytest.raises(StreamAuthError) as refused:
        joined(target)
    assert refused.value.failure is AuthFailure.TIMEOUT and "(waiting for HELLO)" in refused.value.message
    assert pair[1].gettimeout() is None  # the socket's own timeout is restored


def test_a_trickling_peer_meets_one_deadline_for_the_whole_handshake(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    """Each byte arrives well within the timeout; only a deadline over the whole handshake ends it."""
    src, dst = pair
    target = in_thread(lambda: server_handshake(dst, os.urandom(32), HELLO, timeout=0.6))
    hello = bytes(wire.encode(HELLO, 0))
    for byte in hello:
        if target["done"].is_set():
            break
        src.send(bytes([byte]))
        time.sleep(0.05)
    with pytest.raises(StreamAuthError) as refused:
        joined(target)
    assert refused.value.failure is AuthFailure.TIMEOUT


def test_the_target_keeps_listening_after_strangers() -> None:
    """The accept loop the target engine runs: a stranger's failure costs one connection, not the attempt."""
    key = os.urandom(32)
    failures: list[AuthFailure] = []

    def accept_loop(listener: socket.socket) -> Hello:
        while True:
            conn, _ = listener.accept()
            with conn:
                try:
                    return server_handshake(conn, key, HELLO, timeout=5)[1]
                except StreamAuthError as err:
                    failures.append(err.failure)

    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        target = in_thread(lambda: accept_loop(listener))
        with socket.create_connection(("127.0.0.1", port)) as stranger:
            stranger.sendall(b"\x00" * HEADER_SIZE)
            assert stranger.recv(1) == b""  # dropped without an answer
        with socket.create_connection(("127.0.0.1", port)) as stranger:
            Stranger(stranger).hello()
            stranger.sendall(wire.encode(wire.Auth(os.urandom(32)), 1))
            assert stranger.recv(1) == b""
        with socket.create_connection(("127.0.0.1", port)) as source:
            client_handshake(source, key, HELLO)
            assert joined(target).migration_id == MIGRATION_ID
    assert failures == [AuthFailure.PROTOCOL, AuthFailure.BAD_KEY]


# ---------------------------------------------------------------------------------------------------------
# Replays of a recorded stream


class Recorder:
    """Relays source to target and records what the source sent."""

    def __init__(self, upstream: socket.socket, downstream: socket.socket) -> None:
        self.bytes = bytearray()
        in_thread(lambda: self._pump(upstream, downstream, self.bytes))
        in_thread(lambda: self._pump(downstream, upstream, None))

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket, log: bytearray | None) -> None:
        with src:
            while data := src.recv(65536):
                if log is not None:
                    log += data
                dst.sendall(data)
        dst.shutdown(socket.SHUT_WR)


def record_session(key: bytes, hello: Hello) -> bytes:
    """Every byte a real source sent in a whole (small) migration, handshake included."""
    src, relay_in = socket.socketpair()
    relay_out, dst = socket.socketpair()
    recorder = Recorder(relay_in, relay_out)
    with src, dst:
        target = in_thread(lambda: server_handshake(dst, key, hello))
        keys = client_handshake(src, key, hello)
        tkeys, _ = joined(target)
        writer, reader = keys.writer(src), tkeys.reader(dst, "the source")
        for frame in stream_frames(guest_ram()):
            writer.send(frame)
            reader.recv()
        src.shutdown(socket.SHUT_WR)
        assert dst.recv(1) == b""
    return bytes(recorder.bytes)


@pytest.mark.parametrize("same_key", [True, False], ids=["same key reused", "another attempt's key"])
def test_a_recorded_stream_replayed_into_a_new_session_is_refused(
    pair: tuple[socket.socket, socket.socket], same_key: bool
) -> None:
    old_key = os.urandom(32)
    recording = record_session(old_key, HELLO)
    src, dst = pair
    target = in_thread(lambda: server_handshake(dst, old_key if same_key else os.urandom(32), HELLO))
    src.sendall(recording)  # the recorded HELLO passes the id check; its AUTH is for another nonce_t
    with pytest.raises(StreamAuthError) as refused:
        joined(target)
    assert refused.value.failure is AuthFailure.BAD_KEY


def test_a_recording_of_another_migration_is_refused_at_its_id(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    recording = record_session(os.urandom(32), replace(HELLO, migration_id=os.urandom(16)))
    target = in_thread(lambda: server_handshake(pair[1], os.urandom(32), HELLO))
    pair[0].sendall(recording)
    with pytest.raises(StreamAuthError) as refused:
        joined(target)
    assert refused.value.failure is AuthFailure.MIGRATION_ID


def test_recorded_frames_spliced_into_an_authenticated_session_are_refused(session: Session) -> None:
    recording = record_session(os.urandom(32), HELLO)
    handshake_bytes = 2 * HEADER_SIZE + Hello.LAYOUT.size + wire.Auth.LAYOUT.size  # HELLO, AUTH
    reader = feed(session.target, recording[handshake_bytes:])
    with pytest.raises(PageCoreError) as refused:
        reader.recv()  # seq 2 as expected, but sealed under the old session's key
    assert refused.value.code is CoreStatus.AUTH_TAG


# ---------------------------------------------------------------------------------------------------------
# Tampering, reordering, truncation


@pytest.fixture
def wired(session: Session) -> list[bytes]:
    return capture(session.source, stream_frames(guest_ram()))


def test_frames_out_of_order_dropped_or_repeated_are_refused(session: Session, wired: list[bytes]) -> None:
    for data, seq in ((wired[1] + wired[0], 3), (wired[0] + wired[2], 4), (wired[0] + wired[0], 2)):
        reader = feed(session.target, data)
        if seq != 3:
            reader.recv()
        with pytest.raises(PageCoreError) as refused:
            reader.recv()
        assert refused.value.code is CoreStatus.SEQUENCE
        assert f"has seq {seq}" in refused.value.message and "replayed" in refused.value.message


def test_a_truncated_stream_is_refused(session: Session, wired: list[bytes]) -> None:
    reader = feed(session.target, wired[0] + wired[1][:-1])  # the tag's last byte never comes
    reader.recv()
    with pytest.raises(ConfplanError, match=r"closed the migration stream .* truncated"):
        reader.recv()


def test_an_unprotected_frame_on_a_protected_stream_is_refused(session: Session) -> None:
    reader = feed(session.target, bytes(wire.encode(Done(1, 2, 3), 2)))
    with pytest.raises(PageCoreError, match="unprotected frame on a protected stream") as refused:
        reader.recv()
    assert refused.value.code is CoreStatus.UNPROTECTED


def test_a_protected_frame_on_an_unprotected_stream_is_refused(wired: list[bytes]) -> None:
    a, b = socket.socketpair()
    with a, b:
        a.sendall(wired[0])
        b_reader = FrameReader(b, "the source")
        b_reader.seq = 2
        with pytest.raises(PageCoreError, match="this side has no stream key"):
            b_reader.recv()


def _fix_header_crc(frame: bytearray) -> bytearray:
    frame[28:32] = crc32c(bytes(frame[:28])).to_bytes(4, "little")
    return frame


SEALED_RECORDS = HEADER_SIZE + wire.PAGES_PREFIX_SIZE  # offset of the first record in a sealed frame

# frame (index in stream_frames: 0 shared, 1 sealed, 2 ROUND_END, 3 VCPU_STATE, 4 DEVICE_STATE, 5 DONE),
# byte offset in the frame as wired, bits flipped, the refusal expected
FLIPS = {
    "header seq, CRC fixed": (4, 16, 0x04, CoreStatus.SEQUENCE),
    "header type, CRC fixed": (4, 6, 0x04, CoreStatus.AUTH_TAG),  # DEVICE_STATE (6) as SHARED_PAGES (2)
    "header PROTECTED flag, CRC fixed": (4, 8, 0x01, CoreStatus.UNPROTECTED),
    "header unknown flag, CRC fixed": (4, 8, 0x04, CoreStatus.FLAGS),
    "header CRC field": (4, 28, 0x04, CoreStatus.HEADER_CRC),
    "header, CRC not fixed": (0, 17, 0x04, CoreStatus.HEADER_CRC),
    "control payload (vCPU registers)": (3, HEADER_SIZE + 8, 0x04, CoreStatus.AUTH_TAG),
    "shared page data": (0, HEADER_SIZE + 8 + 16 + 100, 0x04, CoreStatus.AUTH_TAG),
    "shared page entry (GPA)": (0, HEADER_SIZE + 8, 0x04, CoreStatus.AUTH_TAG),
    "sealed frame count": (1, HEADER_SIZE + 1, 0x04, CoreStatus.PAYLOAD_LEN),  # refused before the tag
    "sealed frame reserved": (1, HEADER_SIZE + 4, 0x04, CoreStatus.AUTH_TAG),
    "sealed record header (GPA)": (1, SEALED_RECORDS + SEALED_PAGE_SIZE + 1, 0x04, CoreStatus.AUTH_TAG),
    "sealed record header (helper's tag)": (1, SEALED_RECORDS + 40, 0x04, CoreStatus.AUTH_TAG),
    "sealed record header (status)": (1, SEALED_RECORDS + 12, 0x04, CoreStatus.AUTH_TAG),
    "tag of an encrypted frame": (2, -1, 0x04, CoreStatus.AUTH_TAG),
    "tag of a sealed frame": (1, -16, 0x04, CoreStatus.AUTH_TAG),
}


@pytest.mark.parametrize("case", FLIPS)
def test_a_flipped_byte_is_refused(session: Session, wired: list[bytes], case: str) -> None:
    index, offset, mask, code = FLIPS[case]
    tampered = bytearray(wired[index])
    tampered[offset] ^= mask
    if "CRC fixed" in case:
        _fix_header_crc(tampered)
    reader = feed(session.target, b"".join(wired[:index]) + bytes(tampered))
    for _ in range(index):
        reader.recv()
    with pytest.raises(PageCoreError) as refused:
        reader.recv()
    assert refused.value.code is code, refused.value.message


def test_a_flipped_sealed_ciphertext_byte_is_refused_by_the_helper(
    session: Session, wired: list[bytes]
) -> None:
    """Wire v3: neither the frame tag nor a CRC covers record ciphertexts (no host pass over them); the
    helper's own tag, which the frame tag pins, refuses a changed byte, accidental or not."""
    tampered = bytearray(wired[1])
    tampered[SEALED_RECORDS + wire.SEALED_HEADER_SIZE + 7] ^= 0x01
    reader = feed(session.target, wired[0] + bytes(tampered))
    reader.recv()
    frame = reader.recv()  # the tag verifies: it covers the record headers, not the ciphertexts
    records = bytearray(4 * SEALED_PAGE_SIZE)
    info = unframe_sealed_pages(frame.data, records, ram_size=RAM)
    assert not opens(record(records, 0))
    assert all(opens(record(records, i)) for i in range(1, info.count))


def test_a_send_key_has_one_writer(session: Session, pair: tuple[socket.socket, socket.socket]) -> None:
    session.source.writer(pair[0])
    with pytest.raises(ValueError, match="already has a writer"):
        session.source.writer(pair[0])


def test_the_schedule_binds_every_handshake_byte() -> None:
    key, hello = os.urandom(32), replace(HELLO, nonce=os.urandom(32)).pack()
    nonce_t = os.urandom(32)
    base = key_schedule(key, hello, nonce_t)
    keys = {base.source_to_target, base.target_to_source, base.target_proof_key, base.source_proof_key}
    assert len(keys) == 4
    for changed in (
        key_schedule(os.urandom(32), hello, nonce_t),
        key_schedule(key, hello, os.urandom(32)),
        key_schedule(key, replace(Hello.unpack(hello), vcpus=3).pack(), nonce_t),
        key_schedule(key, replace(Hello.unpack(hello), migration_id=bytes(16)).pack(), nonce_t),
    ):
        assert changed.source_to_target != base.source_to_target
        assert changed.source_proof != base.source_proof


def test_a_frame_verifies_only_in_its_direction(session: Session, wired: list[bytes]) -> None:
    assert session.source.send.direction is Direction.SOURCE_TO_TARGET
    assert session.source.send.nonce(5) != session.target.send.nonce(5)
    a, b = socket.socketpair()
    with a, b:
        a.sendall(wired[2])
        reflected = FrameReader(b, "the target", session.source.receive)  # the source's own reader
        reflected.seq = 4
        with pytest.raises(PageCoreError) as refused:
            reflected.recv()
    assert refused.value.code is CoreStatus.AUTH_TAG


def test_channel_keys_differ_per_channel_and_per_session(pair: tuple[socket.socket, socket.socket]) -> None:
    """Wire v4: both ends of one main session derive the same key per extra channel; another session under
    the same stream key (another attempt that reused it) derives others, and channel 0 has none."""
    key = os.urandom(32)
    source, target = handshake(*pair, src_key=key)
    (theirs, hello), mine = joined(target), joined(source)
    assert mine.channel_key(1) == theirs.channel_key(1)
    assert mine.channel_key(1) != mine.channel_key(2)
    other = key_schedule(key, replace(hello, nonce=os.urandom(32)).pack(), os.urandom(32)).for_source()
    assert other.channel_key(1) != mine.channel_key(1)
    with pytest.raises(ValueError):
        mine.channel_key(0)
