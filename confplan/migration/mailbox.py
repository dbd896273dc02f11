"""One migration helper's mailbox, as the VMM drives it (docs/mailbox.md): ``Mailbox`` posts ops into the
op ring, waits for them and reads their results.

Per MH vCPU the VMM holds a writable view of guest RAM at the mailbox GPA: a 4 KiB control page (the VMM
engineer's ``cp_mailbox_header``, this protocol's block at 0x40, the op ring at 0x400) and ``batch_pages``
data slots, each a ``struct cp_sealed_page`` (offsets in ``mailbox_layout``). An op is posted by writing its
ring entry and then bumping ``seq``; the helper answers by raising ``done`` to it. Up to ``RING`` ops may be
queued, so ``mailbox_set.MailboxSet.save_stream``/``load_stream`` keep the helper busy on one bank of slots
while the VMM empties and refills another. Per-page work (GPAs into slots, statuses out) is done with
strided memoryview copies, never a Python loop over pages.
"""

from __future__ import annotations

import array
import os
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from confplan.migration.mailbox_layout import (
    CMD_ARGS,
    CMD_OFFSETS,
    CMD_RESULT,
    CMD_SIZE,
    CMD_TSC,
    DIGEST_BYTES,
    FIELD_OFFSETS,
    MANIFEST_REFUSALS,
    NO_INDEX,
    PROTO_MAGIC,
    PROTO_VERSION,
    RING,
    RING_OFFSET,
    SLOT_SIZE,
    SLOT_STATUS,
    SLOTS_OFFSET,
    WARM_HUGE,
    WARM_WRITE,
    MailboxError,
    MhStatus,
    Op,
    status_name,
)

_Q_SEQ, _Q_DONE = FIELD_OFFSETS["seq"] // 8, FIELD_OFFSETS["done"] // 8
_SLOT_Q, _SLOT_I = SLOT_SIZE // 8, SLOT_SIZE // 4

# (expected seq, seconds at most) -> returns when the helper may have answered, or after the time.
Waiter = Callable[[int, float], None]
# A sleep here wakes ~100 us late (measured: time.sleep(0) takes 106 us, sleep(77 us) 183 us), longer than a
# small op: so wait() sleeps only until this much before an op's expected end, then yields the CPU in a loop
# (os.sched_yield: ~1 us, releases the GIL) until done moves, for at most SPIN_AFTER past the expected end.
SLEEP_LATE = 0.00015
SPIN_AFTER = 0.0002


def sleeping_waiter(seq: int, seconds: float) -> None:
    """Default waiter: a short sleep (the VMM hands in one woken by the doorbell exit instead)."""
    time.sleep(min(seconds, 0.0005))


@dataclass(frozen=True)
class InitInfo:
    """What INIT published: the migration id bound into every AAD, the key fingerprint, the nonce prefix."""

    migration_id: bytes
    key_id: int
    sender_id: int


@dataclass(frozen=True)
class BatchResult:
    """A SAVE or LOAD: per-slot statuses (``array('I')``, 0 = done) and the slots' records.

    ``first_bad`` counts from the op's first slot (``records`` starts there too); ``gpas`` are the pages a
    streamed SAVE asked for (None elsewhere)."""

    statuses: array.array[int]
    records: memoryview
    n_ok: int
    n_refused: int
    first_bad: int
    gpas: array.array[int] | None = None

    def refused(self) -> list[tuple[int, MhStatus]]:
        """(slot, status) of every refused slot."""
        return [(i, MhStatus(s)) for i, s in enumerate(self.statuses) if s]


class KickFd(Protocol):
    """What wakes a parked helper from C: an open eventfd (``vmm.vcpu_thread.Waker``)."""

    @property
    def fd(self) -> int: ...


