"""The VMM service: the RPC face of a VMM process, a thin adapter over one migration side.

``create`` builds the machine and picks its side (``migration.outgoing.OutgoingMigration`` for a source,
``migration.incoming.IncomingMigration`` for a target); every other method checks the role, decodes its
parameters and calls that side. Calls that change state take one lock, so two orchestrators (a rerun while
an old one still hangs on) cannot interleave; ``info`` answers without it. docs/rpc.md lists the methods.
"""

from __future__ import annotations

import base64
import dataclasses
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from confplan.errors import ConfplanError
from confplan.migration.handover import Role
from confplan.migration.handover_io import HandoverFiles, dead_view
from confplan.migration.incoming import IncomingMigration
from confplan.migration.outgoing import OutgoingMigration
from confplan.rpc import Call, RpcServer
from confplan.vmm import MachineConfig

ROLES = ("source", "target")
_HOST_ONLY = frozenset({"console_log", "console_echo"})  # chosen by the VMM's host, never by a caller
Side = OutgoingMigration | IncomingMigration
Params = dict[str, Any]


_LOG_FILES: list[TextIO] = []


def set_log_file(out: TextIO) -> None:
    """Also write every log line to ``out`` (the agent's log in its state folder)."""
    _LOG_FILES.append(out)


def log(line: str) -> None:
    """One line on stderr (the VMM's log file when the orchestrator started it) and the agent's log."""
    stamped = f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {line}"
    print(stamped, file=sys.stderr, flush=True)
    for out in _LOG_FILES:
        print(stamped, file=out, flush=True)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(params: Params, key: str) -> bytes:
    try:
        return base64.b64decode(str(params[key]), validate=True)
    except (KeyError, ValueError) as err:
        raise ConfplanError(f"parameter {key!r} is missing or not base64: {err}") from None


def _hex(params: Params, key: str, size: int) -> bytes:
    try:
        value = bytes.fromhex(str(params[key]))
    except (KeyError, ValueError):
        value = b""
    if len(value) != size:
        raise ConfplanError(f"parameter {key!r} must be {size} bytes in hex")
    return value


@dataclass(frozen=True)
class _Method:
    """An RPC method: the roles that serve it (empty: any, even before ``create``) and its body."""

    roles: tuple[str, ...]
    body: Callable[..., Any]
    locked: bool = True  # False: answered while a long call (stop-and-copy) holds the service's lock
    with_call: bool = False  # the body also gets the Call (to send events while it runs)


