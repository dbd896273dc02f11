"""The VMM service: the RPC methods of a VMM process that owns one machine (source or target).

The orchestrator drives it step by step: create the machine, the measured launch (chain, measure, secret),
start; on the source connect the outgoing stream and send rounds, stop and copy; on the target listen for
the incoming stream, then resume. Calls that change state take one lock, so two orchestrators (a rerun
while an old one still hangs on) cannot interleave; ``info`` answers without it.
"""

from __future__ import annotations

import array
import base64
import dataclasses
import os
import socket
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from confplan.core.wire import Hello, HelperMode
from confplan.errors import ConfplanError
from confplan.migration.dirty import DirtyTracker
from confplan.migration.helper import helper_mailboxes
from confplan.migration.mailbox_set import MailboxSet
from confplan.migration.session import resynced_tsc
from confplan.migration.source import Outgoing
from confplan.migration.target import Incoming, IncomingState
from confplan.migration.verify import (
    SharedTable,
    private_digests,
    shared_digest,
    table_digests,
)
from confplan.rpc import Call, RpcServer
from confplan.vmm import abi

if TYPE_CHECKING:
    from confplan.vmm import Machine

ROLES = ("source", "target")
THROTTLE_PERIOD = 0.02  # seconds per pause/run cycle while the guest is throttled


def log(line: str) -> None:
    """One line on stderr: the VMM's log file when the orchestrator started it."""
    print(f"{time.strftime('%H:%M:%S')} {line}", file=sys.stderr, flush=True)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(params: dict[str, Any], key: str) -> bytes:
    try:
        return base64.b64decode(str(params[key]), validate=True)
    except (KeyError, ValueError) as err:
        raise ConfplanError(f"parameter {key!r} is missing or not base64: {err}") from None


