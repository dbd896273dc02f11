"""Shared test set-up: tests marked ``kvm`` skip, with the reason, where /dev/kvm cannot be used."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import settings
from launcher import Launcher

from confplan.sev import EmulatedSecureProcessor
from confplan.vmm.bootparams import HostCpu

# CI runs the property tests derandomized, so a red CI is reproducible and never depends on luck;
# developers' runs explore new examples each time.
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


def _kvm_unusable_reason() -> str | None:
    path = "/dev/kvm"
    if not os.path.exists(path):
        return f"{path} does not exist (no KVM on this machine)"
    if not os.access(path, os.R_OK | os.W_OK):
        return f"{path} is not readable and writable by this user"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = _kvm_unusable_reason()
    if reason is None:
        return
    skip = pytest.mark.skip(reason=f"needs KVM: {reason}")
    for item in items:
        if "kvm" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def psp(tmp_path_factory: pytest.TempPathFactory) -> EmulatedSecureProcessor:
    """An emulated secure processor with its own key file, shared by one test module."""
    return EmulatedSecureProcessor.open(tmp_path_factory.mktemp("psp"))


@pytest.fixture(scope="module")
def host() -> HostCpu:
    """This host's CPU facts for boot parameters (asks KVM: use only in kvm-marked tests)."""
    return HostCpu.probe()


@pytest.fixture
def plan_dir(tmp_path: Path) -> Iterator[Path]:
    """A folder for a plan whose checkpoint is ``state/`` in it; no VMM process it started outlives it."""
    from confplan.agent import handle as vmm_handle

    yield tmp_path
    for role in ("source", "target"):
        found = vmm_handle.find_local(tmp_path / "state", role)
        if found is not None:
            vmm_handle.stop(found)


@pytest.fixture
def launcher(psp: EmulatedSecureProcessor, host: HostCpu, tmp_path: Path) -> Iterator[Launcher]:
    """Measured launches (tests/launcher.py); every machine it booted is closed after the test."""
    boot = Launcher(psp, host, tmp_path / "owner")
    try:
        yield boot
    finally:
        boot.close()
