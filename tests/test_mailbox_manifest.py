"""Mailbox v5 on the host build of the MH engine (the same C as the guest's), through the real client: the
manifest a source helper seals and a target helper checks, and the sealed vCPU state opened into a VMSA
slot. The sealed records are opened and every digest recomputed in Python with ``cryptography``, so the
format in docs/mailbox.md is checked by independent code, not only by the C agreeing with itself."""

from __future__ import annotations

import array
import ctypes
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from confplan.migration import mailbox_layout as mbx
from confplan.migration.host_mh import SIDE_TARGET, HostGuest, build_host_library
from confplan.migration.manifest import ManifestRefused, range_bits, sealed_head, state_hash
from confplan.sev.secret_table import (
    CONFPLAN_MIGRATION_ID_GUID,
    CONFPLAN_TRANSPORT_KEY_GUID,
    build_secret_table,
)
from confplan.vmm import abi

PAGE = 4096
RAM = 12 << 20
WORK = 0x400000  # the host guest's MH area ends here
NPAGES = (RAM - WORK) // PAGE  # 2048
CHUNK = 256  # 8 chunks
VCPUS = 2
KEY = bytes(range(32))
HASH = state_hash([b"vcpu 0", b"vcpu 1", b"enc-bitmap"])


@pytest.fixture(scope="module")
def lib(tmp_path_factory: pytest.TempPathFactory) -> ctypes.CDLL:
    return build_host_library(tmp_path_factory.mktemp("mh-manifest"))


def _secret(migration_id: bytes | None = None) -> bytes:
    entries = {CONFPLAN_TRANSPORT_KEY_GUID: KEY}
    if migration_id is not None:
        entries[CONFPLAN_MIGRATION_ID_GUID] = migration_id
    return build_secret_table(entries)


