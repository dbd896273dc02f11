"""The VMM side of the migration helper's mailbox (docs/mailbox.md): the one module that knows its layout.

Per MH vCPU the VMM holds a writable view of guest RAM at the mailbox GPA: a 4 KiB control page (the VMM
engineer's ``cp_mailbox_header``, this protocol's block at 0x40, the op ring at 0x400) and ``batch_pages``
data slots, each a ``struct cp_sealed_page``. An op is posted by writing its ring entry and then bumping
``seq``; the helper answers by raising ``done`` to it. Up to ``RING`` ops may be queued, so
``MailboxSet.save_stream``/``load_stream`` keep the helper busy on one bank of slots while the VMM empties
and refills another. Per-page work (GPAs into slots, statuses out) is done with strided
memoryview copies, never a Python loop over pages. ``tests/test_mailbox_protocol.py`` pins every offset
here against ``firmware/include/cp_mailbox.h`` compiled with gcc.
"""

from __future__ import annotations

import array
import collections
import enum
import os
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from confplan.errors import ConfplanError

PAGE_SIZE = 4096
PROTO_MAGIC = 0x504D4243  # "CBMP"
PROTO_VERSION = 4
PROTO_OFFSET = 0x40
SLOTS_OFFSET = 0x1000
RING_OFFSET = 0x400
RING = 16  # op entries: op number seq lives in entry seq % RING
CMD_SIZE = 64
SLOT_SIZE = 4160
SLOT_HEADER = 64
DIGEST_BYTES = 32
MAC_BYTES = 16  # one MAC table entry (CP_MB_MAC_BYTES)
NO_INDEX = 0xFFFFFFFF
MAX_GENERATION = 0xFFFFFFFE

# Byte offsets inside the control page (CP_MB_PROTO_OFFSET + offsetof(struct cp_mb_proto, field)).
FIELD_OFFSETS: dict[str, int] = {
    name: PROTO_OFFSET + off
    for name, off in {
        "magic": 0, "version": 4, "flags": 6, "batch_pages": 8, "sender_id": 12, "seq": 16, "done": 24,
        "ring": 32, "key_id": 36, "migration_id": 40, "digest": 56, "digest_pages": 88, "digest_skipped": 96,
        "pages_sealed": 104, "pages_opened": 112, "pages_refused": 120, "ops": 128, "drains": 136,
    }.items()
}  # fmt: skip
# Inside a ring entry (offsetof(struct cp_mb_cmd, field)).
CMD_OFFSETS: dict[str, int] = {
    "op": 0, "count": 4, "generation": 8, "first": 12, "arg0": 16, "arg1": 24, "status": 32, "n_ok": 36,
    "n_refused": 40, "first_bad": 44, "tsc_start": 48, "tsc_end": 56,
}  # fmt: skip
_CMD_ARGS = struct.Struct("<IIIIQQ")  # op, count, generation, first, arg0, arg1: the VMM's half
_CMD_RESULT = struct.Struct("<IIII")  # status, n_ok, n_refused, first_bad: the MH's
_CMD_TSC = struct.Struct("<QQ")
PROTO_SIZE = 256
# Inside a slot (struct cp_sealed_page).
SLOT_GPA, SLOT_GENERATION, SLOT_STATUS, SLOT_NONCE, SLOT_KEY_ID, SLOT_TAG, SLOT_CT = 0, 8, 12, 16, 28, 32, 64

_Q_SEQ, _Q_DONE = FIELD_OFFSETS["seq"] // 8, FIELD_OFFSETS["done"] // 8
_SLOT_Q, _SLOT_I = SLOT_SIZE // 8, SLOT_SIZE // 4


class Op(enum.IntEnum):
    """CP_MB_OP_*."""

    INIT = 1
    SAVE = 2
    LOAD = 3
    DIGEST = 4
    RESET = 5
    MAC_RANGE = 6
    MAC_LIST = 7
    FOLD = 8


