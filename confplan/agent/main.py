"""Running a VMM process: serve the VMM service on a unix socket (``confplan vmm``, a local child of the
orchestrator) or on TCP (``confplan agent``, on a remote host), until a ``shutdown`` call.

A local VMM runs in its own session and ignores SIGINT: Ctrl-C in the orchestrator's terminal must never
take the source guest down with it, and an orchestrator that dies leaves the VMM serving its socket in the
checkpoint folder, where the next ``confplan apply`` reconnects (docs/migration.md).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import threading
from pathlib import Path

from confplan.agent.service import VmmService
from confplan.errors import ConfplanError
from confplan.rpc import RpcServer
from confplan.transport import sockets

ACCEPT_POLL = 0.2


def serve(service: VmmService, listener: socket.socket, *, name: str, control_fd: int | None = None) -> int:
    """Accept connections until the service is told to stop; then stop the guest and return 0."""
    server = RpcServer(name)
    service.register(server)
    if control_fd is not None:
        conn = socket.socket(fileno=control_fd)
        threading.Thread(target=server.serve_connection, args=(conn,), daemon=True).start()
    listener.settimeout(ACCEPT_POLL)
    try:
        while not service.stopping.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            conn.settimeout(None)
            threading.Thread(target=server.serve_connection, args=(conn,), daemon=True).start()
        service.stopping.wait(ACCEPT_POLL)  # let the shutdown answer reach the caller
    finally:
        listener.close()
        service.close()
    return 0


def _main_thread_setup() -> None:
    """Signal handlers can only be installed from the main thread, and machines are built in RPC
    threads: install the vCPU kick handler here, or pausing a busy guest would wait for its next exit."""
    from confplan.vmm.vcpu_thread import install_kick_handler

    install_kick_handler()


def run_vmm(socket_path: Path, *, psp_dir: Path, firmware_dir: Path | None, control_fd: int | None) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _main_thread_setup()
    try:
        listener = sockets.listen_unix(socket_path, what="confplan vmm")
    except ConfplanError as err:
        raise SystemExit(f"confplan vmm: {err.message}") from None
    print(f"confplan vmm {os.getpid()}: serving {socket_path}", file=sys.stderr, flush=True)
    try:
        return serve(VmmService(psp_dir=psp_dir, firmware_dir=firmware_dir), listener,
                     name=f"the VMM process {os.getpid()}", control_fd=control_fd)  # fmt: skip
    finally:
        with contextlib.suppress(FileNotFoundError):
            socket_path.unlink()


def run_agent(host: str, port: int, *, psp_dir: Path, firmware_dir: Path | None) -> int:
    _main_thread_setup()
    listener = sockets.listen_tcp(host, port, what="the agent's control port")
    print(f"listening {listener.getsockname()[1]}", flush=True)
    name = f"the agent at {host}:{listener.getsockname()[1]}"
    return serve(VmmService(psp_dir=psp_dir, firmware_dir=firmware_dir), listener, name=name)
