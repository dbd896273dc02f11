"""What the stage modules share: the VMM handles, the machine configs, the owner's secrets, and the
measured launch with the owner's key broker (the orchestrator plays the guest owner for local runs)."""

from __future__ import annotations

import contextlib
import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from confplan.agent import handle as vmm_handle
from confplan.agent.handle import VmmHandle
from confplan.errors import ConfplanError
from confplan.plan import Plan
from confplan.rpc import RpcError
from confplan.stages import machines
from confplan.stages.base import StageContext, Teardown, TeardownWhen

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

DIGEST_TIMEOUT = 300.0
TEARDOWN_TIMEOUT = 5.0  # a tear-down never waits long on a dead peer


def state_dir(plan: Plan) -> Path:
    return Path(plan.checkpoint.dir)


def owner_dir(plan: Plan) -> Path:
    return state_dir(plan) / "owner"


def vmm(ctx: StageContext, role: str) -> VmmHandle:
    """The live handle of ``role``'s VMM: from this apply, or reconnected to the one an earlier apply
    started. A ConfplanError says so when it is gone."""
    handle: VmmHandle | None = ctx.vmms.get(role)
    if handle is not None and handle.client.connected:
        return handle
    endpoint = ctx.plan.target if role == "target" else ctx.plan.source
    if endpoint.is_local:
        handle = vmm_handle.find_local(state_dir(ctx.plan), role, plan=ctx.plan.metadata.name)
    else:
        host, port = endpoint.address or ("", 0)
        handle = vmm_handle.connect_remote(host, port, role, pin=endpoint.fingerprint)
    if handle is None:
        first = "launch-source" if role == "source" else "provision-target"
        raise ConfplanError(
            f"the {role} VMM process is gone "
            f"(nothing serves {vmm_handle.socket_path(state_dir(ctx.plan), role)})",
            hint=f"`confplan apply --restart` starts over from {first}",
        )
    adopt(ctx, role, handle)
    return handle


def adopt(ctx: StageContext, role: str, handle: VmmHandle) -> None:
    """Keep ``handle`` for later stages of this apply; the connection closes when the apply ends."""
    ctx.vmms[role] = handle
    ctx.add_teardown(f"disconnect from the {role} VMM", handle.close, when=TeardownWhen.ALWAYS)


@dataclass(frozen=True)
class LiveVmm:
    """A VMM of this plan that still serves, and what stopping it would destroy."""

    role: str
    pid: int | None
    what: str  # "runs the migrated guest", "runs the source guest", ...
    precious: bool  # stopping it stops a guest that runs or is the only copy

    def describe(self) -> str:
        return f"the {self.role} VMM (pid {self.pid}) {self.what}"


def live_vmms(plan: Plan) -> list[LiveVmm]:
    """The local VMMs of ``plan`` that serve now (a new run would stop them), with what they hold."""
    found = []
    for role in ("source", "target"):
        handle = vmm_handle.find_local(state_dir(plan), role, plan=plan.metadata.name)
        if handle is None:
            continue
        try:
            info = handle.call("info", timeout=5.0)
        except RpcError:
            continue
        finally:
            handle.close()
        found.append(_classify(role, info))
    return found


def _classify(role: str, info: dict[str, Any]) -> LiveVmm:
    pid = info.get("pid")
    if not info.get("machine"):
        return LiveVmm(role, pid, "holds no guest", precious=False)
    if info.get("guest_error"):
        return LiveVmm(role, pid, f"holds a guest that stopped ({info['guest_error']})", precious=False)
    if role == "target":
        if info.get("resumed"):
            return LiveVmm(role, pid, "runs the migrated guest", precious=True)
        return LiveVmm(role, pid, "holds a target that never resumed (helper only)", precious=False)
    if info.get("running"):
        return LiveVmm(role, pid, "runs the source guest", precious=True)
    return LiveVmm(role, pid, "holds the source guest (not running)", precious=True)


def probe_local(previous_result: dict[str, Any] | Any, role: str, **want: Any) -> bool:
    """resume_safe helper: does the VMM recorded in a stage result (its local socket, or the remote agent
    and its pin) still serve, in the wanted state? A restarted agent holds no machine: the stage redoes."""
    socket = previous_result.get("socket") if previous_result else None
    agent = previous_result.get("agent") if previous_result else None
    handle: VmmHandle | None = None
    if socket:
        handle = vmm_handle.find_local(Path(socket).parent, role)
    elif agent:
        try:
            pin = previous_result.get("pin")
            handle = vmm_handle.connect_remote(str(agent[0]), int(agent[1]), role, pin=pin)
        except ConfplanError:
            return False
    else:
        return True  # nothing recorded to probe
    if handle is None:
        return False
    try:
        info = handle.call("info", timeout=5.0)
    except RpcError:
        return False
    finally:
        handle.close()
    return all(info.get(key) == value for key, value in want.items())


def machine_config(plan: Plan, *, mh_only: bool) -> dict[str, Any]:
    """The plan's guest as ``MachineConfig`` fields (JSON, for the VMM's ``create``); measured launch (an
    SEV-SNP guest with the owner's static key, made by ``new_migration_secrets``)."""
    owner_key = snp_owner_key(plan)[1] if plan.sev.generation == "sev-snp" else b""
    return dataclasses.asdict(
        machines.machine_config(plan, measured=True, mh_only=mh_only, owner_key=owner_key)
    )


def _write_secret(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, path)