class MhStatus(enum.IntEnum):
    """CP_MBS_*: the op status and the per-slot status."""

    OK = 0
    BAD_OP = 1
    NO_KEY = 2
    COUNT = 3
    PARTIAL = 4
    GPA_ALIGN = 5
    GPA_RANGE = 6
    GPA_MH = 7
    GEN_INVALID = 8
    GEN_STALE = 9
    AUTH = 10
    KEY_ID = 11
    RESERVED = 12
    NONCE = 13
    SECRET_HEADER = 14
    SECRET_LENGTH = 15
    SECRET_ENTRY = 16
    SECRET_NO_KEY = 17
    SECRET_KEY_LEN = 18
    SECRET_ID_LEN = 19
    CONFIG = 20
    MAC_MISSING = 21

    @property
    def meaning(self) -> str:
        return _MEANING[self]


_MEANING: dict[MhStatus, str] = {
    MhStatus.OK: "done",
    MhStatus.BAD_OP: "unknown op",
    MhStatus.NO_KEY: "the helper has no transport key (INIT first; RESET forgets it)",
    MhStatus.COUNT: "page count is 0 or above the mailbox's slots",
    MhStatus.PARTIAL: "some pages were refused",
    MhStatus.GPA_ALIGN: "GPA is not page-aligned",
    MhStatus.GPA_RANGE: "GPA lies outside guest RAM",
    MhStatus.GPA_MH: "GPA lies inside the migration helper's own area",
    MhStatus.GEN_INVALID: "generation 0 or 0xffffffff is not allowed",
    MhStatus.GEN_STALE: "generation is not newer than the one already sealed or placed for this GPA (replay)",
    MhStatus.AUTH: "the GCM tag does not verify (ciphertext, tag, nonce, GPA or generation changed)",
    MhStatus.KEY_ID: "the record was sealed under another transport key",
    MhStatus.RESERVED: "the record's reserved bytes or status are not zero",
    MhStatus.NONCE: "the helper's nonce sequence is used up: a new transport key is needed",
    MhStatus.SECRET_HEADER: "no efi_secret table header GUID at the secret page",
    MhStatus.SECRET_LENGTH: "the secret table's total length is out of range",
    MhStatus.SECRET_ENTRY: "a secret table entry overruns the table (or more than 64 entries)",
    MhStatus.SECRET_NO_KEY: "the secret table has no transport key entry",
    MhStatus.SECRET_KEY_LEN: "the transport key entry is not 32 bytes",
    MhStatus.SECRET_ID_LEN: "the migration id entry is not 16 bytes",
    MhStatus.CONFIG: "the helper's context is inconsistent (firmware bug)",
    MhStatus.MAC_MISSING: "a page of the range has no MAC in the helper's table yet (MAC_RANGE it first)",
}


def status_name(code: int) -> str:
    """``NAME (meaning)`` for a status code, or the raw number for an unknown one."""
    try:
        st = MhStatus(code)
    except ValueError:
        return f"unknown status {code}"
    return f"{st.name} ({st.meaning})"


class MailboxError(ConfplanError):
    """An op the helper refused or did not answer; names the op, the MH vCPU and the status."""

    def __init__(
        self, message: str, *, op: Op, mh_index: int, status: int, statuses: array.array[int] | None = None,
        hint: str | None = None,
    ) -> None:  # fmt: skip
        super().__init__(message, hint=hint)
        self.op, self.mh_index, self.status = op, mh_index, status
        self.statuses = statuses


