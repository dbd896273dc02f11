"""The target engine: receives one migration stream into a machine booted MH-only.

A thread accepts the source (the first connection that proves the stream key), reads frames
(``FrameReader`` checks header and sequence) and applies each once it is checked completely: page frames
through the ``PageReceiver`` (shared pages into guest RAM above the helper's area, sealed records opened
by the MH vCPUs in parallel), every LOAD done before the frame that ends the pages (ROUND_END) is applied.
vCPU states and the encryption bitmap are kept until resume. Any refusal ends the stream: the source is
told why (an ERROR frame) and nothing more is applied.
"""

from __future__ import annotations

import contextlib
import enum
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from confplan.core.stream import Frame, FrameReader, FrameWriter
from confplan.core.streamauth import (
    HANDSHAKE_TIMEOUT,
    AuthFailure,
    SessionKeys,
    StreamAuthError,
    server_handshake,
)
from confplan.core.wire import (
    DeviceState,
    Done,
    ErrorReport,
    FrameType,
    Handover,
    Hello,
    Manifest,
    RoundEnd,
    VcpuState,
    decode,
)
from confplan.errors import ConfplanError
from confplan.migration.channels import ChannelReceiver, ChannelSet, awaited_channel_key, share_mailboxes
from confplan.migration.mailbox_set import MailboxSet
from confplan.migration.page_receiver import PageReceiver
from confplan.migration.session import (
    ENC_BITMAP_DEVICE,
    ENC_BITMAP_FORMAT,
    KVM_CLOCK_DEVICE,
    KVM_CLOCK_FORMAT,
    VCPU_SEALED_FORMAT,
    SavedVcpu,
    vcpu_from_blob,
)
from confplan.migration.source import BANKS
from confplan.transport.sockets import tune_accepted
from confplan.vmm import Machine
from confplan.vmm.clock import VmClock, clock_from_blob

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
    channels: int = 0  # the stream's connections, once they proved their keys (wire v4: main + extra)
    vcpus: dict[int, SavedVcpu] = field(default_factory=dict)
    sealed_vcpus: dict[int, bytes] = field(default_factory=dict)  # SEV-ES/SNP: the helper opens them
    state_parts: list[bytes] = field(default_factory=list)  # the state blobs as received (manifest's hash)
    enc_bitmap: bytes | None = None
    clock: VmClock | None = None  # the source VM's kvm-clock in the pause (None: an older source sent none)
    manifests: dict[int, Manifest] = field(default_factory=dict)  # by format: for the target's own check

    def to_json(self) -> dict[str, Any]:
        return {
            "state": self.state.value, "error": self.error, "rounds": self.rounds,
            "shared_pages": self.shared_pages, "zero_pages": self.zero_pages,
            "sealed_pages": self.sealed_pages, "bytes_received": self.bytes_received,
            "channels": self.channels,
        }  # fmt: skip


class HandoverHooks:
    """What the target's handover hears from the stream (``migration.incoming`` feeds its machine):
    DONE once the copy is whole, each handover message after it, and the link going down."""

    def done(self) -> None: ...
    def pages_complete(self, enc_bitmap: bytes) -> None:
        """Every page is in (the final round ended) and the encryption bitmap arrived: verify's table work
        may start now, while the rest of the pause's frames arrive. Must not block."""

    def states_complete(self, sealed: dict[int, bytes]) -> None:
        """After the final round every vCPU's state arrived (``sealed``: SEV-ES/SNP's, by vCPU, as the
        source's helper sealed them): the helper may open them now, before DONE. Must not block."""

    def message(self, msg: Handover) -> None: ...
    def link_down(self, why: str) -> None: ...


