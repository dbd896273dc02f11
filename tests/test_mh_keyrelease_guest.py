"""The SNP key release inside a booted guest under KVM: the helper's firmware draws its key with RDRAND
and runs X25519, HKDF and AES-GCM at CPL3 natively, answering Python's secure processor and broker
(tests/snp_party.py) through its real mailbox. The boot parameters are patched to say SNP and the secrets
page and the owner's key are placed by the test before the vCPUs start (an unmeasured guest: the SNP
launch, vmm.sev_launch.SnpLaunch, does this for real, tests/test_apply_snp.py; here only the helper's side
is under test)."""

from __future__ import annotations

import os

import pytest
from snp_party import OWNER_PUBLIC, key_op, open_request, psp_response, secrets_page, wrap_key

from confplan.migration.helper import open_mailboxes
from confplan.migration.mailbox_layout import MhStatus, Op
from confplan.sev.secret_table import (
    CONFPLAN_MIGRATION_ID_GUID,
    CONFPLAN_TRANSPORT_KEY_GUID,
    build_secret_table,
)
from confplan.vmm import Machine, MachineConfig, abi

pytestmark = pytest.mark.kvm


def snp_machine(vmpck0: bytes) -> Machine:
    m = Machine(MachineConfig(memory=32 * abi.MIB, workload_kind="quiet", aux_vcpus=2, batch_pages=4))
    if not m.cpu.features & abi.FEATURE_BITS["rdrand"]:
        m.close()
        pytest.skip("neither KVM nor this CPU offers RDRAND to the guest")
    at = abi.BOOT_PARAMS_GPA + abi.BootParams.flags.offset
    flags = int.from_bytes(m.read(at, 4), "little")
    m.write(at, (flags | abi.BP_FLAG_SNP).to_bytes(4, "little"))
    m.write(abi.BOOT_PARAMS_GPA + abi.BootParams.owner_key.offset, OWNER_PUBLIC)
    m.write(abi.SECRET_GPA, secrets_page(vmpck0))
    m.start()
    return m


def test_the_guests_helper_runs_the_whole_key_release() -> None:
    vmpck0, key, mig = os.urandom(32), os.urandom(32), os.urandom(16)
    m = snp_machine(vmpck0)
    try:
        mbs = open_mailboxes(m)
        mb = mbs.mailboxes[0]
        nonce = os.urandom(32)
        status, request = key_op(mb, Op.KEY_REQUEST, nonce)
        assert status == MhStatus.OK
        seqno, report_data, vmpl = open_request(vmpck0, request)  # the tag opens under our VMPCK0
        assert (seqno, report_data[:32], vmpl) == (1, nonce, 0)
        status, again = key_op(mb, Op.KEY_REQUEST, nonce)
        assert open_request(vmpck0, again)[1][32:] != report_data[32:]  # RDRAND: a new key each time
        response, report = psp_response(vmpck0, again)
        assert key_op(mb, Op.KEY_REPORT, response) == (MhStatus.OK, report)
        table = build_secret_table({CONFPLAN_TRANSPORT_KEY_GUID: key, CONFPLAN_MIGRATION_ID_GUID: mig})
        wrap = wrap_key(report, nonce, table)
        assert key_op(mb, Op.KEY_RELEASE, wrap[:-1] + bytes([wrap[-1] ^ 1]))[0] == MhStatus.KEY_AUTH
        assert key_op(mb, Op.KEY_RELEASE, wrap)[0] == MhStatus.OK
        assert key_op(mb, Op.KEY_RELEASE, wrap)[0] == MhStatus.KEY_STATE
        assert key_op(mbs.mailboxes[1], Op.KEY_REQUEST, nonce)[0] == MhStatus.KEY_HELPER
        infos = [mb.init() for mb in mbs.mailboxes]  # both helpers take the released key
        assert {info.migration_id for info in infos} == {mig}
        assert key.hex() not in m.console.text()
        m.check()
    finally:
        m.close()