class Mailbox:
    """One MH vCPU's mailbox over ``view`` (control page + slots), with ``kick`` to wake the vCPU.

    The helper rings its doorbell only once it has caught up, so ``wait`` sleeps on the doorbell only for
    the last queued op; for an op with later ones queued behind it, it sleeps about half that op's expected
    time (``count`` x the helper's seconds per page, learnt from the guest TSC stamps of finished ops when
    ``tsc_khz`` is known; never below ``poll``) and looks at ``done`` again: about two wake-ups per op, and
    the helper keeps working on the queued ops meanwhile. Each queued op's expected end is kept (post
    time or the previous op's expected end, plus its pages x ``page_seconds``, re-anchored whenever done is
    seen to move): ``wait`` sleeps until just before it, then yields in a loop for the last stretch, since a
    sleep wakes ~100 us late and the helper would otherwise catch up and park between ops."""

    def __init__(
        self, view: memoryview, *, mh_index: int, batch_pages: int, kick: Callable[[], None],
        wait: Waiter = sleeping_waiter, timeout: float = 30.0, poll: float = 0.00005, tsc_khz: int = 0,
        waker: KickFd | None = None,
    ) -> None:  # fmt: skip
        need = SLOTS_OFFSET + batch_pages * SLOT_SIZE
        if batch_pages < 1 or len(view) < need or view.readonly:
            raise ValueError(
                f"mailbox {mh_index}: a writable view of {need} bytes is needed, got {len(view)}"
            )
        self.mh_index, self.batch_pages = mh_index, batch_pages
        self._kick, self._wait, self.timeout, self.poll = kick, wait, timeout, poll
        self._waker = waker  # held: its descriptor stays open while this mailbox lives
        self.tsc_khz = tsc_khz
        self.page_seconds = 1e-6  # the helper's time per page, a running average (TSC stamps)
        self.op_seconds = 0.0  # the helper's own time in the SAVE/LOAD ops finished so far (TSC stamps)
        self._counts = [0] * RING  # pages of the op in each ring entry, for the wait estimate
        self._expect = [0.0] * RING  # monotonic time each queued op is expected to be done
        self._last_expect = 0.0  # expected end of the newest posted op
        view = view.cast("B")
        self._ctl = view[:SLOTS_OFFSET]
        self._ctl_q = self._ctl.cast("Q")
        self.slots = view[SLOTS_OFFSET:need]
        self._slot_q = self.slots.cast("Q")
        self._slot_i = self.slots.cast("I")

    @property
    def control(self) -> memoryview:
        """The control page (protocol block and op ring), for the core's data loops."""
        return self._ctl

    def kick(self) -> None:
        """Wake the helper if it parked (the core's data loops post ops themselves)."""
        self._kick()

    @property
    def kick_fd(self) -> int:
        """An eventfd a write of 1 to wakes the helper with (the core's data loops, without the GIL); -1:
        none, kick() only."""
        return -1 if self._waker is None else self._waker.fd

    def check(self) -> None:
        """Raise the machine's error if the guest died (a zero wait on the doorbell)."""
        self._wait(0, 0.0)

    # ---- fields ----
    def _get(self, name: str, fmt: str) -> int:
        return int(struct.unpack_from(fmt, self._ctl, FIELD_OFFSETS[name])[0])

    def _set(self, name: str, fmt: str, value: int) -> None:
        struct.pack_into(fmt, self._ctl, FIELD_OFFSETS[name], value)

    @staticmethod
    def _entry(seq: int) -> int:
        """Byte offset of op ``seq``'s ring entry in the control page."""
        return RING_OFFSET + (seq % RING) * CMD_SIZE

    @property
    def ready(self) -> bool:
        """The helper's serve loop has published the protocol block (this protocol version)."""
        return self._get("magic", "<I") == PROTO_MAGIC and self._get("version", "<H") == PROTO_VERSION

    @property
    def queued(self) -> int:
        """Ops posted and not yet done."""
        return int(self._ctl_q[_Q_SEQ] - self._ctl_q[_Q_DONE])

    def counters(self) -> dict[str, int]:
        """The helper's counters since boot (pages sealed, opened, refused; ops; drains = doorbells rung)."""
        names = ("pages_sealed", "pages_opened", "pages_refused", "ops", "drains")
        return {k: self._get(k, "<Q") for k in names}

    def op_tsc(self, seq: int) -> tuple[int, int]:
        """Guest TSC when the helper began and finished op ``seq`` (until RING later ops reuse its entry)."""
        start, end = CMD_TSC.unpack_from(self._ctl, self._entry(seq) + CMD_OFFSETS["tsc_start"])
        return int(start), int(end)

    def last_op_seconds(self) -> float | None:
        """The helper's own time for its last finished op (guest TSC; None when the TSC rate is unknown)."""
        if not self.tsc_khz:
            return None
        start, end = self.op_tsc(self._get("done", "<Q"))
        return (end - start) / (self.tsc_khz * 1000.0)

    # ---- posting and waiting ----
    def post(
        self, op: Op, *, count: int = 0, generation: int = 0, arg0: int = 0, arg1: int = 0, first: int = 0
    ) -> int:
        """Write an op into its ring entry, then bump seq (one aligned 8-byte store) and kick. Returns the
        seq. At most ``RING`` ops may be queued; their slot ranges (``first``, ``count``) must not overlap."""
        seq = int(self._ctl_q[_Q_SEQ]) + 1
        if seq - int(self._ctl_q[_Q_DONE]) > RING:
            raise ValueError(f"MH vCPU {self.mh_index}: {RING} ops are queued already; wait for one first")
        CMD_ARGS.pack_into(self._ctl, self._entry(seq), op, count, generation, first, arg0, arg1)
        self._counts[seq % RING] = count
        self._last_expect = max(time.monotonic(), self._last_expect) + count * self.page_seconds
        self._expect[seq % RING] = self._last_expect
        self._ctl_q[_Q_SEQ] = seq
        self._kick()
        return seq

    def wait(self, op: Op, seq: int) -> int:
        """Wait for ``done >= seq``; returns the op status. Raises MailboxError after ``timeout`` seconds."""
        deadline = time.monotonic() + self.timeout
        next_check = 0.0
        spun = False
        while self._ctl_q[_Q_DONE] < seq:
            now = time.monotonic()
            left = deadline - now
            if left <= 0:
                done = self._ctl_q[_Q_DONE]
                raise no_answer(op, self.mh_index, self.timeout, f" (seq {seq}, the helper's done is {done})")
            expect = self._expect[seq % RING]
            if self._ctl_q[_Q_SEQ] == seq:
                self._wait(seq, left)  # the last queued op: the helper's doorbell wakes us
            elif now >= next_check:  # a zero wait still raises the machine's error if the guest died
                self._wait(seq, 0.0)
                next_check = now + 0.01
            elif now < expect - SLEEP_LATE:
                time.sleep(min(left, expect - SLEEP_LATE - now))
            elif now < expect + SPIN_AFTER:
                os.sched_yield()
                spun = True
            else:  # later than expected: poll as before, without holding a core
                time.sleep(min(left, max(self.poll, 0.5 * self._counts[seq % RING] * self.page_seconds)))
        if spun:
            self._reanchor(seq, time.monotonic())
        return int(struct.unpack_from("<I", self._ctl, self._entry(seq) + CMD_OFFSETS["status"])[0])

    def _reanchor(self, seq: int, done_at: float) -> None:
        """Op ``seq`` was seen done at ``done_at`` (to within a yield): the ops queued behind it start from
        there, so shift their expected ends by the estimate's error."""
        shift = done_at - self._expect[seq % RING]
        for later in range(seq + 1, int(self._ctl_q[_Q_SEQ]) + 1):
            self._expect[later % RING] += shift
        self._last_expect += shift

    def _learn_rate(self, seq: int, count: int) -> None:
        """Fold op ``seq``'s guest time per page into ``page_seconds`` (needs the TSC rate)."""
        start, end = self.op_tsc(seq)
        if self.tsc_khz > 0 and count > 0 and end > start:
            self.op_seconds += (end - start) / (self.tsc_khz * 1e3)
            per_page = (end - start) / (self.tsc_khz * 1e3) / count
            self.page_seconds = 0.75 * self.page_seconds + 0.25 * min(per_page, 1e-3)

    def _fail(self, op: Op, status: int, detail: str = "", statuses: array.array[int] | None = None) -> None:
        raise MailboxError(
            f"mailbox {op.name} on MH vCPU {self.mh_index} failed: {status_name(status)}{detail}",
            op=op, mh_index=self.mh_index, status=status, statuses=statuses,
        )  # fmt: skip

    def run(self, op: Op, **args: int) -> int:
        """Post and wait; raise unless the op status is OK or PARTIAL."""
        status = self.wait(op, self.post(op, **args))
        if status not in (MhStatus.OK, MhStatus.PARTIAL):
            self._fail(op, status)
        return status

    # ---- ops ----
    def init(self) -> InitInfo:
        """INIT: the helper reads the launch secret and publishes the migration id and key id."""
        self.run(Op.INIT)
        mig = bytes(self._ctl[FIELD_OFFSETS["migration_id"] : FIELD_OFFSETS["migration_id"] + 16])
        return InitInfo(mig, self._get("key_id", "<I"), self._get("sender_id", "<I"))

    def _check_count(self, op: Op, count: int, first: int) -> None:
        if count < 1 or first < 0 or first + count > self.batch_pages:
            raise ValueError(
                f"{op.name} on MH vCPU {self.mh_index}: {count} pages from slot {first}, "
                f"{self.batch_pages} slots in all"
            )

    def post_save(self, gpas: Sequence[int] | array.array[int], generation: int, *, first: int = 0) -> int:
        """Write the GPAs into slots ``first..`` (strided copy) and post SAVE; pair with ``finish``."""
        gpa_array = gpas if isinstance(gpas, array.array) and gpas.typecode == "Q" else array.array("Q", gpas)
        count = len(gpa_array)
        self._check_count(Op.SAVE, count, first)
        a = first * _SLOT_Q
        self._slot_q[a : a + count * _SLOT_Q : _SLOT_Q] = memoryview(gpa_array).cast("B").cast("Q")
        return self.post(Op.SAVE, count=count, generation=generation, first=first)

    def post_load(self, count: int, *, first: int = 0) -> int:
        """Post LOAD of the ``count`` records already in slots ``first..``."""
        self._check_count(Op.LOAD, count, first)
        return self.post(Op.LOAD, count=count, first=first)

    def finish(
        self, op: Op, seq: int, count: int, *, first: int = 0, gpas: array.array[int] | None = None
    ) -> BatchResult:
        """Wait for a posted SAVE/LOAD; per-page refusals are in the result, op failures raise."""
        status = self.wait(op, seq)
        if status not in (MhStatus.OK, MhStatus.PARTIAL):
            self._fail(op, status)
        self._learn_rate(seq, count)
        at = self._entry(seq) + CMD_OFFSETS["status"]
        _, n_ok, n_refused, first_bad = CMD_RESULT.unpack_from(self._ctl, at)
        statuses = array.array("I")
        a = first * _SLOT_I + SLOT_STATUS // 4
        statuses.frombytes(self._slot_i[a : a + count * _SLOT_I : _SLOT_I].tobytes())
        records = self.slots[first * SLOT_SIZE : (first + count) * SLOT_SIZE]
        return BatchResult(statuses, records, n_ok, n_refused, first_bad, gpas)

    def save(self, gpas: Sequence[int] | array.array[int], generation: int) -> BatchResult:
        """SAVE: seal the pages at ``gpas`` for ``generation``; raises if any page is refused.

        The sealed records are ``result.records`` (valid until the next op), ready for
        ``confplan.core.frame_sealed_pages``.
        """
        result = self.finish(Op.SAVE, self.post_save(gpas, generation), len(gpas))
        raise_for_refusals(Op.SAVE, self.mh_index, result)
        return result

    def load(self, count: int) -> BatchResult:
        """LOAD: open the first ``count`` records in the slots into their GPAs; statuses say which failed."""
        return self.finish(Op.LOAD, self.post_load(count), count)

    def digest(self, start: int, npages: int) -> bytes:
        """DIGEST: the keyed digest (32 bytes) of ``npages`` pages from GPA ``start``, MH area skipped."""
        self.run(Op.DIGEST, arg0=start, arg1=npages)
        return self._digest_field()

    def post_digest(self, start: int, npages: int) -> int:
        """Post DIGEST of ``npages`` pages from GPA ``start``; pair with ``finish_digest`` before posting
        another (the result lives in the protocol block, not in a slot)."""
        return self.post(Op.DIGEST, arg0=start, arg1=npages)

    def finish_digest(self, seq: int) -> bytes:
        """Wait for a posted DIGEST; its 32 bytes. Anything but OK raises."""
        status = self.wait(Op.DIGEST, seq)
        if status != MhStatus.OK:
            self._fail(Op.DIGEST, status)
        return self._digest_field()

    def _digest_field(self) -> bytes:
        off = FIELD_OFFSETS["digest"]
        return bytes(self._ctl[off : off + DIGEST_BYTES])

    def reset(self) -> None:
        """RESET: the helper forgets the transport key (nonce counters and anti-replay table stay)."""
        self.run(Op.RESET)

    def post_warm(self, start: int, npages: int, *, huge: bool = False, write: bool = False) -> int:
        """Post WARM (v8): the helper reads a byte of every page of the range (MH area skipped), which maps
        them into its view of guest RAM. ``huge`` (v9): the host backs that RAM with 2 MiB pages, so one
        read per 2 MiB page of the view does it (above the low 2 MiB). ``write`` (v9, a target's helper
        only): each touch a locked OR of zero, which maps for writing. Needs no key."""
        flags = (WARM_HUGE if huge else 0) | (WARM_WRITE if write else 0)
        return self.post(Op.WARM, count=flags, arg0=start, arg1=npages)

    def finish_warm(self, seq: int) -> int:
        """Wait for a posted WARM; the pages it read. Anything but OK raises."""
        status = self.wait(Op.WARM, seq)
        if status != MhStatus.OK:
            self._fail(Op.WARM, status)
        return self._get("digest_pages", "<Q")

    # ---- the per-page MAC table (v3) ----
    @property
    def mac_list_capacity(self) -> int:
        """GPAs one MAC_LIST takes at most: the whole data area as u64s."""
        return self.batch_pages * SLOT_SIZE // 8

    def post_mac_range(self, start: int, npages: int) -> int:
        """Post MAC_RANGE: the helper stores the MAC of every page of the range (MH area skipped)."""
        return self.post(Op.MAC_RANGE, arg0=start, arg1=npages)

    def post_mac_list(self, gpas: array.array[int], *, first: int = 0) -> int:
        """Write ``gpas`` (array('Q')) packed into the data area from slot ``first`` and post MAC_LIST."""
        fit = (self.batch_pages - first) * SLOT_SIZE // 8
        if not 1 <= len(gpas) <= fit:
            raise ValueError(f"MAC_LIST on MH vCPU {self.mh_index}: {len(gpas)} GPAs, 1..{fit} fit")
        raw = memoryview(gpas).cast("B")
        self.slots[first * SLOT_SIZE : first * SLOT_SIZE + len(raw)] = raw
        return self.post(Op.MAC_LIST, count=len(gpas), first=first)

    def finish_mac(self, op: Op, seq: int) -> int:
        """Wait for a MAC_RANGE / MAC_LIST; raises on any refusal. Returns the pages MAC'd."""
        status = self.wait(op, seq)
        if status != MhStatus.OK:
            self._fail(op, status, self._refused_detail(op, seq))
        if op is Op.MAC_LIST:
            return int(struct.unpack_from("<I", self._ctl, self._entry(seq) + CMD_OFFSETS["n_ok"])[0])
        return self._get("digest_pages", "<Q")

    def _refused_detail(self, op: Op, seq: int) -> str:
        if op is not Op.MAC_LIST:
            return ""
        at = self._entry(seq) + CMD_OFFSETS["status"]
        _, _, n_refused, first_bad = CMD_RESULT.unpack_from(self._ctl, at)
        if first_bad == NO_INDEX:
            return ""
        gpa = struct.unpack_from("<Q", self.slots, first_bad * 8)[0]
        return f": {n_refused} GPAs refused, first: {gpa:#x} (index {first_bad})"

    def post_fold(self, start: int, npages: int, chunk_pages: int) -> int:
        """Post FOLD: one digest per ``chunk_pages`` of the range, from the MAC table, into the slots."""
        chunks = -(-npages // chunk_pages) if chunk_pages > 0 else 0
        if npages < 1 or chunks < 1 or chunks * DIGEST_BYTES > self.batch_pages * SLOT_SIZE:
            raise ValueError(f"FOLD on MH vCPU {self.mh_index}: {npages} pages in chunks of {chunk_pages}")
        return self.post(Op.FOLD, count=chunk_pages, arg0=start, arg1=npages)

    def finish_fold(self, seq: int, chunks: int) -> list[bytes]:
        """Wait for a FOLD; its ``chunks`` digests, in order."""
        status = self.wait(Op.FOLD, seq)
        if status != MhStatus.OK:
            self._fail(Op.FOLD, status)
        return [bytes(self.slots[i * DIGEST_BYTES : (i + 1) * DIGEST_BYTES]) for i in range(chunks)]

    # ---- v5: the manifest and sealed vCPU state (the request formats: ``migration.manifest``) ----
    def _put(self, op: Op, data: bytes) -> None:
        """``data`` into the data area from slot 0, or a refusal that says how many slots it needs."""
        if len(data) > len(self.slots):
            raise MailboxError(
                f"{op.name} on MH vCPU {self.mh_index}: {len(data)} bytes of request do not fit its data "
                f"area ({self.batch_pages} slots, {len(self.slots)} bytes)",
                op=op, mh_index=self.mh_index, status=MhStatus.COUNT,
                hint=f"give the helper at least {-(-len(data) // SLOT_SIZE)} batch_pages",
            )  # fmt: skip
        self.slots[: len(data)] = data

    def result(self, seq: int) -> tuple[int, int, int, int]:
        """Op ``seq``'s status, n_ok, n_refused, first_bad (until RING later ops reuse its entry)."""
        at = self._entry(seq) + CMD_OFFSETS["status"]
        status, n_ok, n_refused, first_bad = CMD_RESULT.unpack_from(self._ctl, at)
        return int(status), int(n_ok), int(n_refused), int(first_bad)

    def _sealed(self, op: Op, seq: int) -> bytes:
        """Wait for a SEAL_MANIFEST / SEAL_STATE; the record it wrote at slot 0 (``n_ok`` bytes)."""
        status = self.wait(op, seq)
        if status != MhStatus.OK:
            self._fail(op, status)
        return bytes(self.slots[: self.result(seq)[1]])

    def seal_manifest(self, start: int, npages: int, chunk_pages: int, request: bytes) -> bytes:
        """SEAL_MANIFEST (source): the sealed manifest of this side's tables over the range."""
        self._put(Op.SEAL_MANIFEST, request)
        seq = self.post(Op.SEAL_MANIFEST, count=chunk_pages, arg0=start, arg1=npages)
        return self._sealed(Op.SEAL_MANIFEST, seq)

    def prepare_manifest(self, start: int, npages: int, chunk_pages: int, request: bytes) -> int:
        """PREPARE_MANIFEST (either side, v7): this side's manifest fields ahead of the SEAL_MANIFEST /
        CHECK_MANIFEST on this helper that follows with the same range and bitmap; the status (not OK: that
        op computes them itself, as before)."""
        return self.wait(Op.PREPARE_MANIFEST, self.post_prepare_manifest(start, npages, chunk_pages, request))

    def post_prepare_manifest(self, start: int, npages: int, chunk_pages: int, request: bytes) -> int:
        """Post PREPARE_MANIFEST (its request from slot 0); ``wait`` for its status."""
        self._put(Op.PREPARE_MANIFEST, request)
        return self.post(Op.PREPARE_MANIFEST, count=chunk_pages, arg0=start, arg1=npages)

    def check_manifest(
        self, start: int, npages: int, chunk_pages: int, request: bytes
    ) -> tuple[int, int, int, int]:
        """CHECK_MANIFEST (target): (status, n_ok, n_refused, first_bad), OK or a MANIFEST_* status (the
        caller names the refusal: ``manifest.refusal``); any other status (SIDE, NO_KEY, COUNT) raises."""
        self._put(Op.CHECK_MANIFEST, request)
        seq = self.post(Op.CHECK_MANIFEST, count=chunk_pages, arg0=start, arg1=npages)
        status = self.wait(Op.CHECK_MANIFEST, seq)
        if status != MhStatus.OK and status not in MANIFEST_REFUSALS:
            self._fail(Op.CHECK_MANIFEST, status)
        return self.result(seq)

    def seal_state(self, vcpu: int, blob: bytes) -> bytes:
        """SEAL_STATE (source): vCPU ``vcpu``'s state blob sealed (head + ciphertext)."""
        self._put(Op.SEAL_STATE, blob)
        return self._sealed(Op.SEAL_STATE, self.post(Op.SEAL_STATE, arg0=vcpu, arg1=len(blob)))

    def verified(self) -> bool:
        """VERIFIED: whether a CHECK_MANIFEST passed for the helper's migration id and nothing (LOAD,
        MAC_LIST, MAC_RANGE, OPEN_STATE) changed what it checked since."""
        seq = self.post(Op.VERIFIED)
        status = self.wait(Op.VERIFIED, seq)
        if status != MhStatus.OK:
            self._fail(Op.VERIFIED, status)
        return self.result(seq)[1] == 1

    def open_state(self, vcpu: int, sealed: bytes) -> None:
        """OPEN_STATE (target): open a sealed state into the helper's VMSA slot ``vcpu``; raises MailboxError
        (AUTH for a changed byte: nothing is written) unless it was opened."""
        self._put(Op.OPEN_STATE, sealed)
        status = self.wait(Op.OPEN_STATE, self.post(Op.OPEN_STATE, arg0=vcpu, arg1=len(sealed)))
        if status != MhStatus.OK:
            self._fail(Op.OPEN_STATE, status, f" (vCPU {vcpu}'s state, {len(sealed)} bytes)")

    # ---- v6: the SNP key release (docs/key-release.md), helper 0 only ----
    def _exchange(self, op: Op, data: bytes, what: str) -> int:
        """Put ``data``, run ``op`` on it; its ``n_ok`` (bytes written back to the data area, or released)."""
        self._put(op, data)
        seq = self.post(op, arg1=len(data))
        status = self.wait(op, seq)
        if status != MhStatus.OK:
            self._fail(op, status, f" ({what})")
        return self.result(seq)[1]

    def key_request(self, nonce: bytes) -> bytes:
        """KEY_REQUEST: the helper makes a key pair and seals MSG_REPORT_REQ (REPORT_DATA = nonce || its
        public key) under VMPCK0; the sealed message, for the secure processor."""
        return bytes(self.slots[: self._exchange(Op.KEY_REQUEST, nonce, "the owner's nonce")])

    def key_report(self, answer: bytes) -> bytes:
        """KEY_REPORT: the secure processor's sealed MSG_REPORT_RSP in, the opened report (0x4A0) out."""
        return bytes(self.slots[: self._exchange(Op.KEY_REPORT, answer, "the secure processor's answer")])

    def key_release(self, wrapped: bytes) -> int:
        """KEY_RELEASE: the owner's wrapped secrets; the helper opens them or refuses (KEY_AUTH: nothing is
        installed). The released table's length."""
        return self._exchange(Op.KEY_RELEASE, wrapped, "the owner's wrapped key")


def raise_for_refusals(op: Op, mh_index: int, result: BatchResult) -> None:
    """Raise MailboxError naming the first refused slot of ``result``, if any."""
    if not result.n_refused:
        return
    first = result.first_bad
    gpa = struct.unpack_from("<Q", result.records, first * SLOT_SIZE)[0]
    raise refusal_error(
        op, mh_index, result.n_refused, len(result.statuses), first, gpa, result.statuses[first],
        statuses=result.statuses,
    )  # fmt: skip


def no_answer(op: Op, mh_index: int, timeout: float, detail: str = "") -> MailboxError:
    """The MailboxError for an op the helper did not finish within ``timeout`` seconds."""
    return MailboxError(
        f"mailbox {op.name} on MH vCPU {mh_index} got no answer within {timeout:g} s{detail}",
        op=op, mh_index=mh_index, status=-1,
        hint="check that the helper vCPU runs (its heartbeat) and that the kick reaches it",
    )  # fmt: skip


def refusal_error(
    op: Op, mh_index: int, n_refused: int, count: int, slot: int, gpa: int, status: int, *,
    statuses: array.array[int] | None = None,
) -> MailboxError:  # fmt: skip
    """The MailboxError for an op whose helper refused ``n_refused`` of ``count`` pages, first ``slot``."""
    return MailboxError(
        f"mailbox {op.name} on MH vCPU {mh_index}: {n_refused} of {count} pages refused; "
        f"first: slot {slot}, GPA {gpa:#x}: {status_name(status)}",
        op=op, mh_index=mh_index, status=MhStatus.PARTIAL, statuses=statuses,
        hint="ask only for private guest pages outside the helper's area, with a newer generation each round",
    )  # fmt: skip
