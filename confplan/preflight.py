"""Preflight: what a plan needs from the hosts, checked before anything is launched (docs/preflight.md).

``run_checks(plan)`` looks, changes nothing, and returns one ``Check`` per fact: the plan within this VMM's
limits, the firmware and the C core built, and per side KVM usable and memory for the guest; the
checkpoint folder writable with room; pinned ports free; a remote target reachable and the agent it
should be. ``require(plan)`` is the first step of ``confplan apply``: it raises ``PreflightFailed`` (exit
3) listing the failed checks, so a host that lacks something stops the apply before a VMM starts.

Limits that the plan alone decides are the plan's rules (``confplan validate``); here only the hosts.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from confplan.agent import handle as vmm_handle
from confplan.errors import ConfplanError, EnvironmentProblem, PlanBusy
from confplan.guest import abi
from confplan.kvm import probe_kvm
from confplan.plan import Plan
from confplan.plan.models import StartIncomingParams
from confplan.plan.units import format_size
from confplan.transport import UntrustedPeer
from confplan.transport.tls import ChannelError
from confplan.vmm.memory import mem_available

# A VMM process beside its guest RAM: Python, confplan, the firmware image, vCPU threads and stream
# buffers. Measured here at 38 MiB resident for an idle VMM; the rest is headroom for the stream's buffers.
VMM_OVERHEAD = 64 * abi.MIB
# The checkpoint folder holds the SQLite checkpoint, VMM logs, console logs and keys: a few MiB per run.
MIN_FREE_SPACE = 64 * abi.MIB
SIDES = ("source", "target")


@dataclass(frozen=True)
class Check:
    """One fact checked: ``check`` a stable id (docs/report.md), ``side`` source, target or orchestrator,
    ``detail`` what was found, ``hint`` the fix (None when ``ok``)."""

    check: str
    side: str
    ok: bool
    detail: str
    hint: str | None = None

    def lines(self) -> list[str]:
        """``OK    kvm              source        ...``, and under a FAIL its ``hint:`` line (columns, so
        a screenful of checks reads as a table)."""
        head = f"{'OK' if self.ok else 'FAIL':<5} {self.check:<16} {self.side:<13} {self.detail}"
        return [head] if self.ok or not self.hint else [head, f"      hint: {self.hint}"]

    def to_json(self) -> dict[str, Any]:
        return {"check": self.check, "side": self.side, "ok": self.ok, "detail": self.detail,
                "hint": self.hint}  # fmt: skip


class PreflightFailed(EnvironmentProblem):
    """Checks failed; nothing was launched. ``checks`` holds every check run (passed ones too)."""

    def __init__(self, checks: list[Check], *, shown: bool) -> None:
        failed = [check for check in checks if not check.ok]
        names = ", ".join(f"{check.check} ({check.side})" for check in failed)
        hint: str | None
        if shown:  # the FAIL lines with their hints are on the screen already: name them, once
            message = f"preflight failed: {names}; nothing was launched"
            hint = "fix what each FAIL line above says, then rerun"
        else:
            message = "preflight failed, nothing was launched: " + "; ".join(
                f"{check.check} ({check.side}): {check.detail}" for check in failed
            )
            hint = "; ".join(dict.fromkeys(check.hint for check in failed if check.hint)) or None
        super().__init__(message, hint=hint)
        self.checks = checks


OnCheck = Callable[[Check], None]


def require(plan: Plan, *, on_check: OnCheck | None = None, shown: bool = False,
            home: Path | None = None) -> list[Check]:  # fmt: skip
    """Run every check (each handed to ``on_check`` as it is made); raise ``PreflightFailed`` when one
    failed. ``shown``: ``on_check`` prints the lines, so the error need not repeat them."""
    checks = run_checks(plan, on_check=on_check, home=home)
    if not all(check.ok for check in checks):
        raise PreflightFailed(checks, shown=shown)
    return checks


def run_checks(plan: Plan, *, on_check: OnCheck | None = None, home: Path | None = None) -> list[Check]:
    """Every check of ``plan`` against the hosts, in a stable order; nothing is created or changed."""
    checks: list[Check] = []
    for check in _all_checks(plan, home):
        checks.append(check)
        if on_check is not None:
            on_check(check)
    return checks


def _all_checks(plan: Plan, home: Path | None) -> Iterator[Check]:
    yield _plan_limits(plan)
    local = [side for side in SIDES if _endpoint(plan, side).is_local]
    if local:
        yield _firmware()
        yield _c_core()
    running = {side: _running_vmm(plan, side) for side in local}
    for side in SIDES:
        if side in local:
            yield _kvm_local(plan, side)
            yield _memory_local(plan, side, local, running)
        else:
            yield from _remote(plan, side, home)
    yield from _checkpoint_dir(plan.checkpoint.dir)
    yield _ports(plan, running.get("target"))


def _endpoint(plan: Plan, side: str) -> Any:
    return plan.source if side == "source" else plan.target


# ---- host-independent ----
def _plan_limits(plan: Plan) -> Check:
    guest, helper = plan.guest, plan.helper
    detail = (
        f"guest {format_size(guest.memory)}, {guest.vcpus} vCPU(s) + {helper.mh_vcpus} helper vCPU(s) "
        f"({helper.mode}), {plan.sev.generation}: within this VMM's limits "
        f"({format_size(abi.MAX_RAM)}, {abi.MAX_VCPUS} vCPUs)"
    )
    return Check("plan-limits", "orchestrator", True, detail)


# ---- this host: what the local VMMs run ----
def _firmware() -> Check:
    from confplan.vmm.firmware import Firmware

    try:
        firmware = Firmware.load()
    except ConfplanError as err:
        return Check("firmware", "orchestrator", False, err.message, err.hint)
    return Check("firmware", "orchestrator", True, f"{firmware.path} (sha256 {firmware.sha256[:16]}...)")


def _c_core() -> Check:
    from confplan.core._lib import lib

    try:
        loaded = lib()
    except ConfplanError as err:
        return Check("c-core", "orchestrator", False, err.message, err.hint)
    except OSError as err:
        return Check("c-core", "orchestrator", False, f"the C page-transfer core does not load: {err}",
                     "rebuild it: `make install` in the confplan checkout")  # fmt: skip
    name = Path(loaded._name).name
    return Check("c-core", "orchestrator", True, f"the C page-transfer core loads ({name})")


def _kvm_local(plan: Plan, side: str) -> Check:
    try:
        probe = probe_kvm()
    except EnvironmentProblem as err:
        return Check("kvm", side, False, err.message, err.hint)
    return _vcpus_within(plan, side, probe.detail, probe.max_vcpus)


def _vcpus_per_vm(plan: Plan) -> int:
    """The vCPUs of the guest's VM: aux helper vCPUs are in it, a mirror VM's are in a VM of their own."""
    helper = plan.helper
    return plan.guest.vcpus + (helper.mh_vcpus if helper.mode == "aux-vcpu" else 0)


def _vcpus_within(plan: Plan, side: str, detail: str, limit: int | None) -> Check:
    """KVM's own vCPU limit (KVM_CAP_MAX_VCPUS) on that host, beside the firmware's that validate checks."""
    need = _vcpus_per_vm(plan)
    if limit is not None and need > limit:
        hint = "lower guest.vcpus or helper.aux_vcpus, or use a host whose KVM allows more"
        return Check("kvm", side, False, f"{detail}; the guest's VM needs {need} vCPUs", hint)
    return Check("kvm", side, True, detail)


def _running_vmm(plan: Plan, side: str) -> int | None:
    """The pid of this plan's VMM for ``side`` that already runs (a resumed apply keeps it), else None."""
    try:
        found = vmm_handle.find_local(plan.checkpoint.dir, side, plan=plan.metadata.name)
    except PlanBusy:
        return None  # another plan's VMM: apply refuses that itself, with its own message
    if found is None:
        return None
    found.close()
    return found.pid


