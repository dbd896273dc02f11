"""QEMU's own plain (non-confidential) migration of a paused guest of random RAM over TCP loopback.

The baseline for issue 5's speed goal: confplan's total migration time is compared against this figure,
taken in the same run on the same machine. A later bench imports it:

    from qemu_baseline import measure_qemu_migration
    base = measure_qemu_migration(ram_mib=1024, multifd_channels=2)

or runs it as a script (several channel counts: the first is the baseline the others are compared with):

    .venv/bin/python bench/qemu_baseline.py --ram-mib 1024 --channels 2 1 0 [--repeat 3] [--json]

How it measures (the method of docs/kvm-here.md): a random file fills guest RAM above 16 MiB through QEMU's
generic loader; the source is paused (-S, TCG: the guest never runs); the target waits with -incoming
defer. QMP on both sets multifd (channels >= 1; 0 = classic single-stream migration) and lifts the source's
bandwidth cap, then the source migrates to the target over tcp:127.0.0.1. Figures are QEMU's own
query-migrate counters (total-time, downtime, ram.transferred). Afterwards samples of the target's RAM are
compared with the random file, so a run that did not move the data cannot pass as fast.

Nothing is installed here: without qemu-system-x86_64 it prints the apt-get command and exits 2.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from confplan.errors import ConfplanError

MIB = 1 << 20
QEMU_BINARY = "qemu-system-x86_64"
APT_COMMAND = "apt-get install qemu-system-x86"
LOADER_ADDR = 0x1000000  # where the random file goes in guest RAM (16 MiB, as in the reference method)
MAX_RAM_MIB = 3072  # the pc machine keeps at most 3 GiB below 4 GiB; the loader needs one flat range
MAX_BANDWIDTH = 1 << 40  # bytes/s; QEMU 7.2 caps at 128 MiB/s by default, a throttle test, not a baseline
DEFAULT_TIMEOUT_S = 300.0
POLL_INTERVAL_S = 0.02  # the figures come from QEMU's counters, so polling only needs to notice the end
FILL_CHUNK = 16 * MIB
VERIFY_SAMPLE = 64 * 1024
FAILED_STATES = frozenset({"failed", "cancelled", "cancelling"})


class QemuBaselineError(ConfplanError):
    """The QEMU baseline could not be measured; the message names the step and the side."""


@dataclass(frozen=True)
class QemuResult:
    """QEMU's figures for one completed migration (query-migrate on the source)."""

    total_time_s: float
    downtime_ms: float
    transferred_bytes: int
    throughput_bytes_s: float  # transferred_bytes / total_time_s
    qemu_version: str


# ---------------------------------------------------------------------------------------------------------
# Pure parts: command lines, QMP message handling, result parsing, formatting.


def random_fill_bytes(ram_mib: int) -> int:
    """How many random bytes fill a guest of ram_mib MiB from LOADER_ADDR to the end of its RAM."""
    low_mib = LOADER_ADDR // MIB
    if not low_mib < ram_mib <= MAX_RAM_MIB:
        raise QemuBaselineError(
            f"QEMU baseline: ram_mib={ram_mib} is out of range",
            hint=f"use {low_mib + 1}..{MAX_RAM_MIB} MiB (random data is loaded from {low_mib} MiB up)",
        )
    return (ram_mib - low_mib) * MIB


def qemu_command(
    binary: str, ram_mib: int, qmp_socket: Path, random_file: Path | None, *, prealloc: bool = False
) -> list[str]:
    """One side's command line: a paused TCG pc machine. With random_file it is the source, whose RAM
    holds that file; without, the target, which waits for an incoming migration and starts with zero RAM
    (so only the migration can put the random data there). The loader device has no migration state,
    so the two machines still match. prealloc faults all guest RAM in at start-up (-mem-prealloc)."""
    cmd = [
        binary, "-accel", "tcg", "-machine", "pc", "-m", str(ram_mib), "-S", "-nographic", "-nodefaults",
        "-qmp", f"unix:{qmp_socket},server=on,wait=off",
    ]  # fmt: skip
    if prealloc:
        cmd.append("-mem-prealloc")
    if random_file is None:
        return [*cmd, "-incoming", "defer"]
    return [*cmd, "-device", f"loader,file={random_file},addr={LOADER_ADDR:#x},force-raw=on"]


