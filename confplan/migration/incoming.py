"""The target side of a migration: a machine booted helper-only, the incoming stream, and the resume.
The stream itself is ``target.Incoming``; the guest's vCPUs stay paused until ``resume``.
"""

from __future__ import annotations

import array
import dataclasses
import time
from pathlib import Path
from typing import Any, ClassVar

from confplan.errors import ConfplanError
from confplan.migration.session import resynced_tsc
from confplan.migration.side import Log, MigrationSide, StreamSide
from confplan.migration.target import Incoming, IncomingState
from confplan.transport import sockets
from confplan.vmm import Machine


class IncomingMigration(MigrationSide):
    """A target VMM's machine and the stream it receives."""

    role: ClassVar[str] = "target"

    def __init__(self, machine: Machine, *, psp_dir: Path, log: Log) -> None:
        super().__init__(machine, psp_dir=psp_dir, log=log)
        self.stream: Incoming | None = None
        self.resumed = False

    def info(self) -> dict[str, Any]:
        stream = None if self.stream is None else self.stream.status.to_json()
        return {**super().info(), "resumed": self.resumed, "incoming": stream}

    # ---- the stream ----
    def listen(
        self, host: str, port: int, *, migration_id: bytes, stream_key: bytes, accept_timeout: float
    ) -> dict[str, Any]:
        """Listen for the source's stream (a previous one is dropped) and take the first connection that
        proves ``stream_key``; answers the port."""
        machine = self.need_machine()
        if not machine.config.mh_only or self.resumed:
            raise ConfplanError("only a target VMM whose guest has not resumed accepts a migration stream")
        self.abort()
        listener = sockets.listen_tcp(host, port, what="the target's migration port")
        self.shared_table = None
        self.stream = Incoming(
            machine, listener, hello=self.hello(migration_id), stream_key=stream_key, mailboxes=self.helper(),
            accept_timeout=accept_timeout, log=self.log,
        )  # fmt: skip
        return {"host": host, "port": listener.getsockname()[1]}

    def need_stream(self) -> Incoming:
        self.need_machine()
        if self.stream is None:
            raise ConfplanError("no incoming migration stream", hint="run start-incoming first")
        return self.stream

    def stream_side(self) -> StreamSide:
        return self.need_stream()

    def shared_for_fill(self) -> array.array[int] | None:
        # The encryption bitmap only arrives at DONE: fill the pages the stream sent as shared so far.
        return self.need_stream().shared_written()

    def status(self, wait: float) -> dict[str, Any]:
        return self.need_stream().wait(wait).to_json()

    def abort(self) -> None:
        if self.stream is not None:
            self.stream.close()
            self.stream = None

    # ---- the resume ----
    def resume(self) -> dict[str, Any]:
        """Run the guest here: the vCPU states (the encryption bitmap is already in place) with the TSC
        moved on by the pause (clock re-sync), then the guest's vCPUs."""
        status = self.need_stream().status
        if status.state is not IncomingState.COMPLETE or status.enc_bitmap is None:
            raise ConfplanError(
                f"the incoming stream is {status.state.value}, not complete: nothing to resume"
                + (f" ({status.error})" if status.error else ""),
            )
        machine = self.need_machine()
        now = time.time()
        tsc_khz = machine.host.tsc_khz
        states = [
            dataclasses.replace(saved.state, tsc=resynced_tsc(saved, now, tsc_khz))
            for _, saved in sorted(status.vcpus.items())
        ]
        machine.restore_vcpu_states(states)
        machine.resume_all_vcpus_except_aux()
        self.resumed = True
        self.log("target: guest resumed")
        gap = max(now - saved.paused_wall for saved in status.vcpus.values())
        return {"clock_gap_seconds": gap}

    def pause_guest(self) -> None:
        self.need_machine().pause_all_vcpus_except_aux()
        self.resumed = False

    def close(self) -> None:
        self.abort()
        super().close()
