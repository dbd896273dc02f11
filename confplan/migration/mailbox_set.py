"""Scheduling across all of one side's migration helpers (docs/mailbox.md): ``MailboxSet`` spreads a batch
over the MH vCPUs' mailbox (``mailbox.Mailbox``) and runs them in parallel; ``save_stream``/``load_stream``
pipeline SAVE/LOAD over banks of each mailbox's slots; digests, MAC table and folds go the same way.
"""

from __future__ import annotations

import array
import collections
from collections.abc import Callable, Sequence

from confplan.guest.abi import HUGE
from confplan.migration import manifest
from confplan.migration.mailbox import BatchResult, InitInfo, Mailbox, raise_for_refusals
from confplan.migration.mailbox_layout import (
    PAGE_SIZE,
    RING,
    SLOT_SIZE,
    MailboxError,
    MhStatus,
    Op,
    manifest_chunk_pages,
)
from confplan.migration.manifest import ManifestResult

# Streaming: a finished SAVE/LOAD handed to the VMM (mailbox, result); records valid during the call only.
Consume = Callable[[Mailbox, BatchResult], None]
# Streaming LOAD: (mailbox, a free bank of its slots) -> records written there, 0 when there are no more.
Fill = Callable[[Mailbox, memoryview], int]
DEFAULT_BANKS = 2  # slot banks per mailbox in save_stream/load_stream (docs/mailbox.md, "Pipelining")


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

    def warm(self, start: int, npages: int, *, huge: bool = False, write: bool = False) -> int:
        """WARM over the range, shared out among the helpers in 2 MiB-aligned parts, all at once
        (docs/mailbox.md, "WARM"). They share page tables, so on a shadow MMU the page one maps is mapped
        for all. ``huge``: the host backs guest RAM with 2 MiB pages (one read per 2 MiB page); ``write``:
        a target's, mapped for writing. Returns the pages read."""
        step = HUGE // PAGE_SIZE  # pages in a 2 MiB page of the helper's view: each part starts on one
        per = max(1, -(-npages // len(self.mailboxes) // step)) * step
        parts = [(at, min(per, npages - at)) for at in range(0, npages, per)]
        seqs = [mb.post_warm(start + at * PAGE_SIZE, n, huge=huge, write=write)
                for mb, (at, n) in zip(self.mailboxes, parts, strict=False)]  # fmt: skip
        return sum(mb.finish_warm(seq) for mb, seq in zip(self.mailboxes, seqs, strict=False))

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
            posted = [(mb, mb.post_digest(a, n)) for mb, (a, n) in wave]
            out.extend(mb.finish_digest(seq) for mb, seq in posted)
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

    def post_mac_list(self, gpas: array.array[int]) -> Callable[[], int]:
        """Post ``mac_list`` and return the call that waits for it (the pages MAC'd), so the caller works
        meanwhile; more pages than one MAC_LIST per helper holds are MAC'd before this returns."""
        share = -(-len(gpas) // len(self.mailboxes))
        if not gpas or share > min(mb.mac_list_capacity for mb in self.mailboxes):
            done = self.mac_list(gpas)
            return lambda: done
        posted = [(mb, mb.post_mac_list(gpas[at : at + share]))
                  for mb, at in zip(self.mailboxes, range(0, len(gpas), share), strict=False)]  # fmt: skip
        return lambda: sum(mb.finish_mac(Op.MAC_LIST, seq) for mb, seq in posted)

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

    # ---- v5: the manifest and sealed vCPU state (docs/mailbox.md); one helper does each op, in ms ----
    def seal_manifest(
        self, start: int, npages: int, *, enc_bitmap: bytes | memoryview, state_hash: bytes, rounds: int,
        chunk_pages: int | None = None,
    ) -> bytes:  # fmt: skip
        """SEAL_MANIFEST on the source: the helper's sealed statement of what its tables say it sent over the
        range, with ``state_hash`` (``manifest.state_hash`` of the state this VMM sends), ``rounds`` and the
        range's bits of ``enc_bitmap`` (the whole guest's encryption bitmap). Every page of the range outside
        the helper's area needs a MAC (MAC its shared pages first: MAC_MISSING otherwise)."""
        chunk = chunk_pages or manifest_chunk_pages(npages)
        request = manifest.request(
            start, npages, chunk, enc_bitmap=enc_bitmap, state_hash=state_hash, rounds=rounds
        )
        return self.mailboxes[0].seal_manifest(start, npages, chunk, request)

    def prepare_manifest(
        self, start: int, npages: int, *, enc_bitmap: bytes | memoryview, chunk_pages: int | None = None
    ) -> bool:
        """PREPARE_MANIFEST on the helper that seals or checks (mailbox v7): its own fields of the manifest
        computed now, for this bitmap, so the SEAL_MANIFEST / CHECK_MANIFEST that follows with the same range
        and bitmap, nothing having changed the tables in between, only adds what is left (the state hash,
        rounds, vCPU tags; on the target the comparison). False when the helper could not (a MAC gap, say):
        the op that follows then computes everything itself, and says what is wrong."""
        return self.mac_and_prepare(array.array("Q"), start, npages, enc_bitmap=enc_bitmap,
                                    chunk_pages=chunk_pages)[1]  # fmt: skip

    def mac_and_prepare(
        self, gpas: array.array[int], start: int, npages: int, *, enc_bitmap: bytes | memoryview,
        chunk_pages: int | None = None,
    ) -> tuple[int, bool]:  # fmt: skip
        """MAC the pages at ``gpas``, then ``prepare_manifest``: (pages MAC'd, prepared)."""
        return self.post_mac_and_prepare(
            gpas, start, npages, enc_bitmap=enc_bitmap, chunk_pages=chunk_pages
        )()

    def post_mac_and_prepare(
        self, gpas: array.array[int], start: int, npages: int, *, enc_bitmap: bytes | memoryview,
        chunk_pages: int | None = None,
    ) -> Callable[[], tuple[int, bool]]:  # fmt: skip
        """Post what ``mac_and_prepare`` does and return the call that waits for it, so the caller works
        meanwhile (the pause: the host's shared CRCs while the helper prepares). The two go to the helper
        that prepares, queued back to back (its MAC_LIST's GPAs in the slots after the request), so one
        wake-up serves both: spreading a few hundred MACs over the helpers cost a wake-up of each, ~1-3 ms
        apiece on a loaded 2-core host, for ~0.2 ms of MACs. (Too many to fit: MAC'd over all helpers before
        this returns.)"""
        chunk = chunk_pages or manifest_chunk_pages(npages)
        request = manifest.request(
            start, npages, chunk, enc_bitmap=enc_bitmap, state_hash=bytes(32), rounds=0
        )
        mb = self.mailboxes[0]
        after = -(-len(request) // SLOT_SIZE)  # the first slot past the request
        fits = len(gpas) <= (mb.batch_pages - after) * SLOT_SIZE // 8
        maced = self.mac_list(gpas) if len(gpas) and not fits else 0
        macs = mb.post_mac_list(gpas, first=after) if len(gpas) and fits else None
        prepare = mb.post_prepare_manifest(start, npages, chunk, request)

        def finish() -> tuple[int, bool]:
            # raises on a refused page, as mac_list does
            done = mb.finish_mac(Op.MAC_LIST, macs) if macs is not None else maced
            return done, mb.wait(Op.PREPARE_MANIFEST, prepare) == MhStatus.OK

        return finish

    def check_manifest(
        self, sealed: bytes, start: int, npages: int, *, enc_bitmap: bytes | memoryview, state_hash: bytes,
        rounds: int, chunk_pages: int | None = None,
    ) -> ManifestResult:  # fmt: skip
        """CHECK_MANIFEST on the target, with this VMM's own bitmap, state hash and round count. Raises
        ``ManifestRefused`` naming the first field that differs (and the chunk or vCPU); on success the helper
        holds "verified" for this migration, which the VMSA slots it opened now carry."""
        mb = self.mailboxes[0]
        chunk_pages = chunk_pages or manifest_chunk_pages(npages)
        request = manifest.request(
            start, npages, chunk_pages, enc_bitmap=enc_bitmap, state_hash=state_hash, rounds=rounds,
            sealed=sealed,
        )  # fmt: skip
        status, _, n_refused, first_bad = mb.check_manifest(start, npages, chunk_pages, request)
        if status != MhStatus.OK:
            raise manifest.refusal(
                status, first_bad=first_bad, n_refused=n_refused, start=start, chunk_pages=chunk_pages,
                mh_index=mb.mh_index,
            )  # fmt: skip
        head = manifest.sealed_head(sealed)
        return ManifestResult(head.migration_id, start, npages, chunk_pages, -(-npages // chunk_pages))

    def verified(self) -> bool:
        """Ask the helper (the target's) whether a manifest check passed and still holds: what a later step
        (the resume, a rerun after a crash) relies on rather than on this VMM's memory."""
        return self.mailboxes[0].verified()

    def _for_vcpu(self, vcpu: int) -> Mailbox:
        return self.mailboxes[vcpu % len(self.mailboxes)]

    def apart(self) -> tuple[MailboxSet, MailboxSet]:
        """(the helper that prepares and seals the manifest, the helpers that seal vCPU states beside it): a
        SEAL_STATE on the preparing helper would drop its PREPARE (both use its private seal buffer), one on
        another helper leaves it be (the VMSA slots are shared; SEAL_STATE changes no table). With one
        helper both are that one, and its states must be sealed before it prepares."""
        first = MailboxSet(self.mailboxes[:1])
        return first, (MailboxSet(self.mailboxes[1:]) if len(self.mailboxes) > 1 else first)

    def seal_state(self, vcpu: int, blob: bytes) -> bytes:
        """SEAL_STATE on the source: vCPU ``vcpu``'s state blob (``session.vcpu_blob``) sealed by the helper
        (head + ciphertext, ~64 bytes more than the blob); the manifest binds the last one per vCPU."""
        return self._for_vcpu(vcpu).seal_state(vcpu, blob)

    def open_state(self, vcpu: int, sealed: bytes) -> None:
        """OPEN_STATE on the target: the helper opens a sealed state into its VMSA slot ``vcpu`` (never where
        this VMM can read it); a changed byte raises MailboxError (AUTH) and writes nothing."""
        self._for_vcpu(vcpu).open_state(vcpu, sealed)
