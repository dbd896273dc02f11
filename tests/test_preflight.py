"""`confplan preflight PLAN` and apply's first step: every host fact checked against real files, devices,
sockets and a real agent; a failing preflight launches nothing; errors of the environment are exit 3 with a
hint, printed once."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import pytest
from agents import Agent
from typer.testing import CliRunner

from confplan import preflight
from confplan.cli import app, main
from confplan.errors import ExitCode
from confplan.plan import load_plan

runner = CliRunner()


def cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """The console script's way: ``cli.main`` (errors rendered, exit codes), its stdout and stderr."""
    code = main(args)
    out = capsys.readouterr()
    return code, out.out, out.err
PLAN = "guest: {memory: 64MiB}\ncheckpoint: {dir: state}\n"


@pytest.fixture
def plan_file(tmp_path: Path) -> Path:
    path = tmp_path / "pre.yaml"
    path.write_text(PLAN)
    return path


def _by_id(checks: list[preflight.Check]) -> dict[tuple[str, str], preflight.Check]:
    return {(check.check, check.side): check for check in checks}


@pytest.mark.kvm
def test_a_good_host_passes_every_check(plan_file: Path) -> None:
    checks = preflight.require(load_plan(plan_file))
    found = _by_id(checks)
    keys = [("plan-limits", "orchestrator"), ("firmware", "orchestrator"), ("c-core", "orchestrator"),
            ("kvm", "source"), ("kvm", "target"), ("memory", "source"), ("memory", "target"),
            ("checkpoint-dir", "orchestrator"), ("disk-space", "orchestrator"),
            ("ports", "target")]  # fmt: skip
    for key in keys:
        assert found[key].ok and found[key].hint is None, found[key]
    assert "source and target on this host" in found[("memory", "source")].detail  # both counted together
    assert not (plan_file.parent / "state").exists()  # a preflight creates nothing


