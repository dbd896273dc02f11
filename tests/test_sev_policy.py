"""SEV / SNP policy words: bit positions pinned against the specifications, round trips."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from confplan.sev.policy import (
    SEV_DEFINED_MASK,
    SNP_DEFINED_MASK,
    SNP_RESERVED_ONE,
    SevPolicyFlag,
    decode_sev_policy,
    decode_snp_policy,
    encode_sev_policy,
    encode_snp_policy,
    sev_api_version,
)


def test_sev_bits_match_the_spec() -> None:
    assert encode_sev_policy(nodbg=True) == 0x01
    assert encode_sev_policy(noks=True) == 0x02
    assert encode_sev_policy(es=True) == 0x04
    assert encode_sev_policy(nosend=True) == 0x08
    assert encode_sev_policy(domain=True) == 0x10
    assert encode_sev_policy(sev=True) == 0x20
    assert encode_sev_policy(api_major=1, api_minor=40) == (1 << 16) | (40 << 24)
    assert SEV_DEFINED_MASK == 0xFFFF003F


def test_snp_bits_match_the_spec() -> None:
    assert SNP_RESERVED_ONE == 1 << 17
    assert encode_snp_policy(smt=False) == 1 << 17
    assert encode_snp_policy(smt=True, migrate_ma=True, debug=True, single_socket=True) == 0x1F0000
    assert encode_snp_policy(smt=False, api_major=1, api_minor=51) == (1 << 17) | (1 << 8) | 51
    assert SNP_DEFINED_MASK == 0x1FFFFF


@given(st.integers(min_value=0, max_value=0xFFFFFFFF))
def test_sev_round_trip(word: int) -> None:
    defined = word & SEV_DEFINED_MASK
    assert encode_sev_policy(**decode_sev_policy(word)) == defined


@given(st.integers(min_value=0, max_value=(1 << 64) - 1))
def test_snp_round_trip(word: int) -> None:
    assert encode_snp_policy(**decode_snp_policy(word)) == (word & SNP_DEFINED_MASK) | SNP_RESERVED_ONE


def test_api_version_and_flags() -> None:
    word = encode_sev_policy(nodbg=True, nosend=True, api_major=0, api_minor=18)
    assert sev_api_version(word) == (0, 18)
    assert SevPolicyFlag.NOSEND in SevPolicyFlag(word & 0x3F)


def test_out_of_range_api_is_refused() -> None:
    with pytest.raises(ValueError, match="api_major"):
        encode_sev_policy(api_major=256)
