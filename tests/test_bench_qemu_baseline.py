"""bench/qemu_baseline.py: the pure parts always; a few tiny real QEMU migrations where QEMU is installed."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench" / "qemu_baseline.py"


def _load_bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("qemu_baseline", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["qemu_baseline"] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


qb = _load_bench()
MIB = 1 << 20
needs_qemu = pytest.mark.skipif(
    shutil.which("qemu-system-x86_64") is None,
    reason="needs qemu-system-x86_64 (apt-get install qemu-system-x86)",
)

# Replies as QEMU 7.2 sent them in a real run (trimmed).
GREETING = {
    "QMP": {
        "version": {
            "qemu": {"micro": 22, "minor": 2, "major": 7},
            "package": "Debian 1:7.2+dfsg-7+deb12u18+b3",
        },
        "capabilities": ["oob"],
    }
}
COMPLETED: dict[str, Any] = {
    "status": "completed",
    "setup-time": 1,
    "downtime": 12,
    "total-time": 800,
    "ram": {"total": 1074331648, "transferred": 1062800000, "multifd-bytes": 1062700000, "normal": 258048},
}
INCOMING = {"socket-address": [{"port": "32991", "ipv4": True, "host": "127.0.0.1", "type": "inet"}]}


# --- sizes and command lines


def test_random_fill_covers_ram_above_the_loader_address() -> None:
    assert qb.random_fill_bytes(1024) == 1008 * MIB
    assert qb.random_fill_bytes(17) == 1 * MIB


@pytest.mark.parametrize("ram_mib", [0, 16, 3073])
def test_random_fill_rejects_sizes_the_loader_cannot_fill(ram_mib: int) -> None:
    with pytest.raises(qb.QemuBaselineError) as info:
        qb.random_fill_bytes(ram_mib)
    assert f"ram_mib={ram_mib}" in info.value.message
    assert info.value.hint is not None and "17..3072" in info.value.hint


def test_source_loads_the_random_file_and_target_waits_with_zero_ram() -> None:
    source = qb.qemu_command("qemu", 1024, Path("/t/src.sock"), Path("/t/random.bin"))
    target = qb.qemu_command("qemu", 1024, Path("/t/dst.sock"), None)
    assert "loader,file=/t/random.bin,addr=0x1000000,force-raw=on" in source
    assert "-incoming" not in source
    assert target[-2:] == ["-incoming", "defer"]
    assert not any("loader" in arg for arg in target)
    for cmd, sock in ((source, "/t/src.sock"), (target, "/t/dst.sock")):
        assert cmd[cmd.index("-m") + 1] == "1024"
        assert cmd[cmd.index("-machine") + 1] == "pc"
        assert "-S" in cmd
        assert cmd[cmd.index("-qmp") + 1] == f"unix:{sock},server=on,wait=off"
        assert "-mem-prealloc" not in cmd
    assert "-mem-prealloc" in qb.qemu_command("qemu", 64, Path("/t/s.sock"), None, prealloc=True)


# --- QMP messages


def test_version_comes_from_the_greeting() -> None:
    assert qb.version_from_greeting(GREETING) == "7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)"
    bare = {"QMP": {"version": {"qemu": {"micro": 0, "minor": 0, "major": 9}}}}
    assert qb.version_from_greeting(bare) == "9.0.0"


def test_a_greeting_without_version_is_an_error() -> None:
    with pytest.raises(qb.QemuBaselineError, match="no QEMU version"):
        qb.version_from_greeting({"event": "SHUTDOWN"})


def test_reply_for_skips_events_and_other_ids() -> None:
    event = {"event": "MIGRATION", "data": {"status": "setup"}, "timestamp": {"seconds": 1}}
    assert qb.reply_for(event, 3, "migrate") is None
    assert qb.reply_for({"return": {}, "id": 2}, 3, "migrate") is None
    assert qb.reply_for({"return": {"status": "active"}, "id": 3}, 3, "query-migrate") == {"status": "active"}


def test_reply_for_raises_qemus_error_text() -> None:
    error = {"error": {"class": "GenericError", "desc": "Parameter 'uri' is missing"}, "id": 5}
    with pytest.raises(qb.QemuBaselineError, match="QMP migrate on the source failed: Parameter 'uri'"):
        qb.reply_for(error, 5, "migrate on the source")


def test_incoming_port_is_read_from_the_targets_socket_address() -> None:
    assert qb.incoming_port(INCOMING) == 32991


def test_incoming_port_missing_says_which_qemu_is_needed() -> None:
    with pytest.raises(qb.QemuBaselineError) as info:
        qb.incoming_port({"status": "setup"})
    assert info.value.hint is not None and "QEMU 4.0" in info.value.hint


# --- results


def test_completed_query_migrate_gives_the_figures() -> None:
    result = qb.result_from_query_migrate(COMPLETED, "7.2.22")
    assert result == qb.QemuResult(
        total_time_s=0.8,
        downtime_ms=12.0,
        transferred_bytes=1062800000,
        throughput_bytes_s=1062800000 / 0.8,
        qemu_version="7.2.22",
    )


def test_an_unfinished_migration_has_no_figures() -> None:
    with pytest.raises(qb.QemuBaselineError, match="'active', not 'completed'"):
        qb.result_from_query_migrate({"status": "active", "total-time": 5}, "7.2.22")


def test_a_failed_migration_reports_qemus_reason() -> None:
    info = {"status": "failed", "error-desc": "Unable to write to socket: Broken pipe"}
    with pytest.raises(qb.QemuBaselineError, match="source migration failed: Unable to write to socket"):
        qb.result_from_query_migrate(info, "7.2.22")
    assert qb.migration_status({"status": "active"}, "target") == "active"


@pytest.mark.parametrize(
    ("change", "expected"),
    [({"ram": {}}, "transferred"), ({"downtime": None}, "downtime"), ({"total-time": 0}, "total-time 0")],
)
def test_incomplete_counters_are_an_error(change: dict[str, Any], expected: str) -> None:
    with pytest.raises(qb.QemuBaselineError, match=expected):
        qb.result_from_query_migrate({**COMPLETED, **change}, "7.2.22")


def test_ratio_formatting() -> None:
    assert qb.format_ratio(qb.time_ratio(1.5, 1.0)) == "1.50x"
    assert qb.format_ratio(qb.time_ratio(0.3, 0.9)) == "0.33x"
    with pytest.raises(ValueError, match="positive"):
        qb.time_ratio(1.0, 0.0)


def test_result_line_shows_all_figures() -> None:
    line = qb.format_result(qb.result_from_query_migrate(COMPLETED, "7.2.22"))
    assert line == "total 0.800 s  downtime 12 ms  transferred 1.063 GB  throughput 1.33 GB/s"


def test_summary_compares_medians_with_the_first_channel_count() -> None:
    def run(seconds: float) -> Any:
        return qb.QemuResult(seconds, 1.0, 10, 10 / seconds, "7.2.22")

    lines = qb.summary_lines({2: [run(1.0), run(3.0), run(2.0)], 0: [run(3.0)]})
    assert lines[0] == "median total time, ratio against multifd x2:"
    assert lines[1].split() == ["multifd", "x2", "2.000", "s", "1.00x"]
    assert lines[2].split() == ["plain", "(1", "stream)", "3.000", "s", "1.50x"]


def test_samples_cover_start_middle_and_end_page_aligned() -> None:
    offsets = qb.sample_offsets(1008 * MIB)
    assert offsets == [0, 528_449_536, 1_056_899_072]  # the last 64 KiB sample ends at the end of RAM
    assert all(offset % 4096 == 0 for offset in offsets)
    assert qb.sample_offsets(200_000) == [0, 65536, 134_464]
    assert qb.sample_offsets(4096) == [0]


def test_random_file_has_the_exact_size_and_does_not_compress(tmp_path: Path) -> None:
    size = qb.FILL_CHUNK + 12345  # one full chunk and a partial one
    first, second = tmp_path / "a", tmp_path / "b"
    qb.write_random_file(first, size)
    qb.write_random_file(second, size)
    data = first.read_bytes()
    assert len(data) == size
    assert len(zlib.compress(data[: 1 << 20])) > (1 << 20)  # random data grows under compression
    assert data != second.read_bytes()


# --- errors a user hits


def test_missing_qemu_prints_the_apt_get_command_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert qb.main(["--qemu", "/nonexistent/qemu-system-x86_64", "--ram-mib", "64"]) == 2
    err = capsys.readouterr().err
    assert "/nonexistent/qemu-system-x86_64 not found" in err
    assert "apt-get install qemu-system-x86" in err


def test_negative_channel_count_is_rejected() -> None:
    with pytest.raises(qb.QemuBaselineError, match="multifd_channels=-1"):
        qb.measure_qemu_migration(64, -1)


# --- real QEMU (tiny guests)


def _qemu_children() -> list[int]:
    """PIDs of QEMU processes whose parent is this test process."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        comm, rest = stat[stat.index("(") + 1 : stat.rindex(")")], stat[stat.rindex(")") + 2 :].split()
        if comm.startswith("qemu-system") and int(rest[1]) == os.getpid():
            found.append(int(entry))
    return found


