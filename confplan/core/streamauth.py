"""The wire v2 handshake: the source and the target each prove they hold the migration's stream key, and
derive the session's frame keys, before a single page moves (docs/stream-security.md, "The handshake").

    source                                     target
    HELLO {geometry, migration id, nonce_s} ->
                                           <-  CHALLENGE {nonce_t, HMAC(m_t, th)}
    AUTH {HMAC(m_s, th)}                   ->
    protected frames from seq 2            ->  (protected ERROR from seq 1, if it refuses)

``th`` is SHA-256 over the HELLO payload and ``nonce_t``; HKDF-SHA256 over the stream key K, salted with both
nonces and bound to ``th``, gives the two direction keys and the two proof keys. The stream key comes from
the orchestrator over the control channel; this module only takes it as an argument.

``server_handshake`` is per connection: every failure before AUTH verifies is a ``StreamAuthError`` and the
target's accept loop goes on listening; it answers a stranger nothing but the CHALLENGE.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import hashlib
import hmac
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from confplan.core.frameauth import KEY_SIZE, Direction, FrameKey
from confplan.core.status import CoreStatus, PageCoreError
from confplan.core.stream import FrameReader, FrameWriter
from confplan.core.wire import (
    HEADER_SIZE,
    NONCE_SIZE,
    WIRE_VERSION,
    Auth,
    Challenge,
    Control,
    ErrorReport,
    Hello,
    decode,
    encode,
    parse_header,
)
from confplan.errors import ConfplanError

HANDSHAKE_TIMEOUT = 10.0  # seconds for a whole handshake, not per read: a trickling stranger cannot stall it
MAX_HANDSHAKE_PAYLOAD = 128  # a stranger cannot make the target allocate a page frame's buffer
TRANSCRIPT_LABEL = b"confplan stream v2 transcript"
KDF_LABEL = b"confplan stream v2"
CHANNEL_LABEL = b"confplan stream v4 channel"  # an extra channel's stream key (wire v4, parallel streams)
SOURCE_FIRST_SEQ = 2  # after HELLO (0) and AUTH (1)
TARGET_FIRST_SEQ = 1  # after CHALLENGE (0)
TARGET_ERROR_CODE = 2  # ErrorReport.code the target uses (as migration/target.py does)


class AuthFailure(enum.StrEnum):
    """Why a handshake failed; each has its own message."""

    VERSION = "version"  # the peer speaks another wire version
    PROTOCOL = "protocol"  # not the handshake message expected, or a malformed one
    MIGRATION_ID = "migration-id"  # HELLO names another migration
    BAD_KEY = "bad-key"  # a key proof does not verify: no key, another key, or a replayed recording
    TIMEOUT = "timeout"
    CLOSED = "closed"


class StreamAuthError(ConfplanError):
    """A connection failed the handshake. On the target: a stranger (or a replay); keep listening."""

    def __init__(self, message: str, *, failure: AuthFailure, hint: str) -> None:
        super().__init__(message, hint=hint)
        self.failure = failure


@dataclass(frozen=True)
class SessionKeys:
    """One side's frame keys after the handshake: ``send`` for its writer, ``receive`` for its reader."""

    send: FrameKey
    receive: FrameKey
    channel_seed: bytes = field(default=b"", repr=False)  # this session's secret for its extra channels

    def channel_key(self, channel: int) -> bytes:
        """The stream key extra channel ``channel`` (1..) proves in its own handshake (wire v4): only the two
        ends of this session know it, so a channel of another attempt or a stranger's is refused."""
        if not self.channel_seed or channel < 1:
            raise ValueError(f"no key for channel {channel} of this session")
        return hmac.digest(self.channel_seed, CHANNEL_LABEL + channel.to_bytes(2, "little"), "sha256")

    def writer(self, sock: socket.socket) -> FrameWriter:
        """The one writer of this side (a second would reuse GCM nonces: refused)."""
        return FrameWriter(sock, self.send)

    def reader(self, sock: socket.socket, peer: str) -> FrameReader:
        return FrameReader(sock, peer, self.receive)


@dataclass(frozen=True)
class KeySchedule:
    """Everything both sides derive from the stream key and the handshake."""

    transcript: bytes
    source_to_target: bytes
    target_to_source: bytes
    target_proof_key: bytes
    source_proof_key: bytes
    channel_seed: bytes  # wire v4: HKDF's fifth 32 bytes, the root of the extra channels' stream keys

    @property
    def target_proof(self) -> bytes:
        return hmac.digest(self.target_proof_key, self.transcript, "sha256")

    @property
    def source_proof(self) -> bytes:
        return hmac.digest(self.source_proof_key, self.transcript, "sha256")

    def for_source(self) -> SessionKeys:
        return SessionKeys(
            FrameKey(self.source_to_target, Direction.SOURCE_TO_TARGET, SOURCE_FIRST_SEQ),
            FrameKey(self.target_to_source, Direction.TARGET_TO_SOURCE, TARGET_FIRST_SEQ),
            self.channel_seed,
        )

    def for_target(self) -> SessionKeys:
        return SessionKeys(
            FrameKey(self.target_to_source, Direction.TARGET_TO_SOURCE, TARGET_FIRST_SEQ),
            FrameKey(self.source_to_target, Direction.SOURCE_TO_TARGET, SOURCE_FIRST_SEQ),
            self.channel_seed,
        )


