"""The wire format's control frames and the header the C core builds and checks for them."""

from __future__ import annotations

from dataclasses import replace

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given, settings
from hypothesis import strategies as st

from confplan.core import CoreStatus, PageCoreError, _lib, crc32c, frameauth, wire
from confplan.core.wire import (
    Auth,
    Challenge,
    Control,
    DeviceState,
    Done,
    ErrorReport,
    FrameType,
    Hello,
    HelperMode,
    Manifest,
    RoundEnd,
    VcpuState,
)

HELLO = Hello(ram_size=256 << 20, migration_id=bytes(range(16)), helper_mode=HelperMode.AUX_VCPU, vcpus=2)

MESSAGES: list[Control] = [
    HELLO,
    RoundEnd(round=3, shared_pages=10, zero_pages=4, sealed_pages=900, final=True),
    VcpuState(vcpu=1, format_version=2, blob=b"\x01" * 700),
    DeviceState(name="serial0 ünicode", format_version=1, blob=b"state"),
    Manifest(format_version=1, blob=bytes(range(256))),
    Done(rounds=5, shared_pages=12, sealed_pages=34),
    ErrorReport(code=7, message="target: out of memory at GPA 0x1000 ✗"),
    Challenge(nonce=bytes(range(32)), proof=bytes(range(32, 64))),
    Auth(proof=bytes(range(100, 132))),
]


def test_constants_agree_with_the_c_core() -> None:
    dll = _lib.lib()
    assert dll.cp_query(_lib.Q_MAGIC) == wire.MAGIC
    assert dll.cp_query(_lib.Q_WIRE_VERSION) == wire.WIRE_VERSION
    assert dll.cp_query(_lib.Q_HEADER_SIZE) == wire.HEADER_SIZE
    assert dll.cp_query(_lib.Q_MAX_PAYLOAD) == wire.MAX_PAYLOAD
    assert dll.cp_query(_lib.Q_MAX_FRAME_PAGES) == wire.MAX_FRAME_PAGES
    assert dll.cp_query(_lib.Q_SEALED_PAGE_SIZE) == wire.SEALED_PAGE_SIZE
    assert dll.cp_query(_lib.Q_TAG_SIZE) == wire.TAG_SIZE == 16
    assert wire.SEALED_HEADER.size == wire.SEALED_HEADER_SIZE == 64
    assert wire.MAGIC.to_bytes(4, "little") == b"CFPL"


@pytest.mark.parametrize("msg", MESSAGES, ids=lambda m: type(m).__name__)
def test_control_frame_round_trip(msg: Control) -> None:
    frame = wire.encode(msg, seq=42)
    header, back = wire.decode(frame)
    assert back == msg
    assert (header.type, header.seq, header.frame_len) == (msg.TYPE, 42, len(frame))
    assert header.payload_crc32c == crc32c(bytes(frame[wire.HEADER_SIZE :]))


def test_header_layout_on_the_wire() -> None:
    frame = wire.encode(Done(rounds=1, shared_pages=2, sealed_pages=3), seq=0x0102030405060708)
    assert frame[:4] == b"CFPL"
    assert frame[4:6] == (4).to_bytes(2, "little")
    assert frame[6:8] == int(FrameType.DONE).to_bytes(2, "little")
    assert frame[12:16] == (24).to_bytes(4, "little")
    assert frame[16:24] == bytes.fromhex("0807060504030201")
    assert frame[28:32] == crc32c(bytes(frame[:28])).to_bytes(4, "little")


def test_parse_header_needs_only_the_header() -> None:
    frame = wire.encode(HELLO, seq=0)
    header = wire.parse_header(frame[: wire.HEADER_SIZE])
    assert header.type is FrameType.HELLO and header.payload_len == Hello.LAYOUT.size
    with pytest.raises(PageCoreError) as info:
        wire.check_frame(frame[: wire.HEADER_SIZE])
    assert info.value.code is CoreStatus.TRUNCATED


def test_foreign_stream_gets_a_clear_message() -> None:
    with pytest.raises(PageCoreError) as info:
        wire.parse_header(b"GET / HTTP/1.1\r\nHost: example\r\n\r\n")
    assert info.value.code is CoreStatus.MAGIC
    assert "not a confplan stream" in info.value.message
    assert info.value.hint is not None