def version_from_greeting(greeting: dict[str, Any]) -> str:
    """'7.2.22 (Debian 1:7.2+dfsg-7)' from QMP's greeting {"QMP": {"version": ...}}."""
    try:
        version = greeting["QMP"]["version"]
        numbers = version["qemu"]
        text = f"{numbers['major']}.{numbers['minor']}.{numbers['micro']}"
    except (KeyError, TypeError) as exc:
        raise QemuBaselineError(f"QMP greeting has no QEMU version: {greeting!r}") from exc
    package = str(version.get("package", "")).strip()
    return f"{text} ({package})" if package else text


def reply_for(message: dict[str, Any], command_id: int, command: str) -> dict[str, Any] | None:
    """The 'return' value if message answers command_id; None for events and other traffic; raise on error."""
    if message.get("id") != command_id:
        return None
    if "error" in message:
        error = message["error"]
        desc = error.get("desc", error) if isinstance(error, dict) else error
        raise QemuBaselineError(f"QMP {command} failed: {desc}")
    result = message.get("return")
    return result if isinstance(result, dict) else {}


def incoming_port(info: dict[str, Any]) -> int:
    """The TCP port the target listens on, from its query-migrate after migrate-incoming on port 0."""
    for address in info.get("socket-address", []):
        if address.get("type") == "inet" and "port" in address:
            return int(address["port"])
    raise QemuBaselineError(
        f"target query-migrate reports no listening TCP address: {info!r}",
        hint="QEMU 4.0 or newer is needed (it reports socket-address after migrate-incoming)",
    )


def migration_status(info: dict[str, Any], side: str) -> str:
    """The status of a query-migrate reply; a failed or cancelled migration raises with QEMU's reason."""
    status = str(info.get("status", "none"))
    if status in FAILED_STATES:
        reason = info.get("error-desc", "no reason given")
        raise QemuBaselineError(f"{side} migration {status}: {reason}")
    return status


def result_from_query_migrate(info: dict[str, Any], qemu_version: str) -> QemuResult:
    """A QemuResult from the source's query-migrate reply once its status is 'completed'."""
    status = migration_status(info, "source")
    if status != "completed":
        raise QemuBaselineError(f"source migration is '{status}', not 'completed': no figures yet")
    try:
        total_ms = float(info["total-time"])
        downtime_ms = float(info["downtime"])
        transferred = int(info["ram"]["transferred"])
    except (KeyError, TypeError, ValueError) as exc:
        raise QemuBaselineError(f"source query-migrate lacks {exc} in {info!r}") from exc
    if total_ms <= 0:
        raise QemuBaselineError(f"source query-migrate reports total-time {total_ms} ms: cannot rate it")
    total_s = total_ms / 1000.0
    return QemuResult(total_s, downtime_ms, transferred, transferred / total_s, qemu_version)


def time_ratio(candidate_s: float, baseline_s: float) -> float:
    """candidate / baseline: 1.0 is as fast as the baseline, below 1.0 faster."""
    if baseline_s <= 0:
        raise ValueError(f"baseline time must be positive, got {baseline_s}")
    return candidate_s / baseline_s


def format_ratio(ratio: float) -> str:
    return f"{ratio:.2f}x"


def channels_label(multifd_channels: int) -> str:
    return "plain (1 stream)" if multifd_channels == 0 else f"multifd x{multifd_channels}"


def format_result(result: QemuResult) -> str:
    """One line of figures: total, downtime, transferred, throughput (decimal GB)."""
    return (
        f"total {result.total_time_s:.3f} s  downtime {result.downtime_ms:.0f} ms  "
        f"transferred {result.transferred_bytes / 1e9:.3f} GB  "
        f"throughput {result.throughput_bytes_s / 1e9:.2f} GB/s"
    )


# ---------------------------------------------------------------------------------------------------------
# Running QEMU: deadline, QMP client, processes.


