"""Issue 5's speed figures: `confplan apply` of a 1 GiB guest, idle and dirtying 64 MiB/s, against QEMU's
own plain migration of a paused 1 GiB guest of random RAM over TCP loopback, measured in the same run.

    .venv/bin/python bench/bench_migration.py [--ram-mib 1024] [--channels 2] [--skip-qemu] [--repeat 3]
                                               [--skip-protection] [--stream-channels 1] [--scaling]
                                               [--generation sev|sev-es|sev-snp]

Per scenario it prints the total migration time (start-incoming until the guest runs on the target: what
QEMU's total-time covers, plus our verify) as a ratio of QEMU's (goal <= 1.0x), the downtime
(pause on the source to running on the target; goal <= 50 ms), the rounds, and each VMM process's
memory beyond guest RAM (RSS minus the memfd guest RAM it maps; goal <= 64 MiB), and each VMM process's
CPU-seconds (user + system, /proc/<pid>/stat) from the start of start-incoming to the end of the migration,
per GiB of guest RAM. Beside the totals: the crypto floor, measured in the same run: OpenSSL AES-256-GCM
(`cryptography`) sealing and then opening the guest's RAM size in 4 KiB records on all cores, i.e. what
confidentiality must cost on this CPU; total/floor says how much of the rest is overhead. Real VMM
processes, real in-guest helpers, measured launches: the same path as `confplan apply`. Then, per repeat,
the stream with its wire v2 protection against the previous unprotected path, same engines
(stream_protection.py), the order of the two alternating between repeats.

``--scaling`` (issue 14, parallel streams) adds, per repeat and scenario, interleaved: 1 helper vCPU with
1 stream channel, 2 helper vCPUs with 1 channel (the default plan) and 2 helper vCPUs with 2 channels (one
TCP connection per helper vCPU, wire v4), and prints the 1 -> 2 scaling of each in the same run.

``--generation sev-es`` / ``sev-snp`` runs the same scenarios with the plan's ``sev.generation`` set (the
vCPU state then travels sealed by the helpers; SEV-SNP adds the measured SNP launch and the owner's key
release against attestation reports, as `confplan apply plans/sev-snp.yaml` does: emulated here).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from confplan.agent import handle as vmm_handle
from confplan.errors import ConfplanError
from confplan.plan import load_plan
from confplan.stages import Observer, apply
from confplan.stages.executor import Step
from confplan.stages.modules import __name__ as _stages  # noqa: F401  (registers the stages)
from confplan.vmm.memory import GUEST_RAM_VMFLAGS, smaps

MIGRATION_STAGES = ("start-incoming", "precopy", "stop-and-copy", "verify", "resume-target")
STAGES = ("launch-source", "provision-target", "attest-target", *MIGRATION_STAGES)  # no cleanup: RSS of both
# The plan's sev section per --generation (plain SEV: none, the plan's default); the policies are the ones
# the tests and plans/sev-snp.yaml use.
SEV_SECTIONS = {
    "sev": "",
    "sev-es": "sev: {generation: sev-es, policy: {nodbg: true, es: true}}\n",
    "sev-snp": "sev: {generation: sev-snp, policy: {smt: true}}\n",
}


def write_plan(
    folder: Path, ram_mib: int, workload: str, batch_pages: int = 256, helpers: int = 2, channels: int = 1,
    generation: str = "sev",
) -> Path:  # fmt: skip
    path = folder / "plan.yaml"
    stages = [f"start-incoming: {{channels: {channels}}}" if s == "start-incoming" else s for s in STAGES]
    path.write_text(
        f"metadata: {{name: bench}}\nguest:\n  memory: {ram_mib}MiB\n  workload: {workload}\n"
        f"helper: {{mode: aux-vcpu, aux_vcpus: {helpers}, batch_pages: {batch_pages}}}\n"
        "limits: {max_downtime: 50ms, completion_timeout_per_gib: 800s, max_precopy_rounds: 30}\n"
        f"{SEV_SECTIONS[generation]}stages: [{', '.join(stages)}]\ncheckpoint: {{dir: state}}\n"
    )
    return path


def beyond_guest_ram_mib(pid: int) -> float:
    """RSS minus the guest RAM of a VMM process, MiB (guest RAM: the mapping confplan.vmm.memory marks)."""
    mappings = list(smaps(pid))
    rss = sum(m.kib.get("Rss", 0) for m in mappings)
    return (rss - sum(m.kib.get("Rss", 0) for m in mappings if m.flags >= GUEST_RAM_VMFLAGS)) / 1024


RECORD = 4096
FLOOR_CHUNK = 16 << 20  # bytes each worker seals (keeping the records) and then opens, per step


def _floor_worker(nbytes: int, barrier: Any, cpu: Any) -> None:
    """Seal and then open ``nbytes`` in 4 KiB records (OpenSSL via `cryptography`, one record a call); put
    the CPU seconds that took on the ``cpu`` queue."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    aead, aad = AESGCM(os.urandom(32)), bytes(28)
    data = os.urandom(min(nbytes, FLOOR_CHUNK))
    records = [data[i : i + RECORD] for i in range(0, len(data), RECORD)]
    nonces = [i.to_bytes(12, "big") for i in range(len(records))]
    barrier.wait()
    start = time.process_time()
    for _ in range(max(1, nbytes // len(data))):
        sealed = [aead.encrypt(n, r, aad) for n, r in zip(nonces, records, strict=True)]
        for n, c in zip(nonces, sealed, strict=True):
            aead.decrypt(n, c, aad)
    cpu.put(time.process_time() - start)


def crypto_floor_s(ram_mib: int) -> tuple[float, float]:
    """Wall seconds for OpenSSL AES-256-GCM to seal and then open ``ram_mib`` MiB in 4 KiB records, split
    over one process per core (their set-up, the random bytes, happens before the clock starts), and the
    CPU seconds per core that took (what the wall figure would be with the cores to ourselves)."""
    cores = os.cpu_count() or 1
    ctx = multiprocessing.get_context("spawn")
    barrier, cpu = ctx.Barrier(cores + 1), ctx.Queue()
    share = ram_mib * (1 << 20) // cores
    workers = [ctx.Process(target=_floor_worker, args=(share, barrier, cpu)) for _ in range(cores)]
    for w in workers:
        w.start()
    barrier.wait()
    start = time.perf_counter()
    for w in workers:
        w.join()
    elapsed = time.perf_counter() - start
    if any(w.exitcode != 0 for w in workers):
        raise SystemExit("the crypto-floor workers failed")
    return elapsed, max(cpu.get() for _ in workers)


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far (all its threads), from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


class MigrationCpu(Observer):
    """Each VMM process's CPU time when start-incoming begins; ``since`` gives what each used after."""

    def __init__(self, state: Path) -> None:
        self.state = state
        self.pids: dict[str, int] = {}
        self.at_start: dict[str, float] = {}

    def stage_started(self, step: Step) -> None:
        if step.stage != MIGRATION_STAGES[0]:
            return
        for role in ("source", "target"):
            found = vmm_handle.find_local(self.state, role)
            if found is not None and found.pid:
                self.pids[role], self.at_start[role] = found.pid, process_cpu_s(found.pid)
                found.close()

    def since(self) -> dict[str, float]:
        return {role: process_cpu_s(pid) - self.at_start[role] for role, pid in self.pids.items()}


def run_scenario(
    ram_mib: int, workload: str, batch_pages: int = 256, helpers: int = 2, channels: int = 1,
    generation: str = "sev",
) -> dict[str, Any]:  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="confplan-bench-") as tmp:
        plan = load_plan(write_plan(Path(tmp), ram_mib, workload, batch_pages, helpers, channels, generation))
        state = Path(plan.checkpoint.dir)
        cpu = MigrationCpu(state)
        try:
            report = apply(plan, observer=cpu)
            cpu_s = cpu.since()  # the migration has ended: the target's guest runs
            memory = {}
            for role in ("source", "target"):
                found = vmm_handle.find_local(state, role)
                if found is not None and found.pid:
                    memory[role] = beyond_guest_ram_mib(found.pid)
                    found.close()
        finally:
            for role in ("source", "target"):
                found = vmm_handle.find_local(state, role)
                if found is not None:
                    vmm_handle.stop(found)
    records = report.records
    # Up to the guest running on the target (QEMU's total-time ends there too): the ledger check after it
    # is ours alone and left out.
    until_resumed = records["resume-target"].result["resume_seconds"]
    total = sum(records[name].duration or 0.0 for name in MIGRATION_STAGES[:-1]) + until_resumed
    rounds = list(records["precopy"].result["rounds"])
    return {
        "total_s": total, "downtime_s": records["resume-target"].result["downtime_seconds"],
        "rounds": len(rounds) + 1, "first_round_MBps": rounds[0]["bytes_sent"] / rounds[0]["seconds"] / 1e6,
        "sealed_MiB": sum(r.bytes_sealed for r in records.values()) / (1 << 20), "memory_mib": memory,
        "stages": {name: round(records[name].duration or 0.0, 3) for name in STAGES},
        "prefault_s": records["provision-target"].result["created"].get("prefault_seconds"),
        "pause_ms": pause_breakdown(records),
        "round_list": rounds, "mac_tables": records["precopy"].result.get("mac_tables"),
        "cpu_s_per_gib": {role: secs / (ram_mib / 1024) for role, secs in cpu_s.items()},
    }  # fmt: skip


def pause_breakdown(records: Any) -> dict[str, Any]:
    """Where the downtime goes, in ms: the stop-and-copy steps, verify per side, the resume."""
    sc, verify = records["stop-and-copy"].result, records["verify"].result
    final = sc["final_round"]
    ms = {f"sc_{k}": round(v * 1e3, 1) for k, v in sc.get("steps", {}).items()}
    ms["final_pages"] = int(final["sealed_pages"]) + int(final["shared_pages"])
    for side, secs in (verify.get("seconds") or {}).items():
        if isinstance(secs, dict):
            ms.update({f"verify_{side}_{k}": round(v * 1e3, 1) for k, v in secs.items() if v is not None})
        elif secs is not None:
            ms[f"verify_{side}"] = round(secs * 1e3, 1)
    ms["verify_pages_hashed"] = verify.get("pages_hashed_in_pause")
    for moment, secs in (verify.get("since_pause") or {}).items():
        ms[f"at_verify_{moment}"] = round(secs * 1e3, 1)
    resumed = records["resume-target"].result
    if resumed.get("started_since_pause") is not None:
        ms["at_resume_started"] = round(resumed["started_since_pause"] * 1e3, 1)
    ms["resume"] = round(resumed["resume_seconds"] * 1e3, 1)
    ms["verify_shared_pages_crcd"] = verify.get("shared_pages_crcd_in_pause")
    for moment, secs in (resumed.get("pause_timeline") or {}).items():  # the target's own clock
        ms[f"t_{moment}"] = round(secs * 1e3, 1)
    return ms


def qemu_baselines(ram_mib: int, channels: int) -> dict[str, float]:
    """QEMU's total time, s: as the issue states it (the target faults its RAM in while receiving), and
    with -mem-prealloc (allocated before, as confplan's provision-target does): the like-for-like one."""
    from qemu_baseline import format_result, measure_qemu_migration

    out: dict[str, float] = {}
    for label, prealloc in (("", False), (" -mem-prealloc", True)):
        for attempt in (1, 2):  # one retry: the baseline itself can fail on a loaded machine
            try:
                qemu = measure_qemu_migration(ram_mib, channels, prealloc=prealloc)
            except ConfplanError as err:
                print(f"QEMU{label} baseline attempt {attempt} failed: {err.message}")
                continue
            out[label] = qemu.total_time_s
            print(f"QEMU{label} baseline: {format_result(qemu)}")
            break
    return out


def report_run(
    ram_mib: int, name: str, r: dict[str, Any], baselines: dict[str, float], floor_s: float
) -> dict[str, float]:
    """Print one scenario run; return its figures for the summary (ratios against this run's QEMU and
    crypto floor)."""
    ratios = {label: r["total_s"] / secs for label, secs in baselines.items()}
    text = "".join(f" = {ratio:.2f}x QEMU{label}" for label, ratio in ratios.items())
    print(f"{ram_mib} MiB {name}: total {r['total_s']:.2f} s{text} (goal <= 1.0x QEMU); crypto floor "
          f"{floor_s:.2f} s, total/floor {r['total_s'] / floor_s:.2f}x; downtime "
          f"{r['downtime_s'] * 1e3:.0f} ms (goal <= 50 ms); {r['rounds']} rounds; first round "
          f"{r['first_round_MBps']:.0f} MB/s; {r['sealed_MiB']:.0f} MiB sealed")  # fmt: skip
    mem = ", ".join(f"{role} {mib:.0f} MiB" for role, mib in r["memory_mib"].items())
    print(f"  VMM memory beyond guest RAM: {mem} (goal <= 64 MiB each); target RAM pre-faulted in "
          f"{r['prefault_s'] or 0:.2f} s in provision-target (before the timed window)")  # fmt: skip
    cpu = ", ".join(f"{role} {secs:.2f}" for role, secs in r["cpu_s_per_gib"].items())
    print(f"  VMM CPU-seconds per GiB of guest RAM, start-incoming to running on the target: {cpu}")
    print(f"  stages {r['stages']}")
    print(f"  pause: {r['pause_ms']}")
    figures = {"total s": r["total_s"], "downtime ms": r["downtime_s"] * 1e3,
               "first round MB/s": r["first_round_MBps"], "memory MiB": max(r["memory_mib"].values())}
    figures.update({f"x QEMU{label}": ratio for label, ratio in ratios.items()})
    figures.update({"crypto floor s": floor_s, "x floor": r["total_s"] / floor_s})
    figures.update({f"{role} CPU-s/GiB": secs for role, secs in r["cpu_s_per_gib"].items()})
    return figures


def print_summary(runs: dict[str, list[dict[str, float]]]) -> None:
    """Medians and ranges over the repeats: with 2 shared cores single runs vary, medians less."""
    print(f"\nsummary over {max(len(v) for v in runs.values())} runs (median [min-max]):")
    for name, figures in runs.items():
        if not figures:
            print(f"  {name}: no run finished")
            continue
        cells = []
        for key in figures[0]:
            values = [f[key] for f in figures]
            cells.append(f"{key} {statistics.median(values):.2f} [{min(values):.2f}-{max(values):.2f}]")
        print(f"  {name}: " + "; ".join(cells))


SCALING = {"1 helper, 1 channel": (1, 1), "2 helpers, 1 channel": (2, 1), "2 helpers, 2 channels": (2, 2)}


Runs = dict[str, list[dict[str, float]]]


def run_scaling(args: argparse.Namespace, scenarios: dict[str, str], runs: Runs) -> None:
    """One repeat of the parallel-streams comparison: each configuration of ``SCALING`` per scenario, back to
    back; prints the 1 -> 2 ratios of this repeat (first-round MB/s and total time)."""
    for name, workload in scenarios.items():
        got: dict[str, dict[str, Any]] = {}
        for label, (helpers, channels) in SCALING.items():
            try:
                r = run_scenario(args.ram_mib, workload, args.batch_pages, helpers, channels, args.generation)
            except ConfplanError as err:
                print(f"{args.ram_mib} MiB {name}, {label}: the migration failed: {err.message}")
                continue
            got[label] = r
            cpu = ", ".join(f"{role} {secs:.2f}" for role, secs in r["cpu_s_per_gib"].items())
            print(f"{args.ram_mib} MiB {name}, {label}: total {r['total_s']:.2f} s; first round "
                  f"{r['first_round_MBps']:.0f} MB/s; downtime {r['downtime_s'] * 1e3:.0f} ms; {r['rounds']} "
                  f"rounds; CPU-s/GiB {cpu}")  # fmt: skip
            figures = {"total s": r["total_s"], "first round MB/s": r["first_round_MBps"],
                       "downtime ms": r["downtime_s"] * 1e3}  # fmt: skip
            runs.setdefault(f"{name}, {label}", []).append(figures)
        one, two1, two2 = (got.get(label) for label in SCALING)
        pairs = (("1 -> 2 helpers and channels", one, two2), ("1 -> 2 channels, 2 helpers", two1, two2))
        for what, a, b in pairs:
            if a is not None and b is not None:
                print(f"  {name}: {what}: first round x{b['first_round_MBps'] / a['first_round_MBps']:.2f}, "
                      f"total x{a['total_s'] / b['total_s']:.2f} faster")  # fmt: skip


def main() -> int:
    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=raw)
    parser.add_argument("--ram-mib", type=int, default=1024)
    parser.add_argument("--channels", type=int, default=2, help="QEMU multifd channels (0: single stream)")
    parser.add_argument("--skip-qemu", action="store_true", help="no QEMU baseline (ratios not printed)")
    parser.add_argument("--batch-pages", type=int, default=1024, help="the plan's helper.batch_pages")
    parser.add_argument("--repeat", type=int, default=1, help="runs of everything, interleaved; then medians")
    parser.add_argument("--skip-protection", action="store_true", help="no protected/unprotected comparison")
    parser.add_argument("--stream-channels", type=int, default=1, help="start-incoming.channels of the plan")
    parser.add_argument("--scaling", action="store_true", help="1 vs 2 helper vCPUs and stream channels")
    parser.add_argument("--generation", choices=tuple(SEV_SECTIONS), default="sev",
                        help="the plan's sev.generation (sev-es, sev-snp: the vCPU state travels sealed)")
    args = parser.parse_args()
    scenarios = {"idle": "{kind: idle}", "64MiB/s": "{kind: dirty-writer, dirty_rate: 64MiB/s}"}
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in scenarios}
    if not args.skip_protection:
        runs["stream protection"] = []
    for repeat in range(max(1, args.repeat)):
        baselines = {} if args.skip_qemu else qemu_baselines(args.ram_mib, args.channels)
        floor_s, floor_cpu_s = crypto_floor_s(args.ram_mib)
        print(f"crypto floor: {floor_s:.2f} s (OpenSSL AES-256-GCM, {args.ram_mib} MiB sealed then opened in "
              f"4 KiB records on {os.cpu_count()} cores; {floor_cpu_s:.2f} CPU-s per core, so less load "
              f"would bring it down to that)")  # fmt: skip
        for name, workload in scenarios.items():
            try:
                result = run_scenario(args.ram_mib, workload, args.batch_pages, channels=args.stream_channels,
                                      generation=args.generation)
            except ConfplanError as err:  # e.g. precopy gave up on a loaded machine: say so, run the rest
                print(f"{args.ram_mib} MiB {name}: the migration failed: {err.message}")
                continue
            runs[name].append(report_run(args.ram_mib, name, result, baselines, floor_s))
        if not args.skip_protection:
            from stream_protection import compare

            first = repeat % 2 == 1  # alternate which of the two goes second
            runs["stream protection"].append(compare(args.ram_mib, args.batch_pages, protected_first=first))
        if args.scaling:
            run_scaling(args, scenarios, runs)
    if args.repeat > 1:
        print_summary(runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
