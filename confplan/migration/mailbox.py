"""The VMM side of the migration helper's mailbox (docs/mailbox.md): the one module that knows its layout.

Per MH vCPU the VMM holds a writable view of guest RAM at the mailbox GPA: a 4 KiB control page (the VMM
engineer's ``cp_mailbox_header``, then this protocol's block at 0x40) and ``batch_pages`` data slots, each
a ``struct cp_sealed_page``. An op is posted by writing its arguments and then bumping ``seq``; the helper
answers by setting ``done = seq``. Per-page work (GPAs into slots, statuses out) is done with strided
memoryview copies, never a Python loop over pages. ``tests/test_mailbox_protocol.py`` pins every offset
here against ``firmware/include/cp_mailbox.h`` compiled with gcc.
"""

from __future__ import annotations

import array
import enum
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from confplan.errors import ConfplanError

PAGE_SIZE = 4096
PROTO_MAGIC = 0x504D4243  # "CBMP"
PROTO_VERSION = 1
PROTO_OFFSET = 0x40
SLOTS_OFFSET = 0x1000
SLOT_SIZE = 4160
SLOT_HEADER = 64
DIGEST_BYTES = 32
NO_INDEX = 0xFFFFFFFF
MAX_GENERATION = 0xFFFFFFFE

# Byte offsets inside the control page (CP_MB_PROTO_OFFSET + offsetof(struct cp_mb_proto, field)).
FIELD_OFFSETS: dict[str, int] = {
    name: PROTO_OFFSET + off
    for name, off in {
        "magic": 0, "version": 4, "flags": 6, "batch_pages": 8, "sender_id": 12, "seq": 16, "done": 24,
        "op": 32, "count": 36, "generation": 40, "status": 44, "arg0": 48, "arg1": 56, "n_ok": 64,
        "n_refused": 68, "first_bad": 72, "key_id": 76, "migration_id": 80, "digest": 96,
        "digest_pages": 128, "digest_skipped": 136, "pages_sealed": 144, "pages_opened": 152,
        "pages_refused": 160, "ops": 168,
    }.items()
}  # fmt: skip
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
    """A SAVE or LOAD: per-slot statuses (``array('I')``, 0 = done) and the slots' records."""

    statuses: array.array[int]
    records: memoryview
    n_ok: int
    n_refused: int
    first_bad: int

    def refused(self) -> list[tuple[int, MhStatus]]:
        """(slot, status) of every refused slot."""
        return [(i, MhStatus(s)) for i, s in enumerate(self.statuses) if s]


class Mailbox:
    """One MH vCPU's mailbox over ``view`` (control page + slots), with ``kick`` to wake the vCPU."""

    def __init__(
        self, view: memoryview, *, mh_index: int, batch_pages: int, kick: Callable[[], None],
        wait: Waiter = sleeping_waiter, timeout: float = 30.0,
    ) -> None:  # fmt: skip
        need = SLOTS_OFFSET + batch_pages * SLOT_SIZE
        if batch_pages < 1 or len(view) < need or view.readonly:
            raise ValueError(
                f"mailbox {mh_index}: a writable view of {need} bytes is needed, got {len(view)}"
            )
        self.mh_index, self.batch_pages = mh_index, batch_pages
        self._kick, self._wait, self.timeout = kick, wait, timeout
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

    @property
    def ready(self) -> bool:
        """The helper's serve loop has published the protocol block."""
        return self._get("magic", "<I") == PROTO_MAGIC and self._get("version", "<H") == PROTO_VERSION

    def counters(self) -> dict[str, int]:
        """The helper's counters since boot (pages sealed, opened, refused; ops)."""
        return {k: self._get(k, "<Q") for k in ("pages_sealed", "pages_opened", "pages_refused", "ops")}

    # ---- posting and waiting ----
    def post(self, op: Op, *, count: int = 0, generation: int = 0, arg0: int = 0, arg1: int = 0) -> int:
        """Write an op's arguments, then bump seq (one aligned 8-byte store) and kick. Returns the seq."""
        for name, fmt, value in (("op", "<I", op), ("count", "<I", count), ("generation", "<I", generation),
                                 ("arg0", "<Q", arg0), ("arg1", "<Q", arg1)):  # fmt: skip
            self._set(name, fmt, value)
        seq = self._ctl_q[_Q_SEQ] + 1
        self._ctl_q[_Q_SEQ] = seq
        self._kick()
        return int(seq)

    def wait(self, op: Op, seq: int) -> int:
        """Wait for ``done == seq``; returns the op status. Raises MailboxError after ``timeout`` seconds."""
        deadline = time.monotonic() + self.timeout
        while self._ctl_q[_Q_DONE] != seq:
            left = deadline - time.monotonic()
            if left <= 0:
                raise MailboxError(
                    f"mailbox {op.name} on MH vCPU {self.mh_index} got no answer within {self.timeout:g} s "
                    f"(seq {seq}, the helper's done is {self._ctl_q[_Q_DONE]})",
                    op=op, mh_index=self.mh_index, status=-1,
                    hint="check that the helper vCPU runs (its heartbeat) and that the kick reaches it",
                )  # fmt: skip
            self._wait(seq, left)
        return self._get("status", "<I")

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

    def _check_count(self, op: Op, count: int) -> None:
        if not 1 <= count <= self.batch_pages:
            raise ValueError(
                f"{op.name} on MH vCPU {self.mh_index}: {count} pages, 1..{self.batch_pages} fit"
            )

    def post_save(self, gpas: Sequence[int] | array.array[int], generation: int) -> int:
        """Write the GPAs into the slots (strided copy) and post SAVE; pair with ``finish(Op.SAVE, ...)``."""
        gpa_array = gpas if isinstance(gpas, array.array) and gpas.typecode == "Q" else array.array("Q", gpas)
        count = len(gpa_array)
        self._check_count(Op.SAVE, count)
        self._slot_q[0 : count * _SLOT_Q : _SLOT_Q] = memoryview(gpa_array).cast("B").cast("Q")
        return self.post(Op.SAVE, count=count, generation=generation)

    def post_load(self, count: int) -> int:
        """Post LOAD of the ``count`` records already in the slots."""
        self._check_count(Op.LOAD, count)
        return self.post(Op.LOAD, count=count)

    def finish(self, op: Op, seq: int, count: int) -> BatchResult:
        """Wait for a posted SAVE/LOAD; per-page refusals are in the result, op failures raise."""
        status = self.wait(op, seq)
        if status not in (MhStatus.OK, MhStatus.PARTIAL):
            self._fail(op, status)
        statuses = array.array("I")
        statuses.frombytes(self._slot_i[SLOT_STATUS // 4 : count * _SLOT_I : _SLOT_I].tobytes())
        return BatchResult(
            statuses, self.slots[: count * SLOT_SIZE], self._get("n_ok", "<I"), self._get("n_refused", "<I"),
            self._get("first_bad", "<I"),
        )  # fmt: skip

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


def _digest_result(mb: Mailbox, seq: int) -> bytes:
    status = mb.wait(Op.DIGEST, seq)
    if status != MhStatus.OK:
        mb._fail(Op.DIGEST, status)
    off = FIELD_OFFSETS["digest"]
    return bytes(mb._ctl[off : off + DIGEST_BYTES])
