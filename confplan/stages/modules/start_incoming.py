"""start-incoming: the seed's start-migrate-incoming. The target listens for the stream, the source
connects to it and says HELLO (the target checks the geometry and the migration id).

Parameters: ``listen_port`` (default any free port), ``connect_to`` ("HOST:PORT" the source dials instead
of the target's own address: a relay or NAT in between).
"""

from __future__ import annotations

from confplan.plan.models import StartIncomingParams
from confplan.stages.base import Stage, StageContext, StageResult, TeardownWhen, register_stage
from confplan.stages.modules import _common as common


@register_stage
class StartIncoming(Stage):
    name = "start-incoming"
    needs = ("attest-target",)
    provides = ("listen_port", "source_dials")

    def run(self, ctx: StageContext) -> StageResult:
        source, target = common.vmm(ctx, "source"), common.vmm(ctx, "target")
        _, migration_id = common.migration_secrets(ctx.plan)
        remote = ctx.plan.target.address
        listen_host = "0.0.0.0" if remote else "127.0.0.1"
        params = StartIncomingParams.model_validate(self.params)
        port = params.listen_port
        listening = target.call(
            "listen_incoming", {"host": listen_host, "port": port, "migration_id": migration_id.hex()}
        )
        ctx.add_teardown(
            "stop the target's incoming stream",
            lambda: target.call("abort_incoming"),
            when=TeardownWhen.ON_FAILURE,
        )
        host, port = (remote[0] if remote else "127.0.0.1"), int(listening["port"])
        if params.connect_to:
            host, _, text = params.connect_to.rpartition(":")
            port = int(text)
        common.undo_on_source(ctx)
        stream = {"host": host, "port": port, "migration_id": migration_id.hex()}
        source.call("connect_outgoing", {**stream, "bandwidth": ctx.plan.limits.bandwidth})
        return StageResult(data={"listen_port": listening["port"], "source_dials": f"{host}:{port}"})
