"""provision-target: the target VMM (a local child, or a remote agent) with a machine built MH-only.

Parameters (``confplan.plan.models.ProvisionTargetParams``): ``firmware``, a folder holding another firmware
build for the target (the owner's check in attest-target then decides whether it may have the key);
``prefault`` (default true): allocate all of the target's guest RAM here, before the stream starts, so the
migration does not pay for it page by page and a host short of memory fails now rather than halfway
through (1 GiB took 1.2-2.8 s on this machine).
"""

from __future__ import annotations

from pathlib import Path

from confplan.agent import handle as vmm_handle
from confplan.plan.models import ProvisionTargetParams
from confplan.stages.base import Stage, StageContext, StageResult, register_stage
from confplan.stages.checkpoint import StageRecord
from confplan.stages.modules import _common as common


@register_stage
class ProvisionTarget(Stage):
    name = "provision-target"
    provides = ("pid", "socket", "created", "config")

    def run(self, ctx: StageContext) -> StageResult:
        directory = common.state_dir(ctx.plan)
        params = ProvisionTargetParams.model_validate(self.params)
        firmware = params.firmware
        if ctx.plan.target.is_local:
            handle = vmm_handle.start_local(
                directory, "target", firmware_dir=Path(firmware) if firmware else None,
                plan=ctx.plan.metadata.name,
            )
            socket = str(vmm_handle.socket_path(directory, "target"))
            common.adopt(ctx, "target", handle)
            ctx.add_teardown("stop the target VMM", lambda: vmm_handle.stop(handle))
        else:  # a remote agent outlives this migration: a failed attempt only discards its machine
            host, port = ctx.plan.target.address or ("", 0)
            pin = ctx.plan.target.fingerprint
            handle, socket = vmm_handle.connect_remote(host, port, "target", pin=pin), ""
            common.adopt(ctx, "target", handle)
            handle.call("discard")
            ctx.add_teardown("discard the target machine", lambda: handle.call("discard", timeout=5.0))
        config = common.machine_config(ctx.plan, mh_only=True)
        config["prefault"] = params.prefault
        created = handle.call("create", {"role": "target", "config": config})
        agent = list(ctx.plan.target.address) if ctx.plan.target.address else None
        return StageResult(data={"pid": handle.pid, "socket": socket, "agent": agent,
                                 "pin": ctx.plan.target.fingerprint, "created": created,
                                 "config": config})  # fmt: skip

    def resume_safe(self, previous: StageRecord) -> bool:
        return common.probe_local(previous.result, "target", machine=True, resumed=False)
