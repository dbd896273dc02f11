"""start-incoming: the seed's start-migrate-incoming. The orchestrator makes a fresh stream key and hands it
to both VMMs; the target listens, the source connects and both prove the key in the wire v2 handshake (the
target checks the migration id and the geometry, and keeps listening past any connection that fails).

Parameters: ``listen_port`` (default any free port), ``connect_to`` ("HOST:PORT" the source dials instead
of the target's own address: a relay or NAT in between), ``channels`` (the stream's TCP connections, at
most one per helper vCPU: wire v4 parallel streams; default 1).
"""

from __future__ import annotations

import os
import time

from confplan.errors import ConfplanError
from confplan.plan import STAGE_NEEDS
from confplan.plan.models import StartIncomingParams
from confplan.stages.base import Stage, StageContext, StageResult, TeardownWhen, register_stage
from confplan.stages.modules import _common as common


@register_stage
class StartIncoming(Stage):
    name = "start-incoming"
    needs = tuple(STAGE_NEEDS[name])  # the plan's table: validate checks the same order
    provides = ("listen_port", "source_dials")

    def run(self, ctx: StageContext) -> StageResult:
        source, target = common.vmm(ctx, "source"), common.vmm(ctx, "target")
        _, migration_id = common.migration_secrets(ctx.plan)
        remote = ctx.plan.target.address
        listen_host = "0.0.0.0" if remote else "127.0.0.1"
        params = StartIncomingParams.model_validate(self.params)
        port = params.listen_port
        helpers = ctx.plan.helper.mh_vcpus
        if params.channels > helpers:
            raise ConfplanError(
                f"start-incoming.channels is {params.channels}, but the helper has {helpers} vCPUs: one "
                "stream channel per helper vCPU at most",
                hint="lower channels or raise helper.aux_vcpus",
            )
        # A fresh stream key per attempt, handed to both VMMs over their authenticated control channels:
        # only the source that proves it may feed the target (docs/stream-security.md).
        stream_key = os.urandom(32).hex()
        # The attempt numbers this try in both sides' handover records; it only grows (milliseconds).
        attempt = time.time_ns() // 1_000_000
        # SEV-ES/SNP: the register state travels sealed by the helpers, and the target takes no other.
        sealed_state = ctx.plan.sev.generation in ("sev-es", "sev-snp")
        listening = target.call("listen_incoming", {
            "host": listen_host, "port": port, "migration_id": migration_id.hex(), "stream_key": stream_key,
            "attempt": attempt, "sealed_state": sealed_state,
        })  # fmt: skip
        ctx.add_teardown(
            "stop the target's incoming stream",
            lambda: target.call("abort_incoming", timeout=5.0),
            when=TeardownWhen.ON_FAILURE,
        )
        host, port = (remote[0] if remote else "127.0.0.1"), int(listening["port"])
        if params.connect_to:
            host, _, text = params.connect_to.rpartition(":")
            port = int(text)
        common.undo_on_source(ctx)
        stream = {"host": host, "port": port, "migration_id": migration_id.hex(), "stream_key": stream_key,
                  "attempt": attempt, "sealed_state": sealed_state}  # fmt: skip
        limits = ctx.plan.limits
        source.call("connect_outgoing", {**stream, "bandwidth": limits.bandwidth, "channels": params.channels,
                                         "progress_timeout": float(limits.progress_timeout)})  # fmt: skip
        return StageResult(data={"listen_port": listening["port"], "source_dials": f"{host}:{port}",
                                 "attempt": attempt})  # fmt: skip