@pytest.fixture
def private_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point tempfile at tmp_path so a test can see that the bench removed its working directory."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return tmp_path


@needs_qemu
@pytest.mark.slow
@pytest.mark.parametrize("channels", [0, 2])
def test_real_migration_of_a_small_guest(channels: int, private_tmp: Path) -> None:
    result = qb.measure_qemu_migration(ram_mib=48, multifd_channels=channels, timeout_s=60)
    assert result.transferred_bytes >= 32 * MIB  # the 32 MiB of random data went across
    assert result.total_time_s > 0
    assert result.throughput_bytes_s == pytest.approx(result.transferred_bytes / result.total_time_s)
    assert result.qemu_version[0].isdigit()
    assert _qemu_children() == []
    assert list(private_tmp.iterdir()) == []


@needs_qemu
@pytest.mark.slow
def test_timeout_kills_both_qemus_and_removes_the_directory(private_tmp: Path) -> None:
    with pytest.raises(qb.QemuBaselineError, match="timed out after 0 s while"):
        qb.measure_qemu_migration(ram_mib=32, multifd_channels=2, timeout_s=0)
    assert _qemu_children() == []
    assert list(private_tmp.iterdir()) == []


@needs_qemu
@pytest.mark.slow
def test_verification_notices_ram_that_did_not_arrive(tmp_path: Path) -> None:
    random_file = tmp_path / "random.bin"
    qb.write_random_file(random_file, 1 * MIB)
    qmp_path = tmp_path / "target.sock"
    cmd = qb.qemu_command(qb.find_qemu(None), 32, qmp_path, None)  # a target nothing migrated to
    with qb._running("target", cmd, tmp_path) as qemu:
        client = qb.QmpClient(qemu, qmp_path, qb.Deadline(30))
        try:
            with pytest.raises(qb.QemuBaselineError, match="differs from the source's random data"):
                qb.verify_target_ram(client, random_file, 1 * MIB, tmp_path)
        finally:
            client.close()
    assert _qemu_children() == []