class VmmService:
    """One machine and its migration side; ``register`` puts the methods on an RpcServer."""

    def __init__(
        self, *, psp_dir: Path, firmware_dir: Path | None = None, state_dir: Path | None = None,
        remote: bool = False, plan: str | None = None,
    ) -> None:  # fmt: skip
        """``state_dir``: where this VMM keeps its console log (the checkpoint folder of a local VMM, the
        agent's own folder); ``remote``: an agent, which serves migration targets only."""
        self.psp_dir, self.firmware_dir, self.state_dir = psp_dir, firmware_dir, state_dir
        self.remote, self.plan = remote, plan
        self.side: Side | None = None
        self.stopping = threading.Event()
        self.started = time.time()
        self._lock = threading.Lock()

    @property
    def role(self) -> str:
        return "" if self.side is None else self.side.role

    # ---- plumbing ----
    def register(self, server: RpcServer) -> None:
        for name, method in _METHODS.items():
            server.register(name, self._handler(name, method))

    def _handler(self, name: str, method: _Method) -> Callable[[Params, Call], Any]:
        def run(params: Params, call: Call) -> Any:
            target = self if not method.roles else self._side_for(name, method.roles)
            return method.body(target, params, call) if method.with_call else method.body(target, params)

        def handler(params: Params, call: Call) -> Any:
            try:
                if not method.locked:  # the handover's own lock keeps its view and orders consistent
                    return run(params, call)
                with self._lock:
                    return run(params, call)
            except ConfplanError as err:
                log(f"refused {name!r} from {call.peer or 'the caller'}: {err.message}")
                raise

        return handler

    def _side_for(self, name: str, roles: tuple[str, ...]) -> Side:
        side = self.side
        if side is None:
            raise ConfplanError("this VMM has no machine yet", hint="call 'create' first")
        if side.role not in roles:
            raise ConfplanError(
                f"only a {' or '.join(roles)} VMM serves {name!r}; this one holds a {side.role} machine",
                hint="call it on the other side's VMM",
            )
        side.need_machine()  # a guest that stopped says why, rather than a confusing later error
        return side

    def handover_state(self) -> Params:
        """This VMM's side of the handover (docs/handover.md), or what a dead predecessor's record says."""
        if self.side is not None:
            return {**self.side.handover_view(), "pid": os.getpid()}
        if self.state_dir is not None:  # a restarted agent answers for the VMM that died before it
            for role in (Role.TARGET, Role.SOURCE):
                dead = dead_view(HandoverFiles(self.state_dir, role))
                if dead is not None and dead.get("state") is not None:
                    return {**dead, "pid": os.getpid()}
        return {"reach": "alive", "role": self.role, "guest_id": None, "attempt": 0, "state": None,
                "running": False, "pid": os.getpid()}  # fmt: skip

    def handover_order(self, params: Params) -> Params:
        """The orchestrator's order (compare and set), whatever state the guest is in."""
        if self.side is None:
            raise ConfplanError("this VMM has no machine, so no handover", hint="reconcile again")
        return self.side.handover_order(str(params.get("order")), str(params.get("expect")))

    # ---- calls on the service itself ----
    def info(self, params: Params | None = None) -> Params:
        """Who this VMM is and what it holds; the side's own fields over the defaults of an empty VMM.
        With ``{"host": true}`` also this host's facts for a preflight: KVM usable, memory available."""
        base = {"pid": os.getpid(), "role": self.role, "machine": False, "since": self.started,
                "plan": self.plan, "running": False, "guest_error": None, "resumed": False,
                "incoming": None, "outgoing": False, "throttle": 0.0, "launch_state": None}  # fmt: skip
        if params and params.get("host"):
            base["host"] = host_facts()
        return base if self.side is None else {**base, **self.side.info()}

    def create(self, params: Params) -> Params:
        from confplan.vmm import Machine
        from confplan.vmm.firmware import Firmware

        if self.side is not None:
            raise ConfplanError(f"this VMM already holds a {self.role} machine", hint="use a new VMM process")
        role = str(params.get("role"))
        if role not in ROLES:
            raise ConfplanError(f"unknown role {role!r}", hint="use source or target")
        if self.remote and role != "target":
            raise ConfplanError(
                "an agent serves migration targets only: it never runs a source or dials out",
                hint="launch the source with `confplan apply` on its own host",
            )
        config = self._config(params.get("config"), role)
        firmware = Firmware.load(self.firmware_dir) if self.firmware_dir else None
        machine = Machine(config, firmware=firmware)
        kind = OutgoingMigration if role == "source" else IncomingMigration
        try:
            self.side = kind(machine, psp_dir=self.psp_dir, log=log, state_dir=self.state_dir,
                             on_exit=self.stopping.set)  # fmt: skip
        except BaseException:
            machine.close()
            raise
        return self.side.created()

    def _config(self, doc: object, role: str) -> MachineConfig:
        """The machine config from the wire, with nothing that names a host path or host output: the
        console log goes to this VMM's own state folder."""
        if not isinstance(doc, dict):
            raise ConfplanError("parameter 'config' must be an object of MachineConfig fields")
        defaults = {f.name: f.default for f in dataclasses.fields(MachineConfig)}
        host_set = sorted(key for key in _HOST_ONLY if doc.get(key, defaults[key]) != defaults[key])
        if host_set:
            raise ConfplanError(
                f"config fields {', '.join(map(repr, host_set))} are not accepted over the control channel",
                hint="a VMM decides its own files and output; send only the guest's fields",
            )
        doc = {key: value for key, value in doc.items() if key not in _HOST_ONLY}
        log_path = str(self.state_dir / f"console-{role}.log") if self.state_dir is not None else None
        try:
            return MachineConfig(**doc, console_log=log_path)
        except TypeError as err:
            raise ConfplanError(f"config: {err}") from None

    def platform_chain(self, params: Params) -> Params:
        from confplan.sev import EmulatedSecureProcessor

        psp = EmulatedSecureProcessor.open(self.psp_dir)
        v = psp.version
        return {"chain": _b64(psp.platform_chain().pack()), "version": [v.api_major, v.api_minor, v.build]}

    def discard(self, params: Params) -> Params:
        """Drop a target machine that never resumed (a failed attempt), so the agent can take the next
        one; a guest that runs here (resumed, or a source) is never discarded this way."""
        side = self.side
        if side is None:
            return {"discarded": False}
        resumed = isinstance(side, IncomingMigration) and side.resumed
        if resumed or side.role != "target":
            raise ConfplanError(
                f"this VMM runs a {side.role} guest{' that resumed here' if resumed else ''}: not discarded",
                hint="stop it deliberately (`confplan stop`), or use another agent",
            )
        self.close()
        log("target: machine discarded")
        return {"discarded": True}

    def stop_guest(self, params: Params) -> Params:
        """Stop the guest this VMM holds, whatever it is doing (`confplan stop`); the process serves on
        (an agent takes the next migration)."""
        side = self.side
        if side is None:
            return {"stopped": None}
        role = side.role
        self.close()
        log(f"{role}: guest stopped on request")
        return {"stopped": role}

    def shutdown(self, params: Params) -> Params:
        """Stop the guest and this process (after the answer is sent)."""
        self.stopping.set()
        log(f"{self.role or 'vmm'}: shutting down")
        return {"pid": os.getpid()}

    def close(self) -> None:
        side, self.side = self.side, None
        if side is not None:
            side.close()