def key_schedule(key: bytes, hello_payload: bytes, nonce_t: bytes) -> KeySchedule:
    """th = SHA-256(label || HELLO payload || nonce_t); HKDF-SHA256(K, salt = nonce_s || nonce_t,
    info = label || th) -> k_s2t, k_t2s, m_t, m_s, and (wire v4) the channel seed."""
    check_stream_key(key)
    nonce_s = Hello.unpack(hello_payload).nonce
    th = hashlib.sha256(TRANSCRIPT_LABEL + hello_payload + nonce_t).digest()
    okm = HKDF(hashes.SHA256(), 5 * KEY_SIZE, salt=nonce_s + nonce_t, info=KDF_LABEL + th).derive(key)
    parts = [okm[i : i + KEY_SIZE] for i in range(0, 5 * KEY_SIZE, KEY_SIZE)]
    return KeySchedule(th, *parts)


def check_stream_key(key: bytes) -> None:
    if len(key) != KEY_SIZE:
        raise ValueError(f"the stream key is {KEY_SIZE} bytes, got {len(key)}")


def client_handshake(
    sock: socket.socket, key: bytes, hello: Hello, *, timeout: float = HANDSHAKE_TIMEOUT,
    peer: str = "the target",
) -> SessionKeys:  # fmt: skip
    """The source's side on a connected ``sock``: HELLO (``hello`` with a fresh nonce), check the target's
    CHALLENGE, AUTH. Returns the source's keys (its writer starts at seq 2). Raises StreamAuthError."""
    check_stream_key(key)
    hello = dataclasses.replace(hello, nonce=os.urandom(NONCE_SIZE))
    with _Channel(sock, timeout, peer) as channel:
        channel.send(hello, 0)
        challenge = channel.recv(Challenge, 0)
        schedule = key_schedule(key, hello.pack(), challenge.nonce)
        if not hmac.compare_digest(challenge.proof, schedule.target_proof):
            raise StreamAuthError(
                f"{peer}'s CHALLENGE does not prove this migration's stream key",
                failure=AuthFailure.BAD_KEY,
                hint="the source reached a host that is not the chosen target, or the two VMMs were given "
                "different stream keys: nothing was sent; rerun the migration",
            )
        channel.send(Auth(schedule.source_proof), 1)
    return schedule.for_source()


def server_handshake(
    sock: socket.socket, key: bytes | Callable[[Hello], bytes], expect: Hello, *,
    timeout: float = HANDSHAKE_TIMEOUT, peer: str = "the peer",
) -> tuple[SessionKeys, Hello]:  # fmt: skip
    """The target's side on an accepted ``sock``: HELLO for ``expect``'s migration id, CHALLENGE, AUTH.
    Returns the target's keys (its reader expects seq 2) and the source's HELLO. ``key`` may pick the key
    from the HELLO (wire v4: an extra channel proves its channel key; it raises StreamAuthError for a
    channel it does not wait for).

    Raises StreamAuthError when the peer is not proven to be the source (keep listening), and, once it is,
    PageCoreError when its geometry differs from ``expect`` (after telling it so in a protected ERROR: the
    chosen source is misconfigured, the migration fails)."""
    if isinstance(key, bytes):
        check_stream_key(key)
    with _Channel(sock, timeout, peer) as channel:
        hello, payload = channel.recv_hello()
        if hello.wire_version != WIRE_VERSION:
            raise StreamAuthError(
                f"{peer}'s HELLO says wire version {hello.wire_version}, this confplan speaks {WIRE_VERSION}",
                failure=AuthFailure.VERSION,
                hint="run the same confplan version on the source and the target",
            )
        if hello.migration_id != expect.migration_id:
            raise StreamAuthError(
                f"{peer}'s HELLO is for migration {hello.migration_id.hex()}, this target waits for "
                f"{expect.migration_id.hex()}: another migration's stream, or a replay of one",
                failure=AuthFailure.MIGRATION_ID,
                hint="still listening for the chosen source; check that the source was given this target",
            )
        nonce_t = os.urandom(NONCE_SIZE)
        schedule = key_schedule(key if isinstance(key, bytes) else key(hello), payload, nonce_t)
        channel.send(Challenge(nonce_t, schedule.target_proof), 0)
        auth = channel.recv(Auth, 1)
        if not hmac.compare_digest(auth.proof, schedule.source_proof):
            raise StreamAuthError(
                f"{peer}'s AUTH does not prove this migration's stream key: a stranger, a replayed "
                "recording, or a source given another key",
                failure=AuthFailure.BAD_KEY,
                hint="still listening for the chosen source",
            )
    keys = schedule.for_target()
    try:
        hello.require_match(expect)
    except PageCoreError as err:
        # best effort: if it does not arrive, the source sees the stream close; this side's error says why
        with contextlib.suppress(OSError):
            keys.writer(sock).send_control(ErrorReport(TARGET_ERROR_CODE, err.message))
        raise
    return keys, hello


