"""SEV and SEV-SNP guest policy words: bit definitions, encoding and decoding.

The guest owner sets the policy at launch; the secure processor enforces it. Layouts (AMD SEV API and
SEV-SNP ABI specifications):
- SEV (u32): NODBG 0, NOKS 1, ES 2, NOSEND 3, DOMAIN 4, SEV 5, API major 23:16, API minor 31:24.
- SNP (u64): API minor 7:0, API major 15:8, SMT 16, bit 17 reserved and must be one, MIGRATE_MA 18,
  DEBUG 19, SINGLE_SOCKET 20.
This module only knows the bits; what a plan may ask for is checked in ``confplan.plan``.
"""

from __future__ import annotations

import enum
from typing import TypedDict


class SevPolicyFlag(enum.IntFlag):
    """The single-bit flags of a legacy SEV / SEV-ES policy."""

    NODBG = 1 << 0  # debugging the guest (reading its memory through the PSP) is refused
    NOKS = 1 << 1  # the guest's keys may not be shared with another guest
    ES = 1 << 2  # SEV-ES: register state is encrypted too
    NOSEND = 1 << 3  # the guest may not be sent (migrated) to another platform
    DOMAIN = 1 << 4  # the guest may only be sent to a platform in the same domain
    SEV = 1 << 5  # the guest may only be sent to a platform supporting SEV


SEV_API_MAJOR_SHIFT = 16
SEV_API_MINOR_SHIFT = 24
SEV_FLAGS_MASK = 0x3F
SEV_DEFINED_MASK = SEV_FLAGS_MASK | (0xFF << SEV_API_MAJOR_SHIFT) | (0xFF << SEV_API_MINOR_SHIFT)


class SnpPolicyFlag(enum.IntFlag):
    """The single-bit flags of an SEV-SNP guest policy."""

    SMT = 1 << 16  # SMT may be enabled on the host
    RESERVED_ONE = 1 << 17  # reserved, must be one
    MIGRATE_MA = 1 << 18  # association with a migration agent is allowed
    DEBUG = 1 << 19  # debugging is allowed
    SINGLE_SOCKET = 1 << 20  # the guest may only run on one socket


SNP_API_MINOR_SHIFT = 0
SNP_API_MAJOR_SHIFT = 8
SNP_RESERVED_ONE = int(SnpPolicyFlag.RESERVED_ONE)
SNP_DEFINED_MASK = 0xFFFF | (0x1F << 16)


class SevPolicyFields(TypedDict):
    """A SEV policy word as named fields."""

    nodbg: bool
    noks: bool
    es: bool
    nosend: bool
    domain: bool
    sev: bool
    api_major: int
    api_minor: int


class SnpPolicyFields(TypedDict):
    """An SEV-SNP policy word as named fields."""

    smt: bool
    migrate_ma: bool
    debug: bool
    single_socket: bool
    api_major: int
    api_minor: int


def _check_byte(name: str, value: int) -> int:
    if not 0 <= value <= 0xFF:
        raise ValueError(f"{name} must be between 0 and 255, got {value}")
    return value


def encode_sev_policy(
    *,
    nodbg: bool = False,
    noks: bool = False,
    es: bool = False,
    nosend: bool = False,
    domain: bool = False,
    sev: bool = False,
    api_major: int = 0,
    api_minor: int = 0,
) -> int:
    """Build a SEV policy word from named fields."""
    word = 0
    for flag, wanted in (
        (SevPolicyFlag.NODBG, nodbg),
        (SevPolicyFlag.NOKS, noks),
        (SevPolicyFlag.ES, es),
        (SevPolicyFlag.NOSEND, nosend),
        (SevPolicyFlag.DOMAIN, domain),
        (SevPolicyFlag.SEV, sev),
    ):
        if wanted:
            word |= int(flag)
    word |= _check_byte("api_major", api_major) << SEV_API_MAJOR_SHIFT
    word |= _check_byte("api_minor", api_minor) << SEV_API_MINOR_SHIFT
    return word


def decode_sev_policy(word: int) -> SevPolicyFields:
    """Split a SEV policy word into named fields (undefined bits are ignored; see ``SEV_DEFINED_MASK``)."""
    flags = SevPolicyFlag(word & SEV_FLAGS_MASK)
    return SevPolicyFields(
        nodbg=SevPolicyFlag.NODBG in flags,
        noks=SevPolicyFlag.NOKS in flags,
        es=SevPolicyFlag.ES in flags,
        nosend=SevPolicyFlag.NOSEND in flags,
        domain=SevPolicyFlag.DOMAIN in flags,
        sev=SevPolicyFlag.SEV in flags,
        api_major=(word >> SEV_API_MAJOR_SHIFT) & 0xFF,
        api_minor=(word >> SEV_API_MINOR_SHIFT) & 0xFF,
    )


def encode_snp_policy(
    *,
    smt: bool = True,
    migrate_ma: bool = False,
    debug: bool = False,
    single_socket: bool = False,
    api_major: int = 0,
    api_minor: int = 0,
) -> int:
    """Build an SNP policy word from named fields; the reserved-one bit is always set."""
    word = SNP_RESERVED_ONE
    for flag, wanted in (
        (SnpPolicyFlag.SMT, smt),
        (SnpPolicyFlag.MIGRATE_MA, migrate_ma),
        (SnpPolicyFlag.DEBUG, debug),
        (SnpPolicyFlag.SINGLE_SOCKET, single_socket),
    ):
        if wanted:
            word |= int(flag)
    word |= _check_byte("api_minor", api_minor) << SNP_API_MINOR_SHIFT
    word |= _check_byte("api_major", api_major) << SNP_API_MAJOR_SHIFT
    return word


def decode_snp_policy(word: int) -> SnpPolicyFields:
    """Split an SNP policy word into named fields (undefined bits are ignored; see ``SNP_DEFINED_MASK``)."""
    return SnpPolicyFields(
        smt=bool(word & SnpPolicyFlag.SMT),
        migrate_ma=bool(word & SnpPolicyFlag.MIGRATE_MA),
        debug=bool(word & SnpPolicyFlag.DEBUG),
        single_socket=bool(word & SnpPolicyFlag.SINGLE_SOCKET),
        api_major=(word >> SNP_API_MAJOR_SHIFT) & 0xFF,
        api_minor=(word >> SNP_API_MINOR_SHIFT) & 0xFF,
    )


def sev_api_version(word: int) -> tuple[int, int]:
    """The minimum firmware API (major, minor) a SEV policy word asks for."""
    return (word >> SEV_API_MAJOR_SHIFT) & 0xFF, (word >> SEV_API_MINOR_SHIFT) & 0xFF