@needs_qemu
@pytest.mark.slow
def test_script_prints_one_json_record_per_run() -> None:
    args = ["--ram-mib", "40", "--channels", "1", "--json", "--timeout", "60", "--prealloc"]
    done = subprocess.run([sys.executable, str(BENCH), *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    record = json.loads(done.stdout)
    assert record["multifd_channels"] == 1 and record["ram_mib"] == 40 and record["run"] == 1
    assert record["prealloc"] is True
    assert record["transferred_bytes"] >= 24 * MIB


def _process_state(pid: int) -> str:
    """The one-letter state of pid ('Z' zombie), or 'gone'."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "gone"


def _wait_for(predicate: Callable[[], bool], tries: int = 1000) -> bool:
    for _ in range(tries):  # polls for an asynchronous kernel action; not a timing assertion
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs util-linux setpriv")
def test_children_die_with_a_killed_bench() -> None:
    """What keeps two 1 GiB QEMUs from outliving a bench killed with SIGKILL (no finally runs then)."""
    helper = (
        "import subprocess, sys, time\n"
        f"sys.path.insert(0, {str(BENCH.parent)!r})\n"
        "import qemu_baseline as qb\n"
        "child = subprocess.Popen(qb.with_parent_death_signal(['sleep', '600']))\n"
        "print(child.pid, flush=True)\n"
        "time.sleep(600)\n"
    )
    bench = subprocess.Popen([sys.executable, "-c", helper], stdout=subprocess.PIPE, text=True)
    assert bench.stdout is not None
    child_pid = int(bench.stdout.readline())
    try:
        # setpriv arms the death signal before it execs the command: once the child is 'sleep', it is armed
        assert _wait_for(lambda: Path(f"/proc/{child_pid}/comm").read_text().strip() == "sleep")
        bench.kill()
        bench.wait()
        assert _wait_for(lambda: _process_state(child_pid) in ("Z", "gone"))
    finally:
        bench.kill()
        with contextlib.suppress(ProcessLookupError):
            os.kill(child_pid, signal.SIGKILL)  # only if the test failed: leave nothing behind