# (expected seq, seconds at most) -> returns when the helper may have answered, or after the time.
Waiter = Callable[[int, float], None]
# Streaming: a finished SAVE/LOAD handed to the VMM (mailbox, result); records valid during the call only.
Consume = Callable[["Mailbox", "BatchResult"], None]
# Streaming LOAD: (mailbox, a free bank of its slots) -> records written there, 0 when there are no more.
Fill = Callable[["Mailbox", memoryview], int]
DEFAULT_BANKS = 2  # slot banks per mailbox in save_stream/load_stream (docs/mailbox.md, "Pipelining")
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
    ) -> None:  # fmt: skip
        need = SLOTS_OFFSET + batch_pages * SLOT_SIZE
        if batch_pages < 1 or len(view) < need or view.readonly:
            raise ValueError(
                f"mailbox {mh_index}: a writable view of {need} bytes is needed, got {len(view)}"
            )
        self.mh_index, self.batch_pages = mh_index, batch_pages
        self._kick, self._wait, self.timeout, self.poll = kick, wait, timeout, poll
        self.tsc_khz = tsc_khz
        self.page_seconds = 1e-6  # the helper's time per page, a running average (TSC stamps)
        self._counts = [0] * RING  # pages of the op in each ring entry, for the wait estimate
        self._expect = [0.0] * RING  # monotonic time each queued op is expected to be done
        self._last_expect = 0.0  # expected end of the newest posted op
        view = view.cast("B")
        self._ctl = view[:SLOTS_OFFSET]
        self._ctl_q = self._ctl.cast("Q")
        self.slots = view[SLOTS_OFFSET:need]
        self._slot_q = self.slots.cast("Q")
        self._slot_i = self.slots.cast("I")

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
        start, end = _CMD_TSC.unpack_from(self._ctl, self._entry(seq) + CMD_OFFSETS["tsc_start"])
        return int(start), int(end)

    # ---- posting and waiting ----
    def post(
        self, op: Op, *, count: int = 0, generation: int = 0, arg0: int = 0, arg1: int = 0, first: int = 0
    ) -> int:
        """Write an op into its ring entry, then bump seq (one aligned 8-byte store) and kick. Returns the
        seq. At most ``RING`` ops may be queued; their slot ranges (``first``, ``count``) must not overlap."""
        seq = int(self._ctl_q[_Q_SEQ]) + 1
        if seq - int(self._ctl_q[_Q_DONE]) > RING:
            raise ValueError(f"MH vCPU {self.mh_index}: {RING} ops are queued already; wait for one first")
        _CMD_ARGS.pack_into(self._ctl, self._entry(seq), op, count, generation, first, arg0, arg1)
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
                raise MailboxError(
                    f"mailbox {op.name} on MH vCPU {self.mh_index} got no answer within {self.timeout:g} s "
                    f"(seq {seq}, the helper's done is {self._ctl_q[_Q_DONE]})",
                    op=op, mh_index=self.mh_index, status=-1,
                    hint="check that the helper vCPU runs (its heartbeat) and that the kick reaches it",
                )  # fmt: skip
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
        _, n_ok, n_refused, first_bad = _CMD_RESULT.unpack_from(self._ctl, at)
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
        off = FIELD_OFFSETS["digest"]
        return bytes(self._ctl[off : off + DIGEST_BYTES])

    def reset(self) -> None:
        """RESET: the helper forgets the transport key (nonce counters and anti-replay table stay)."""
        self.run(Op.RESET)

    # ---- the per-page MAC table (v3) ----
    @property
    def mac_list_capacity(self) -> int:
        """GPAs one MAC_LIST takes at most: the whole data area as u64s."""
        return self.batch_pages * SLOT_SIZE // 8

    def post_mac_range(self, start: int, npages: int) -> int:
        """Post MAC_RANGE: the helper stores the MAC of every page of the range (MH area skipped)."""
        return self.post(Op.MAC_RANGE, arg0=start, arg1=npages)

    def post_mac_list(self, gpas: array.array[int]) -> int:
        """Write ``gpas`` (array('Q')) packed into the data area and post MAC_LIST of them."""
        if not 1 <= len(gpas) <= self.mac_list_capacity:
            raise ValueError(
                f"MAC_LIST on MH vCPU {self.mh_index}: {len(gpas)} GPAs, 1..{self.mac_list_capacity} fit"
            )
        raw = memoryview(gpas).cast("B")
        self.slots[: len(raw)] = raw
        return self.post(Op.MAC_LIST, count=len(gpas))

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
        _, _, n_refused, first_bad = _CMD_RESULT.unpack_from(self._ctl, at)
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


