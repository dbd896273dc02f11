"""The incremental verify's bookkeeping on literal bitmaps: which chunks the final round touched, how
chunk lists become digest runs, and when early digests pay off."""

from __future__ import annotations

from confplan.migration.verify import CHUNK_PAGES, _runs, touched_chunks
from confplan.stages.modules.precopy import worth_early_digests


def _bitmap(npages: int, pages: list[int]) -> bytes:
    bits = 0
    for page in pages:
        bits |= 1 << page
    return bits.to_bytes((npages + 63) // 64 * 8, "little")


def test_touched_chunks_are_those_with_a_dirty_page() -> None:
    npages = 4 * CHUNK_PAGES
    pages = [0, CHUNK_PAGES - 1, 3 * CHUNK_PAGES + 5]
    assert touched_chunks(_bitmap(npages, pages)) == [0, 3]
    assert touched_chunks(_bitmap(npages, [])) == []
    assert touched_chunks(_bitmap(npages, [CHUNK_PAGES])) == [1]  # the first page of a chunk is its own


def test_chunk_runs_merge_neighbours() -> None:
    assert _runs([5, 1, 2, 3, 7, 2]) == [(1, 3), (5, 1), (7, 1)]
    assert _runs([]) == []


def test_early_digests_only_when_few_pages_are_left() -> None:
    gib = 1 << 30  # 128 chunks of 8 MiB
    assert worth_early_digests(0, gib) and worth_early_digests(63, gib)
    assert not worth_early_digests(64, gib) and not worth_early_digests(5000, gib)
