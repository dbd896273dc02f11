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
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from confplan.agent.service import VmmService, log, set_log_file
from confplan.errors import ConfplanError
from confplan.rpc import RpcServer
from confplan.transport import sockets
from confplan.transport.files import private_dir

ACCEPT_POLL = 0.2


Accept = Callable[[float], tuple[socket.socket, str]]  # (poll seconds) -> (connection, who it is)


def serve(service: VmmService, accept: Accept, *, name: str, control_fd: int | None = None) -> int:
    """Serve every connection ``accept`` hands out until the service is told to stop; then stop the guest
    and return 0."""
    server = RpcServer(name)
    service.register(server)
    if control_fd is not None:
        conn = socket.socket(fileno=control_fd)
        threading.Thread(target=server.serve_connection, args=(conn, "the parent"), daemon=True).start()
    try:
        while not service.stopping.is_set():
            try:
                conn, peer = accept(ACCEPT_POLL)
            except TimeoutError:
                continue
            threading.Thread(target=server.serve_connection, args=(conn, peer), daemon=True).start()
        service.stopping.wait(ACCEPT_POLL)  # let the shutdown answer reach the caller
    finally:
        service.close()
    return 0


def _unix_accept(listener: socket.socket) -> Accept:
    listener.settimeout(ACCEPT_POLL)

    def accept(poll: float) -> tuple[socket.socket, str]:
        conn, _ = listener.accept()
        conn.settimeout(None)
        return conn, "a local user (unix socket, mode 0600)"

    return accept


def _main_thread_setup() -> None:
    """Signal handlers can only be installed from the main thread, and machines are built in RPC
    threads: install the vCPU kick handler here, or pausing a busy guest would wait for its next exit."""
    from confplan.vmm.vcpu_thread import install_kick_handler

    install_kick_handler()


def run_vmm(
    socket_path: Path, *, psp_dir: Path, firmware_dir: Path | None, control_fd: int | None,
    plan: str | None = None,
) -> int:  # fmt: skip
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _main_thread_setup()
    try:
        listener = sockets.listen_unix(socket_path, what="confplan vmm")
    except ConfplanError as err:
        raise SystemExit(f"confplan vmm: {err.message}") from None
    print(f"confplan vmm {os.getpid()}: serving {socket_path}", file=sys.stderr, flush=True)
    service = VmmService(psp_dir=psp_dir, firmware_dir=firmware_dir, state_dir=socket_path.parent, plan=plan)
    try:
        return serve(service, _unix_accept(listener), name=f"the VMM process {os.getpid()}",
                     control_fd=control_fd)  # fmt: skip
    finally:
        listener.close()
        with contextlib.suppress(FileNotFoundError):
            socket_path.unlink()


def run_agent(
    host: str, port: int, *, home: Path, psp_dir: Path | None, firmware_dir: Path | None,
    out: TextIO = sys.stdout,
) -> int:  # fmt: skip
    """Serve a VMM for remote orchestrators over mutual TLS 1.3 (docs/channel.md): only orchestrators
    enrolled in ``home``'s trust store get past the handshake; this agent's identity lives in ``home``.
    Its state (the emulated PSP's keys unless ``psp_dir``, console logs, its log) goes under
    ``home/agent``: nothing of the host's filesystem is named from the wire."""
    from confplan.transport import Identity, Role, TlsListener, TrustStore

    _main_thread_setup()
    identity = Identity.load_or_create(home, Role.AGENT)
    trust = TrustStore.at_home(home)
    state = private_dir(home / "agent", use="the agent's state")
    log_file = open(state / "agent.log", "a", encoding="utf-8", buffering=1)  # noqa: SIM115
    set_log_file(log_file)
    listener = sockets.listen_tcp(host, port, what="the agent's control port")
    bound = listener.getsockname()[1]
    tls = TlsListener(listener, identity, trust, log=log)
    enrolled = len(trust.list(Role.ORCHESTRATOR))
    print(f"listening {bound} on {host} as agent {identity.fingerprint}", file=out, flush=True)
    print(f"  pin it in the plan: target: {{host: tcp://HOST:{bound}, fingerprint: {identity.fingerprint}}}",
          file=out, flush=True)  # fmt: skip
    if not enrolled:
        print("  no orchestrator is enrolled yet: on the orchestrator's host run `confplan identity show "
              "--role orchestrator --pem > orch.pem`, then here `confplan trust add --orchestrator orch.pem`",
              file=out, flush=True)  # fmt: skip
    log(f"agent {identity.fingerprint} listening on {host}:{bound}; {enrolled} orchestrators enrolled")
    service = VmmService(
        psp_dir=psp_dir or state / "psp", firmware_dir=firmware_dir, state_dir=state, remote=True
    )
    try:
        return serve(service, tls.accept, name=f"the agent at {host}:{bound} ({identity.short})")
    finally:
        tls.close()
        log_file.close()