def raise_for_refusals(op: Op, mh_index: int, result: BatchResult) -> None:
    """Raise MailboxError naming the first refused slot of ``result``, if any."""
    if not result.n_refused:
        return
    first = result.first_bad
    gpa = struct.unpack_from("<Q", result.records, first * SLOT_SIZE)[0]
    raise MailboxError(
        f"mailbox {op.name} on MH vCPU {mh_index}: {result.n_refused} of {len(result.statuses)} pages "
        f"refused; "
        f"first: slot {first}, GPA {gpa:#x}: {status_name(result.statuses[first])}",
        op=op, mh_index=mh_index, status=MhStatus.PARTIAL, statuses=result.statuses,
        hint="ask only for private guest pages outside the helper's area, with a newer generation each round",
    )  # fmt: skip


class MailboxSet:
    """All MH vCPUs of one side: spreads a batch over them and runs them in parallel (post all, wait all)."""

    def __init__(self, mailboxes: Sequence[Mailbox]) -> None:
        if not mailboxes:
            raise ValueError("a MailboxSet needs at least one mailbox")
        self.mailboxes = list(mailboxes)

    @property
    def capacity(self) -> int:
        """Pages one save() call takes at most."""
        return sum(mb.batch_pages for mb in self.mailboxes)

    def init(self) -> InitInfo:
        """INIT on every helper; they must agree on the migration id and the key id."""
        infos = [mb.init() for mb in self.mailboxes]
        first = infos[0]
        for mb, info in zip(self.mailboxes, infos, strict=True):
            if (info.migration_id, info.key_id) != (first.migration_id, first.key_id):
                raise MailboxError(
                    f"MH vCPU {mb.mh_index} took another transport key or migration id than MH vCPU "
                    f"{self.mailboxes[0].mh_index}",
                    op=Op.INIT, mh_index=mb.mh_index, status=MhStatus.OK, hint="re-inject the launch secret",
                )  # fmt: skip
        return first

    def reset(self) -> None:
        for mb in self.mailboxes:
            mb.reset()

    def _split(self, n: int) -> list[tuple[Mailbox, int, int]]:
        """(mailbox, first, count): ``n`` items shared out evenly, none over a mailbox's batch size."""
        if n > self.capacity:
            raise ValueError(f"{n} pages for {len(self.mailboxes)} mailboxes holding {self.capacity}")
        parts, start, left = [], 0, n
        for i, mb in enumerate(self.mailboxes):
            take = min(mb.batch_pages, -(-left // (len(self.mailboxes) - i)))
            if take:
                parts.append((mb, start, take))
            start, left = start + take, left - take
        if left:  # uneven batch sizes: the rest goes wherever there is room
            raise ValueError(f"{n} pages do not fit the mailboxes' batch sizes")
        return parts

    def save(self, gpas: array.array[int], generation: int) -> list[tuple[Mailbox, BatchResult]]:
        """SAVE ``gpas`` spread over the helpers in parallel; raises if any page is refused."""
        parts = self._split(len(gpas))
        posted = [(mb, mb.post_save(gpas[a : a + n], generation), n) for mb, a, n in parts]
        results = [(mb, mb.finish(Op.SAVE, seq, n)) for mb, seq, n in posted]
        for mb, result in results:
            raise_for_refusals(Op.SAVE, mb.mh_index, result)
        return results

    def load(self, counts: Sequence[int]) -> list[BatchResult]:
        """LOAD in parallel: ``counts[i]`` records are already in mailbox i's slots (0 skips it)."""
        posted = [(mb, mb.post_load(n), n) for mb, n in zip(self.mailboxes, counts, strict=True) if n]
        return [mb.finish(Op.LOAD, seq, n) for mb, seq, n in posted]

    def bank_sizes(self, banks: int) -> list[int]:
        """Slots per bank of each mailbox: its slots split into ``banks`` (at most RING) equal banks."""
        if banks < 1:
            raise ValueError(f"banks must be at least 1, got {banks}")
        return [max(1, mb.batch_pages // min(banks, RING, mb.batch_pages)) for mb in self.mailboxes]

    def save_stream(
        self, gpas: array.array[int], generation: int, consume: Consume, *, banks: int = DEFAULT_BANKS
    ) -> int:
        """SAVE any number of pages, pipelined; returns the number of ops.

        Each mailbox's slots are split into ``banks`` banks; every bank gets an op queued at once, and as
        each op is done (oldest first) ``consume(mailbox, result)`` gets its records (``result.gpas`` are
        the pages asked for; the view is valid only during the call) and the bank is refilled and queued
        again. The helper works through the queue without parking or ringing, so the VMM's framing of one
        bank overlaps the sealing of the next. Raises MailboxError (after the other queued ops finish on
        their own) if a page is refused.
        """
        sizes = self.bank_sizes(banks)
        chunks: list[list[tuple[int, int]]] = [[] for _ in self.mailboxes]
        pos, turn = 0, 0
        while pos < len(gpas):  # round robin, one bank's worth each
            i = turn % len(self.mailboxes)
            chunks[i].append((pos, min(sizes[i], len(gpas) - pos)))
            pos, turn = pos + sizes[i], turn + 1
        nexts = [iter(c) for c in chunks]
        pending: collections.deque[tuple[int, int, int, array.array[int]]] = collections.deque()

        def post(i: int, first: int) -> None:
            part = next(nexts[i], None)
            if part is not None:
                chunk = gpas[part[0] : part[0] + part[1]]
                pending.append((i, self.mailboxes[i].post_save(chunk, generation, first=first), first, chunk))

        for bank in range(max(len(c) for c in chunks) if gpas else 0):
            for i in range(len(self.mailboxes)):
                if (bank + 1) * sizes[i] <= self.mailboxes[i].batch_pages:  # whole banks only
                    post(i, bank * sizes[i])
        ops = 0
        while pending:
            i, seq, first, chunk = pending.popleft()
            mb = self.mailboxes[i]
            result = mb.finish(Op.SAVE, seq, len(chunk), first=first, gpas=chunk)
            raise_for_refusals(Op.SAVE, mb.mh_index, result)
            consume(mb, result)
            ops += 1
            post(i, first)
        return ops

    def load_stream(
        self, fill: Fill, consume: Consume | None = None, *, banks: int = DEFAULT_BANKS
    ) -> int:
        """LOAD pipelined; returns the number of ops.

        ``fill(mailbox, slots)`` writes records into ``slots`` (a free bank of that mailbox's slots) and
        returns how many, 0 when there are no more. Each filled bank is queued at once; as each op is done
        (oldest first) ``consume(mailbox, result)`` gets its statuses, then the bank is filled again.
        Without ``consume`` a refused page raises MailboxError.
        """
        sizes = self.bank_sizes(banks)
        pending: collections.deque[tuple[int, int, int, int]] = collections.deque()
        more = True

        def post(i: int, first: int) -> None:
            nonlocal more
            mb = self.mailboxes[i]
            n = fill(mb, mb.slots[first * SLOT_SIZE : (first + sizes[i]) * SLOT_SIZE]) if more else 0
            if n > sizes[i]:
                raise ValueError(f"fill wrote {n} records into a bank of {sizes[i]} slots")
            more = more and n > 0
            if n:
                pending.append((i, mb.post_load(n, first=first), first, n))

        for bank in range(min(banks, RING)):
            for i, mb in enumerate(self.mailboxes):
                if (bank + 1) * sizes[i] <= mb.batch_pages:
                    post(i, bank * sizes[i])
        ops = 0
        while pending:
            i, seq, first, n = pending.popleft()
            mb = self.mailboxes[i]
            result = mb.finish(Op.LOAD, seq, n, first=first)
            if consume is None:
                raise_for_refusals(Op.LOAD, mb.mh_index, result)
            else:
                consume(mb, result)
            ops += 1
            post(i, first)
        return ops

    def digest(self, start: int, npages: int, *, chunk_pages: int = 16384) -> list[bytes]:
        """Digests of ``npages`` from ``start`` in fixed chunks (same for any helper count), in parallel."""
        chunks = [
            (start + p * PAGE_SIZE, min(chunk_pages, npages - p)) for p in range(0, npages, chunk_pages)
        ]
        out: list[bytes] = []
        for i in range(0, len(chunks), len(self.mailboxes)):
            wave = list(zip(self.mailboxes, chunks[i : i + len(self.mailboxes)], strict=False))
            posted = [(mb, mb.post(Op.DIGEST, arg0=a, arg1=n)) for mb, (a, n) in wave]
            out.extend(_digest_result(mb, seq) for mb, seq in posted)
        return out


    # ---- the per-page MAC table (v3): verify's cost in the pause follows the pages changed, not RAM ----
    def _ranges(self, start: int, npages: int, chunk_pages: int) -> list[tuple[Mailbox, int, int]]:
        """(mailbox, first page, pages): the range cut at chunk boundaries into one part per helper."""
        chunks = -(-npages // chunk_pages)
        per = -(-chunks // len(self.mailboxes))
        parts = []
        for i, mb in enumerate(self.mailboxes):
            first = i * per * chunk_pages
            if first < npages:
                parts.append((mb, start // PAGE_SIZE + first, min(per * chunk_pages, npages - first)))
        return parts

    def mac_range(self, start: int, npages: int, *, chunk_pages: int = 16384) -> int:
        """MAC every page of the range into the helpers' table, in parallel; returns the pages MAC'd."""
        posted = [
            (mb, mb.post_mac_range(p * PAGE_SIZE, n)) for mb, p, n in self._ranges(start, npages, chunk_pages)
        ]
        return sum(mb.finish_mac(Op.MAC_RANGE, seq) for mb, seq in posted)

    def mac_list(self, gpas: array.array[int]) -> int:
        """MAC the pages at ``gpas`` (any number; duplicates cost time only), spread over the helpers."""
        done, pos = 0, 0
        while pos < len(gpas):
            posted = []
            for mb in self.mailboxes:
                share = min(mb.mac_list_capacity, -(-(len(gpas) - pos) // len(self.mailboxes)))
                if pos < len(gpas):
                    posted.append((mb, mb.post_mac_list(gpas[pos : pos + share])))
                    pos += share
            done += sum(mb.finish_mac(Op.MAC_LIST, seq) for mb, seq in posted)
        return done

    def fold(self, start: int, npages: int, *, chunk_pages: int = 16384) -> list[bytes]:
        """The chunk digests of the range folded from the MAC table: equal to ``digest`` of the same
        range while every page's MAC is current. One op per helper."""
        return self.mac_and_fold(array.array("Q"), start, npages, chunk_pages=chunk_pages)[1]

    def mac_and_fold(
        self, gpas: array.array[int], start: int, npages: int, *, chunk_pages: int = 16384
    ) -> tuple[int, list[bytes]]:
        """MAC the pages at ``gpas``, then ``fold``; returns (pages MAC'd, digests). Each helper MACs the
        pages in the range it folds, with its FOLD queued right behind that MAC_LIST: a helper takes its
        ops in order and no other helper's MAC_LIST touches its range, so no wake-up sits between them."""
        ranges = self._ranges(start, npages, chunk_pages)
        shares = []
        for mb, first, n in ranges:
            low, high = first * PAGE_SIZE, (first + n) * PAGE_SIZE
            shares.append((mb, array.array("Q", (g for g in gpas if low <= g < high))))
        maced = 0
        fits = all(len(mine) <= mb.mac_list_capacity for mb, mine in shares)
        if not fits or sum(len(mine) for _, mine in shares) < len(gpas):
            # more than a data area for one helper, or pages outside the range: MAC them first, apart
            maced, shares = self.mac_list(gpas), []
        lists = [(mb, mb.post_mac_list(mine)) for mb, mine in shares if len(mine)]
        folds = [
            (mb, mb.post_fold(p * PAGE_SIZE, n, chunk_pages), -(-n // chunk_pages)) for mb, p, n in ranges
        ]
        digests = [d for mb, seq, chunks in folds for d in mb.finish_fold(seq, chunks)]
        maced += sum(mb.finish_mac(Op.MAC_LIST, seq) for mb, seq in lists)  # done before their FOLDs
        return maced, digests


def _digest_result(mb: Mailbox, seq: int) -> bytes:
    status = mb.wait(Op.DIGEST, seq)
    if status != MhStatus.OK:
        mb._fail(Op.DIGEST, status)
    off = FIELD_OFFSETS["digest"]
    return bytes(mb._ctl[off : off + DIGEST_BYTES])
