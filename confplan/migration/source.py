"""The source engine: sends a running guest's memory, then its vCPU and device state, on one TCP stream.

Per round: take the pending dirty set, split it with the core into shared and private GPAs (the
encryption bitmap decides), frame the shared pages straight from guest RAM (C gather), have the MH seal
the private ones in mailbox batches spread over its vCPUs and frame its records, end the round. Python
handles batches, never single pages. The stream itself is ``confplan.core.stream.FrameWriter``.
"""

from __future__ import annotations

import array
import contextlib
import dataclasses
import os
import select
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from confplan.core import HostMemory, frame_shared_pages, scan_dirty
from confplan.core.datapath import DataLoop, LoopResult, Stop
from confplan.core.pages import FrameInfo
from confplan.core.stream import FrameReader, FrameWriter
from confplan.core.streamauth import client_handshake
from confplan.core.wire import (
    NONCE_SIZE,
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
    shared_frame_capacity,
)
from confplan.errors import ConfplanError
from confplan.migration.channels import (
    SendChannel,
    close_all,
    dial_channels,
    run_parallel,
    share_gpas,
    share_mailboxes,
)
from confplan.migration.dirty import DirtyTracker, concat_gpas
from confplan.migration.helper import require_helper
from confplan.migration.mailbox_layout import Op
from confplan.migration.mailbox_set import MailboxSet
from confplan.migration.precopy import RoundStats
from confplan.migration.sealed_path import SealedPath, socket_error
from confplan.migration.session import (
    ENC_BITMAP_DEVICE,
    ENC_BITMAP_FORMAT,
    KVM_CLOCK_DEVICE,
    KVM_CLOCK_FORMAT,
    VCPU_FORMAT,
    VCPU_SEALED_FORMAT,
    vcpu_blob,
)
from confplan.vmm import Machine, abi
from confplan.vmm.clock import clock_blob

BANKS = 4  # slot banks per mailbox: the MH seals one while the VMM frames and sends another
# Shared pages per frame: 1 MiB frames cost no more per page than the wire's 2048-page maximum, and keep
# the frame buffer (and the target's receive buffer) 7 MiB smaller in each VMM process.
SHARED_FRAME_PAGES = 256
PAGE_SHIFT = abi.PAGE.bit_length() - 1


@dataclass
class Totals:
    rounds: int = 0
    shared_pages: int = 0
    sealed_pages: int = 0
    bytes_shared: int = 0
    bytes_sealed: int = 0
    held_back: int = 0  # shared pages left out of a frame: converted after the scan (sent the next round)


@dataclass
class RoundInFlight:
    """The round being sent, as another thread may read it (``Outgoing.round_progress``)."""

    round: int = 0
    pages: int = 0  # pages this round sends (shared and private)
    pages_sent: int = 0
    started: float = 0.0  # monotonic
    sent_before: int = 0  # stream bytes sent before the round began


