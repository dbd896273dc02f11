"""verify's bookkeeping on literal bitmaps: which GPAs the MAC tables must take again."""

from __future__ import annotations

from confplan.migration.verify import gpas_of


def _bitmap(npages: int, pages: list[int]) -> bytes:
    bits = 0
    for page in pages:
        bits |= 1 << page
    return bits.to_bytes((npages + 63) // 64 * 8, "little")


def test_gpas_of_a_bitmap_are_its_set_pages_in_order() -> None:
    npages = 5000
    pages = [0, 63, 64, 4095, npages - 1]
    assert list(gpas_of(_bitmap(npages, pages), npages)) == [p * 4096 for p in pages]
    assert list(gpas_of(_bitmap(npages, []), npages)) == []
    # bits past npages (the bitmap's padding) are not pages
    padded = (int.from_bytes(_bitmap(npages, [1]), "little") | 1 << (npages + 3)).to_bytes(632, "little")
    assert list(gpas_of(padded, npages)) == [4096]