@pytest.mark.parametrize("version", [1, 2, 3, 5])
def test_other_wire_version_is_refused_with_advice(version: int) -> None:
    frame = wire.encode(HELLO, seq=0)
    frame[4:6] = version.to_bytes(2, "little")
    with pytest.raises(PageCoreError) as info:
        wire.decode(frame)
    assert info.value.code is CoreStatus.VERSION
    assert f"wire version {version}, this confplan speaks 4" in info.value.message
    assert info.value.hint == "run the same confplan version on the source and the target"


def forged(ftype: FrameType, payload: bytes) -> bytearray:
    return wire.build_frame(ftype, payload, seq=0)


@pytest.mark.parametrize(
    ("ftype", "payload", "words"),
    [
        (FrameType.HELLO, HELLO.pack()[:-1], "payload of 79 bytes, expected 80"),
        (FrameType.HELLO, HELLO.pack() + b"x", "payload of 81 bytes, expected 80"),
        (FrameType.CHALLENGE, bytes(63), "payload of 63 bytes, expected 64"),
        (FrameType.AUTH, bytes(33), "payload of 33 bytes, expected 32"),
        (FrameType.HELLO, HELLO.pack()[:2] + (9).to_bytes(2, "little") + HELLO.pack()[4:], "helper mode 9"),
        (FrameType.ROUND_END, RoundEnd.LAYOUT.pack(1, 2, 0, 0, 0), "unknown flags 0x2"),
        (FrameType.DEVICE_STATE, DeviceState.LAYOUT.pack(10, 0, 1) + b"abc", "name length 10"),
        (FrameType.DEVICE_STATE, DeviceState.LAYOUT.pack(2, 0, 1) + b"\xff\xfe", "not UTF-8"),
        (FrameType.DONE, Done.LAYOUT.pack(1, 5, 0, 0), "reserved field 0x5"),
        (FrameType.ERROR, ErrorReport.LAYOUT.pack(1, 0) + b"x" * 4097, "message of 4097 bytes"),
        (FrameType.VCPU_STATE, b"\x00" * 7, "payload of 7 bytes, expected 8"),
    ],
)
def test_malformed_control_payload_is_refused(ftype: FrameType, payload: bytes, words: str) -> None:
    with pytest.raises(PageCoreError, match=words) as info:
        wire.decode(forged(ftype, payload))
    assert ftype.name in info.value.message


def test_page_frames_are_not_control_frames() -> None:
    with pytest.raises(PageCoreError) as info:
        wire.decode(forged(FrameType.SHARED_PAGES, bytes(8)))
    assert info.value.code is CoreStatus.TYPE


def test_hello_mismatch_names_every_differing_field() -> None:
    peer = Hello(ram_size=512 << 20, migration_id=bytes(16), helper_mode=HelperMode.MIRROR_VM, vcpus=2)
    with pytest.raises(PageCoreError) as info:
        peer.require_match(HELLO)
    assert "ram_size: peer 536870912, here 268435456" in info.value.message
    assert "helper_mode" in info.value.message and "vcpus" not in info.value.message
    assert f"migration_id: peer {bytes(16).hex()}, here {bytes(range(16)).hex()}" in info.value.message
    HELLO.require_match(HELLO)
    replace(HELLO, nonce=bytes(range(32))).require_match(HELLO)  # the handshake nonce is not geometry


def protector() -> tuple[bytes, frameauth.FrameKey]:
    key = bytes(range(32))
    return key, frameauth.FrameKey(key, frameauth.Direction.SOURCE_TO_TARGET, 0)


