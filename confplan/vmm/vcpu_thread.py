"""One thread per vCPU: KVM_RUN (GIL released), exit dispatch, pause/resume, park/kick, stop.

Interrupting a vCPU (pause, stop, watchdog) = set ``immediate_exit`` (covers the race where the thread is
about to enter KVM_RUN) and send it ``KICK_SIGNAL`` (makes a running KVM_RUN return EINTR). The signal
needs a handler, installed once from the main thread; without one only ``immediate_exit`` is used.
"""

from __future__ import annotations

import enum
import errno
import os
import select
import signal
import threading
import time
import weakref
from collections.abc import Callable

from confplan.core.helper_run import INTERRUPTED, HelperRun
from confplan.kvm import KvmError, Vcpu
from confplan.vmm.exits import GuestError, VcpuExit, decode

KICK_SIGNAL = signal.SIGRTMIN + 2


def _on_kick(signum: int, frame: object) -> None:
    """Does nothing: the signal only has to interrupt KVM_RUN in the target thread."""


def install_kick_handler() -> bool:
    """Install the no-op handler (main thread only); True when a handler is in place."""
    if signal.getsignal(KICK_SIGNAL) is _on_kick:
        return True
    if threading.current_thread() is not threading.main_thread():
        return False
    signal.signal(KICK_SIGNAL, _on_kick)
    return True


class Waker:
    """The eventfd a parked vCPU thread (or a mailbox doorbell's waiter) waits on: ``wake`` from any thread,
    or a write of 1 to ``fd`` from C (the core's data loops kick a helper that way, a helper's C loop rings
    its doorbell that way, without taking the GIL). Closed only once nothing refers to it, so a loop that
    holds the number never writes into a reused descriptor."""

    def __init__(self) -> None:
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        weakref.finalize(self, os.close, self.fd)

    def wake(self) -> None:
        os.eventfd_write(self.fd, 1)

    def wait(self, timeout: float | None) -> bool:
        """Block until woken or ``timeout`` seconds passed; True if woken (the wake is consumed: with
        several waiters, one of them). A poll object per call: several threads may wait at once."""
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        if not poller.poll(None if timeout is None else max(0.0, timeout * 1000.0)):
            return False
        return self.drain()

    def drain(self) -> bool:
        """Consume any wake without waiting; True if there was one."""
        try:
            return os.eventfd_read(self.fd) > 0
        except BlockingIOError:
            return False


class RunState(enum.Enum):
    CREATED = "created"
    RUNNING = "running"  # in or around KVM_RUN
    PARKED = "parked"  # the guest asked to idle/sleep (doorbell); waiting for a kick
    PAUSED = "paused"  # the VMM paused it
    STOPPED = "stopped"


Dispatch = Callable[["VcpuRunner", VcpuExit], None]


