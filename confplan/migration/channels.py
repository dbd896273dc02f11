"""Parallel streams (wire v4): a migration stream's extra TCP channels, like QEMU's multifd channels.

A stream of N channels has N connections. Channel 0 is the main one and carries everything it carried
before; channels 1..N-1 carry only SEALED_PAGES frames and one ROUND_END per round, for their own helpers:
channel c's helpers are every N-th MH vCPU from c, on both sides, so the core's data loops of the N
channels run at once (each in its own thread, the GIL released) with no helper shared. The source dials
the extra channels right after the main handshake; each proves the channel key that only the two ends of
this main session can derive (``SessionKeys.channel_key``) in a handshake of its own, so each channel has
its own frame keys and sequence numbers. The target opens a round's pages of a channel only after the
main channel's previous ROUND_END was applied, and applies a ROUND_END only once every channel delivered
its own. Design, ordering and failures: docs/wire.md, "Channels", and docs/stream-security.md.
"""

from __future__ import annotations

import array
import contextlib
import dataclasses
import queue
import socket
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from confplan.core import zeroed
from confplan.core.datapath import DataLoop, Stop
from confplan.core.stream import FrameReader, FrameWriter
from confplan.core.streamauth import AuthFailure, SessionKeys, StreamAuthError, client_handshake
from confplan.core.wire import FrameType, Hello, RoundEnd, decode
from confplan.errors import ConfplanError
from confplan.migration.mailbox_layout import PAGE_SIZE, Op
from confplan.migration.mailbox_set import MailboxSet
from confplan.migration.sealed_path import SealedPath, socket_error

T = TypeVar("T")


def share_mailboxes(mailboxes: MailboxSet, channels: int) -> list[MailboxSet]:
    """Each channel's helpers: every ``channels``-th mailbox, channel c's from the c-th."""
    if not 1 <= channels <= len(mailboxes.mailboxes):
        raise ValueError(f"{channels} channels for {len(mailboxes.mailboxes)} helper vCPUs")
    return [MailboxSet(mailboxes.mailboxes[c::channels]) for c in range(channels)]


def share_gpas(gpas: array.array[int], weights: Sequence[int]) -> list[array.array[int]]:
    """``gpas`` cut into consecutive parts in proportion to ``weights`` (each channel's helper count)."""
    total, parts, start, acc = sum(weights), [], 0, 0
    for weight in weights:
        acc += weight
        end = len(gpas) * acc // total
        parts.append(gpas[start:end])
        start = end
    return parts


def run_parallel(jobs: Sequence[Callable[[], T]]) -> list[T | BaseException]:
    """Run ``jobs[0]`` here and the others in threads of their own, all at once; each one's result or the
    exception it raised, in order, once all have ended."""
    results: list[T | BaseException] = [ConfplanError("not run")] * len(jobs)

    def run(i: int) -> None:
        try:
            results[i] = jobs[i]()
        except BaseException as err:  # handed back: the caller picks which error to raise
            results[i] = err

    threads = [threading.Thread(target=run, args=(i,), name=f"channel-{i}", daemon=True)
               for i in range(1, len(jobs))]  # fmt: skip
    for thread in threads:
        thread.start()
    run(0)
    for thread in threads:
        thread.join()
    return results


# ---- source ----
@dataclass
class SendChannel:
    """One extra channel of the source: its connection and its writer (its own keys and sequence)."""

    index: int
    sock: socket.socket
    writer: FrameWriter


def dial_channels(
    dial: Callable[[], socket.socket], keys: SessionKeys, hello: Hello, channels: int, *, peer: str,
    timeout: float | None,
) -> list[SendChannel]:  # fmt: skip
    """Dial channels 1..``channels``-1 and run each one's handshake under its channel key; all or none."""
    opened: list[SendChannel] = []
    try:
        for c in range(1, channels):
            sock = dial()
            try:
                mine = dataclasses.replace(hello, channels=channels, channel=c)
                chan = client_handshake(sock, keys.channel_key(c), mine, peer=f"{peer} (channel {c})")
            except BaseException:
                sock.close()
                raise
            sock.settimeout(timeout)
            opened.append(SendChannel(c, sock, chan.writer(sock)))
    except BaseException:
        close_all(ch.sock for ch in opened)
        raise
    return opened


def close_all(socks: Iterable[socket.socket]) -> None:
    for sock in socks:
        with contextlib.suppress(OSError):
            sock.close()


# ---- target ----
def awaited_channel_key(
    keys: SessionKeys, channels: int, opened: set[int], peer: str
) -> Callable[[Hello], bytes]:
    """The key an extra channel's HELLO must prove: its channel key, for a channel still to open."""

    def pick(hello: Hello) -> bytes:
        if hello.channels != channels or hello.channel == 0 or hello.channel in opened:
            raise StreamAuthError(
                f"{peer}'s HELLO is for channel {hello.channel} of {hello.channels}: not a channel this "
                "stream still waits for", failure=AuthFailure.PROTOCOL,
                hint="still listening for the source's channels",
            )  # fmt: skip
        return keys.channel_key(hello.channel)

    return pick


@dataclass(frozen=True)
class ChannelRound:
    """What one extra channel delivered for a round: its ROUND_END, and the pages it LOADed."""

    channel: int
    round_end: RoundEnd
    nbytes: int
    gpas: array.array[int]