class Deadline:
    """One time budget for the whole measurement; every blocking step asks it how long it may wait."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.end = time.monotonic() + seconds

    def remaining(self, step: str) -> float:
        left = self.end - time.monotonic()
        if left <= 0:
            raise QemuBaselineError(
                f"QEMU baseline timed out after {self.seconds:g} s while {step}",
                hint="raise --timeout, or check that the machine is not overloaded",
            )
        return left


def with_parent_death_signal(cmd: list[str]) -> list[str]:
    """Prefix cmd with util-linux setpriv so the kernel kills QEMU if this process dies without cleaning
    up (SIGKILL, OOM): two 1 GiB QEMUs must not outlive the bench. setpriv execs QEMU in place."""
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "KILL", "--", *cmd] if setpriv else cmd


class QemuProcess:
    """One QEMU side: the process, its log file, and how to report its death."""

    def __init__(self, side: str, cmd: list[str], log_path: Path) -> None:
        self.side = side
        self.log_path = log_path
        with log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                with_parent_death_signal(cmd), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )

    def log_tail(self, limit: int = 1500) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_bytes()[-limit:].decode(errors="replace").strip()
        return ""

    def check_alive(self, step: str) -> None:
        code = self.proc.poll()
        if code is not None:
            raise QemuBaselineError(
                f"{self.side} QEMU exited with status {code} while {step}: {self.log_tail() or '(no output)'}"
            )

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)


class QmpClient:
    """A minimal QMP client: JSON lines over a unix socket; events interleaved with replies are kept."""

    def __init__(self, qemu: QemuProcess, path: Path, deadline: Deadline) -> None:
        self.qemu = qemu
        self.deadline = deadline
        self.events: list[dict[str, Any]] = []
        self._buffer = b""
        self._next_id = 0
        self._sock = self._connect(path)
        try:
            self.qemu_version = version_from_greeting(self._read_message("reading the QMP greeting"))
            self.execute("qmp_capabilities")
        except BaseException:
            self._sock.close()  # nobody else holds the client yet
            raise

    def _connect(self, path: Path) -> socket.socket:
        step = f"connecting to the {self.qemu.side} QMP socket {path}"
        while True:  # QEMU creates the socket a moment after it starts
            self.qemu.check_alive(step)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(str(path))
                return sock
            except (FileNotFoundError, ConnectionRefusedError):
                sock.close()
                time.sleep(min(0.02, self.deadline.remaining(step)))

    def _read_message(self, step: str) -> dict[str, Any]:
        while b"\n" not in self._buffer:
            self._sock.settimeout(self.deadline.remaining(step))
            try:
                chunk = self._sock.recv(65536)
            except TimeoutError:
                continue  # the next remaining() call raises the timeout with the step named
            if not chunk:
                self.qemu.check_alive(step)
                raise QemuBaselineError(f"{self.qemu.side} QMP connection closed while {step}")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        try:
            message = json.loads(line)
        except ValueError as exc:
            raise QemuBaselineError(f"{self.qemu.side} QMP sent invalid JSON while {step}: {line!r}") from exc
        if not isinstance(message, dict):
            raise QemuBaselineError(f"{self.qemu.side} QMP sent a non-object while {step}: {line!r}")
        return message

    def execute(self, command: str, **arguments: Any) -> dict[str, Any]:
        """Run one QMP command and return its 'return' object; events that arrive meanwhile are kept."""
        self._next_id += 1
        request: dict[str, Any] = {"execute": command, "id": self._next_id}
        if arguments:
            request["arguments"] = arguments
        step = f"waiting for the {self.qemu.side} reply to {command}"
        try:
            self._sock.sendall(json.dumps(request).encode() + b"\n")
        except OSError as exc:  # QEMU went away: say so, with its last words, rather than EPIPE
            self.qemu.check_alive(step)
            raise QemuBaselineError(f"sending {command} to the {self.qemu.side} QMP failed: {exc}") from exc
        while True:
            message = self._read_message(step)
            if "event" in message:
                self.events.append(message)
                continue
            reply = reply_for(message, self._next_id, f"{command} on the {self.qemu.side}")
            if reply is not None:
                return reply

    def close(self) -> None:
        self._sock.close()


def find_qemu(binary: str | None) -> str:
    """The QEMU executable to run, or an error that says how to install it."""
    path = shutil.which(binary or QEMU_BINARY)
    if path is None:
        raise QemuBaselineError(
            f"{binary or QEMU_BINARY} not found (searched PATH); the QEMU baseline needs it",
            hint=f"install it with: {APT_COMMAND}",
        )
    return path


def write_random_file(path: Path, nbytes: int) -> None:
    """nbytes of incompressible data: AES-CTR keystream under a fresh key (os.urandom is ~5x slower)."""
    encryptor = Cipher(algorithms.AES(os.urandom(32)), modes.CTR(os.urandom(16))).encryptor()
    zeros = bytes(FILL_CHUNK)
    with path.open("wb") as out:
        for start in range(0, nbytes, FILL_CHUNK):
            out.write(encryptor.update(zeros[: min(FILL_CHUNK, nbytes - start)]))


def sample_offsets(nbytes: int) -> list[int]:
    """Offsets of the verification samples in the random region: its start, middle and end."""
    last = max(0, nbytes - VERIFY_SAMPLE)
    return sorted({0, (last // 2) & ~0xFFF, last})


def verify_target_ram(target: QmpClient, random_file: Path, nbytes: int, workdir: Path) -> None:
    """Compare samples of the target's RAM with the random file: proves the data actually moved."""
    dump = workdir / "sample.bin"
    with random_file.open("rb") as expected_file:
        for offset in sample_offsets(nbytes):
            size = min(VERIFY_SAMPLE, nbytes - offset)
            target.execute("pmemsave", val=LOADER_ADDR + offset, size=size, filename=str(dump))
            expected_file.seek(offset)
            if dump.read_bytes() != expected_file.read(size):
                raise QemuBaselineError(
                    f"target RAM at GPA {LOADER_ADDR + offset:#x} (+{size} bytes) differs from the source's "
                    "random data after a 'completed' migration: the baseline figure would be meaningless"
                )