class Outgoing:
    """One outgoing stream. ``generations`` hands out the round numbers the MH seals under; it outlives
    the stream (the source MH refuses a generation it already sealed a page under)."""

    def __init__(
        self, machine: Machine, sock: socket.socket, *, hello: Hello, stream_key: bytes | None,
        mailboxes: MailboxSet | None, tracker: DirtyTracker, next_generation: int,
        bandwidth: float | None = None, peer: str = "the target", progress_timeout: float | None = None,
        channels: int = 1, dial: Callable[[], socket.socket] | None = None,
    ) -> None:  # fmt: skip
        """``channels`` > 1 (wire v4, parallel streams): ``dial`` opens each extra connection to the
        target; channel c's pages are sealed by every ``channels``-th helper vCPU from c."""
        if channels > 1 and (dial is None or stream_key is None):
            raise ValueError("parallel streams need a dial function and a stream key")
        helpers = len(mailboxes.mailboxes) if mailboxes is not None else 0
        if channels > max(1, helpers):
            raise ConfplanError(
                f"{channels} stream channels but {helpers} helper vCPUs on the source: one channel per "
                "helper vCPU at most", hint="lower the channels, or raise helper.aux_vcpus",
            )  # fmt: skip
        self.machine, self.sock, self.hello, self.peer = machine, sock, hello, peer
        self.hello = dataclasses.replace(hello, channels=channels, channel=0)
        self._dial = dial
        self.channels: list[SendChannel] = []  # the extra channels, after start()
        self.mailboxes, self.tracker, self.bandwidth = mailboxes, tracker, bandwidth
        self.generation = next_generation
        self.totals = Totals()
        self._key = stream_key
        self.progress_timeout = progress_timeout  # a send that makes no progress this long fails the stream
        self.writer: FrameWriter | None = None  # after the handshake (``start``)
        self._reader: FrameReader | None = None
        self.ram = HostMemory(machine.ram.address, machine.ram.top)
        self._shared_buf = bytearray(shared_frame_capacity(SHARED_FRAME_PAGES))
        self._started = time.monotonic()
        self._sent = 0
        self._changed: list[array.array[int]] = []  # GPAs sent since take_changed_gpas(), per round and kind
        self._shared_sent: list[array.array[int]] = []  # shared pages sent since take_shared_gpas()
        # The round in flight, as ``round_progress`` reads it from another thread (per frame, never per page)
        self._round = RoundInFlight()
        self._cancel = threading.Event()  # set by cancel_round(): the precopy round stops at the next frame
        self._cancellable = False  # a precopy round is in flight (the pause's final round never is)
        self._loops: list[DataLoop] = []  # the core's data loops while they send a round's sealed pages

    # ---- the stream ----
    def _writer(self) -> FrameWriter:
        if self.writer is None:
            raise ConfplanError("the migration stream is not open yet", hint="call start() first")
        return self.writer

    def _send(self, frame: memoryview | bytearray) -> None:
        if self._cancel.is_set():
            raise self._cancelled()
        self._check_peer()
        try:
            self._writer().send(frame)
        except OSError as err:
            raise self._stream_broken(err) from None
        self._sent += len(frame)
        self._pace()

    @staticmethod
    def _cancelled() -> ConfplanError:
        return ConfplanError(
            "the precopy round was cancelled by the orchestrator (Ctrl-C)",
            hint="the source guest keeps running; rerun the apply to migrate again",
        )

    def _pace(self) -> None:
        """Keep to the plan's bandwidth cap: sleep off whatever was sent ahead of it."""
        if self.bandwidth:
            ahead = self._sent / self.bandwidth - (time.monotonic() - self._started)
            if ahead > 0:
                self._cancel.wait(ahead)  # a cancel ends the wait: the next frame sees it

    def _stream_broken(self, err: OSError) -> ConfplanError:
        if isinstance(err, TimeoutError):
            return ConfplanError(
                f"the migration stream to {self.peer} made no progress for {self.sock.gettimeout()} s "
                "(nothing was acknowledged): the network or the target stalled",
                hint="the source guest keeps running; check the path to the target, then rerun the apply "
                "(limits.progress_timeout sets how long a stall may last)",
            )
        reason = self._peer_error()
        detail = f": {reason}" if reason else f" ({err.strerror or err})"
        return ConfplanError(
            f"the migration stream to {self.peer} broke{detail}",
            hint="the source guest keeps running; see the target VMM's log, then rerun the apply",
        )

    def _check_peer(self, wait: float = 0.0) -> None:
        """The target only ever writes to the stream to refuse it: stop at once when it has (``wait``: an
        extra channel failed, and the target's ERROR on the main one may still be on its way)."""
        readable, _, _ = select.select([self.sock], [], [], wait)
        if readable:
            reason = self._peer_error() or "it closed the stream"
            raise ConfplanError(
                f"{self.peer} refused the migration stream: {reason}",
                hint="the source guest keeps running; rerun the apply to migrate again",
            )

    def _peer_error(self) -> str | None:
        """The ERROR frame the target sent before it hung up (protected: only the target can write one),
        if there is one."""
        if self._reader is None:
            return None
        saved = self.sock.gettimeout()
        try:
            self.sock.settimeout(2.0)
            frame = self._reader.recv()
            if frame.header.type is FrameType.ERROR:
                return ErrorReport.unpack(bytes(frame.data[32 : 32 + frame.header.payload_len])).message
        except (OSError, ConfplanError):
            return None
        finally:
            with contextlib.suppress(OSError):
                self.sock.settimeout(saved)
        return None

    def _control(self, msg: Any) -> None:
        try:
            self._writer().send_control(msg)
        except OSError as err:
            raise self._stream_broken(err) from None

    def start(self) -> None:
        """The wire v2 handshake: HELLO, the target's proof of the stream key, AUTH (docs/stream-security.md);
        from here every frame is protected under this session's keys. Without a key (``None``: only the
        in-process benchmark of what protection costs, never a VMM) HELLO, then unprotected frames."""
        if self._key is None:
            self.writer, self._reader = FrameWriter(self.sock), FrameReader(self.sock, self.peer)
            self._control(dataclasses.replace(self.hello, nonce=os.urandom(NONCE_SIZE)))
            return
        keys = client_handshake(self.sock, self._key, self.hello, peer=self.peer)
        self.writer, self._reader = keys.writer(self.sock), keys.reader(self.sock, self.peer)
        self.sock.settimeout(self.progress_timeout)
        if self.hello.channels > 1 and self._dial is not None:
            self.channels = dial_channels(
                self._dial, keys, self.hello, self.hello.channels, peer=self.peer,
                timeout=self.progress_timeout,
            )  # fmt: skip

    def bound_sends(self, seconds: float | None) -> None:
        """From now on a send that makes no progress for ``seconds`` fails (the pause's deadline)."""
        for sock in (self.sock, *(ch.sock for ch in self.channels)):
            sock.settimeout(seconds)

    # ---- rounds ----
    def send_round(self, *, final: bool = False) -> RoundStats:
        """Send every pending page; for the final round the guest's vCPUs must already be paused. Only a
        precopy round (not ``final``) can be cut short by ``cancel_round``."""
        self._cancel.clear()
        self._cancellable = not final
        try:
            return self._send_round(final)
        finally:
            self._cancellable = False

    def _send_round(self, final: bool) -> RoundStats:
        started, sent_before = time.monotonic(), self._sent
        shared_before, sealed_before = self.totals.bytes_shared, self.totals.bytes_sealed
        # Taken before anything is sealed: a round that fails half way has used its generation up.
        generation, self.generation = self.generation, self.generation + 1
        dirty = self.tracker.take()
        scanned = self.tracker.generation  # the kinds are read after this: conversions since are checked
        shared, private = scan_dirty(dirty, self.tracker.shared_bitmap(), self.tracker.npages)
        self._round = RoundInFlight(generation, len(shared) + len(private), 0, started, sent_before)
        self._changed += (shared, private)  # kept as scanned: taking them is a concatenation, no rescan
        self.tracker.rearm_pages(shared)  # just before they are read (the data loops re-arm their own)
        shared, zero = self._send_shared(shared, scanned)
        if len(shared):
            self._shared_sent.append(shared)
        lanes = len(self.channels) + 1
        per_channel = self._send_private(private, generation) if len(private) else [0] * lanes
        for channel, pages in zip(self.channels, per_channel[1:], strict=True):
            self._channel_control(channel, RoundEnd(generation, 0, 0, pages, final=final))
        self._control(RoundEnd(generation, len(shared), zero, len(private), final=final))
        if final:  # a channel's last frame is its final ROUND_END
            close_all(ch.sock for ch in self.channels)
        self.totals.rounds += 1
        self.totals.shared_pages += len(shared)
        self.totals.sealed_pages += len(private)
        dirty_after = 0 if final else self.tracker.collect()
        return RoundStats(
            generation, len(shared), zero, len(private), self._sent - sent_before,
            time.monotonic() - started, dirty_after, self.totals.bytes_shared - shared_before,
            self.totals.bytes_sealed - sealed_before,
        )  # fmt: skip

    def _send_shared(self, gpas: array.array[int], scanned: int) -> tuple[array.array[int], int]:
        """Frame and send the pages the scan found shared; (the GPAs sent, how many were zero pages)."""
        sent, zero = array.array("Q"), 0
        for first in range(0, len(gpas), SHARED_FRAME_PAGES):
            chunk = gpas[first : first + SHARED_FRAME_PAGES]
            framed = self._frame_shared(chunk, scanned)
            if framed is None:
                continue
            chunk, info = framed
            self._send(memoryview(self._shared_buf)[: info.frame_len])
            self._round.pages_sent += len(chunk)
            sent.extend(chunk)
            zero += info.zero_pages
            self.totals.bytes_shared += info.frame_len
        return sent, zero

    def _frame_shared(
        self, chunk: array.array[int], scanned: int
    ) -> tuple[array.array[int], FrameInfo] | None:
        """Frame ``chunk`` from guest RAM, leaving out every page converted since the scan read its kind.

        Such a page may already hold what the guest wrote as private (it converts, then writes), so the
        frame read after the conversion must not leave this host; it is in the next round's set (the
        conversion log) and goes then as its new kind. The check comes after the read: a conversion the
        read could have seen is logged by then (docs/migration.md, "Conversions while the guest runs")."""
        enc = self.machine.enc_bitmap
        while len(chunk):
            info = frame_shared_pages(
                self.ram, chunk, self._shared_buf, seq=self._writer().seq, ram_size=self.machine.ram.top
            )
            if enc.generation == scanned:
                return chunk, info
            converted = enc.converted_since(scanned)
            kept = array.array("Q", (gpa for gpa in chunk if gpa >> PAGE_SHIFT not in converted))
            if len(kept) == len(chunk):
                return chunk, info
            self.totals.held_back += len(chunk) - len(kept)
            chunk = kept
        return None

    def _send_private(self, gpas: array.array[int], generation: int) -> list[int]:
        """The core's data loops, one per channel at once (GIL released): the MHs seal bank after bank while
        each done bank is sent from their slots (docs/migration.md, "Session 5"). The pages each channel
        sent."""
        mailboxes = require_helper(self.mailboxes, "source", len(gpas))
        lanes = [(self.sock, self._writer())] + [(ch.sock, ch.writer) for ch in self.channels]
        helpers = share_mailboxes(mailboxes, len(lanes))
        parts = share_gpas(gpas, [len(h.mailboxes) for h in helpers])
        sibling = threading.Event()  # a channel failed: the others stop at their next look
        paths = [SealedPath(h, BANKS, cancel=self._cancel, sibling=sibling) for h in helpers]
        loops = [
            DataLoop(
                sock.fileno(), path.loop_mailboxes, key=w.key.for_core() if w.key is not None else None,
                seq=w.seq, op_timeout=path.op_timeout, io_timeout=sock.gettimeout(), poke=path.poke,
                ram_size=self.machine.ram.top, rearm=self.tracker.rearm(),
            )
            for (sock, w), path in zip(lanes, paths, strict=True)
        ]
        share = len(lanes)  # the plan's cap is shared evenly between the channels

        def job(loop: DataLoop, part: array.array[int]) -> Callable[[], LoopResult]:
            def run() -> LoopResult:
                result = loop.send(
                    part, generation=generation, bandwidth=(self.bandwidth or 0.0) / share,
                    pace_t0=self._started, pace_sent=self._sent // share,
                )  # fmt: skip
                if result.stop is not Stop.DONE:
                    sibling.set()
                return result

            return run

        self._loops = loops
        try:
            results = run_parallel([job(loop, part) for loop, part in zip(loops, parts, strict=True)])
        finally:
            self._loops = []
        done: list[LoopResult] = []
        for (_, writer), result in zip(lanes, results, strict=True):
            if isinstance(result, BaseException):
                raise result
            writer.seq = result.seq
            self._sent += result.nbytes
            self._round.pages_sent += result.pages
            self.totals.bytes_sealed += result.nbytes
            done.append(result)
        self._raise_first_stop(paths, done)
        return [r.pages for r in done]

    def _raise_first_stop(self, paths: list[SealedPath], results: list[LoopResult]) -> None:
        """A channel's own failure rather than the stop it caused in the others (CANCELLED by a sibling)."""
        pairs = enumerate(zip(paths, results, strict=True))
        own = [(c, p, r) for c, (p, r) in pairs if r.stop is not Stop.DONE]
        if not own:
            return
        first = next(((c, p, r) for c, p, r in own if r.stop is not Stop.CANCELLED), own[0])
        self._raise_for_stop(*first)

    def _raise_for_stop(self, channel: int, path: SealedPath, result: LoopResult) -> None:
        if result.stop is Stop.PEER:
            self._check_peer(wait=2.0 if channel else 0.0)  # raises with the target's ERROR message
            closed = ConnectionResetError(0, "the target closed it")
            raise self._channel_broken(channel, closed) if channel else self._stream_broken(closed)
        if result.stop is Stop.CANCELLED:
            raise self._cancelled()
        if result.stop in (Stop.SOCKET, Stop.TIMEOUT):
            err = socket_error(result)
            raise self._channel_broken(channel, err) if channel else self._stream_broken(err)
        path.raise_for(result, Op.SAVE, frame_what=f"framing sealed pages (frame {result.seq})")

    def _channel_control(self, channel: SendChannel, msg: RoundEnd) -> None:
        try:
            channel.writer.send_control(msg)
        except OSError as err:
            raise self._channel_broken(channel.index, err) from None

    def _channel_broken(self, channel: int, err: OSError) -> ConfplanError:
        """An extra channel failed: the target's ERROR on the main channel says why, if it sent one."""
        self._check_peer(wait=2.0)
        return ConfplanError(
            f"channel {channel} of the migration stream to {self.peer} broke ({err.strerror or err})",
            hint="the source guest keeps running; see the target VMM's log, then rerun the apply",
        )

    def round_progress(self) -> dict[str, float | int]:
        """How far the round in flight is: its number, its pages, the pages and bytes sent so far, its
        seconds. Read from another thread while ``send_round`` runs (the counters move per frame)."""
        now, current, loops = time.monotonic(), self._round, self._loops
        pages, sent = sum(loop.pages for loop in loops), sum(loop.nbytes for loop in loops)
        return {"round": current.round, "pages": current.pages, "pages_sent": current.pages_sent + pages,
                "bytes_sent": self._sent + sent - current.sent_before,
                "seconds": now - current.started if current.started else 0.0}  # fmt: skip

    def cancel_round(self) -> bool:
        """Stop the precopy round in flight at its next frame (it fails, and so does the stream); the
        pause's final round is never cut short. True when a round was in flight."""
        if not self._cancellable:
            return False
        self._cancel.set()
        return True

    def take_shared_gpas(self) -> array.array[int]:
        """The pages sent as shared since the last call (duplicates possible): the ones whose MH MAC table
        entries no SAVE set (mailbox v4: SAVE stores each sealed page's tag, LOAD the same on the target)."""
        taken, self._shared_sent = self._shared_sent, []
        return concat_gpas(taken)

    def take_changed_gpas(self) -> array.array[int]:
        """The pages sent since the last call (every page the dirty log said changed), as GPAs in no set
        order, duplicates possible: each round's own scan, joined (no rescan of a RAM-sized bitmap)."""
        taken, self._changed = self._changed, []
        return concat_gpas(taken)

    # ---- the end ----
    def send_state(
        self, paused_wall: float, *, seal: Callable[[int, bytes], bytes] | None = None,
        manifest: Callable[[list[bytes]], list[Manifest]] | None = None,
        bitmap_sent: Callable[[], None] | None = None,
    ) -> None:  # fmt: skip
        """The encryption bitmap (then ``bitmap_sent`` is called: the target's table work starts with it, the
        source's may too), the guest's vCPU states (each sealed by the source helper with ``seal``:
        SEV-ES/SNP), the VM's kvm-clock, then the
        ``manifest`` frames made from the state blobs as sent (after the state is on its way, so the target
        applies it while this side seals), then DONE (the guest is paused)."""
        # The bitmap first (it is final once the guest paused): with it and the final round the target has
        # all its verify needs but the manifest, and starts while the vCPU states are read and sent.
        bitmap = bytes(self.machine.enc_bitmap.bitmap.view())
        self._control(DeviceState(ENC_BITMAP_DEVICE, ENC_BITMAP_FORMAT, bitmap))
        if bitmap_sent is not None:
            bitmap_sent()
        parts: list[bytes] = [bitmap]
        for state in self.machine.save_vcpu_states():
            blob = vcpu_blob(state, paused_wall)
            frame = VcpuState(state.vcpu_id, VCPU_FORMAT, blob) if seal is None else VcpuState(
                state.vcpu_id, VCPU_SEALED_FORMAT, seal(state.vcpu_id, blob))  # fmt: skip
            self._control(frame)
            parts.append(frame.blob)
        clock = clock_blob(self.machine.save_clock())
        self._control(DeviceState(KVM_CLOCK_DEVICE, KVM_CLOCK_FORMAT, clock))
        parts.append(clock)
        for made in manifest(parts) if manifest is not None else []:
            self._control(made)
        t = self.totals
        self._control(Done(t.rounds, t.shared_pages, t.sealed_pages))

    # ---- the handover (docs/handover.md) ----
    def send_handover(self, msg: Handover) -> None:
        try:
            self._writer().send_control(msg)
        except OSError as err:
            raise self._stream_broken(err) from None

    def read_handover(self, deliver: Callable[[Handover | ErrorReport], None]) -> str:
        """Read the target's handover messages (and an ERROR, if it gives up) until the stream ends;
        returns why it ended. Runs in a thread of its own once DONE is sent."""
        reader = self._reader
        if reader is None:
            return "the stream was never opened"
        try:
            self.sock.settimeout(None)
            while True:
                _, msg = decode(reader.recv().data)
                if isinstance(msg, Handover | ErrorReport):
                    deliver(msg)
        except (OSError, ConfplanError) as err:
            return err.message if isinstance(err, ConfplanError) else str(err)

    def abort(self, message: str) -> None:
        """Tell the target why the stream ends (best effort), then close it."""
        with contextlib.suppress(OSError, ConfplanError):
            self._writer().send_control(ErrorReport(1, message))
        close_all([self.sock, *(ch.sock for ch in self.channels)])