class VcpuRunner:
    """Runs one vCPU on its own thread. ``index`` is the KVM vCPU id; ``aux`` marks helper vCPUs (aux vCPUs
    and the mirror VM's, which pausing the guest leaves running); ``label`` names it in messages."""

    def __init__(
        self,
        vcpu: Vcpu,
        *,
        aux: bool,
        dispatch: Dispatch,
        on_error: Callable[[BaseException], None],
        heartbeat: Callable[[], int] | None = None,
        label: str | None = None,
    ) -> None:
        self.vcpu = vcpu
        self.index = vcpu.id
        self.aux = aux
        self.label = label or f"vCPU {self.index}"
        self._dispatch = dispatch
        self._on_error = on_error
        self.heartbeat = heartbeat
        self.state = RunState.CREATED
        self._exits = 0
        self._c_loop: HelperRun | None = None
        self.last_progress = time.monotonic()
        self._cond = threading.Condition()
        self._pause_req = False
        self._stop_req = False
        self._kicked = False
        self.waker = Waker()  # what park waits on: kick, pause and stop wake it
        self._stuck_for: float | None = None
        self._pending_io = False
        self._signal_ok = install_kick_handler()
        self._thread = threading.Thread(target=self._main, name=self.label.replace(" ", "-"), daemon=True)

    def use_c_loop(self, loop: HelperRun) -> None:
        """Run through ``loop`` (a helper vCPU's doorbells and parks in C, core/helper_run.py), before
        ``start``. It parks on this runner's ``waker``, so kick, pause and stop reach it as they reach
        ``park``; every other exit still comes to ``dispatch``."""
        assert self.state is RunState.CREATED, "the loop is chosen before the thread starts"
        self._c_loop = loop

    @property
    def exits(self) -> int:
        """Exits so far: those dispatched here and those the C loop handled."""
        return self._exits + (self._c_loop.exits if self._c_loop else 0)

    @property
    def parked(self) -> bool:
        """Waiting for a kick (on a doorbell, here or in the C loop)."""
        return self.state is RunState.PARKED or bool(self._c_loop and self._c_loop.parked)

    @property
    def active(self) -> bool:
        """Started, not paused (or being paused) and not stopped."""
        return not (self._pause_req or self._stop_req) and self.state not in (
            RunState.CREATED,
            RunState.STOPPED,
        )

    # ---- control, from other threads ----
    def start(self, paused: bool = False) -> None:
        self._pause_req = paused
        self._thread.start()

    def pause(self, timeout: float = 5.0) -> None:
        """Stop running guest code; return once the thread has parked in PAUSED (or stopped)."""
        with self._cond:
            self._pause_req = True
            self._cond.notify_all()
        self.waker.wake()
        self._interrupt()
        deadline = time.monotonic() + timeout
        with self._cond:
            while self.state not in (RunState.PAUSED, RunState.STOPPED):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise GuestError(f"{self.label} did not pause within {timeout} s", vcpu=self.index)
                self._cond.wait(left)

    def resume(self) -> None:
        with self._cond:
            self._pause_req = False
            self._cond.notify_all()

    def kick(self) -> None:
        """Wake the vCPU if it is parked on an idle/sleep doorbell (latched: a park after it returns)."""
        self._kicked = True
        self.waker.wake()

    def stop(self) -> None:
        with self._cond:
            self._stop_req = True
            self._cond.notify_all()
        self.waker.wake()
        self._interrupt()

    def join(self, timeout: float) -> bool:
        if self._thread.ident is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def declare_stuck(self, seconds: float) -> None:
        """Watchdog: the guest made no progress; get it out of KVM_RUN and report where it was."""
        self._stuck_for = seconds
        self._interrupt()

    def _interrupt(self) -> None:
        run = self.vcpu.run_struct
        if run is not None:
            run.immediate_exit = 1
        ident = self._thread.ident
        if self._signal_ok and ident is not None and self._thread.is_alive():
            signal.pthread_kill(ident, KICK_SIGNAL)

    # ---- called on this vCPU's thread (by devices) ----
    def park(self, timeout: float | None) -> None:
        """Block until kicked, paused, stopped or ``timeout`` seconds passed (idle/sleep doorbells)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        self.state = RunState.PARKED
        while not (self._kicked or self._pause_req or self._stop_req):
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                break
            if self.waker.wait(left):  # kick() sets _kicked too; the core's loops only write the fd
                break
        # Whatever woke it, the guest runs now and sees every post made so far: a wake still pending would
        # only make its next park return at once.
        self.waker.drain()
        self._kicked = False
        self.state = RunState.RUNNING
        self.last_progress = time.monotonic()

    # ---- the loop ----
    def _main(self) -> None:
        try:
            self._loop()
        except BaseException as err:  # handed to the machine, which stops everything and re-raises
            self._on_error(err)
        finally:
            with self._cond:
                self.state = RunState.STOPPED
                self._cond.notify_all()

    def _loop(self) -> None:
        run = self.vcpu.run
        while True:
            if self._stop_req or self._pause_req:
                self._complete_pending_io()
                if self._stop_req:
                    return
                self._wait_paused()
                continue
            self.state = RunState.RUNNING
            ret = self._c_loop.run() if self._c_loop else self.vcpu.run_once()
            self.last_progress = time.monotonic()
            if ret < 0:
                run.immediate_exit = 0
                if ret in (-errno.EINTR, -errno.EAGAIN):
                    self._check_stuck()
                    continue
                raise KvmError(-ret, f"{self.label}: KVM_RUN" + (" (or its park)" if self._c_loop else ""))
            if self._c_loop and ret == INTERRUPTED:  # a park cut short: pause or stop, above
                self._pending_io = True
                continue
            self._exits += 1
            self._pending_io = True
            self._dispatch(self, decode(run))

    def _complete_pending_io(self) -> None:
        """KVM completes an MMIO/IO exit on the next KVM_RUN: do that (returning at once) before the
        vCPU's state may be saved or the thread leaves."""
        if not self._pending_io:
            return
        run = self.vcpu.run
        run.immediate_exit = 1
        self.vcpu.run_once()
        run.immediate_exit = 0
        self._pending_io = False

    def _wait_paused(self) -> None:
        with self._cond:
            self.state = RunState.PAUSED
            self._cond.notify_all()
            while self._pause_req and not self._stop_req:
                self._cond.wait()
            self.state = RunState.RUNNING
            self.last_progress = time.monotonic()

    def _check_stuck(self) -> None:
        if self._stuck_for is None:
            return
        regs, sregs = self.vcpu.get_regs(), self.vcpu.get_sregs()
        raise GuestError(
            f"{self.label} made no progress for {self._stuck_for:.1f} s (no exit, no heartbeat): "
            f"stopped by the watchdog at RIP {regs.rip:#x} CPL {sregs.cs.selector & 3}",
            vcpu=self.index,
            rip=int(regs.rip),
            hint="the guest is spinning without leaving KVM_RUN; look up the RIP in confplan-fw.sym",
        )