def new_migration_secrets(plan: Plan) -> None:
    """A fresh transport key, migration id and (SEV-SNP) owner's static X25519 key for a new source launch
    (kept 0600 in the owner folder)."""
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

    _write_secret(owner_dir(plan) / "transport.key", os.urandom(32))
    _write_secret(owner_dir(plan) / "migration.id", os.urandom(16))
    raw = X25519PrivateKey.generate().private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
    _write_secret(owner_dir(plan) / "snp-owner.key", raw)


def snp_owner_key(plan: Plan) -> tuple[X25519PrivateKey, bytes]:
    """The owner's static X25519 key for this migration's SEV-SNP guests, and its public half."""
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    from confplan.sev.snp_release import public_bytes

    try:
        key = X25519PrivateKey.from_private_bytes((owner_dir(plan) / "snp-owner.key").read_bytes())
    except (OSError, ValueError) as err:
        raise ConfplanError(
            f"the owner's SNP key of this migration is missing or damaged: {err}",
            hint="`confplan apply --restart`",
        ) from None
    return key, public_bytes(key)


def migration_secrets(plan: Plan) -> tuple[bytes, bytes]:
    try:
        return (owner_dir(plan) / "transport.key").read_bytes(), (
            owner_dir(plan) / "migration.id"
        ).read_bytes()
    except OSError as err:
        raise ConfplanError(
            f"the transport key of this migration is missing: {err}", hint="`confplan apply --restart`"
        ) from None


def _expected_digest(created: dict[str, Any], config: dict[str, Any]) -> bytes:
    from confplan.vmm import MachineConfig
    from confplan.vmm.bootparams import HostCpu
    from confplan.vmm.firmware import Firmware
    from confplan.vmm.launch_blobs import expected_launch_digest

    return expected_launch_digest(MachineConfig(**config), Firmware.load(), HostCpu(**created["host"]))


def launch_and_start(
    plan: Plan, handle: VmmHandle, created: dict[str, Any], config: dict[str, Any]
) -> tuple[str, dict[str, Any]]:  # the matched digest, and start's answer (+ SNP: "attestation")
    """The measured launch of ``handle``'s machine with the owner's broker here, then its start: the
    transport key is released only to a guest whose measurement is the digest predicted from the plan and
    confplan's own firmware (AttestationRefused otherwise, and nothing is released).

    SEV/SEV-ES: LAUNCH_MEASURE is checked and the key goes in as LAUNCH_SECRET before any vCPU runs.
    SEV-SNP (docs/key-release.md): the guest launches and starts, then its helper's report (bound to a fresh
    nonce and its ephemeral key) is checked and the key is wrapped to that key; start's answer then also
    says what the report check covered ("attestation"). Returns (digest, start's answer)."""
    from confplan.sev.broker import confplan_secrets

    policy = int(plan.sev.policy_int)
    expected = _expected_digest(created, config)
    key, migration_id = migration_secrets(plan)
    secrets = confplan_secrets(key, migration_id)
    if config.get("snp"):
        from confplan.sev.owner import release_to_snp_guest

        peer = handle.launch_peer()
        peer.snp_launch(policy)  # the host's word on the digest; the report below is the proof
        started = handle.call("start", timeout=60.0)
        checked = release_to_snp_guest(
            peer, expected, policy, secrets, owner_key=snp_owner_key(plan)[0], trust_emulated_platform=True
        )
        return expected.hex(), {**started, "attestation": checked}
    from confplan.sev import KeyBroker
    from confplan.sev.owner import attest_and_release, owner_policy_for

    with contextlib.suppress(FileExistsError):
        owner_dir(plan).mkdir(parents=True, mode=0o700)
    broker = KeyBroker.init(
        owner_dir(plan), owner_policy_for(expected.hex(), policy, trust_emulated_platform=True), force=True
    )
    record = attest_and_release(handle.launch_peer(), broker, policy, secrets)
    return record.digest, handle.call("start", timeout=60.0)


def undo_on_source(ctx: StageContext) -> Teardown:
    """Register 'resume the source guest' (stream closed, vCPUs running); resume-target cancels it."""

    def resume() -> None:
        cancel_round(ctx.plan)  # else the resume waits for the round (seconds of a big guest) to end
        reason = {"reason": f"stage {ctx.current} failed"}
        vmm(ctx, "source").call("resume_guest", reason, timeout=TEARDOWN_TIMEOUT)

    return ctx.add_teardown("resume the source guest's vCPUs", resume)


def cancel_round(plan: Plan) -> bool:
    """Cut short a precopy round the source VMM may be running (the stage was interrupted while it waited
    for it): over a connection of its own, since the stage's connection waits for the round's answer. The
    round fails at its next frame and the guest runs on. False when nothing was cancelled (no round, no
    source VMM, or one without ``cancel``)."""
    if not plan.source.is_local:
        return False
    try:
        handle = vmm_handle.find_local(state_dir(plan), "source", plan=plan.metadata.name)
    except ConfplanError:
        return False
    if handle is None:
        return False
    try:
        if "cancel" not in handle.client.server_info.get("methods", ()):
            return False  # an older VMM: the round runs to its end
        return bool(handle.call("cancel", timeout=TEARDOWN_TIMEOUT)["cancelled"])
    except ConfplanError:
        return False
    finally:
        handle.close()


def stream_error(ctx: StageContext, err: ConfplanError) -> ConfplanError:
    """A source-side stream error, with the target's own account of it when it has one."""
    try:
        status = vmm(ctx, "target").call("incoming_status", {"wait": 1.0}, timeout=10.0)
    except ConfplanError as target_err:
        return ConfplanError(f"{err.message}; {target_err.message}", hint=err.hint)
    if status.get("error") and "the source gave up" not in status["error"]:
        return ConfplanError(f"{err.message}; the target says: {status['error']}", hint=err.hint)
    return err

