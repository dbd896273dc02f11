"""What the stream's protection costs (issue 10: at most 5 % of the 1 GiB idle migration), measured in the
same run: the same engines, helpers and machines as `confplan apply`, once with the wire v2 protection (the
stream key handshake, every non-sealed frame encrypted, every frame authenticated) and once on the
previous, unprotected path (a stream key of None: only constructible here, never by a VMM process).

The source runs in this process and the target in another (as two VMM processes do: each has its own
GIL). The timed window is the stream: connect, precopy rounds until little is left, pause, final round,
state, the target's DONE. Machine set-up (RAM pre-faulted on the target, as provision-target does) is
outside.
"""

from __future__ import annotations

import multiprocessing
import os
import socket
import time
from typing import Any

from confplan.core.wire import Hello, HelperMode
from confplan.migration.dirty import DirtyTracker
from confplan.migration.helper import open_mailboxes
from confplan.migration.source import Outgoing
from confplan.migration.target import Incoming, IncomingState
from confplan.sev import CONFPLAN_TRANSPORT_KEY_GUID
from confplan.sev.secret_table import CONFPLAN_MIGRATION_ID_GUID, build_secret_table
from confplan.vmm import Machine, MachineConfig, abi

MIGRATION_ID = bytes(range(48, 64))  # the same in the target process (spawned: it imports this anew)


def _config(ram_mib: int, batch_pages: int, *, target: bool) -> MachineConfig:
    return MachineConfig(
        memory=ram_mib * abi.MIB, vcpus=1, aux_vcpus=2, batch_pages=batch_pages, workload_kind="idle",
        shared_fraction=0.05, mh_only=target, prefault=target, dirty_logging=not target,
    )  # fmt: skip


def _target(ram_mib: int, batch_pages: int, secret: bytes, stream_key: bytes | None, conn: Any) -> None:
    """The target in a process of its own, as a target VMM is: listen, receive, say when complete."""
    dst = Machine(_config(ram_mib, batch_pages, target=True))
    try:
        dst.write(abi.SECRET_GPA, secret)
        dst.start()
        mailboxes = open_mailboxes(dst)
        mailboxes.init()
        hello = Hello(dst.config.memory, MIGRATION_ID, HelperMode.AUX_VCPU, 1)
        listener = socket.create_server(("127.0.0.1", 0))
        incoming = Incoming(dst, listener, hello=hello, stream_key=stream_key, mailboxes=mailboxes)
        conn.send(listener.getsockname()[1])
        status = incoming.wait(300)
        conn.send((status.state.value, status.error))
        incoming.close()
    finally:
        dst.close()


def migrate_once(ram_mib: int, batch_pages: int, *, protected: bool) -> dict[str, Any]:
    """One migration of an idle guest from a machine here to a fresh target in another process (two VMM
    processes, as in `confplan apply`); the stream's seconds and bytes."""
    key = os.urandom(32)
    secret = build_secret_table({CONFPLAN_TRANSPORT_KEY_GUID: key, CONFPLAN_MIGRATION_ID_GUID: MIGRATION_ID})
    stream_key = os.urandom(32) if protected else None
    context = multiprocessing.get_context("spawn")
    here, there = context.Pipe()
    child = context.Process(target=_target, args=(ram_mib, batch_pages, secret, stream_key, there))
    child.start()
    src = Machine(_config(ram_mib, batch_pages, target=False))
    try:
        src.write(abi.SECRET_GPA, secret)
        src.start()
        src.wait_workload(abi.EV_WL_FILLED, timeout=120)
        src_mb = open_mailboxes(src)
        src_mb.init()
        hello = Hello(src.config.memory, MIGRATION_ID, HelperMode.AUX_VCPU, 1)
        port = here.recv()
        tracker = DirtyTracker(src)
        tracker.reset()
        started = time.monotonic()
        sock = socket.create_connection(("127.0.0.1", port))
        out = Outgoing(src, sock, hello=hello, stream_key=stream_key, mailboxes=src_mb, tracker=tracker,
                       next_generation=1)  # fmt: skip
        out.start()
        rounds = [out.send_round()]
        while rounds[-1].dirty_after > 256 and len(rounds) < 10:
            rounds.append(out.send_round())
        src.pause_all_vcpus_except_aux()
        rounds.append(out.send_round(final=True))
        out.send_state(time.time())
        state, error = here.recv()
        seconds = time.monotonic() - started
        if state != IncomingState.COMPLETE.value:
            raise RuntimeError(f"the benchmark's migration failed: {error}")
        out.sock.close()
        return {"seconds": seconds, "rounds": len(rounds), "bytes": sum(r.bytes_sent for r in rounds)}
    finally:
        src.close()
        child.join(timeout=30)


def compare(ram_mib: int, batch_pages: int, protected_first: bool = False) -> dict[str, float]:
    """Unprotected and protected, back to back, in the order asked (the second of two runs tends to be slower
    here: alternate it across repeats); the ratio of their stream times."""
    if protected_first:
        guarded = migrate_once(ram_mib, batch_pages, protected=True)
        plain = migrate_once(ram_mib, batch_pages, protected=False)
    else:
        plain = migrate_once(ram_mib, batch_pages, protected=False)
        guarded = migrate_once(ram_mib, batch_pages, protected=True)
    ratio = guarded["seconds"] / plain["seconds"]
    print(f"{ram_mib} MiB idle stream: protected {guarded['seconds']:.2f} s vs previous unprotected path "
          f"{plain['seconds']:.2f} s = {ratio:.3f}x (goal <= 1.05x); {guarded['bytes'] / 2**20:.0f} MiB "
          f"in {guarded['rounds']} rounds")  # fmt: skip
    return {"protected s": guarded["seconds"], "unprotected s": plain["seconds"], "x unprotected": ratio}