def _memory_local(plan: Plan, side: str, local: list[str], running: dict[str, int | None]) -> Check:
    if running.get(side) is not None:
        return Check("memory", side, True, f"the {side} VMM (pid {running[side]}) already holds the guest")
    starting = [each for each in local if running.get(each) is None]
    need = len(starting) * (plan.guest.memory + VMM_OVERHEAD)
    avail = mem_available()
    what = f"{format_size(plan.guest.memory)} guest RAM + {format_size(VMM_OVERHEAD)} VMM"
    if len(starting) > 1:
        what = f"{' and '.join(starting)} on this host: {len(starting)} x ({what})"
    if avail is None:
        return Check("memory", side, True, f"needs {_size(need)} ({what}); MemAvailable unknown, not checked")
    detail = f"needs {_size(need)} ({what}), {_size(avail)} available"
    if avail >= need:
        return Check("memory", side, True, detail)
    return Check("memory", side, False, detail, "free memory on this host or lower guest.memory in the plan "
                 "(a VMM short of memory is killed by the kernel mid-migration)")  # fmt: skip


def _size(count: int) -> str:
    mib = count / abi.MIB
    return f"{mib / 1024:.1f} GiB" if mib >= 1024 else f"{mib:.0f} MiB"


# ---- a remote side: the agent ----
def _remote(plan: Plan, side: str, home: Path | None) -> Iterator[Check]:
    endpoint = _endpoint(plan, side)
    host, port = endpoint.address
    where = f"the agent at {host}:{port}"
    try:
        agent = vmm_handle.connect_remote(host, port, side, pin=endpoint.fingerprint, home=home)
    except UntrustedPeer as err:
        yield Check("target-reachable", side, True, f"{where} answered the TLS handshake")
        yield Check("target-identity", side, False, err.message, err.hint)
        return
    except ChannelError as err:
        yield Check("target-reachable", side, False, err.message, err.hint)
        return
    except (ConfplanError, OSError) as err:
        yield Check("target-reachable", side, False, f"{where}: {_message(err)}",
                    "check that `confplan agent` runs there and that the port is reachable")  # fmt: skip
        return
    try:
        yield Check("target-reachable", side, True, f"{where} answered (agent pid {agent.pid})")
        how = "pinned in the plan" if endpoint.fingerprint else "enrolled in this host's trust store"
        yield Check("target-identity", side, True, f"{agent.peer_fingerprint} ({how})")
        info = agent.call("info", {"host": True}, timeout=10.0)
    except ConfplanError as err:
        yield Check("target-reachable", side, False, f"{where}: {err.message}", err.hint)
        return
    finally:
        agent.close()
    yield from _remote_host(plan, side, info.get("host"))