Msg = TypeVar("Msg", bound=Control)


class _Channel:
    """The handshake's unprotected frames on a socket, every read and write under one deadline; the
    socket's own timeout is restored on exit."""

    def __init__(self, sock: socket.socket, timeout: float, peer: str) -> None:
        self._sock, self._peer = sock, peer
        self._deadline = time.monotonic() + timeout
        self._timeout = timeout
        self._saved: float | None = None

    def __enter__(self) -> _Channel:
        self._saved = self._sock.gettimeout()
        return self

    def __exit__(self, *exc_info: object) -> None:
        with contextlib.suppress(OSError):  # closed under us: the error being raised says why
            self._sock.settimeout(self._saved)

    def _arm(self, what: str) -> None:
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise self._timed_out(what)
        self._sock.settimeout(left)

    def _timed_out(self, what: str) -> StreamAuthError:
        return StreamAuthError(
            f"{self._peer} did not complete the handshake within {self._timeout:g} s ({what})",
            failure=AuthFailure.TIMEOUT,
            hint="a silent or slow peer: not the chosen source or target, or the network between them stalls",
        )

    def send(self, msg: Control, seq: int) -> None:
        what = f"sending {msg.TYPE.name}"
        try:
            self._arm(what)
            self._sock.sendall(encode(msg, seq))
        except TimeoutError:
            raise self._timed_out(what) from None
        except OSError as err:
            raise self._closed(what, err) from None

    def recv(self, cls: type[Msg], seq: int) -> Msg:
        msg, _ = self._recv(cls, seq)
        return msg

    def recv_hello(self) -> tuple[Hello, bytes]:
        """HELLO and its payload bytes as received (the transcript covers exactly those)."""
        return self._recv(Hello, 0)

    def _recv(self, cls: type[Msg], seq: int) -> tuple[Msg, bytes]:
        name, peer = cls.TYPE.name, self._peer
        head = self._read(HEADER_SIZE, f"waiting for {name}")
        try:
            header = parse_header(head)
        except PageCoreError as err:
            failure = AuthFailure.VERSION if err.code is CoreStatus.VERSION else AuthFailure.PROTOCOL
            raise self._protocol(f"{peer}'s {name} was refused: {err.message}", failure) from None
        if header.protected or header.type is not cls.TYPE or header.seq != seq:
            got = f"{'protected ' if header.protected else ''}{header.type.name} frame {header.seq}"
            raise self._protocol(f"{peer} sent a {got} where {name} frame {seq} belongs")
        if header.payload_len > MAX_HANDSHAKE_PAYLOAD:
            raise self._protocol(f"{peer}'s {name} has a {header.payload_len}-byte payload")
        payload = self._read(header.payload_len, f"waiting for the rest of {name}")
        try:
            _, msg = decode(head + payload)
        except PageCoreError as err:
            raise self._protocol(f"{peer}'s {name} was refused: {err.message}") from None
        if not isinstance(msg, cls):  # decode() picked the class from the type checked above
            raise self._protocol(f"{peer}'s {name} decoded as {type(msg).__name__}")
        return msg, payload

    def _read(self, n: int, what: str) -> bytes:
        buf = bytearray(n)
        view, got = memoryview(buf), 0
        while got < n:
            try:
                self._arm(what)
                k = self._sock.recv_into(view[got:])
            except TimeoutError:
                raise self._timed_out(what) from None
            except OSError as err:
                raise self._closed(what, err) from None
            if k == 0:
                raise self._closed(what, None)
            got += k
        return bytes(buf)

    def _closed(self, what: str, err: OSError | None) -> StreamAuthError:
        why = f" ({err.strerror or err})" if err is not None else ""
        return StreamAuthError(
            f"{self._peer} closed the connection during the handshake ({what}){why}",
            failure=AuthFailure.CLOSED,
            hint="the peer refused this side (wrong migration id or key, another version: see its log) or "
            "the network dropped the connection",
        )

    def _protocol(self, message: str, failure: AuthFailure = AuthFailure.PROTOCOL) -> StreamAuthError:
        return StreamAuthError(
            message,
            failure=failure,
            hint="run the same confplan version on both sides"
            if failure is AuthFailure.VERSION
            else "the peer does not speak the confplan v2 handshake: not the chosen source or target",
        )