class Incoming:
    """Accepts one connection on ``listener`` and applies its stream to ``machine`` in a thread. After DONE
    the connection stays open for the handover's messages (``hooks``), both ways."""

    def __init__(
        self, machine: Machine, listener: socket.socket, *, hello: Hello, stream_key: bytes | None,
        mailboxes: MailboxSet | None, accept_timeout: float = 60.0, log: Callable[[str], None] | None = None,
        hooks: HandoverHooks | None = None,
    ) -> None:  # fmt: skip
        self.machine, self.listener, self.hello, self.mailboxes = machine, listener, hello, mailboxes
        self.accept_timeout = accept_timeout
        self._key = stream_key
        self._log = log or (lambda line: None)
        self.hooks = hooks or HandoverHooks()
        self._send_lock = threading.Lock()
        self.refused: list[str] = []  # connections that failed the handshake (strangers, replays)
        self._writer: FrameWriter | None = None
        self.status = IncomingStatus()
        self._done = threading.Event()
        self._conn: socket.socket | None = None
        self.pages = PageReceiver(machine, self.status, self._apply)  # the page frames, and what they wrote
        self._helpers = mailboxes  # the main channel's helpers (all of them with one channel)
        self._channels: ChannelSet | None = None  # wire v4's extra channels, once accepted
        self._final_round = False  # the final ROUND_END was applied: no page frame may follow it
        self._states_told = False  # HandoverHooks.states_complete was called
        self.marks: dict[str, float] = {}  # wall time of the pause's frames as they arrived (a timeline)
        self._thread = threading.Thread(target=self._main, name="incoming-stream", daemon=True)
        self._thread.start()

    # ---- control ----
    def wait(self, timeout: float) -> IncomingStatus:
        """Wait until the stream completed or failed (or ``timeout`` passed); the status either way."""
        self._done.wait(timeout)
        return self.status

    def close(self) -> None:
        """Stop receiving (the stream and the listener close; the thread ends)."""
        socks = [sock for sock in (self._conn, self.listener) if sock is not None]
        for sock in socks:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        if self._channels is not None:  # a main thread waiting for a channel's round ends with it
            self._channels.close()
        # the core's receive loop works on the raw fd: it ends at the shutdown, and only then may the fd
        # be closed (and its number reused)
        if threading.current_thread() is not self._thread:  # the handover may close from its own thread
            self._thread.join(timeout=5.0)
        for sock in socks:
            sock.close()

    # ---- the thread ----
    def _main(self) -> None:
        try:
            reader = self._accept_source()
            self.status.state = IncomingState.RECEIVING
            self._receive(reader)
            self.status.state = IncomingState.COMPLETE
        except BaseException as raised:  # the thread's end: record it for the orchestrator, tell the source
            err = raised
            if self._channels is not None and self._channels.error is not None:
                err = self._channels.error  # it ended the main channel's read: its own error says why
            self.status.error = (
                err.message if isinstance(err, ConfplanError) else f"{type(err).__name__}: {err}"
            )
            self.status.state = IncomingState.FAILED
            self._done.set()
            self._tell_source(self.status.error)
            self.hooks.link_down(self.status.error)
            return
        finally:
            self._done.set()
        self.hooks.done()
        self._handover_messages(reader)

    def _handover_messages(self, reader: FrameReader) -> None:
        """After DONE: the source's handover messages until it hangs up (or this side closes)."""
        why = "the source closed the stream"
        try:
            while True:
                _, msg = decode(reader.recv().data)
                if isinstance(msg, Handover):
                    self.hooks.message(msg)
                elif isinstance(msg, ErrorReport):
                    why = f"the source gave up: {msg.message}"
                    break
        except (OSError, ConfplanError) as err:
            why = err.message if isinstance(err, ConfplanError) else str(err)
        self.hooks.link_down(why)

    def send_handover(self, msg: Handover) -> None:
        """A handover message to the source (OSError / ConfplanError when the link is down)."""
        if self._writer is None:
            raise ConfplanError("no source is connected")
        with self._send_lock:
            self._writer.send_control(msg)

    def _accept_source(self) -> FrameReader:
        """Accept connections until one proves the migration's stream key (docs/stream-security.md): a
        stranger, a replayed recording or another migration's source is logged, closed, and the next
        connection accepted; the first that authenticates is the source, and the listener closes."""
        deadline = time.monotonic() + self.accept_timeout

        def late() -> str:
            refused = f" ({len(self.refused)} connections refused)" if self.refused else ""
            return f"no source proved this migration's stream key within {self.accept_timeout:g} s{refused}"

        while True:
            conn, addr, left = self._accept_before(deadline, late)
            peer = f"the peer at {addr[0]}:{addr[1]}"
            if self._key is None:  # the in-process benchmark's unprotected path (see source.Outgoing.start)
                return self._unprotected(tune_accepted(conn), peer)
            try:
                sock, timeout = tune_accepted(conn), min(HANDSHAKE_TIMEOUT, left)
                keys, hello = server_handshake(sock, self._main_key(peer), self.hello, timeout=timeout,
                                               peer=peer)  # fmt: skip
            except StreamAuthError as err:
                self.refused.append(err.message)
                self._log(f"target: refused a stream connection: {err.message}")
                conn.close()
                continue
            except BaseException:
                self._conn = conn  # the chosen source, misconfigured: it has been told; fail the stream
                raise
            self._conn = conn
            self._writer = keys.writer(conn)
            if hello.channels > 1:
                self._accept_channels(keys, hello.channels, max(HANDSHAKE_TIMEOUT, left))
            self.status.channels = hello.channels  # every one proved its key
            self.listener.close()  # one source per migration: nobody else may connect now
            return keys.reader(conn, f"the source at {addr[0]}:{addr[1]}")

    def _accept_before(self, deadline: float, late: Callable[[], str]) -> tuple[socket.socket, Any, float]:
        """The next connection and the seconds left, or ConfplanError(``late()``) once ``deadline`` passed."""
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ConfplanError(
                    late(), hint="check that the source VMM can reach this port, then rerun the apply"
                )
            self.listener.settimeout(left)
            try:
                conn, addr = self.listener.accept()
            except TimeoutError:
                continue
            return conn, addr, left

    def _main_key(self, peer: str) -> Callable[[Hello], bytes]:
        key = self._key
        assert key is not None

        def pick(hello: Hello) -> bytes:
            if hello.channel != 0:  # an extra channel before the main one: not this stream's order
                raise StreamAuthError(
                    f"{peer}'s HELLO is for channel {hello.channel}, this target waits for the main one",
                    failure=AuthFailure.PROTOCOL, hint="still listening for the chosen source",
                )
            return key

        return pick

    def _accept_channels(self, keys: SessionKeys, channels: int, within: float) -> None:
        """Wire v4: accept the source's extra channels 1..``channels``-1, each proving its channel key (a
        stranger, a channel of another attempt or a second copy of one is refused and the next one
        accepted), then start their receivers. Every channel has its own helpers."""
        helpers = len(self.mailboxes.mailboxes) if self.mailboxes is not None else 0
        if self.mailboxes is None or channels > helpers:
            raise ConfplanError(
                f"the source opens {channels} stream channels, this target has {helpers} helper vCPUs: one "
                "channel per helper vCPU at most",
                hint="give the source and the target the same helper.aux_vcpus",
            )
        shares = share_mailboxes(self.mailboxes, channels)
        self._helpers = shares[0]
        deadline = time.monotonic() + within
        opened: dict[int, tuple[socket.socket, FrameReader]] = {}
        while len(opened) < channels - 1:
            conn, addr, left = self._accept_before(
                deadline, lambda: f"the source opened {len(opened) + 1} of its {channels} stream channels "
                f"within {within:g} s",
            )  # fmt: skip
            peer = f"the peer at {addr[0]}:{addr[1]}"
            key_for = awaited_channel_key(keys, channels, set(opened), peer)
            try:
                sock = tune_accepted(conn)
                timeout = min(HANDSHAKE_TIMEOUT, left)
                chan, hello = server_handshake(sock, key_for, self.hello, timeout=timeout, peer=peer)
            except StreamAuthError as err:
                self.refused.append(err.message)
                self._log(f"target: refused a stream channel: {err.message}")
                conn.close()
                continue
            except BaseException:
                conn.close()
                raise
            source = f"the source at {addr[0]}:{addr[1]} (channel {hello.channel})"
            opened[hello.channel] = (conn, chan.reader(conn, source))
        self._channels = ChannelSet([
            ChannelReceiver(c, conn, reader, shares[c], banks=BANKS, ram_size=self.machine.ram.top,
                            on_fail=self._channel_failed)
            for c, (conn, reader) in sorted(opened.items())
        ])  # fmt: skip

    def _channel_failed(self) -> None:
        """A channel failed: end the main channel's read (its error is the channel's, see ``_main``)."""
        conn = self._conn
        if conn is not None:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RD)

    def _unprotected(self, conn: socket.socket, peer: str) -> FrameReader:
        self._conn, self._writer = conn, FrameWriter(conn)
        self.listener.close()
        reader = FrameReader(conn, peer)
        _, hello = decode(reader.recv().data)
        if not isinstance(hello, Hello):
            raise ConfplanError(f"{peer}'s stream does not start with HELLO")
        hello.require_match(self.hello)
        if hello.channels != 1:
            raise ConfplanError(f"{peer} opens {hello.channels} channels: an unprotected stream has one")
        self.status.channels = 1
        return reader

    def _tell_source(self, message: str) -> None:
        """Send an ERROR frame, then stop reading: the source sees it before its next frame and stops."""
        conn = self._conn
        if conn is None:
            return
        with contextlib.suppress(OSError, ConfplanError):
            if self._writer is not None:
                with self._send_lock:
                    self._writer.send_control(ErrorReport(2, message))
        if self._channels is not None:  # after the ERROR: a source that sees a channel close reads it
            self._channels.close()
        with contextlib.suppress(OSError):
            conn.shutdown(socket.SHUT_WR)
            conn.settimeout(DRAIN_SECONDS)
            while conn.recv(1 << 16):  # discard what was in flight until the source hangs up
                pass
        conn.close()

    def _receive(self, reader: FrameReader) -> None:
        # HELLO was the handshake's (migration id and geometry checked there): page frames follow
        while not self._apply(self._next_of(reader)):
            pass

    def _next_of(self, reader: FrameReader) -> Frame:
        if self._final_round:
            return self._after_final(reader)
        return self.pages.receive(reader, self._conn, self._helpers or self.mailboxes)

    def _after_final(self, reader: FrameReader) -> Frame:
        """A frame after the final round: the state, manifests, DONE. Verify may have started on the
        pages (``HandoverHooks.pages_complete``), so a page frame here is refused, never applied."""
        frame = reader.recv()
        self.status.bytes_received += len(frame.data)
        if frame.header.type in (FrameType.SHARED_PAGES, FrameType.SEALED_PAGES):
            raise ConfplanError(
                f"the source sent a page frame ({frame.header.type.name}) after its final round",
                hint="the source and target run different confplan versions, or the source is broken",
            )
        return frame

    def _apply(self, frame: Frame) -> bool:
        """Apply one frame that is not page data (every LOAD before it is done); True at DONE."""
        _, msg = decode(frame.data)
        if isinstance(msg, RoundEnd):
            self._channel_rounds(msg)
            self.status.rounds += 1
            if msg.final:
                self._final_round = True
                self.marks["final_round"] = time.time()
        elif isinstance(msg, VcpuState):
            self.marks.setdefault("state", time.time())
            self.status.state_parts.append(msg.blob)
            if msg.format_version == VCPU_SEALED_FORMAT:
                self.status.sealed_vcpus[msg.vcpu] = msg.blob  # opened by the helper, never here
            else:
                self.status.vcpus[msg.vcpu] = vcpu_from_blob(msg.vcpu, msg.format_version, msg.blob)
            self._states_arrived()
        elif isinstance(msg, DeviceState):
            self._device(msg)
            self.status.state_parts.append(msg.blob)
        elif isinstance(msg, Manifest):
            self.status.manifests[msg.format_version] = msg
            self.marks[f"manifest_{msg.format_version}"] = time.time()
        elif isinstance(msg, Done):
            self.marks["done"] = time.time()
            self._check_done(msg)
            return True
        elif isinstance(msg, ErrorReport):
            raise ConfplanError(f"the source gave up: {msg.message}")
        return False

    def _states_arrived(self) -> None:
        """Tell the hooks once every vCPU has its state, if that is after the final round (a copy of the
        sealed ones: a later frame must not change what they open)."""
        have = self.status.vcpus.keys() | self.status.sealed_vcpus.keys()
        if self._final_round and not self._states_told and all(r.index in have for r in self.machine.vcpus):
            self._states_told = True
            self.marks["states"] = time.time()
            self.hooks.states_complete(dict(self.status.sealed_vcpus))

    def _channel_rounds(self, main: RoundEnd) -> None:
        """Wire v4: the round is whole once every extra channel has LOADed its part; then they may go on."""
        if self._channels is None:
            return
        for part in self._channels.collect(main):
            self.status.bytes_received += part.nbytes
            self.status.sealed_pages += len(part.gpas)
            self.pages.track(part.gpas)
        if not main.final:
            self._channels.next_round()

    def _device(self, msg: DeviceState) -> None:
        if msg.name == KVM_CLOCK_DEVICE:
            self._clock(msg)
            return
        if msg.name != ENC_BITMAP_DEVICE:
            raise ConfplanError(f"DEVICE_STATE for device {msg.name!r}: this VMM has no such device")
        want = self.machine.enc_bitmap.bitmap.nbytes
        if msg.format_version != ENC_BITMAP_FORMAT or len(msg.blob) != want:
            raise ConfplanError(
                f"the encryption bitmap is format {msg.format_version}, {len(msg.blob)} bytes; "
                f"expected format {ENC_BITMAP_FORMAT}, {want} bytes"
            )
        if self.status.enc_bitmap is not None:  # verify may already work from the first one
            raise ConfplanError("the source sent a second encryption bitmap")
        self.status.enc_bitmap = msg.blob
        self.marks["bitmap"] = time.time()
        if self._final_round:
            self.hooks.pages_complete(msg.blob)

    def _clock(self, msg: DeviceState) -> None:
        if msg.format_version != KVM_CLOCK_FORMAT:
            raise ConfplanError(
                f"the kvm-clock state is format {msg.format_version}; "
                f"this VMM reads format {KVM_CLOCK_FORMAT}",
                hint="run the same confplan version on the source and the target",
            )
        try:
            self.status.clock = clock_from_blob(msg.blob)
        except ValueError as err:
            raise ConfplanError(f"the kvm-clock state does not decode: {err}") from None

    def _check_done(self, done: Done) -> None:
        got = (self.status.rounds, self.status.shared_pages, self.status.sealed_pages)
        want = (done.rounds, done.shared_pages, done.sealed_pages)
        if got != want or self.status.enc_bitmap is None:
            raise ConfplanError(
                f"the stream ended with totals rounds/shared/sealed {want}, but {got} arrived"
                + ("" if self.status.enc_bitmap is not None else " and no encryption bitmap"),
                hint="frames were lost: rerun the migration",
            )
        have = self.status.vcpus.keys() | self.status.sealed_vcpus.keys()
        missing = [r.index for r in self.machine.vcpus if r.index not in have]
        if missing:
            raise ConfplanError(f"the stream ended without the state of vCPUs {missing}")
        # Installed now, while the guest's vCPUs are still parked: verify reads which pages are shared.
        apply_enc_bitmap(self.machine, self.status.enc_bitmap)


def apply_clock(machine: Machine, status: IncomingStatus, now_wall: float, *, offset_ns: int = 0) -> None:
    """The guest's time, once its vCPUs are restored and before it runs: the source's kvm-clock moved on
    by the pause (nothing when the source sent none), and the workload's largest gap forgotten, so the next
    one it measures is the pause. ``offset_ns`` is for tests only (a clock set wrong)."""
    if status.clock is not None:
        machine.restore_clock(status.clock, now_wall, offset_ns=offset_ns)
    machine.workload.reset_gap()


def apply_enc_bitmap(machine: Machine, blob: bytes) -> None:
    """Install the source's encryption bitmap (which pages are shared) before the guest runs here."""
    view = machine.enc_bitmap.bitmap.view()
    view[: len(blob)] = blob
