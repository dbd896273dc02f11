"""The source side of a migration: the running guest, its dirty log, the outgoing stream, precopy rounds,
the throttle (auto-converge) and stop-and-copy. The stream itself is ``source.Outgoing``.

One lock orders everything that pauses or resumes the guest's vCPUs (the throttle's cycles, stop-and-copy,
an undo), so the throttle can never resume a guest that stop-and-copy just paused.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any, ClassVar

from confplan.errors import ConfplanError
from confplan.migration.dirty import DirtyTracker
from confplan.migration.side import Log, MigrationSide, StreamSide
from confplan.migration.source import Outgoing
from confplan.transport import sockets
from confplan.vmm import Machine

THROTTLE_PERIOD = 0.02  # seconds per pause/run cycle while the guest is throttled


class OutgoingMigration(MigrationSide):
    """A source VMM's machine and its stream to the target."""

    role: ClassVar[str] = "source"

    def __init__(self, machine: Machine, *, psp_dir: Path, log: Log) -> None:
        super().__init__(machine, psp_dir=psp_dir, log=log)
        self.tracker: DirtyTracker | None = None
        self.stream: Outgoing | None = None
        self.next_generation = 1  # the source MH refuses to seal a page twice under one generation
        self.throttle = 0.0
        self._vcpus = threading.Lock()  # pause/resume of the guest's vCPUs
        self._closed = threading.Event()

    def info(self) -> dict[str, Any]:
        return {**super().info(), "outgoing": self.stream is not None, "throttle": self.throttle}

    # ---- the stream ----
    def connect(
        self, host: str, port: int, *, migration_id: bytes, stream_key: bytes, bandwidth: float | None
    ) -> None:
        """Dial the target's migration port and prove the stream key (the wire v2 handshake); a previous
        stream is replaced."""
        machine = self.check_can_send()
        self._close_stream("a new stream replaces it")
        sock = sockets.dial_tcp(host, port, timeout=10.0, what="the target's migration port")
        if self.tracker is None:
            self.tracker = DirtyTracker(machine)
        self.tracker.reset()
        self.shared_table = None
        self.stream = Outgoing(
            machine, sock, hello=self.hello(migration_id), stream_key=stream_key, mailboxes=self.helper(),
            tracker=self.tracker, next_generation=self.next_generation, bandwidth=bandwidth,
            peer=f"the target at {host}:{port}",
        )  # fmt: skip
        try:
            self.stream.start()
        except BaseException:
            self._close_stream("the handshake failed")
            raise
        self.log(f"source: stream to {host}:{port} open (authenticated)")

    def check_can_send(self) -> Machine:
        machine = self.need_machine()
        if not machine.config.dirty_logging:
            raise ConfplanError(
                f"this {self.role} machine keeps no dirty log, so it cannot send a live migration",
                hint="migrate from a source machine (launch-source); a target is built without one",
            )
        return machine

    def need_stream(self) -> Outgoing:
        self.need_machine()
        if self.stream is None:
            raise ConfplanError("no outgoing migration stream", hint="run start-incoming first")
        return self.stream

    def stream_side(self) -> StreamSide:
        return self.need_stream()

    def _close_stream(self, reason: str) -> None:
        if self.stream is not None:
            self.stream.abort(reason)
            self.stream = None

    # ---- precopy ----
    def precopy_round(self) -> dict[str, Any]:
        stream = self.need_stream()
        try:
            stats = stream.send_round(final=False)
        except BaseException as err:
            self.log(f"source: round failed: {err}")
            self._close_stream("the round failed")
            raise
        finally:
            self.next_generation = stream.generation
        return stats.to_json()

    def set_throttle(self, fraction: float) -> float:
        """Keep the guest's vCPUs paused ``fraction`` of the time (QEMU's auto-converge); 0 stops it."""
        if not 0.0 <= fraction < 1.0:
            raise ConfplanError(f"throttle {fraction} is outside [0, 1)")
        start = self.throttle == 0.0 and fraction > 0.0
        self.throttle = fraction
        if start:
            threading.Thread(target=self._throttle_loop, name="throttle", daemon=True).start()
        return fraction

    def _throttle_loop(self) -> None:
        machine = self.machine
        while self.throttle > 0.0 and not self._closed.is_set():
            with self._vcpus:
                if self.throttle == 0.0 or self.stream is None:
                    break
                machine.pause_all_vcpus_except_aux()
            time.sleep(THROTTLE_PERIOD * self.throttle)
            with self._vcpus:
                if self.throttle > 0.0:
                    machine.resume_all_vcpus_except_aux()
            time.sleep(THROTTLE_PERIOD * (1.0 - self.throttle))

    # ---- the pause ----
    def stop_and_copy(self) -> dict[str, Any]:
        """Pause the guest's vCPUs (the helper serves on), send the last dirty pages, the vCPU states and
        the encryption bitmap, then DONE."""
        stream = self.need_stream()
        machine = self.need_machine()
        with self._vcpus:
            self.throttle = 0.0
            paused = time.monotonic()
            machine.pause_all_vcpus_except_aux()  # the seed's: the guest stops, the helper serves on
        paused_wall, halted = time.time(), time.monotonic()
        try:
            stats = stream.send_round(final=True)
            sent = time.monotonic()
            stream.send_state(paused_wall)
        except BaseException:
            self._close_stream("stop-and-copy failed")
            raise
        finally:
            self.next_generation = stream.generation
        done = time.monotonic()
        self.log(f"source: stop-and-copy sent {stats.pages} pages and the state; guest paused")
        return {
            "round": stats.to_json(),
            "paused_seconds": done - paused,
            "steps": {"pause_vcpus": halted - paused, "final_pages": sent - halted,
                      "vcpu_and_device_state": done - sent},
        }  # fmt: skip

    def resume_guest(self, reason: str) -> None:
        """Undo a migration attempt on the source: the stream closes, the guest's vCPUs run again."""
        machine = self.need_machine()
        with self._vcpus:
            self.throttle = 0.0
            self._close_stream(reason)
            machine.resume_all_vcpus_except_aux()
        self.log(f"source: guest vCPUs running ({reason})")

    def pause_guest(self) -> None:
        with self._vcpus:
            self.need_machine().pause_all_vcpus_except_aux()

    def close(self) -> None:
        self._closed.set()
        self.throttle = 0.0
        self._close_stream("the source VMM is shutting down")
        super().close()