class VmmService:
    """One machine and its migration stream; ``register`` puts the methods on an RpcServer."""

    def __init__(self, *, psp_dir: Path, firmware_dir: Path | None = None) -> None:
        self.psp_dir, self.firmware_dir = psp_dir, firmware_dir
        self.role = ""
        self.machine: Machine | None = None
        self.launch: Any = None
        self.tracker: DirtyTracker | None = None
        self.outgoing: Outgoing | None = None
        self.incoming: Incoming | None = None
        self.shared_table: SharedTable | None = None  # the stream's shared-page CRCs (mac_table fill)
        self.next_generation = 1  # the source MH refuses to seal a page twice under one generation
        self.resumed = False
        self.throttle = 0.0
        self.stopping = threading.Event()
        self._lock = threading.Lock()
        self._mailboxes: MailboxSet | None = None
        self._mh_ready = False

    # ---- plumbing ----
    def register(self, server: RpcServer) -> None:
        server.register("info", lambda params, call: self.info())
        for name, method in self._methods().items():
            server.register(name, self._locked(method))

    def _methods(self) -> dict[str, Callable[[dict[str, Any]], Any]]:
        names = (
            "create", "platform_chain", "launch_measure", "launch_secret", "start", "workload_check",
            "connect_outgoing", "precopy_round", "set_throttle", "stop_and_copy", "resume_guest",
            "pause_guest", "listen_incoming", "incoming_status", "abort_incoming", "digests", "mac_table",
            "resume_incoming", "discard", "shutdown",
        )  # fmt: skip
        return {name: getattr(self, name) for name in names}

    def _locked(self, method: Callable[[dict[str, Any]], Any]) -> Callable[[dict[str, Any], Call], Any]:
        def handler(params: dict[str, Any], call: Call) -> Any:
            with self._lock:
                return method(params)

        return handler

    def _need_machine(self) -> Machine:
        if self.machine is None:
            raise ConfplanError("this VMM has no machine yet", hint="call 'create' first")
        self.machine.check()  # a guest that stopped says why, rather than a confusing later error
        return self.machine

    # ---- the machine ----
    def info(self) -> dict[str, Any]:
        m = self.machine
        return {
            "pid": os.getpid(), "role": self.role, "machine": m is not None,
            "running": bool(m is not None and "start" in m.timings and m.error is None),
            "guest_error": None if m is None or m.error is None else str(m.error), "resumed": self.resumed,
            "incoming": None if self.incoming is None else self.incoming.status.to_json(),
            "outgoing": self.outgoing is not None, "throttle": self.throttle,
            "launch_state": None if self.launch is None else self.launch.guest.state.value,
        }  # fmt: skip

    def create(self, params: dict[str, Any]) -> dict[str, Any]:
        from confplan.vmm import Machine, MachineConfig
        from confplan.vmm.firmware import Firmware

        if self.machine is not None:
            raise ConfplanError(f"this VMM already holds a {self.role} machine", hint="use a new VMM process")
        role = str(params.get("role"))
        if role not in ROLES:
            raise ConfplanError(f"unknown role {role!r}", hint="use source or target")
        config = MachineConfig(**params["config"])
        firmware = Firmware.load(self.firmware_dir) if self.firmware_dir else None
        self.machine, self.role = Machine(config, firmware=firmware), role
        host = self.machine.host
        return {
            "host": {"tsc_khz": host.tsc_khz, "features": host.features, "vendor_amd": host.vendor_amd},
            "firmware_sha256": self.machine.firmware.sha256,
            "prefault_seconds": self.machine.prefault_seconds,
        }

    def platform_chain(self, params: dict[str, Any]) -> dict[str, Any]:
        from confplan.sev import EmulatedSecureProcessor

        psp = EmulatedSecureProcessor.open(self.psp_dir)
        v = psp.version
        return {"chain": _b64(psp.platform_chain().pack()), "version": [v.api_major, v.api_minor, v.build]}

    def launch_measure(self, params: dict[str, Any]) -> dict[str, Any]:
        from confplan.sev import EmulatedSecureProcessor
        from confplan.vmm.sev_launch import MeasuredLaunch

        machine = self._need_machine()
        self.launch = MeasuredLaunch(machine, EmulatedSecureProcessor.open(self.psp_dir))
        godh, session = _unb64(params, "godh"), _unb64(params, "session")
        measurement = self.launch.measure(int(params["policy"]), godh, session)
        log(f"{self.role}: launch measured (LAUNCH_START, UPDATE_DATA, MEASURE)")
        return {"measurement": _b64(measurement)}

    def launch_secret(self, params: dict[str, Any]) -> dict[str, Any]:
        if self.launch is None:
            raise ConfplanError("no measured launch in progress", hint="call 'launch_measure' first")
        self.launch.inject_secret(_unb64(params, "header"), _unb64(params, "ciphertext"))  # + LAUNCH_FINISH
        log(f"{self.role}: launch secret injected, LAUNCH_FINISH")
        return {}

    def start(self, params: dict[str, Any]) -> dict[str, Any]:
        machine = self._need_machine()
        machine.start()
        if machine.helpers:
            machine.wait_helpers_ready()
        if not machine.config.mh_only:  # running = filled (its shared pages are reported after the fill)
            machine.wait_workload(abi.EV_WL_FILLED, timeout=120.0)
        return {"vcpus": len(machine.vcpus), "helpers": len(machine.helpers)}

    def workload_check(self, params: dict[str, Any]) -> dict[str, Any]:
        result = self._need_machine().workload.check()
        return {
            "ok": result.ok,
            "first_bad_page": result.first_bad_page,
            "checked_pages": result.checked_pages,
        }

    def _helper(self) -> MailboxSet | None:
        """The MH's mailboxes, INIT done once (it reads the transport key from the secret page)."""
        if self._mailboxes is None:
            self._mailboxes = helper_mailboxes(self._need_machine())
        if self._mailboxes is not None and not self._mh_ready:
            self._mailboxes.init()
            self._mh_ready = True
        return self._mailboxes

    def _hello(self, migration_id: str) -> Hello:
        cfg = self._need_machine().config
        mode = HelperMode.MIRROR_VM if cfg.helper_mode == "mirror-vm" else HelperMode.AUX_VCPU
        return Hello(cfg.memory, bytes.fromhex(migration_id), mode, cfg.vcpus)

    # ---- source ----
    def connect_outgoing(self, params: dict[str, Any]) -> dict[str, Any]:
        machine = self._need_machine()
        if not machine.config.dirty_logging:
            raise ConfplanError(
                f"this {self.role} machine keeps no dirty log, so it cannot send a live migration",
                hint="migrate from a source machine (launch-source); a target is built without one",
            )
        self._close_outgoing("a new stream replaces it")
        host, port = str(params["host"]), int(params["port"])
        try:
            sock = socket.create_connection((host, port), timeout=10.0)
        except OSError as err:
            raise ConfplanError(
                f"the source VMM cannot reach the target's migration port {host}:{port}: "
                f"{err.strerror or err}",
                hint="check that the target VMM listens there (start-incoming) and the port is reachable",
            ) from None
        sock.settimeout(None)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.tracker is None:
            self.tracker = DirtyTracker(machine)
        self.tracker.reset()
        bandwidth = params.get("bandwidth")
        self.shared_table = None
        self.outgoing = Outgoing(
            machine, sock, hello=self._hello(str(params["migration_id"])), mailboxes=self._helper(),
            tracker=self.tracker, next_generation=self.next_generation,
            bandwidth=float(bandwidth) if bandwidth else None, peer=f"the target at {host}:{port}",
        )  # fmt: skip
        self.outgoing.start()
        log(f"source: stream to {host}:{port} open")
        return {}

    def _need_outgoing(self) -> Outgoing:
        self._need_machine()
        if self.outgoing is None:
            raise ConfplanError("no outgoing migration stream", hint="run start-incoming first")
        return self.outgoing

    def _round(self, final: bool) -> dict[str, Any]:
        outgoing = self._need_outgoing()
        try:
            stats = outgoing.send_round(final=final)
        except BaseException as err:
            log(f"source: round failed: {err}")
            self._close_outgoing("the round failed")
            raise
        finally:
            self.next_generation = outgoing.generation
        return stats.to_json()

    def precopy_round(self, params: dict[str, Any]) -> dict[str, Any]:
        return self._round(final=False)

    def set_throttle(self, params: dict[str, Any]) -> dict[str, Any]:
        fraction = float(params.get("fraction", 0.0))
        if not 0.0 <= fraction < 1.0:
            raise ConfplanError(f"throttle {fraction} is outside [0, 1)")
        start = self.throttle == 0.0 and fraction > 0.0
        self.throttle = fraction
        if start:
            threading.Thread(target=self._throttle_loop, name="throttle", daemon=True).start()
        return {"throttle": fraction}

    def _throttle_loop(self) -> None:
        """Auto-converge: keep the guest's vCPUs paused ``throttle`` of the time (aux vCPUs run on)."""
        machine = self.machine
        while machine is not None and self.throttle > 0.0 and not self.stopping.is_set():
            with self._lock:
                if self.throttle == 0.0 or self.outgoing is None:
                    break
                machine.pause_all_vcpus_except_aux()
            time.sleep(THROTTLE_PERIOD * self.throttle)
            with self._lock:
                if self.throttle > 0.0:
                    machine.resume_all_vcpus_except_aux()
            time.sleep(THROTTLE_PERIOD * (1.0 - self.throttle))

    def stop_and_copy(self, params: dict[str, Any]) -> dict[str, Any]:
        outgoing = self._need_outgoing()
        self.throttle = 0.0
        paused = time.monotonic()
        self._need_machine().pause_all_vcpus_except_aux()  # the seed's: the guest stops, the helper serves on
        paused_wall, halted = time.time(), time.monotonic()
        try:
            stats = outgoing.send_round(final=True)
            sent = time.monotonic()
            outgoing.send_state(paused_wall)
        except BaseException:
            self._close_outgoing("stop-and-copy failed")
            raise
        finally:
            self.next_generation = outgoing.generation
        done = time.monotonic()
        log(f"source: stop-and-copy sent {stats.pages} pages and the state; guest paused")
        return {
            "round": stats.to_json(),
            "paused_seconds": done - paused,
            "steps": {"pause_vcpus": halted - paused, "final_pages": sent - halted,
                      "vcpu_and_device_state": done - sent},
        }  # fmt: skip

    def resume_guest(self, params: dict[str, Any]) -> dict[str, Any]:
        """Undo a migration attempt on the source: the stream closes, the guest's vCPUs run again."""
        machine = self._need_machine()
        self.throttle = 0.0
        self._close_outgoing(str(params.get("reason", "the migration was abandoned")))
        machine.resume_all_vcpus_except_aux()
        log(f"source: guest vCPUs running ({params.get('reason', 'resume requested')})")
        return {"running": True}

    def pause_guest(self, params: dict[str, Any]) -> dict[str, Any]:
        self._need_machine().pause_all_vcpus_except_aux()
        self.resumed = False
        return {}

    def _close_outgoing(self, reason: str) -> None:
        if self.outgoing is not None:
            self.outgoing.abort(reason)
            self.outgoing = None

    # ---- target ----
    def listen_incoming(self, params: dict[str, Any]) -> dict[str, Any]:
        machine = self._need_machine()
        if not machine.config.mh_only or self.resumed:
            raise ConfplanError("only a target VMM whose guest has not resumed accepts a migration stream")
        self._close_incoming()
        host, port = str(params.get("host", "127.0.0.1")), int(params.get("port", 0))
        try:
            listener = socket.create_server((host, port))
        except OSError as err:
            raise ConfplanError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None
        self.shared_table = None
        self.incoming = Incoming(
            machine, listener, hello=self._hello(str(params["migration_id"])), mailboxes=self._helper(),
            accept_timeout=float(params.get("accept_timeout", 60.0)),
        )  # fmt: skip
        return {"host": host, "port": listener.getsockname()[1]}

    def _need_incoming(self) -> Incoming:
        self._need_machine()
        if self.incoming is None:
            raise ConfplanError("no incoming migration stream", hint="run start-incoming first")
        return self.incoming

    def incoming_status(self, params: dict[str, Any]) -> dict[str, Any]:
        incoming = self._need_incoming()
        return incoming.wait(float(params.get("wait", 0.0))).to_json()

    def abort_incoming(self, params: dict[str, Any]) -> dict[str, Any]:
        self._close_incoming()
        return {}

    def _close_incoming(self) -> None:
        if self.incoming is not None:
            self.incoming.close()
            self.incoming = None

    def digests(self, params: dict[str, Any]) -> dict[str, Any]:
        """The MHs' digests of every chunk and the CRC of the shared pages. With ``table``: first MAC the
        pages moved as shared since the tables were last brought up to date (SAVE and LOAD keep the private
        pages' entries), then fold the chunks from the tables (cost: those pages, not RAM); else hash all
        of RAM."""
        machine = self._need_machine()
        mailboxes = self._helper()
        started = time.monotonic()
        private, maced = None, 0
        # The shared pages' CRC (host CPU, in C without the GIL) runs while the MHs hash (guest vCPUs).
        table = self.shared_table if params.get("table") else None
        gpas = None
        if params.get("table"):
            self._changed_gpas()  # before the shared digest, which must not use these pages' old CRCs
            gpas = self._shared_moved()  # the MHs MAC only these: SAVE/LOAD set the private pages' entries
        with ThreadPoolExecutor(max_workers=1) as pool:
            shared = (
                pool.submit(self._timed, table.digest if table else partial(shared_digest, machine))
                if params.get("shared", True) else None
            )  # fmt: skip
            if mailboxes is not None and gpas is not None:
                maced, private = table_digests(mailboxes, machine, gpas)
            elif mailboxes is not None:
                private = private_digests(mailboxes, machine)
            hashed = time.monotonic() - started
            crc, crc_seconds = shared.result() if shared is not None else (None, 0.0)
        return {"shared": crc, "private": private, "pages_maced": maced,
                "shared_pages_crcd": table.computed if table is not None else None,
                "seconds": {"private": hashed, "shared": crc_seconds,
                            "rpc": time.monotonic() - started}}  # fmt: skip

    @staticmethod
    def _timed(fn: Callable[[], dict[str, int]]) -> tuple[dict[str, int], float]:
        started = time.monotonic()
        return fn(), time.monotonic() - started

    def mac_table(self, params: dict[str, Any]) -> dict[str, Any]:
        """``fill`` the MHs' per-page MAC tables, while the guest still runs. SAVE and LOAD keep the entries
        of the private pages they move (mailbox v4); what is left is the pages the stream moved as shared:
        the MHs MAC those sent so far, and the shared CRC table starts. Verify, in the pause, MACs the
        shared pages moved after this."""
        if params.get("action", "fill") != "fill":
            raise ConfplanError(f"unknown mac_table action {params['action']!r}", hint="the action is fill")
        machine = self._need_machine()
        mailboxes = self._helper()
        if mailboxes is None:
            return {"pages": None}
        started = time.monotonic()
        self._changed_gpas()  # the shared CRC table forgets these pages (the fill starts it afresh)
        moved = self._shared_moved()
        self.shared_table = SharedTable(machine)
        sent_shared = self.incoming.shared_written() if self.outgoing is None and self.incoming else None
        with ThreadPoolExecutor(max_workers=1) as pool:  # host CRCs while the MHs MAC
            shared = pool.submit(self.shared_table.fill, sent_shared)
            pages = mailboxes.mac_list(moved) if len(moved) else 0
            shared_pages = shared.result()
        return {"pages": pages, "shared_pages": shared_pages, "seconds": time.monotonic() - started}

    def _stream_side(self) -> Outgoing | Incoming:
        if self.outgoing is not None:
            return self.outgoing
        if self.incoming is not None:
            return self.incoming
        raise ConfplanError("no migration stream: the MAC table follows a stream's writes",
                            hint="run start-incoming first")  # fmt: skip

    def _shared_moved(self) -> array.array[int]:
        """Pages the stream moved as shared since the last call: the MAC table entries no SAVE/LOAD set."""
        return self._stream_side().take_shared_gpas()

    def _changed_gpas(self) -> array.array[int]:
        """Pages written since the last call: on the source what the stream sent (the dirty log's pages),
        on the target what the stream wrote. The shared CRC table drops their entries."""
        gpas = self._stream_side().take_changed_gpas()
        if self.shared_table is not None:
            self.shared_table.forget(gpas)  # their CRCs are stale: the next digest computes them again
        return gpas

    def resume_incoming(self, params: dict[str, Any]) -> dict[str, Any]:
        """Run the guest here: the vCPU states (the encryption bitmap is already in place) with the TSC
        moved on by the pause (clock re-sync), then the guest's vCPUs."""
        incoming = self._need_incoming()
        status = incoming.status
        if status.state is not IncomingState.COMPLETE or status.enc_bitmap is None:
            raise ConfplanError(
                f"the incoming stream is {status.state.value}, not complete: nothing to resume"
                + (f" ({status.error})" if status.error else ""),
            )
        machine = self._need_machine()
        now = time.time()
        tsc_khz = machine.host.tsc_khz
        states = [
            dataclasses.replace(saved.state, tsc=resynced_tsc(saved, now, tsc_khz))
            for _, saved in sorted(status.vcpus.items())
        ]
        machine.restore_vcpu_states(states)
        machine.resume_all_vcpus_except_aux()
        self.resumed = True
        log("target: guest resumed")
        gap = max(now - saved.paused_wall for saved in status.vcpus.values())
        return {"clock_gap_seconds": gap}

    # ---- the end ----
    def discard(self, params: dict[str, Any]) -> dict[str, Any]:
        """Drop a target machine that never resumed (a failed attempt), so the agent can take the next
        one; a guest that runs here (resumed, or a source) is never discarded this way."""
        if self.machine is None:
            return {"discarded": False}
        if self.resumed or self.role != "target":
            raise ConfplanError(
                f"this VMM runs a {self.role} guest"
                + (" that resumed here" if self.resumed else "")
                + ": not discarded",
                hint="stop it deliberately (`confplan stop`), or use another agent",
            )
        self.close()
        self.launch, self.tracker, self.role = None, None, ""
        self._mailboxes, self._mh_ready = None, False
        log("target: machine discarded")
        return {"discarded": True}

    def shutdown(self, params: dict[str, Any]) -> dict[str, Any]:
        """Stop the guest and this process (after the answer is sent)."""
        self.stopping.set()
        log(f"{self.role or 'vmm'}: shutting down")
        return {"pid": os.getpid()}

    def close(self) -> None:
        self.throttle = 0.0
        self._close_outgoing("the source VMM is shutting down")
        self._close_incoming()
        if self.machine is not None:
            self.machine.close()
            self.machine = None