def test_a_device_that_is_not_kvm_fails_cleanly(plan_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONFPLAN_KVM_DEVICE", "/dev/null")
    checks = preflight.run_checks(load_plan(plan_file))
    kvm = _by_id(checks)[("kvm", "source")]
    assert not kvm.ok and "/dev/null is not a KVM device" in kvm.detail
    assert "CONFPLAN_KVM_DEVICE" in str(kvm.hint)


def test_a_missing_kvm_device_says_what_to_do(plan_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONFPLAN_KVM_DEVICE", str(plan_file.parent / "no-kvm"))
    kvm = _by_id(preflight.run_checks(load_plan(plan_file)))[("kvm", "target")]
    assert not kvm.ok and "does not exist" in kvm.detail and "CONFIG_KVM" in str(kvm.hint)


def test_memory_beyond_what_is_available_fails(plan_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    meminfo = plan_file.parent / "meminfo"
    meminfo.write_text("MemTotal:  1048576 kB\nMemAvailable:   65536 kB\n")  # 64 MiB free
    monkeypatch.setattr(preflight, "mem_available", lambda: preflight_mem(meminfo))
    memory = _by_id(preflight.run_checks(load_plan(plan_file)))[("memory", "source")]
    assert not memory.ok and "needs 256 MiB" in memory.detail and "64 MiB available" in memory.detail
    assert "lower guest.memory" in str(memory.hint)


def preflight_mem(path: Path) -> int | None:
    from confplan.vmm.memory import mem_available

    return mem_available(str(path))


def test_mem_available_reads_the_kernels_estimate(tmp_path: Path) -> None:
    from confplan.vmm.memory import mem_available

    assert (mem_available() or 0) > 0  # this host's /proc/meminfo
    (tmp_path / "old").write_text("MemTotal: 1024 kB\nMemFree: 512 kB\n")  # a kernel before 3.14
    assert mem_available(str(tmp_path / "old")) is None


def test_an_unwritable_checkpoint_folder_fails(tmp_path: Path) -> None:
    plan = tmp_path / "p.yaml"
    plan.write_text("guest: {memory: 64MiB}\ncheckpoint: {dir: /proc/sys/confplan-state}\n")
    checks = _by_id(preflight.run_checks(load_plan(plan)))
    assert not checks[("checkpoint-dir", "orchestrator")].ok or not checks[("disk-space", "orchestrator")].ok
    afile = tmp_path / "afile"
    afile.write_text("")
    found = _by_id(preflight.run_checks(load_plan(plan).with_checkpoint_dir(afile / "sub")))
    assert not found[("checkpoint-dir", "orchestrator")].ok
    assert "is not a folder" in found[("checkpoint-dir", "orchestrator")].detail


@pytest.fixture
def full_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs filled to the last block (root only)."""
    mount = tmp_path / "full"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.decode().strip()}")
    try:
        fd = os.open(mount / "fill", os.O_WRONLY | os.O_CREAT)
        try:
            while os.write(fd, b"\0" * 4096):
                pass
        except OSError:
            pass  # ENOSPC: full
        finally:
            os.close(fd)
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_fails_preflight_and_apply_launches_nothing(
    plan_file: Path, full_tmpfs: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = cli(["preflight", str(plan_file), "--checkpoint-dir", str(full_tmpfs / "state")], capsys)
    assert code == ExitCode.ENVIRONMENT
    assert "FAIL  disk-space       orchestrator  0 MiB free" in out
    assert "hint: free space on the filesystem" in out
    code, _, err = cli(["apply", str(plan_file), "--checkpoint-dir", str(full_tmpfs / "state")], capsys)
    assert code == ExitCode.ENVIRONMENT and err.count("error: ") == 1
    assert not (full_tmpfs / "state").exists()  # no checkpoint, no VMM socket: nothing started


def test_a_full_disk_under_the_checkpoint_is_an_environment_problem(full_tmpfs: Path) -> None:
    from confplan.stages.checkpoint import CheckpointStore

    with pytest.raises(Exception) as caught:
        CheckpointStore.open(full_tmpfs / "state")
    assert caught.value.__class__.__name__ in ("EnvironmentProblem", "CheckpointDiskFull")
    assert f"no space left on the device holding {full_tmpfs / 'state'}" in str(caught.value)
    code = main_with(lambda: CheckpointStore.open(full_tmpfs / "state2"))
    assert code == ExitCode.ENVIRONMENT


def main_with(action: object) -> int:
    """``cli.main``'s handling of an exception ``action`` raises (as if a command raised it)."""
    from confplan.cli import app as root

    @root.command("raise-for-test", hidden=True)
    def _raise() -> None:
        action()  # type: ignore[operator]

    try:
        return main(["raise-for-test"])
    finally:
        root.registered_commands.pop()


def test_enospc_on_a_file_write_is_not_a_bug(full_tmpfs: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def write() -> None:
        (full_tmpfs / "log").write_bytes(b"x" * 8192)

    assert main_with(write) == ExitCode.ENVIRONMENT
    err = capsys.readouterr().err
    assert err.count("error: no space left on the device") == 1 and "internal error" not in err
    assert "hint: free space there" in err


def test_a_pinned_port_that_is_taken_fails(tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        plan = tmp_path / "p.yaml"
        plan.write_text(f"guest: {{memory: 64MiB}}\nstages: [launch-source, provision-target, attest-target, "
                        f"{{start-incoming: {{listen_port: {port}}}}}]\n")  # fmt: skip
        ports = _by_id(preflight.run_checks(load_plan(plan)))[("ports", "target")]
    assert not ports.ok and "already taken" in ports.detail and "listen_port" in str(ports.hint)
    free = _by_id(preflight.run_checks(load_plan(plan)))[("ports", "target")]
    assert free.ok and f"port {port} on 127.0.0.1 is free" in free.detail


def test_cli_prints_a_line_per_check_and_the_error_once(
    plan_file: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CONFPLAN_KVM_DEVICE", "/dev/null")
    code, out, err = cli(["preflight", str(plan_file)], capsys)
    assert code == ExitCode.ENVIRONMENT
    lines = out.splitlines()
    assert all(line.startswith(("OK    ", "FAIL  ", "      hint: ")) for line in lines)
    fails = [line for line in lines if line.startswith("FAIL")]
    why = "/dev/null is not a KVM device (KVM_GET_API_VERSION: Inappropriate ioctl for device)"
    assert fails == [f"FAIL  {'kvm':<16} {side:<13} {why}" for side in ("source", "target")]
    assert lines[lines.index(fails[0]) + 1].startswith("      hint: point CONFPLAN_KVM_DEVICE")
    assert err == (
        "error: preflight failed: kvm (source), kvm (target); nothing was launched\n"
        "hint: fix what each FAIL line above says, then rerun\n"
    )


def test_the_json_report_is_v1(
    plan_file: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CONFPLAN_KVM_DEVICE", "/dev/null")
    code, out, err = cli(["preflight", str(plan_file), "-o", "json"], capsys)
    assert code == ExitCode.ENVIRONMENT and err.count("error: ") == 1 and "hint: point" in err
    doc = json.loads(out)
    assert doc["schema"] == "confplan.report/v1" and doc["kind"] == "preflight"
    assert doc["outcome"] == "refused" and doc["exit_code"] == 3 and doc["error"]["class"] == "environment"
    assert doc["generated_at"].endswith("Z") and doc["plan"]["name"] == "pre"
    sides = {"enum": ["source", "target", "orchestrator"]}
    item = {"type": "object", "required": ["check", "side", "ok", "detail", "hint"],
            "properties": {"check": {"type": "string"}, "side": sides, "ok": {"type": "boolean"},
                           "detail": {"type": "string"}, "hint": {"type": ["string", "null"]}}}  # fmt: skip
    jsonschema.validate(doc["preflight"], {"type": "array", "items": item})
    assert any(not check["ok"] and check["check"] == "kvm" for check in doc["preflight"])
    schema_file = Path(__file__).parent.parent / "confplan" / "report_schema.json"
    if schema_file.exists():  # the published schema (i12-report), once merged
        jsonschema.validate(doc, json.loads(schema_file.read_text()))


def test_an_invalid_plan_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plan = tmp_path / "big.yaml"
    plan.write_text("guest: {memory: 64GiB}\n")
    code, out, err = cli(["preflight", str(plan), "-o", "json"], capsys)
    assert code == ExitCode.USAGE and "guest.memory: 64GiB is above the 65024MiB this VMM supports" in err
    doc = json.loads(out)
    assert doc["error"]["class"] == "plan" and doc["exit_code"] == 2 and doc["preflight"] == []


@pytest.mark.kvm
def test_apply_with_a_failing_preflight_launches_nothing(plan_file: Path) -> None:
    """The end-to-end refusal: real apply process, /dev/null as KVM; no VMM process, no checkpoint run."""
    env = {**os.environ, "CONFPLAN_KVM_DEVICE": "/dev/null"}
    done = subprocess.run([sys.executable, "-m", "confplan", "apply", str(plan_file)], env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == ExitCode.ENVIRONMENT, done.stderr
    assert "FAIL  kvm              source" in done.stdout and "[launch-source]" not in done.stdout
    assert done.stderr.count("error: ") == 1 and "nothing was launched" in done.stderr
    assert not (plan_file.parent / "state").exists()  # no checkpoint database, no VMM socket or log
    ours = subprocess.run(["pgrep", "-f", f"{plan_file.parent / 'state'}"], capture_output=True, text=True)
    assert ours.stdout.strip() == ""  # no VMM process serving this plan's folder


@pytest.mark.kvm
def test_dry_run_prints_the_preflight(plan_file: Path) -> None:
    result = runner.invoke(app, ["apply", "--dry-run", str(plan_file)])
    assert result.exit_code == 0, result.output
    assert "OK    kvm              source" in result.stdout and "would do:" in result.stdout


def test_a_remote_target_is_reached_and_its_identity_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    agent = Agent.start(tmp_path)
    try:
        monkeypatch.setenv("CONFPLAN_HOME", str(agent.orchestrator_home))
        plan = tmp_path / "two.yaml"
        target = f'target: {{host: "tcp://127.0.0.1:{agent.port}", fingerprint: "{agent.fingerprint}"}}'
        plan.write_text(f"guest: {{memory: 64MiB}}\n{target}\n")
        found = _by_id(preflight.run_checks(load_plan(plan)))
        assert found[("target-reachable", "target")].ok
        identity = found[("target-identity", "target")]
        assert identity.ok and identity.detail.startswith(agent.fingerprint) and "pinned" in identity.detail
        assert ("kvm", "target") in found and ("memory", "target") in found  # from the agent's info
        assert "available" in found[("memory", "target")].detail
        wrong = "sha256:" + "0" * 64
        plan.write_text(f'guest: {{memory: 64MiB}}\ntarget: {{host: "tcp://127.0.0.1:{agent.port}", '
                        f'fingerprint: "{wrong}"}}\n')  # fmt: skip
        refused = _by_id(preflight.run_checks(load_plan(plan)))[("target-identity", "target")]
        assert not refused.ok and agent.fingerprint in refused.detail
    finally:
        agent.stop()
    unreachable = _by_id(preflight.run_checks(load_plan(plan)))[("target-reachable", "target")]
    assert not unreachable.ok and unreachable.hint


def test_the_agent_reports_its_hosts_facts_only_when_asked() -> None:
    from confplan.agent.service import VmmService

    service = VmmService(psp_dir=Path("/nonexistent"))
    assert "host" not in service.info()
    facts = service.info({"host": True})["host"]
    assert set(facts) == {"kvm", "mem_available", "max_vcpus"} and isinstance(facts["kvm"]["ok"], bool)


def test_kvms_own_vcpu_limit_is_checked_per_side_and_by_the_vmm(monkeypatch: pytest.MonkeyPatch) -> None:
    """(v8) Within the firmware's 128, a host's KVM may allow fewer vCPUs per VM (KVM_CAP_MAX_VCPUS): the
    preflight says so for that side with a hint, and the VMM refuses before it creates the VM (exit 3).
    KVM here allows far more, so the limit is lowered for the test."""
    from confplan.errors import EnvironmentProblem
    from confplan.kvm import Kvm
    from confplan.plan import load_plan_text
    from confplan.vmm import Machine, MachineConfig, abi

    plan = load_plan_text("guest: {memory: 256MiB, vcpus: 4}\nhelper: {mode: aux-vcpu, aux_vcpus: 2}\n")
    assert preflight._vcpus_within(plan, "target", "kvm", 6).ok
    refused = preflight._vcpus_within(plan, "target", "kvm", 5)
    assert not refused.ok and "needs 6 vCPUs" in refused.detail and refused.hint
    mirror = load_plan_text("guest: {memory: 256MiB, vcpus: 4}\nhelper: {mode: mirror-vm, aux_vcpus: 2}\n")
    assert preflight._vcpus_within(mirror, "target", "kvm", 4).ok  # a mirror's vCPUs are in their own VM
    monkeypatch.setattr(Kvm, "max_vcpus", lambda self: 3)
    with pytest.raises(EnvironmentProblem, match="at most 3 vCPUs per VM; the guest needs 4") as err:
        Machine(MachineConfig(memory=64 * abi.MIB, vcpus=2, aux_vcpus=2))
    assert err.value.exit_code == ExitCode.ENVIRONMENT
