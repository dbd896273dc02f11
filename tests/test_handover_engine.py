"""The handover between two real machines in one process (issue 10 item 4, issue 11): the source seals its
manifest (and, for SEV-ES, each vCPU's registers) with its helper; the target's helper checks them before
the target may resume. A changed byte in the sealed register state or in the sealed manifest refuses the
resume, and the source takes the guest back by itself (nobody orchestrates here)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from confplan.migration.handover import TargetState, load_record
from confplan.migration.incoming import IncomingMigration
from confplan.migration.outgoing import OutgoingMigration
from confplan.sev import CONFPLAN_TRANSPORT_KEY_GUID
from confplan.sev.secret_table import CONFPLAN_MIGRATION_ID_GUID, build_secret_table
from confplan.vmm import Machine, MachineConfig, abi

pytestmark = pytest.mark.kvm
MIGRATION_ID = bytes(range(16, 32))


def _machine(target: bool, helpers: int = 1) -> Machine:
    config = MachineConfig(
        memory=32 * abi.MIB, vcpus=1, aux_vcpus=helpers, batch_pages=64, shared_fraction=0.1,
        dirty_rate=4 * abi.MIB, mh_only=target, prefault=target, dirty_logging=not target,
    )  # fmt: skip
    return Machine(config)


class Sides:
    def __init__(self, tmp: Path, *, sealed_state: bool, helpers: int = 1) -> None:
        key = os.urandom(32)
        secrets = {CONFPLAN_TRANSPORT_KEY_GUID: key, CONFPLAN_MIGRATION_ID_GUID: MIGRATION_ID}
        secret = build_secret_table(secrets)
        self.log: list[str] = []
        machines = []
        for target in (False, True):
            m = _machine(target, helpers)
            m.write(abi.SECRET_GPA, secret)
            m.start()
            machines.append(m)
        machines[0].wait_workload(abi.EV_WL_FILLED, timeout=30)
        self.source = OutgoingMigration(machines[0], psp_dir=tmp, log=self.log.append, state_dir=tmp / "s")
        self.target = IncomingMigration(machines[1], psp_dir=tmp, log=self.log.append, state_dir=tmp / "t")
        stream_key = os.urandom(32)
        listening = self.target.listen("127.0.0.1", 0, migration_id=MIGRATION_ID, stream_key=stream_key,
                                       accept_timeout=30, attempt=7, sealed_state=sealed_state)  # fmt: skip
        port = listening["port"]
        self.source.connect("127.0.0.1", port, migration_id=MIGRATION_ID, stream_key=stream_key,
                            bandwidth=None, attempt=7, sealed_state=sealed_state)  # fmt: skip

    def migrate(self, *, fill: bool = True) -> str:
        """Precopy, the MAC and CRC tables filled (``fill``: as the precopy stage does; without, verify does
        everything after DONE), then the handover; the target's settled state."""
        for _ in range(2):
            self.source.precopy_round()
        if fill:
            deadline = time.monotonic() + 15
            while self.target.status(0.05)["rounds"] < 2:
                assert time.monotonic() < deadline, self.target.status(0)
            self.source.mac_table_fill()
            self.target.mac_table_fill()
        self.source.stop_and_copy(verdict_timeout=5.0)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            view = self.target.handover_view()
            if view["settled"] and self.source.handover_view()["settled"]:
                return str(view["state"])
            time.sleep(0.02)
        raise AssertionError(f"no settlement: {self.target.handover_view()} {self.source.handover_view()}")

    def close(self) -> None:
        self.source.close()
        self.target.close()


@pytest.fixture
def make(tmp_path: Path) -> Iterator[type[Sides]]:
    made: list[Sides] = []

    class Made(Sides):
        def __init__(self, tmp: Path, *, sealed_state: bool, helpers: int = 1) -> None:
            super().__init__(tmp, sealed_state=sealed_state, helpers=helpers)
            made.append(self)

    yield Made
    for sides in made:
        sides.close()


def _source_runs_again(sides: Sides) -> None:
    assert sides.source.handover_view()["state"] == "aborted"
    assert sides.source.guest_running() and sides.source.workload_check()["ok"]
    assert not sides.target.resumed and not sides.target.guest_running()


@pytest.mark.parametrize(
    ("sealed_state", "helpers", "fill"),
    [(False, 1, True), (True, 1, True), (True, 2, True), (True, 1, False)],
    ids=["sev", "sev-es", "sev-es-2-helpers", "sev-es-no-tables"],
)
def test_the_target_resumes_what_its_helper_verified(
    make: type[Sides], tmp_path: Path, sealed_state: bool, helpers: int, fill: bool
) -> None:
    sides = make(tmp_path, sealed_state=sealed_state, helpers=helpers)
    assert sides.migrate(fill=fill) == "resumed"
    assert sides.source.handover_view()["state"] == "handed-over" and not sides.source.guest_running()
    assert sides.target.guest_running() and sides.target.workload_check()["ok"]
    check = sides.target.handover_view()["verify"]
    assert check["chunks"] == 4 and check["sealed_state"] is sealed_state  # 32 MiB in 8 MiB chunks
    # Both sides prepared their manifest fields in the pause (SEV-ES: the target at the bitmap, then it
    # opened the sealed states, before DONE; the source beside sealing them, or after with one helper)
    if not fill:  # no tables from precopy: verify works after DONE, the states opened then, nothing prepared
        assert check["prepared"] is None and check["states_opened_early"] is False
    else:
        assert check["prepared"] is True and check["states_opened_early"] is sealed_state
    if sealed_state and fill:
        moments = list(sides.target.handover_view()["pause_timeline"])
        opened = moments.index("opened")
        assert moments.index("tables") < opened and moments.index("states") < opened
    # RESUMED was written ahead (its temp file renamed into place: none is left); whether its fsync ended
    # before COMMIT came back is the disk's timing (the COMMIT step waits for it), so only the order the
    # protocol makes is asserted: COMMIT, then the record on disk, then running
    moments = list(sides.target.handover_view()["pause_timeline"])
    assert "staged" in moments
    assert moments.index("got_commit") < moments.index("recorded") < moments.index("running")
    assert [p.name for p in (tmp_path / "t").iterdir() if p.name.startswith(".")] == []
    record = load_record(tmp_path / "t" / "handover-target.rec")
    assert record is not None and record.state is TargetState.RESUMED


def test_a_changed_byte_in_the_sealed_register_state_refuses_the_resume(
    make: type[Sides], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sides = make(tmp_path, sealed_state=True)
    seal = sides.source._seal_state

    def tampered(vcpu: int, blob: bytes) -> bytes:  # a source host that edits regs.rax on the way
        record = bytearray(seal(vcpu, blob))
        record[-40] ^= 0x01
        return bytes(record)

    monkeypatch.setattr(sides.source, "_seal_state", tampered)
    assert sides.migrate() == "refused"
    assert "helper refused the copy" in str(sides.target.handover_view().get("refused"))
    _source_runs_again(sides)


def test_a_wrong_manifest_refuses_the_resume(
    make: type[Sides], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sides = make(tmp_path, sealed_state=False)
    made = sides.source._manifest

    def forged(parts: list[bytes]) -> list:  # type: ignore[type-arg]
        plain, sealed = made(parts)
        blob = bytearray(sealed.blob)
        blob[len(blob) // 2] ^= 0x80
        return [plain, type(sealed)(sealed.format_version, bytes(blob))]

    monkeypatch.setattr(sides.source, "_manifest", forged)
    assert sides.migrate() == "refused"
    assert "MANIFEST" in str(sides.target.handover_view().get("refused"))
    _source_runs_again(sides)