def _bitmap(private: bool = True) -> bytearray:
    """A whole guest's encryption bitmap, every page private (or shared)."""
    return bytearray((b"\xff" if private else b"\x00") * (RAM // PAGE // 8))


@dataclass
class Pair:
    src: HostGuest
    dst: HostGuest

    def move(self, pages: range, generation: int, *, skip: int | None = None) -> None:
        """SAVE the pages on the source, LOAD them on the target (but the page ``skip``)."""
        s, d = self.src.mailboxes.mailboxes[0], self.dst.mailboxes.mailboxes[0]
        for first in range(pages.start, pages.stop, s.batch_pages):
            gpas = array.array(
                "Q", (WORK + p * PAGE for p in range(first, min(first + s.batch_pages, pages.stop)))
            )
            records = bytearray(s.save(gpas, generation).records)
            kept = [i for i, gpa in enumerate(gpas) if gpa != (None if skip is None else WORK + skip * PAGE)]
            packed = b"".join(records[i * mbx.SLOT_SIZE : (i + 1) * mbx.SLOT_SIZE] for i in kept)
            d.slots[: len(packed)] = packed
            assert not kept or d.load(len(kept)).n_refused == 0

    def seal(self, *, bitmap: bytes | None = None, rounds: int = 1) -> bytes:
        bits = _bitmap() if bitmap is None else bitmap
        return self.src.mailboxes.seal_manifest(
            WORK, NPAGES, enc_bitmap=bits, state_hash=HASH, rounds=rounds, chunk_pages=CHUNK
        )

    def check(self, sealed: bytes, **kwargs: object) -> None:
        args: dict[str, object] = {
            "enc_bitmap": _bitmap(),
            "state_hash": HASH,
            "rounds": 1,
            "chunk_pages": CHUNK,
        }
        args.update(kwargs)
        self.dst.mailboxes.check_manifest(sealed, WORK, NPAGES, **args)  # type: ignore[arg-type]


@pytest.fixture
def pair(lib: ctypes.CDLL) -> Iterator[Pair]:
    """A source and a target that moved every workload page (generation 1)."""
    yield from _moved_pair(lib, mh_vcpus=1)


def _moved_pair(lib: ctypes.CDLL, mh_vcpus: int) -> Iterator[Pair]:
    args = {"ram_size": RAM, "secret": _secret(), "vcpus": VCPUS, "mh_vcpus": mh_vcpus}
    with HostGuest(lib, **args) as src, HostGuest(lib, **args, side=SIDE_TARGET) as dst:
        src.mailboxes.init()
        dst.mailboxes.init()
        src.ram[WORK:RAM] = os.urandom(RAM - WORK)
        p = Pair(src, dst)
        p.move(range(NPAGES), 1)
        yield p


# ---- the reference: keys, digests and the record format recomputed with cryptography ----


def _keys() -> dict[str, bytes]:
    ks = AESGCM(KEY).encrypt(b"\xff\xff\xff\xffCPKDF v1", bytes(128), None)[:128]
    return {"digest": ks[:32], "final": ks[32:64], "seal": ks[96:128]}


def _gmac(kind: int, value: int, aad: bytes) -> bytes:
    return AESGCM(_keys()["digest"]).encrypt(
        bytes([0xFF, 0xFF, 0xFF, kind]) + struct.pack(">Q", value), b"", aad
    )


def _prf(c: bytes) -> bytes:
    return AESGCM(_keys()["final"]).encrypt(c[:12], bytes(32), None)[:32]


def _open(record: bytes, label: bytes) -> bytes:
    """The plaintext of a sealed manifest or state (raises InvalidTag when it does not open)."""
    head = sealed_head(record)
    aad = label + record[: mbx.SEALED_AAD]
    return AESGCM(_keys()["seal"]).decrypt(head.nonce, record[mbx.SEALED_HEAD :] + head.tag, aad)


def _gen_digest(guest: HostGuest, start: int, n: int, bits: bytes) -> bytes:
    chain = struct.pack("<QQ", start, n)
    entries = []
    for p in range(n):
        gpa = start + p * PAGE
        if guest.mh_base <= gpa < guest.mh_base + guest.mh_size:
            continue
        entries.append(guest.generation_of(gpa) if bits[p // 8] >> (p % 8) & 1 else 0)
    steps = [entries[i : i + 1024] for i in range(0, len(entries), 1024)]
    for step, part in enumerate(steps):
        part = part + [0] * (-len(part) % 4)
        chain = _gmac(0xFC, step, chain + struct.pack(f"<{len(part)}I", *part))
    return _prf(chain)


def _bitmap_digest(bits: bytes, start: int, npages: int, chunk: int) -> bytes:
    chain = struct.pack("<QQ", start, npages)
    for k in range(-(-npages // chunk)):
        n = min(chunk, npages - k * chunk)
        part = bytearray(bits[k * chunk // 8 : k * chunk // 8 + (n + 7) // 8])
        if n % 8:
            part[-1] &= (1 << (n % 8)) - 1
        chain = _gmac(0xFB, k, chain + bytes(part) + bytes(-len(part) % 16))
    return _prf(chain)


def test_the_manifest_is_what_docs_say_recomputed_in_python(pair: Pair) -> None:
    bitmap = _bitmap()
    shared = WORK + 3 * PAGE  # one page the guest shares: its entry is masked
    bitmap[shared // PAGE // 8] &= ~(1 << (shared // PAGE % 8)) & 0xFF
    sealed = pair.seal(bitmap=bytes(bitmap), rounds=7)
    head = sealed_head(sealed)
    assert (head.magic, head.version, head.flags, head.label) == (mbx.MANIFEST_MAGIC, 1, 0, 0)
    info = pair.src.mailboxes.mailboxes[0].init()
    assert (head.key_id, head.migration_id, head.sender_id >> 16) == (info.key_id, info.migration_id, 0)
    body = _open(sealed, mbx.LABEL_MANIFEST)
    assert head.length == len(body) == mbx.BODY_BYTES + VCPUS * 16 + 8 * 64
    start, npages, chunk, chunks, rounds, max_gen, vcpus = struct.unpack_from("<QQIIIII", body)
    assert (start, npages, chunk, chunks, rounds, max_gen, vcpus) == (WORK, NPAGES, CHUNK, 8, 7, 1, VCPUS)
    bits = range_bits(bytes(bitmap), WORK, NPAGES)
    assert body[48:80] == _bitmap_digest(bits, WORK, NPAGES, CHUNK)
    assert body[80:112] == HASH
    assert body[112 : 112 + VCPUS * 16] == bytes(VCPUS * 16)  # no vCPU state sealed
    folds = pair.src.mailboxes.fold(WORK, NPAGES, chunk_pages=CHUNK)
    entries = body[112 + VCPUS * 16 :]
    for k in range(8):
        s = WORK + k * CHUNK * PAGE
        assert entries[k * 64 : k * 64 + 32] == _gen_digest(pair.src, s, CHUNK, bits[k * 32 : k * 32 + 32]), k
        assert entries[k * 64 + 32 : k * 64 + 64] == folds[k], k
    # the masked page does not count: its digest is that of a zero entry
    assert _gen_digest(pair.src, WORK, CHUNK, bits[:32]) != _gen_digest(pair.src, WORK, CHUNK, b"\xff" * 32)


def test_a_complete_move_checks_and_every_changed_byte_is_refused(pair: Pair) -> None:
    sealed = pair.seal()
    pair.check(sealed)
    for i in range(len(sealed)):  # head and ciphertext: every byte
        bad = bytearray(sealed)
        bad[i] ^= 0x01
        with pytest.raises(ManifestRefused) as err:
            pair.check(bytes(bad))
        assert (err.value.status, err.value.field) == (mbx.MhStatus.MANIFEST_AUTH, "seal"), i
    for cut in (b"", sealed[:63], sealed[:-1], sealed + b"\0"):
        with pytest.raises(ManifestRefused) as err:
            pair.check(cut)
        assert err.value.status == mbx.MhStatus.MANIFEST_AUTH
    pair.check(sealed)  # the refusals changed nothing: the good one still checks


def _reseal(record: bytes, label: bytes, sender_id: int) -> bytes:
    """The record sealed again under the seal key with a nonce of another sender (what only a helper can do:
    the test holds the key)."""
    body = _open(record, label)
    nonce = struct.pack(">IQ", sender_id, 1 << 40)
    head = bytearray(record[: mbx.SEALED_AAD])
    head[mbx.SEALED_OFFSETS["nonce"] : mbx.SEALED_OFFSETS["nonce"] + 12] = nonce
    sealed = AESGCM(_keys()["seal"]).encrypt(nonce, body, label + bytes(head))
    return bytes(head) + sealed[-16:] + sealed[:-16]


def test_only_a_source_helpers_seal_counts(pair: Pair) -> None:
    """A manifest sealed with a target's sender id (side 1) is refused although its tag is good: a target host
    must not get its own helper to vouch for its own tables."""
    sealed = pair.seal()
    pair.check(_reseal(sealed, mbx.LABEL_MANIFEST, 0x0000_0007))  # another source sender: fine
    with pytest.raises(ManifestRefused) as err:
        pair.check(_reseal(sealed, mbx.LABEL_MANIFEST, 0x0001_0000))
    assert err.value.status == mbx.MhStatus.MANIFEST_AUTH
    record = pair.src.mailboxes.seal_state(0, b'{"vcpu_id": 0}')
    with pytest.raises(mbx.MailboxError) as err:
        pair.dst.mailboxes.open_state(0, _reseal(record, mbx.LABEL_STATE, 0x0001_0003))
    assert err.value.status == mbx.MhStatus.AUTH
    # a state record offered as a manifest does not open (its magic and label are bound)
    as_manifest = bytearray(record)
    as_manifest[:4] = struct.pack("<I", mbx.MANIFEST_MAGIC)
    with pytest.raises(ManifestRefused):
        pair.check(bytes(as_manifest))


def test_each_field_that_differs_is_named(pair: Pair) -> None:
    sealed = pair.seal()
    shared = _bitmap()
    shared[(WORK // PAGE + 5) // 8] ^= 1 << ((WORK // PAGE + 5) % 8)
    cases: list[tuple[dict[str, object], mbx.MhStatus, str]] = [
        ({"enc_bitmap": shared}, mbx.MhStatus.MANIFEST_BITMAP, "encryption bitmap"),
        ({"state_hash": state_hash([b"another vCPU state"])}, mbx.MhStatus.MANIFEST_STATE, "state hash"),
        ({"rounds": 2}, mbx.MhStatus.MANIFEST_ROUNDS, "round count"),
        ({"chunk_pages": 2 * CHUNK}, mbx.MhStatus.MANIFEST_RANGE, "range"),
    ]
    for kwargs, status, field in cases:
        with pytest.raises(ManifestRefused) as err:
            pair.check(sealed, **kwargs)
        assert (err.value.status, err.value.field) == (status, field)
        assert field in err.value.message and "source keeps running" in err.value.render()
    with pytest.raises(ManifestRefused) as err:
        pair.dst.mailboxes.check_manifest(
            sealed,
            WORK + PAGE,
            NPAGES - 1,
            enc_bitmap=_bitmap(),
            state_hash=HASH,
            rounds=1,
            chunk_pages=CHUNK,
        )
    assert err.value.status == mbx.MhStatus.MANIFEST_RANGE


def test_a_missing_final_generation_names_its_chunk(pair: Pair) -> None:
    page = 3 * CHUNK + 17  # chunk 3
    pair.move(range(page - 1, page + 2), 2, skip=page)  # its generation-2 record never arrives
    with pytest.raises(ManifestRefused) as err:
        pair.check(pair.seal())
    assert (err.value.status, err.value.index) == (mbx.MhStatus.MANIFEST_GENERATIONS, 3)
    low = WORK + 3 * CHUNK * PAGE
    assert f"chunk 3 (GPAs [{low:#x}, {low + CHUNK * PAGE:#x}))" in err.value.message
    # the same page changed on the target with its generation intact: the MACs name it
    pair.move(range(page, page + 1), 3)
    pair.check(pair.seal())
    pair.dst.ram[WORK + page * PAGE] ^= 1
    pair.dst.mailboxes.mac_list(array.array("Q", [WORK + page * PAGE]))
    with pytest.raises(ManifestRefused) as err:
        pair.check(pair.seal())
    assert (err.value.status, err.value.index, err.value.field) == (mbx.MhStatus.MANIFEST_MAC, 3, "MAC table")


def test_a_page_shared_now_is_not_held_to_its_old_generation(pair: Pair) -> None:
    """The source sealed page P again (generation 2) but the record never left (a broken stream); P then
    moved as shared. Its generation is masked: the check passes while the bitmap says shared, and names
    the generations when the same tables are checked with P private."""
    page = 700
    gpa = WORK + page * PAGE
    pair.move(range(page, page + 1), 2, skip=page)
    content = os.urandom(PAGE)  # the shared copy, the same on both sides, MAC'd on both
    for guest in (pair.src, pair.dst):
        guest.ram[gpa : gpa + PAGE] = content
        guest.mailboxes.mac_list(array.array("Q", [gpa]))
    shared = _bitmap()
    shared[gpa // PAGE // 8] &= ~(1 << (gpa // PAGE % 8)) & 0xFF
    pair.check(pair.seal(bitmap=bytes(shared)), enc_bitmap=shared)
    with pytest.raises(ManifestRefused) as err:
        pair.check(pair.seal())
    assert (err.value.status, err.value.index) == (mbx.MhStatus.MANIFEST_GENERATIONS, page // CHUNK)


def test_a_manifest_of_another_migration_is_refused(lib: ctypes.CDLL) -> None:
    ids = os.urandom(16), os.urandom(16)
    with (
        HostGuest(lib, ram_size=RAM, secret=_secret(ids[0]), vcpus=VCPUS) as src,
        HostGuest(lib, ram_size=RAM, secret=_secret(ids[1]), vcpus=VCPUS, side=SIDE_TARGET) as dst,
    ):
        src.mailboxes.init()
        dst.mailboxes.init()
        src.mailboxes.mac_range(WORK, NPAGES)
        sealed = Pair(src, dst).seal()
        assert sealed_head(sealed).migration_id == ids[0]
        with pytest.raises(ManifestRefused) as err:
            Pair(src, dst).check(sealed)
        assert (err.value.status, err.value.field) == (mbx.MhStatus.MANIFEST_ID, "migration id")


def test_only_a_source_seals_and_only_a_target_checks(pair: Pair) -> None:
    sealed = pair.seal()
    with pytest.raises(mbx.MailboxError) as err:
        pair.dst.mailboxes.seal_manifest(WORK, NPAGES, enc_bitmap=_bitmap(), state_hash=HASH, rounds=1)
    assert err.value.status == mbx.MhStatus.SIDE
    with pytest.raises(mbx.MailboxError) as err:
        pair.src.mailboxes.check_manifest(
            sealed, WORK, NPAGES, enc_bitmap=_bitmap(), state_hash=HASH, rounds=1
        )
    assert err.value.status == mbx.MhStatus.SIDE
    with pytest.raises(mbx.MailboxError) as err:
        pair.dst.mailboxes.seal_state(0, b"{}")
    assert err.value.status == mbx.MhStatus.SIDE
    # a source whose pages have no MAC yet cannot vouch for them
    pair.src.mailboxes.reset()
    pair.src.mailboxes.init()
    with pytest.raises(mbx.MailboxError) as err:
        pair.src.mailboxes.seal_manifest(0, RAM // PAGE, enc_bitmap=_bitmap(), state_hash=HASH, rounds=1)
    assert err.value.status == mbx.MhStatus.MAC_MISSING


def test_a_request_that_does_not_fit_says_how_many_slots_it_needs(lib: ctypes.CDLL) -> None:
    with HostGuest(lib, ram_size=RAM, secret=_secret(), batch_pages=1) as src:
        src.mailboxes.init()
        src.mailboxes.mac_range(WORK, NPAGES)
        src.mailboxes.seal_manifest(
            WORK, NPAGES, enc_bitmap=_bitmap(), state_hash=HASH, rounds=1, chunk_pages=128
        )
        with pytest.raises(mbx.MailboxError) as err:
            src.mailboxes.seal_state(0, b"x" * 5000)
        assert "batch_pages" in err.value.render()
        with pytest.raises(ValueError, match="multiple of 128"):
            src.mailboxes.seal_manifest(
                WORK, NPAGES, enc_bitmap=_bitmap(), state_hash=HASH, rounds=1, chunk_pages=100
            )


# ---- sealed vCPU state ----

BLOB = b'{"vcpu_id": 1, "regs": {"rax": 1234}}' * 40  # the shape of session.vcpu_blob, ~1.5 KiB


def _slot_bytes(guest: HostGuest, vcpu: int) -> bytes:
    return bytes(memoryview(guest.vmsa_slot(vcpu)).cast("B"))


def test_sealed_state_opens_into_the_vmsa_slot_and_nowhere_else(pair: Pair) -> None:
    record = pair.src.mailboxes.seal_state(1, BLOB)
    head = sealed_head(record)
    assert (head.magic, head.label, head.length) == (mbx.STATE_MAGIC, 1, len(BLOB))
    assert _open(record, mbx.LABEL_STATE) == BLOB and BLOB not in record
    assert pair.src.vmsa_slot(1).state == abi.VMSA_SEALED and bytes(pair.src.vmsa_slot(1).tag) == head.tag
    pair.dst.mailboxes.open_state(1, record)
    slot = pair.dst.vmsa_slot(1)
    assert (slot.magic, slot.state, slot.vcpu, slot.length) == (abi.VMSA_MAGIC, abi.VMSA_OPENED, 1, len(BLOB))
    assert bytes(slot.data)[: len(BLOB)] == BLOB and not any(bytes(slot.data)[len(BLOB) :])
    assert all(
        BLOB[:64] not in bytes(mb.slots) for mb in pair.dst.mailboxes.mailboxes
    )  # not in the data area
    # a check makes it VERIFIED and the helper says so; a LOAD after takes both back
    assert not pair.dst.mailboxes.verified()
    pair.check(pair.seal())
    assert pair.dst.vmsa_slot(1).state == abi.VMSA_VERIFIED and pair.dst.vmsa_slot(0).state == abi.VMSA_EMPTY
    assert pair.dst.mailboxes.verified()
    pair.move(range(5, 6), 2)
    assert pair.dst.vmsa_slot(1).state == abi.VMSA_OPENED and not pair.dst.mailboxes.verified()
    pair.check(pair.seal())
    assert pair.dst.mailboxes.verified()
    with pytest.raises(ManifestRefused):  # a failed check takes it back too
        pair.check(pair.seal(), rounds=9)
    assert not pair.dst.mailboxes.verified() and pair.dst.vmsa_slot(1).state == abi.VMSA_OPENED
    for guest in (pair.src, pair.dst):  # (both sides: the entries must match)
        guest.mailboxes.mac_list(array.array("Q", [WORK]))
    pair.check(pair.seal())
    pair.dst.mailboxes.mac_list(array.array("Q", [WORK]))  # so does a MAC_LIST
    assert not pair.dst.mailboxes.verified()


def test_a_changed_sealed_state_is_refused_and_writes_nothing(pair: Pair) -> None:
    record = pair.src.mailboxes.seal_state(0, BLOB)
    before = _slot_bytes(pair.dst, 0)
    for i in list(range(mbx.SEALED_HEAD)) + list(range(mbx.SEALED_HEAD, len(record), 97)):
        bad = bytearray(record)
        bad[i] ^= 0x80
        with pytest.raises(mbx.MailboxError) as err:
            pair.dst.mailboxes.open_state(0, bytes(bad))
        assert err.value.status == mbx.MhStatus.AUTH, i
        assert _slot_bytes(pair.dst, 0) == before, i
    with pytest.raises(mbx.MailboxError) as err:  # authentic, but vCPU 0's state offered for vCPU 1
        pair.dst.mailboxes.mailboxes[0].open_state(1, record)
    assert err.value.status == mbx.MhStatus.STATE_LABEL and _slot_bytes(pair.dst, 1) == before


def test_the_manifest_binds_the_state_the_source_sealed_last(pair: Pair) -> None:
    old = pair.src.mailboxes.seal_state(0, BLOB)
    new = pair.src.mailboxes.seal_state(0, BLOB.replace(b"1234", b"5678"))
    pair.dst.mailboxes.open_state(0, old)  # a replayed older state of this migration: authentic
    sealed = pair.seal()
    with pytest.raises(ManifestRefused) as err:
        pair.check(sealed)
    assert (err.value.status, err.value.index, err.value.field) == (
        mbx.MhStatus.MANIFEST_VMSA,
        0,
        "vCPU state",
    )
    assert pair.dst.vmsa_slot(0).state == abi.VMSA_OPENED
    pair.dst.mailboxes.open_state(0, new)
    pair.check(sealed)
    assert pair.dst.vmsa_slot(0).state == abi.VMSA_VERIFIED


# ---- v7: PREPARE_MANIFEST, the side's own fields computed ahead of SEAL / CHECK ----


def _prepare(guest: HostGuest, bitmap: bytes | None = None) -> bool:
    bits = bytes(_bitmap()) if bitmap is None else bitmap
    return guest.mailboxes.prepare_manifest(WORK, NPAGES, enc_bitmap=bits, chunk_pages=CHUNK)


def test_a_prepared_seal_and_check_say_what_unprepared_ones_say(pair: Pair) -> None:
    plain = _open(pair.seal(), mbx.LABEL_MANIFEST)
    assert _prepare(pair.src)
    prepared = pair.seal()
    assert _open(prepared, mbx.LABEL_MANIFEST) == plain
    assert _prepare(pair.dst)
    pair.check(prepared)
    assert pair.dst.mailboxes.verified()


def test_a_prepared_check_compares_what_was_prepared_once(pair: Pair) -> None:
    """The prepared fields are what the check compares: a MAC entry changed behind the helper's back (no op
    can do that) after PREPARE goes unseen by that one check, and the next check, with nothing prepared,
    computes every chunk again and names it."""
    sealed = pair.seal()
    assert _prepare(pair.dst)
    at = (WORK + 5 * PAGE) // PAGE * abi.MH_MAC_ENTRY
    pair.dst._macs[at] ^= 0x01
    pair.check(sealed)
    with pytest.raises(ManifestRefused) as err:
        pair.check(sealed)
    assert (err.value.field, err.value.index) == ("MAC table", 0)
    pair.dst._macs[at] ^= 0x01
    pair.check(sealed)


def test_a_table_change_after_prepare_is_checked(pair: Pair) -> None:
    """A LOAD after PREPARE (here: page 5 moved again, generation 2) bumps the change counter: the check does
    not use what was prepared, and refuses the older manifest; a fresh one checks."""
    sealed = pair.seal()
    assert _prepare(pair.dst)
    pair.move(range(5, 6), 2)
    with pytest.raises(ManifestRefused) as err:
        pair.check(sealed)
    assert (err.value.field, err.value.index) == ("generation table", 0)
    assert _prepare(pair.src)
    pair.move(range(6, 7), 3)  # a SAVE after the source's PREPARE: its seal computes afresh
    assert _prepare(pair.dst)
    pair.check(pair.seal())
    assert pair.dst.mailboxes.verified()


def test_prepared_fields_hold_only_for_the_same_bitmap(pair: Pair) -> None:
    sealed = pair.seal()
    other = _bitmap()
    other[WORK // PAGE // 8] ^= 0x01  # the first page shared
    assert _prepare(pair.dst, bytes(other))
    pair.check(sealed)  # checked with the bitmap it is given, not the prepared one
    assert _prepare(pair.dst)
    with pytest.raises(ManifestRefused) as err:
        pair.check(sealed, enc_bitmap=other)
    assert err.value.field == "encryption bitmap"
    assert _prepare(pair.src, bytes(other))
    assert _open(pair.seal(), mbx.LABEL_MANIFEST) == _open(sealed, mbx.LABEL_MANIFEST)


def test_any_other_op_drops_the_prepared_fields(pair: Pair) -> None:
    plain = _open(pair.seal(), mbx.LABEL_MANIFEST)
    assert _prepare(pair.src)
    pair.src.mailboxes.seal_state(0, BLOB)  # helper 0's seal buffer held the prepared body
    body = _open(pair.seal(), mbx.LABEL_MANIFEST)
    tags = slice(112, 112 + VCPUS * 16)
    assert body[: tags.start] == plain[: tags.start] and body[tags.stop :] == plain[tags.stop :]
    assert body[tags][:16] != bytes(16)  # vCPU 0's sealed state is bound, the rest computed afresh
    assert _prepare(pair.dst)
    pair.dst.mailboxes.digest(WORK, 16)  # any op in between
    at = (WORK + 5 * PAGE) // PAGE * abi.MH_MAC_ENTRY
    pair.dst._macs[at] ^= 0x01  # so a check that used the dropped fields would pass
    with pytest.raises(ManifestRefused):
        pair.check(pair.seal())
    pair.dst._macs[at] ^= 0x01


@pytest.fixture
def pair2(lib: ctypes.CDLL) -> Iterator[Pair]:
    """``pair`` with two helper vCPUs a side (SEV-ES/SNP's pause seals and opens states beside a PREPARE)."""
    yield from _moved_pair(lib, mh_vcpus=2)


def test_a_state_sealed_by_another_helper_keeps_the_prepared_fields(pair2: Pair) -> None:
    """The source's pause: helper 0 prepares while helper 1 seals the vCPU states (``MailboxSet.apart``).
    The seal then uses what was prepared (a MAC entry changed behind helper 0's back after its PREPARE, which
    no op can do, goes unseen) and binds the states sealed meanwhile; the target checks it."""
    preparing, sealing = pair2.src.mailboxes.apart()
    assert preparing.mailboxes == pair2.src.mailboxes.mailboxes[:1]
    assert sealing.mailboxes == pair2.src.mailboxes.mailboxes[1:]
    assert _prepare(pair2.src)
    records = [sealing.seal_state(v, BLOB) for v in range(VCPUS)]
    at = (WORK + 5 * PAGE) // PAGE * abi.MH_MAC_ENTRY
    pair2.src._macs[at] ^= 0x01
    sealed = pair2.seal()  # the prepared entries: the changed MAC is not in it
    pair2.src._macs[at] ^= 0x01
    for v, record in enumerate(records):
        pair2.dst.mailboxes.open_state(v, record)
    pair2.check(sealed)
    assert pair2.dst.mailboxes.verified()
    assert all(pair2.dst.vmsa_slot(v).state == abi.VMSA_VERIFIED for v in range(VCPUS))


def test_a_state_opened_after_prepare_leaves_it_usable_and_checked(pair2: Pair) -> None:
    """The target's pause prepares at the bitmap and opens the states when they come: an OPEN_STATE changes
    no table a PREPARE covers (it bumps the state counter, not the tables' one), on the preparing helper or
    another, so the check uses the prepared fields (a MAC entry changed behind the helper's back after the
    PREPARE goes unseen) and still reads the VMSA slots itself: a replayed older state is refused."""
    old = pair2.src.mailboxes.seal_state(0, BLOB.replace(b"1234", b"5678"))
    records = [pair2.src.mailboxes.seal_state(v, BLOB) for v in range(VCPUS)]
    sealed = pair2.seal()
    at = (WORK + 5 * PAGE) // PAGE * abi.MH_MAC_ENTRY
    for helper in (0, 1):
        assert _prepare(pair2.dst)
        pair2.dst._macs[at] ^= 0x01
        pair2.dst.mailboxes.mailboxes[helper].open_state(0, old)  # authentic, but not the state sealed last
        pair2.dst.mailboxes.mailboxes[1 - helper].open_state(1, records[1])
        with pytest.raises(ManifestRefused) as err:
            pair2.check(sealed)
        assert (err.value.field, err.value.index) == ("vCPU state", 0)
        pair2.dst._macs[at] ^= 0x01
        assert _prepare(pair2.dst)
        pair2.dst._macs[at] ^= 0x01
        pair2.dst.mailboxes.mailboxes[helper].open_state(0, records[0])
        pair2.check(sealed)  # prepared: the changed MAC entry is not seen
        assert pair2.dst.mailboxes.verified()
        assert all(pair2.dst.vmsa_slot(v).state == abi.VMSA_VERIFIED for v in range(VCPUS))
        pair2.dst._macs[at] ^= 0x01
    assert _prepare(pair2.dst)
    pair2.move(range(5, 6), 2)  # a table change after PREPARE still makes it stale, as before
    with pytest.raises(ManifestRefused) as err:
        pair2.check(sealed)
    assert err.value.field == "generation table"
