"""attest-target: the target's launch digest, from the (emulated) secure processor, must be the one the
owner expects for confplan's own firmware and this plan's MH-only boot; only then is the transport key
released into the target's secret page and the target's helper started (SEV-SNP: the helper starts first
and the key is wrapped to it against its report, docs/key-release.md). A mismatch stops here."""

from __future__ import annotations

from confplan.plan import STAGE_NEEDS
from confplan.stages.base import ResumePolicy, Stage, StageContext, StageResult, register_stage
from confplan.stages.checkpoint import StageRecord
from confplan.stages.modules import _common as common


@register_stage
class AttestTarget(Stage):
    name = "attest-target"
    needs = tuple(STAGE_NEEDS[name])  # the plan's table: validate checks the same order
    provides = ("launch_digest", "socket")
    policy = ResumePolicy(
        "provision-target", "a machine's launch is measured once: a fresh target VMM is provisioned"
    )

    def run(self, ctx: StageContext) -> StageResult:
        provisioned = ctx.result_of("provision-target")
        handle = common.vmm(ctx, "target")
        digest, started = common.launch_and_start(
            ctx.plan, handle, provisioned["created"], provisioned["config"]
        )
        return StageResult(data={"launch_digest": digest, "socket": provisioned.get("socket"),
                                 "agent": provisioned.get("agent"), "pin": provisioned.get("pin"),
                                 **started})  # fmt: skip

    def resume_safe(self, previous: StageRecord) -> bool:
        return common.probe_local(previous.result, "target", running=True, resumed=False)
