"""A migration helper vCPU's run loop in C (``helper_run.c``; docs/mailbox.md, "Parking").

``HelperRun.run`` enters KVM_RUN with the GIL released and comes back only for an exit the VMM's Python
loop must dispatch, or when a park was interrupted (pause, stop, the watchdog). The helper's doorbell
stores and its parks, one or two per mailbox op, never reach Python. This layer knows descriptors and
addresses only: the vCPU's, its run struct's, the eventfds and the doorbell's two words.
"""

from __future__ import annotations

import ctypes

from confplan.core._lib import lib

EXIT = 1  # an exit for the VMM to dispatch is in the run struct
INTERRUPTED = 2  # a park ended on immediate_exit; its doorbell exit is still to complete


class HelperRunC(ctypes.Structure):
    """struct cp_helper_run."""

    _fields_ = (
        ("vcpu_fd", ctypes.c_int32),
        ("wake_fd", ctypes.c_int32),
        ("rung_fd", ctypes.c_int32),
        ("reserved", ctypes.c_uint32),
        ("run", ctypes.c_void_p),
        ("bell_gpa", ctypes.c_uint64),
        ("idle_gpa", ctypes.c_uint64),
        ("rung", ctypes.c_void_p),
        ("rings", ctypes.c_void_p),
        ("exits", ctypes.c_uint64),
        ("parked", ctypes.c_uint32),
        ("reserved2", ctypes.c_uint32),
    )


class HelperRun:
    """One helper vCPU's C loop. ``bell_gpa``: its mailbox doorbell, recorded at ``rung_addr`` (highest seq)
    and ``rings_addr`` (count), then ``rung_fd`` written; ``idle_gpa``: the idle doorbell. Both park on
    ``wake_fd``. The caller keeps the run struct, the eventfds and the two words alive while it runs."""

    def __init__(
        self, *, vcpu_fd: int, run_addr: int, wake_fd: int, bell_gpa: int, idle_gpa: int, rung_addr: int,
        rings_addr: int, rung_fd: int,
    ) -> None:  # fmt: skip
        self.c = HelperRunC(
            vcpu_fd=vcpu_fd, wake_fd=wake_fd, rung_fd=rung_fd, run=run_addr, bell_gpa=bell_gpa,
            idle_gpa=idle_gpa, rung=rung_addr, rings=rings_addr,
        )  # fmt: skip
        self._fn = lib().cp_helper_run
        self._ref = ctypes.byref(self.c)

    def run(self) -> int:
        """KVM_RUN until an exit for Python: ``EXIT``, ``INTERRUPTED``, or ``-errno`` (``-EINTR``: pause,
        stop or the watchdog interrupted KVM_RUN; other: KVM_RUN or the park's wait failed)."""
        return int(self._fn(self._ref))

    @property
    def exits(self) -> int:
        """Exits handled in C (each a doorbell store that parked)."""
        return int(self.c.exits)

    @property
    def parked(self) -> bool:
        return bool(self.c.parked)
