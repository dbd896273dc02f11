"""Start a local child that serves the control channel on an inherited socket, and connect to it.

The child gets one end of a socketpair as an inherited fd (``--control-fd N`` is appended to its argv);
no listening socket, no port, no path to clean up. Its stderr is read by a thread that keeps the last
lines, so when it dies the error says how (exit code, signal) and what it said last.
"""

from __future__ import annotations

import collections
import signal
import socket
import subprocess
import threading
from collections.abc import Sequence
from typing import IO, Any

from confplan.rpc.client import DEFAULT_TIMEOUT, EventHandler, RpcClient, greeted
from confplan.rpc.protocol import PeerGone

TAIL_LINES = 20


class _StderrTail:
    """Drains a child's stderr (so it never blocks on a full pipe), keeping the last lines."""

    def __init__(self, stream: IO[bytes]) -> None:
        self.lines: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        self._thread = threading.Thread(target=self._drain, args=(stream,), daemon=True)
        self._thread.start()

    def _drain(self, stream: IO[bytes]) -> None:
        with stream:
            for raw in stream:
                self.lines.append(raw.decode(errors="replace").rstrip())

    def last(self, wait: float) -> str | None:
        self._thread.join(wait)  # the child has exited: let the last lines arrive
        return next((line for line in reversed(self.lines) if line.strip()), None)


class ChildProcess:
    """A spawned peer: the process, its stderr tail, and how to describe its end."""

    def __init__(self, process: subprocess.Popen[bytes], tail: _StderrTail) -> None:
        self.process = process
        self.tail = tail

    @property
    def pid(self) -> int:
        return self.process.pid

    def describe_exit(self) -> str:
        try:
            code = self.process.wait(timeout=2.0)
        except subprocess.TimeoutExpired:
            return "closed the connection but is still running"
        how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
        last = self.tail.last(1.0)
        return f"{how}: {last}" if last else how

    def stop(self, timeout: float = 5.0) -> int:
        """Wait for the child to exit (it should, on end of stream); terminate, then kill, if it does not."""
        for action in (None, self.process.terminate, self.process.kill):
            if action is not None:
                action()
            try:
                return self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                continue
        return self.process.wait()


class ChildClient(RpcClient):
    """An RpcClient whose peer is a child process; ``close`` also reaps the child."""

    def __init__(self, sock: socket.socket, child: ChildProcess, **options: Any) -> None:
        self.child = child
        super().__init__(sock, describe_gone=child.describe_exit, **options)

    def close(self) -> None:
        super().close()
        self.child.stop()

    @property
    def returncode(self) -> int | None:
        return self.child.process.returncode


def spawn_child(
    argv: Sequence[str],
    *,
    peer: str = "the VMM process",
    fd_option: str = "--control-fd",
    timeout: float = DEFAULT_TIMEOUT,
    on_event: EventHandler | None = None,
    env: dict[str, str] | None = None,
) -> ChildClient:
    """Start ``argv`` + [fd_option, N] with the socket's other end as fd N, say hello, return the client."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    command = [*argv, fd_option, str(theirs.fileno())]
    try:
        process = subprocess.Popen(
            command,
            pass_fds=(theirs.fileno(),),
            stdin=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=env,
        )
    except OSError as err:
        ours.close()
        raise PeerGone(
            f"cannot start {peer} ({command[0]}): {err.strerror or err}",
            hint="check that confplan is installed in this Python environment",
        ) from None
    finally:
        theirs.close()  # the child holds its own copy; ours would keep the stream open after it dies
    assert process.stderr is not None
    child = ChildProcess(process, _StderrTail(process.stderr))
    return greeted(ChildClient(ours, child, peer=peer, on_event=on_event), timeout)