def set_up_multifd(clients: Sequence[QmpClient], channels: int) -> None:
    if channels == 0:
        return
    for client in clients:  # both sides must agree, before migrate-incoming / migrate
        client.execute("migrate-set-capabilities", capabilities=[{"capability": "multifd", "state": True}])
        client.execute("migrate-set-parameters", **{"multifd-channels": channels})


def wait_for_status(client: QmpClient, deadline: Deadline, want: str) -> dict[str, Any]:
    step = f"waiting for the {client.qemu.side} migration to reach '{want}'"
    while True:
        info = client.execute("query-migrate")
        if migration_status(info, client.qemu.side) == want:
            return info
        client.qemu.check_alive(step)
        time.sleep(min(POLL_INTERVAL_S, deadline.remaining(step)))


@contextlib.contextmanager
def _running(side: str, cmd: list[str], workdir: Path) -> Iterator[QemuProcess]:
    qemu = QemuProcess(side, cmd, workdir / f"{side}.log")
    try:
        yield qemu
    finally:
        qemu.kill()  # on success, error, timeout and Ctrl-C alike


def measure_qemu_migration(
    ram_mib: int = 1024,
    multifd_channels: int = 2,
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    qemu_binary: str | None = None,
    verify: bool = True,
    prealloc: bool = False,
) -> QemuResult:
    """Migrate a paused ram_mib MiB guest of random RAM with QEMU over TCP loopback; return its figures.

    multifd_channels >= 1 enables multifd with that many channels; 0 uses classic single-stream migration.
    prealloc=True starts both QEMUs with -mem-prealloc, so the target's first-touch page faults happen
    before the migration instead of during it (they dominate on this machine: see bench/README.md).
    Raises QemuBaselineError (a ConfplanError) if QEMU is missing, fails, or timeout_s runs out; both QEMU
    processes and the temporary directory are always cleaned up.
    """
    if multifd_channels < 0:
        raise QemuBaselineError(f"multifd_channels={multifd_channels}", hint="use 0 (plain) or more channels")
    fill = random_fill_bytes(ram_mib)
    binary = find_qemu(qemu_binary)
    with tempfile.TemporaryDirectory(prefix="confplan-qemu-") as tmp, contextlib.ExitStack() as stack:
        workdir = Path(tmp)
        random_file = workdir / "random.bin"
        write_random_file(random_file, fill)
        deadline = Deadline(timeout_s)  # starts after the file so the budget covers QEMU only

        def side(name: str, ram_file: Path | None) -> QmpClient:
            qmp_path = workdir / f"{name}.sock"
            cmd = qemu_command(binary, ram_mib, qmp_path, ram_file, prealloc=prealloc)
            client = QmpClient(stack.enter_context(_running(name, cmd, workdir)), qmp_path, deadline)
            stack.callback(client.close)
            return client

        target, source = side("target", None), side("source", random_file)
        set_up_multifd((source, target), multifd_channels)
        source.execute("migrate-set-parameters", **{"max-bandwidth": MAX_BANDWIDTH})
        target.execute("migrate-incoming", uri="tcp:127.0.0.1:0")  # the kernel picks a free port: no race
        port = incoming_port(target.execute("query-migrate"))
        source.execute("migrate", uri=f"tcp:127.0.0.1:{port}")
        result = result_from_query_migrate(
            wait_for_status(source, deadline, "completed"), source.qemu_version
        )
        wait_for_status(target, deadline, "completed")
        if verify:
            verify_target_ram(target, random_file, fill, workdir)
        return result