def host_facts() -> Params:
    """What a remote preflight asks of this host: is KVM usable, how much memory is available."""
    from confplan.kvm import probe_kvm
    from confplan.vmm.memory import mem_available

    max_vcpus = None
    try:
        probe = probe_kvm()
        kvm: Params = {"ok": True, "detail": probe.detail, "hint": None}
        max_vcpus = probe.max_vcpus
    except ConfplanError as err:
        kvm = {"ok": False, "detail": err.message, "hint": err.hint}
    return {"kvm": kvm, "mem_available": mem_available(), "max_vcpus": max_vcpus}


# ---- the methods, by the roles that serve them ----
_ANY: tuple[str, ...] = ()
_BOTH, _SOURCE, _TARGET = ("source", "target"), ("source",), ("target",)


def _launch_measure(side: Side, params: Params) -> Params:
    godh, session = _unb64(params, "godh"), _unb64(params, "session")
    return {"measurement": _b64(side.launch_measure(int(params["policy"]), godh, session))}


def _launch_secret(side: Side, params: Params) -> Params:
    side.launch_secret(_unb64(params, "header"), _unb64(params, "ciphertext"))
    return {}


def _snp_launch(side: Side, params: Params) -> Params:
    return {"measurement": _b64(side.snp_launch(int(params["policy"])))}


def _snp_chain(side: Side, params: Params) -> Params:
    ark, ask, vcek = side.snp_chain()
    return {"ark": _b64(ark), "ask": _b64(ask), "vcek": _b64(vcek)}


def _key_request(side: Side, params: Params) -> Params:
    return {"report": _b64(side.key_request(_unb64(params, "nonce")))}


def _key_release(side: Side, params: Params) -> Params:
    side.key_release(_unb64(params, "wrapped"))
    return {}


def _mac_table(side: Side, params: Params) -> Params:
    if params.get("action", "fill") != "fill":
        raise ConfplanError(f"unknown mac_table action {params['action']!r}", hint="the action is fill")
    return side.mac_table_fill()


def _seconds(params: Params, key: str) -> float | None:
    value = params.get(key)
    return float(value) if value else None


def _set_throttle(side: OutgoingMigration, params: Params) -> Params:
    return {"throttle": side.set_throttle(float(params.get("fraction", 0.0)))}


