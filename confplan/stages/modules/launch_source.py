"""launch-source: a source VMM process running the workload, launched measured with the owner's key."""

from __future__ import annotations

from typing import Any

from confplan.agent import handle as vmm_handle
from confplan.stages.base import Stage, StageContext, StageResult, register_stage
from confplan.stages.checkpoint import StageRecord
from confplan.stages.modules import _common as common


@register_stage
class LaunchSource(Stage):
    name = "launch-source"
    provides = ("pid", "socket", "log", "launch_digest", "firmware_sha256")

    # A remote source is refused by the plan's rules (confplan/plan/rules.py).

    def run(self, ctx: StageContext) -> StageResult:
        directory = common.state_dir(ctx.plan)
        handle = vmm_handle.start_local(directory, "source", plan=ctx.plan.metadata.name)
        common.adopt(ctx, "source", handle)
        # Until launch-source is done nothing is precious yet: a failed launch takes its VMM down.
        undo = ctx.add_teardown("stop the half-launched source VMM", lambda: vmm_handle.stop(handle))
        common.new_migration_secrets(ctx.plan)
        config = common.machine_config(ctx.plan, mh_only=False)
        created = handle.call("create", {"role": "source", "config": config})
        digest, started = common.launch_and_start(ctx.plan, handle, created, config)
        ctx.progress(1, 1, message=f"source guest running in pid {handle.pid}")
        undo.cancel()  # from here on the source guest is what a failure must leave running
        data: dict[str, Any] = {
            "pid": handle.pid, "socket": str(vmm_handle.socket_path(directory, "source")),
            "log": str(handle.log), "launch_digest": digest, "firmware_sha256": created["firmware_sha256"],
            **started,
        }  # fmt: skip
        return StageResult(data=data)

    def resume_safe(self, previous: StageRecord) -> bool:
        return common.probe_local(previous.result, "source", running=True)