class ChannelReceiver:
    """One extra channel of the target: a thread receives a round's sealed frames into the channel's helpers
    (the core's loop), reads the channel's ROUND_END and hands the round to the main thread (``take``), then
    waits for ``release`` before the next round: a page the next round seals must not be opened before
    this round's shared frames on the main channel are applied. Its first failure is ``error``; then it
    calls ``on_fail`` (which wakes the main thread) and ends."""

    def __init__(
        self, index: int, conn: socket.socket, reader: FrameReader, mailboxes: MailboxSet, *, banks: int,
        ram_size: int, on_fail: Callable[[], None],
    ) -> None:  # fmt: skip
        self.index, self.conn, self.reader = index, conn, reader
        self._ram_size, self._on_fail = ram_size, on_fail
        self._stop = threading.Event()
        self._path = SealedPath(mailboxes, banks, sibling=self._stop)
        self._gpas = zeroed("Q", ram_size // PAGE_SIZE)
        self._go = threading.Semaphore(1)  # the first round may start at once
        self._rounds: queue.Queue[ChannelRound | None] = queue.Queue()
        self.error: ConfplanError | None = None
        self._thread = threading.Thread(target=self._run, name=f"incoming-channel-{index}", daemon=True)
        self._thread.start()

    def take(self) -> ChannelRound | None:
        """The channel's next round, once it has been LOADed whole; None when the channel failed."""
        return self._rounds.get()

    def release(self) -> None:
        """The main thread applied the round: the channel may open the next one's pages."""
        self._go.release()

    def close(self) -> None:
        self._stop.set()
        self._go.release()
        with contextlib.suppress(OSError):
            self.conn.shutdown(socket.SHUT_RDWR)  # the core's loop works on the fd: it ends here
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=10.0)
        close_all([self.conn])

    def _run(self) -> None:
        try:
            while True:
                self._go.acquire()
                if self._stop.is_set():
                    return
                got = self._round()
                self._rounds.put(got)
                if got.round_end.final:
                    return
        except BaseException as err:
            message = err.message if isinstance(err, ConfplanError) else f"{type(err).__name__}: {err}"
            if not self._stop.is_set():  # not a failure when the main thread closed the channel
                self.error = ConfplanError(
                    f"channel {self.index} of the migration stream failed: {message}",
                    hint="the source guest keeps running; see both VMMs' logs, then rerun the apply",
                )
            self._rounds.put(None)
            self._on_fail()

    def _round(self) -> ChannelRound:
        path, reader, conn = self._path, self.reader, self.conn
        key = reader.key
        loop = DataLoop(
            conn.fileno(), path.loop_mailboxes, key=key.for_core() if key is not None else None,
            seq=reader.seq, op_timeout=path.op_timeout, io_timeout=conn.gettimeout(), poke=path.poke,
            ram_size=self._ram_size,
        )  # fmt: skip
        result = loop.receive(self._gpas)
        reader.seq = result.seq
        if result.stop is Stop.SOCKET and not result.sys_errno:
            raise ConfplanError(f"{reader.peer} closed the channel while a frame was expected: truncated")
        if result.stop in (Stop.SOCKET, Stop.TIMEOUT):
            raise socket_error(result)
        if result.stop is Stop.CANCELLED:
            raise ConfplanError("closed by the main channel")
        path.raise_for(result, Op.LOAD, frame_what=f"SEALED_PAGES frame {result.seq} refused")
        reader.push_header(result.next_header)
        frame = reader.recv()  # checks the header, the sequence and the tag
        kind = frame.header.type
        if kind is FrameType.SEALED_PAGES:  # checked and authentic, but the loop would not take it
            raise ConfplanError(
                f"SEALED_PAGES frame {frame.header.seq} holds more records than a LOAD bank of this channel",
                hint="give both sides the same helper batch_pages",
            )
        msg = decode(frame.data)[1] if kind is FrameType.ROUND_END else None
        if not isinstance(msg, RoundEnd):
            raise ConfplanError(f"a {kind.name} frame: a channel carries only sealed pages and ROUND_END")
        if (msg.shared_pages, msg.zero_pages, msg.sealed_pages) != (0, 0, result.pages):
            raise ConfplanError(
                f"ROUND_END of round {msg.round} says {msg.sealed_pages} sealed pages (and "
                f"{msg.shared_pages} shared), {result.pages} arrived"
            )
        return ChannelRound(self.index, msg, result.nbytes + len(frame.data), self._gpas[: result.pages])


class ChannelSet:
    """The target's extra channels: the main thread collects a round from each at its ROUND_END."""

    def __init__(self, receivers: Sequence[ChannelReceiver]) -> None:
        self.receivers = list(receivers)

    @property
    def error(self) -> ConfplanError | None:
        return next((r.error for r in self.receivers if r.error is not None), None)

    def collect(self, main: RoundEnd) -> list[ChannelRound]:
        """Every channel's part of the round ``main`` ends (all LOADed); raises the first channel's failure,
        or a channel's ROUND_END that is not this round's."""
        got: list[ChannelRound] = []
        for receiver in self.receivers:
            part = receiver.take()
            if part is None:
                raise self.error or ConfplanError(f"channel {receiver.index} of the migration stream failed")
            if (part.round_end.round, part.round_end.final) != (main.round, main.final):
                raise ConfplanError(
                    f"channel {part.channel} ended round {part.round_end.round} (final "
                    f"{part.round_end.final}) where the main channel ended round {main.round} (final "
                    f"{main.final})",
                    hint="frames were lost or spliced between channels: rerun the migration",
                )
            got.append(part)
        return got

    def next_round(self) -> None:
        for receiver in self.receivers:
            receiver.release()

    def close(self) -> None:
        for receiver in self.receivers:
            receiver.close()
