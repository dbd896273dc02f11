"""What tests ask of the VMM processes a plan left running in its checkpoint folder."""

from __future__ import annotations

from pathlib import Path

from confplan.agent import handle as vmm_handle


def ledger_ok(state: Path, role: str, *, running: bool = False) -> bool:
    """The ``role`` VMM in ``state`` still runs and its guest's ledger checks out (and, with ``running``,
    its guest's vCPUs run)."""
    handle = vmm_handle.find_local(state, role)
    assert handle is not None, f"the {role} VMM must still run"
    try:
        if running and not handle.call("info")["running"]:
            return False
        return bool(handle.call("workload_check")["ok"])
    finally:
        handle.close()