def _connect_outgoing(side: OutgoingMigration, params: Params) -> Params:
    side.check_can_send()  # before the parameters: a machine that cannot send says so first
    bandwidth = params.get("bandwidth")
    side.connect(
        str(params["host"]), int(params["port"]), migration_id=_hex(params, "migration_id", 16),
        stream_key=_hex(params, "stream_key", 32), bandwidth=float(bandwidth) if bandwidth else None,
        attempt=int(params.get("attempt", 0)), progress_timeout=_seconds(params, "progress_timeout"),
        sealed_state=bool(params.get("sealed_state", False)), channels=int(params.get("channels", 1)),
    )  # fmt: skip
    return {}


def _precopy_round(side: OutgoingMigration, params: Params, call: Call) -> Params:
    """One round; with ``progress_interval`` > 0, ``precopy-progress`` events while it runs (docs/rpc.md)."""
    interval = float(params.get("progress_interval") or 0.0)
    if interval <= 0:
        return side.precopy_round()
    return side.precopy_round(lambda doc: call.notify("precopy-progress", doc), interval)


def _stop_and_copy(side: OutgoingMigration, params: Params) -> Params:
    timeout, retry = float(params.get("verdict_timeout", 5.0)), float(params.get("retry_interval", 0.2))
    cpl0 = int(params.get("pause_in_cpl0", 0))
    return side.stop_and_copy(verdict_timeout=timeout, retry_interval=retry, pause_in_cpl0=cpl0)


def _resume_guest(side: OutgoingMigration, params: Params) -> Params:
    side.resume_guest(str(params.get("reason", "the migration was abandoned")))
    return {"running": True}


def _listen_incoming(side: IncomingMigration, params: Params) -> Params:
    return side.listen(
        str(params.get("host", "127.0.0.1")), int(params.get("port", 0)),
        migration_id=_hex(params, "migration_id", 16), stream_key=_hex(params, "stream_key", 32),
        accept_timeout=float(params.get("accept_timeout", 60.0)), attempt=int(params.get("attempt", 0)),
        sealed_state=bool(params.get("sealed_state", False)),
    )  # fmt: skip


def _abort_incoming(side: IncomingMigration, params: Params) -> Params:
    side.abort()
    return {}


_METHODS: dict[str, _Method] = {
    "info": _Method(_ANY, lambda service, params: service.info(params), locked=False),
    "handover_state": _Method(_ANY, lambda service, params: service.handover_state(), locked=False),
    "handover_order": _Method(_ANY, VmmService.handover_order, locked=False),
    "create": _Method(_ANY, VmmService.create),
    "platform_chain": _Method(_ANY, VmmService.platform_chain),
    "discard": _Method(_ANY, VmmService.discard),
    "shutdown": _Method(_ANY, VmmService.shutdown),
    "stop_guest": _Method(_ANY, VmmService.stop_guest),
    "launch_measure": _Method(_BOTH, _launch_measure),
    "launch_secret": _Method(_BOTH, _launch_secret),
    "snp_launch": _Method(_BOTH, _snp_launch),
    "snp_chain": _Method(_BOTH, _snp_chain),
    "key_request": _Method(_BOTH, _key_request),
    "key_release": _Method(_BOTH, _key_release),
    "start": _Method(_BOTH, lambda side, params: side.start()),
    "workload_check": _Method(_BOTH, lambda side, params: side.workload_check()),
    "mac_table": _Method(_BOTH, _mac_table),
    "connect_outgoing": _Method(_SOURCE, _connect_outgoing),
    "precopy_round": _Method(_SOURCE, _precopy_round, with_call=True),
    "cancel": _Method(_SOURCE, lambda side, params: {"cancelled": side.cancel_round()}, locked=False),
    "set_throttle": _Method(_SOURCE, _set_throttle),
    "stop_and_copy": _Method(_SOURCE, _stop_and_copy),
    "resume_guest": _Method(_SOURCE, _resume_guest),
    "listen_incoming": _Method(_TARGET, _listen_incoming),
    "incoming_status": _Method(_TARGET, lambda side, p: side.status(float(p.get("wait", 0.0)))),
    "abort_incoming": _Method(_TARGET, _abort_incoming),
}