def _remote_host(plan: Plan, side: str, facts: Any) -> Iterator[Check]:
    """KVM and memory on the agent's host, from its ``info`` (an older agent does not report them)."""
    if not isinstance(facts, dict):
        old = "the agent does not report its host's facts (an older confplan): not checked"
        yield Check("kvm", side, True, old)
        yield Check("memory", side, True, old)
        return
    kvm = facts.get("kvm") or {}
    if kvm.get("ok"):
        limit = facts.get("max_vcpus")
        yield _vcpus_within(plan, side, str(kvm.get("detail")), limit if isinstance(limit, int) else None)
    else:
        yield Check("kvm", side, False, str(kvm.get("detail")), kvm.get("hint"))
    avail, need = facts.get("mem_available"), plan.guest.memory + VMM_OVERHEAD
    what = f"{format_size(plan.guest.memory)} guest RAM + {format_size(VMM_OVERHEAD)} VMM"
    if not isinstance(avail, int):
        yield Check("memory", side, True, f"needs {_size(need)} ({what}); MemAvailable unknown, not checked")
    elif avail >= need:
        yield Check("memory", side, True, f"needs {_size(need)} ({what}), {_size(avail)} available")
    else:
        yield Check("memory", side, False, f"needs {_size(need)} ({what}), {_size(avail)} available on "
                    "the agent's host", "free memory on the agent's host or lower guest.memory in the plan")


def _message(err: BaseException) -> str:
    if isinstance(err, ConfplanError):
        return err.message
    return str(err.strerror if isinstance(err, OSError) and err.strerror else err)


# ---- the checkpoint folder ----
def _checkpoint_dir(directory: Path) -> Iterator[Check]:
    """Writable (or creatable) by this user on a writable filesystem, with ``MIN_FREE_SPACE`` free."""
    existing = directory
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    fix = "give checkpoint.dir a folder this user may write (or pass --checkpoint-dir DIR)"
    if not existing.is_dir():
        yield Check("checkpoint-dir", "orchestrator", False, f"{existing} is not a folder", fix)
        return
    verb = "is" if existing == directory else f"can be created in {existing}, which is"
    stat = os.statvfs(existing)
    if stat.f_flag & os.ST_RDONLY:
        yield Check("checkpoint-dir", "orchestrator", False, f"{directory}: {existing} is on a read-only "
                    "filesystem", fix)  # fmt: skip
        return
    if not os.access(existing, os.W_OK | os.X_OK):
        yield Check("checkpoint-dir", "orchestrator", False, f"{directory}: {existing} is not writable by "
                    "this user", fix)  # fmt: skip
        return
    yield Check("checkpoint-dir", "orchestrator", True, f"{directory} {verb} writable")
    free = stat.f_bavail * stat.f_frsize
    detail = f"{_size(free)} free under {existing} (needs {_size(MIN_FREE_SPACE)})"
    if free >= MIN_FREE_SPACE:
        yield Check("disk-space", "orchestrator", True, detail)
    else:
        yield Check("disk-space", "orchestrator", False, detail,
                    f"free space on the filesystem of {existing}, or pass --checkpoint-dir DIR on another")


# ---- ports ----
def _ports(plan: Plan, target_pid: int | None) -> Check:
    """The page-stream port the plan pins (start-incoming's listen_port) is free on a local target."""
    pinned = [
        StartIncomingParams.model_validate(stage.params).listen_port
        for stage in plan.stages
        if stage.name == "start-incoming"
    ]
    port = next((each for each in pinned if each), 0)
    if not port:
        return Check("ports", "target", True, "no port pinned (the page stream takes a free one)")
    if not plan.target.is_local:
        return Check("ports", "target", True, f"port {port} is on the agent's host: the agent binds it at "
                     "start-incoming")  # fmt: skip
    if target_pid is not None:
        return Check("ports", "target", True, f"port {port}: the target VMM (pid {target_pid}) runs already")
    problem = _port_taken(port)
    if problem is None:
        return Check("ports", "target", True, f"port {port} on 127.0.0.1 is free")
    return Check("ports", "target", False, f"port {port} on 127.0.0.1: {problem}",
                 f"stop what holds it (`ss -ltnp 'sport = :{port}'` shows it), or set start-incoming's "
                 "listen_port to another port (0: any free one)")  # fmt: skip


def _port_taken(port: int) -> str | None:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the target's listener does
        try:
            probe.bind(("127.0.0.1", port))
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                return "already taken by another process"
            return err.strerror or str(err)
    return None
