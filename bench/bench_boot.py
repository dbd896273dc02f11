"""VMM speed figures (printed, not asserted), each against a baseline measured in the same run:
- boot to workload running for a 256 MiB guest, against the 100 ms goal;
- the unpaced dirty-writer's rate, against a host memset of the same size (native speed check);
- a vCPU exit round trip (idle doorbell + kick), against a bare ctypes getppid() call.

Run: .venv/bin/python bench/bench_boot.py
"""

from __future__ import annotations

import ctypes
import statistics
import time

from confplan.vmm import Machine, MachineConfig, abi

MEM = 256 * abi.MIB
GOAL_S = 0.100


def boot_time() -> tuple[float, float]:
    """Seconds from Machine() to the workload's STARTED event, and to FILLED (all RAM written)."""
    t0 = time.perf_counter()
    with Machine(MachineConfig(memory=MEM, workload_kind="quiet")) as m:
        m.start()
        m.wait_workload(abi.EV_WL_STARTED, timeout=10)
        started = time.perf_counter() - t0
        m.wait_workload(abi.EV_WL_FILLED, timeout=30)
        return started, time.perf_counter() - t0


def dirty_rate(seconds: float = 1.0) -> float:
    with Machine(MachineConfig(memory=MEM, workload_kind="dirty-writer")) as m:
        m.start()
        m.wait_workload(abi.EV_WL_FILLED, timeout=30)
        p0, t0 = m.workload.progress().pages_written, time.perf_counter()
        time.sleep(seconds)
        p1, t1 = m.workload.progress().pages_written, time.perf_counter()
        return (p1 - p0) * abi.PAGE / (t1 - t0)


def host_memset_rate() -> float:
    buf = ctypes.create_string_buffer(MEM)
    ctypes.memset(buf, 1, MEM)  # fault the pages in first
    t0 = time.perf_counter()
    for i in range(4):
        ctypes.memset(buf, i, MEM)
    return 4 * MEM / (time.perf_counter() - t0)


def exit_round_trip(n: int = 2000) -> float:
    """Seconds per idle-doorbell exit + kick, measured through the MH's ping/pong."""
    with Machine(MachineConfig(memory=32 * abi.MIB, workload_kind="quiet", aux_vcpus=1)) as m:
        m.start()
        m.wait_helpers_ready()
        aux = m.aux[0]
        t0 = time.perf_counter()
        for _ in range(n):
            aux.ping()
        return (time.perf_counter() - t0) / n


def bare_call() -> float:
    libc = ctypes.CDLL(None)
    t0 = time.perf_counter()
    for _ in range(20000):
        libc.getppid()
    return (time.perf_counter() - t0) / 20000


def main() -> None:
    boots = [boot_time() for _ in range(3)]
    started = statistics.median(b[0] for b in boots)
    filled = statistics.median(b[1] for b in boots)
    print(
        f"boot to workload running, 256 MiB: {started * 1e3:.1f} ms"
        f" = {started / GOAL_S:.2f} x the 100 ms goal"
    )
    print(f"  (to all 256 MiB filled: {filled * 1e3:.0f} ms)")
    rate, memset = dirty_rate(), host_memset_rate()
    print(
        f"unpaced dirty rate: {rate / 2**30:.2f} GiB/s = {rate / memset:.2f} x host memset "
        f"({memset / 2**30:.1f} GiB/s); goal 1 GiB/s -> {rate / 2**30:.2f} x goal"
    )
    rt, call = exit_round_trip(), bare_call()
    print(
        f"vCPU exit round trip (doorbell + kick + pong): {rt * 1e6:.1f} us"
        f" = {rt / call:.0f} x a bare ctypes call"
    )


if __name__ == "__main__":
    main()