def test_protected_header_drops_the_crc_of_an_encrypted_payload_only() -> None:
    frame = wire.encode(Done(rounds=1, shared_pages=2, sealed_pages=3), seq=7)
    key, writer = protector()
    header, parts = writer.protect(frame)
    sent = bytes(parts[0])
    assert header.protected and header.payload_crc32c == 0 and header.seq == 7
    assert wire.parse_header(sent) == header
    ciphertext = bytes(parts[1])
    assert AESGCM(key).decrypt(b"s>t\x00" + (7).to_bytes(8, "big"), ciphertext, sent) == frame[32:]
    plain = bytearray(sent + frame[wire.HEADER_SIZE :])  # what the reader hands out once the tag verified
    assert wire.check_frame(plain) == header  # no payload CRC to check: the stream's tag covers it
    plain[24:28] = crc32c(bytes(frame[wire.HEADER_SIZE :])).to_bytes(4, "little")
    plain[28:32] = crc32c(bytes(plain[:28])).to_bytes(4, "little")
    with pytest.raises(PageCoreError) as leaked:  # a plaintext CRC in the clear header is refused
        wire.check_frame(plain)
    assert leaked.value.code is CoreStatus.FLAGS
    with pytest.raises(PageCoreError) as twice:
        writer.protect(sent + frame[wire.HEADER_SIZE :])
    assert twice.value.code is CoreStatus.FLAGS


def test_a_sealed_frame_tag_is_a_gmac_over_header_prefix_and_record_headers() -> None:
    records = [wire.pack_sealed_header(i * 4096, 1, bytes([i]) * 12, bytes([i]) * 16) + bytes([i]) * 4096
               for i in range(3)]  # fmt: skip
    payload = (3).to_bytes(4, "little") + bytes(4) + b"".join(records)
    frame = wire.build_frame(FrameType.SEALED_PAGES, payload, seq=4)
    key, writer = protector()
    header, (sent, body, tag) = writer.protect(frame)
    assert header.payload_crc32c == 0  # wire v3: the tag covers the record headers, the helper's the rest
    assert bytes(body) == payload
    aad = bytes(sent) + payload[:8] + b"".join(r[:64] for r in records)
    assert AESGCM(key).encrypt(b"s>t\x00" + (4).to_bytes(8, "big"), b"", aad) == tag
    with pytest.raises(PageCoreError) as short:
        writer.protect(frame[:-1])
    assert short.value.code is CoreStatus.TRUNCATED
    lying = wire.build_frame(FrameType.SEALED_PAGES, (4).to_bytes(4, "little") + payload[4:], seq=4)
    with pytest.raises(PageCoreError) as count:  # a count that does not fill the payload
        writer.protect(lying)
    assert count.value.code is CoreStatus.PAYLOAD_LEN


def test_hello_needs_a_16_byte_migration_id() -> None:
    with pytest.raises(ValueError, match="migration_id must be 16 bytes"):
        Hello(ram_size=4096, migration_id=b"short", helper_mode=HelperMode.AUX_VCPU, vcpus=1).pack()


def test_build_frame_refuses_payload_over_the_limit() -> None:
    with pytest.raises(PageCoreError) as info:
        wire.build_frame(FrameType.MANIFEST, bytes(wire.MAX_PAYLOAD + 1), seq=0)
    assert info.value.code is CoreStatus.PAYLOAD_LEN


@settings(max_examples=50, deadline=None)
@given(
    vcpu=st.integers(0, 2**32 - 1),
    blob=st.binary(max_size=2000),
    seq=st.integers(0, 2**64 - 1),
    flip=st.integers(0, 2**32),
)
def test_any_bit_flip_in_a_control_frame_is_refused(vcpu: int, blob: bytes, seq: int, flip: int) -> None:
    msg = VcpuState(vcpu=vcpu, format_version=1, blob=blob)
    frame = wire.encode(msg, seq)
    assert wire.decode(frame)[1] == msg
    frame[flip % len(frame)] ^= 1 << (flip % 8)
    with pytest.raises(PageCoreError):
        wire.decode(frame)


def test_hello_names_its_channel_and_refuses_an_impossible_one() -> None:
    two = replace(HELLO, channels=2, channel=1)
    assert Hello.unpack(two.pack()) == two
    assert len(two.pack()) == 80
    with pytest.raises(PageCoreError, match="channel 2 of 2 channels"):
        Hello.unpack(replace(HELLO, channels=2, channel=2).pack())
    reserved = bytearray(HELLO.pack())
    reserved[76] = 1
    with pytest.raises(PageCoreError, match="reserved"):
        Hello.unpack(bytes(reserved))