# ---------------------------------------------------------------------------------------------------------
# Script.


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--ram-mib", type=int, default=1024, help="guest RAM in MiB (default 1024)")
    parser.add_argument(
        "--channels", type=int, nargs="+", default=[2],
        help="multifd channel counts to run, 0 = plain migration; the first is the baseline (default 2)",
    )  # fmt: skip
    parser.add_argument("--repeat", type=int, default=1, help="runs per channel count (default 1)")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds per run")
    parser.add_argument("--qemu", default=None, help=f"QEMU executable (default {QEMU_BINARY} on PATH)")
    parser.add_argument("--prealloc", action="store_true", help="start both QEMUs with -mem-prealloc")
    parser.add_argument("--no-verify", action="store_true", help="skip the target RAM sample check")
    parser.add_argument("--json", action="store_true", help="print one JSON object per run instead")
    return parser.parse_args(argv)


def run_all(args: argparse.Namespace) -> dict[int, list[QemuResult]]:
    results: dict[int, list[QemuResult]] = {}
    for channels in args.channels:
        for run in range(1, args.repeat + 1):
            result = measure_qemu_migration(
                args.ram_mib,
                channels,
                timeout_s=args.timeout,
                qemu_binary=args.qemu,
                verify=not args.no_verify,
                prealloc=args.prealloc,
            )
            results.setdefault(channels, []).append(result)
            if args.json:
                config = {"ram_mib": args.ram_mib, "multifd_channels": channels, "prealloc": args.prealloc}
                record = {**config, "run": run, **asdict(result)}
                print(json.dumps(record), flush=True)
            else:
                print(f"{channels_label(channels):18} run {run}: {format_result(result)}", flush=True)
    return results


def summary_lines(results: dict[int, list[QemuResult]]) -> list[str]:
    """Median total time per channel count, as a ratio against the first (the baseline of this run)."""
    medians = {ch: statistics.median(r.total_time_s for r in runs) for ch, runs in results.items()}
    baseline_channels = next(iter(medians))
    lines = [f"median total time, ratio against {channels_label(baseline_channels)}:"]
    for channels, median in medians.items():
        ratio = format_ratio(time_ratio(median, medians[baseline_channels]))
        lines.append(f"  {channels_label(channels):18} {median:.3f} s  {ratio}")
    return lines


def header_line(binary: str, ram_mib: int, prealloc: bool) -> str:
    version = subprocess.run([binary, "--version"], capture_output=True, text=True, check=False)
    name = version.stdout.splitlines()[0] if version.stdout else binary
    random_mib = random_fill_bytes(ram_mib) // MIB
    ram = f"guest {ram_mib} MiB{' (-mem-prealloc)' if prealloc else ''}"
    return f"{name}; {ram}, {random_mib} MiB random from {LOADER_ADDR // MIB} MiB; TCP loopback"


def _exit_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds through the finally blocks that kill QEMU


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        if not args.json:
            print(header_line(find_qemu(args.qemu), args.ram_mib, args.prealloc), flush=True)
        results = run_all(args)
    except ConfplanError as exc:
        print(exc.render(), file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted: both QEMUs stopped, temporary files removed", file=sys.stderr)
        return 130
    if not args.json:
        print("\n".join(summary_lines(results)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
