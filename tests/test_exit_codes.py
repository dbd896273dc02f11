"""Exit codes by class, listed in `confplan --help`; summaries in full; errors of the environment with a
hint and never "a bug"; status's exit code and its liveness check; plans over 1 MiB refused unread."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from confplan.agent import handle as vmm_handle
from confplan.cli import main
from confplan.errors import EXIT_CODE_MEANINGS, ExitCode
from confplan.guest.layout import GuestLayout, GuestTooSmall, fits, minimum_memory
from confplan.plan import PlanError, load_plan
from confplan.plan.loader import MAX_PLAN_BYTES
from confplan.vmm import MachineConfig


def run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_help_lists_every_exit_code_and_cuts_no_summary() -> None:
    env = os.environ | {"COLUMNS": "80"}
    argv = [sys.executable, "-m", "confplan", "--help"]
    done = subprocess.run(argv, env=env, capture_output=True, text=True)
    assert done.returncode == 0
    commands = done.stdout[done.stdout.index("Commands:") :]
    assert "..." not in commands
    for code, meaning in EXIT_CODE_MEANINGS.items():
        assert f"{int(code):>3}  {meaning}" in done.stdout
    assert set(EXIT_CODE_MEANINGS) == set(ExitCode)
    assert "preflight  Check the hosts for PLAN" in done.stdout


def test_bad_listen_addresses_are_errors_with_hints(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    home = ["--home", str(tmp_path / "home")]
    for listen, code, words in [
        (":x", ExitCode.USAGE, "is not HOST:PORT"),
        ("127.0.0.1:99999", ExitCode.USAGE, "is not HOST:PORT"),
        ("999.1.1.1:1", ExitCode.USAGE, "Octet 999"),
        ("nohost.invalid:4444", ExitCode.ENVIRONMENT, "is not a name or address this host can resolve"),
    ]:
        got, _, err = run(["agent", "--listen", listen, *home], capsys)
        assert got == code, (listen, err)
        assert err.count("error: ") == 1 and words in err and "hint: " in err and "internal error" not in err


def test_a_taken_agent_port_is_an_environment_problem(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        code, _, err = run(["agent", "--listen", f"127.0.0.1:{port}", "--home", str(tmp_path)], capsys)
    assert code == ExitCode.ENVIRONMENT and "already taken by another process" in err and "hint: stop" in err


def test_a_plan_over_one_mib_is_refused_unread(tmp_path: Path) -> None:
    plan = tmp_path / "huge.yaml"
    with plan.open("w") as out:  # valid YAML all the way: only its size is wrong
        out.write('guest: {memory: 64MiB}\nmetadata:\n  description: "')
        out.write("x" * (50 << 20))
        out.write('"\n')
    with pytest.raises(PlanError) as caught:
        load_plan(plan)
    assert "larger than 1 MiB" in caught.value.diagnostics[0].message
    exact = tmp_path / "exact.yaml"
    text = "guest: {memory: 64MiB}\n"
    exact.write_text(text + "#" * (MAX_PLAN_BYTES - len(text) - 1) + "\n")
    assert load_plan(exact).guest.memory == 64 << 20  # 1 MiB exactly is still a plan


@pytest.mark.parametrize(
    ("vcpus", "mh_vcpus", "batch"), [(1, 1, 256), (2, 2, 256), (4, 1, 4096), (8, 16, 64)]
)
def test_the_plans_minimum_is_exactly_what_the_layout_accepts(vcpus: int, mh_vcpus: int, batch: int) -> None:
    minimum = minimum_memory(vcpus, mh_vcpus, batch)
    config = MachineConfig(memory=minimum, vcpus=vcpus, aux_vcpus=mh_vcpus, batch_pages=batch)
    assert fits(config) and GuestLayout.for_config(config).wl_data_pages >= 16 * vcpus
    smaller = MachineConfig(memory=minimum - (2 << 20), vcpus=vcpus, aux_vcpus=mh_vcpus, batch_pages=batch)
    with pytest.raises(GuestTooSmall) as caught:
        GuestLayout.for_config(smaller)
    assert f"at least {minimum >> 20} MiB" in str(caught.value.hint)


def test_vmm_alive_tells_a_dead_pid_and_a_foreign_one() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert vmm_handle.vmm_alive(child.pid) is False  # alive, but not a confplan VMM
    finally:
        child.kill()
        child.wait()
    assert vmm_handle.vmm_alive(child.pid) is False  # dead
    vmm = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", "confplan.agent"])
    try:
        assert vmm_handle.vmm_alive(vmm.pid) is True
    finally:
        vmm.kill()
        vmm.wait()


def test_a_vmm_killed_while_memory_ran_out_says_so(tmp_path: Path) -> None:
    vmm = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    vmm_handle._CHILDREN[vmm.pid] = vmm
    kills = vmm_handle.oom_kills()
    if kills is None:
        pytest.skip("this kernel does not count OOM kills in /proc/vmstat")
    vmm_handle._OOM_KILLS_AT_START[vmm.pid] = kills - 1  # as if the OOM killer struck since it started
    os.kill(vmm.pid, signal.SIGKILL)
    text = vmm_handle.describe_end(vmm.pid, None)
    assert text.startswith("was killed by SIGKILL: probably out of memory") and "guest.memory" in text
    plain = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    vmm_handle._CHILDREN[plain.pid] = plain
    vmm_handle._OOM_KILLS_AT_START[plain.pid] = kills
    os.kill(plain.pid, signal.SIGKILL)
    time.sleep(0.1)
    if (vmm_handle.oom_kills() or 0) == kills:  # nobody else's OOM kill in between
        assert vmm_handle.describe_end(plain.pid, None).startswith("was killed by SIGKILL")
