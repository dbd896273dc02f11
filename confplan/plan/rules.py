"""Rules beyond types: each says why it exists and what to change.

A rule is a generator over the validated sections it names (``@rule("helper")``) and yields findings:
(data path to point at, message). The loader runs a rule whenever all its sections validated, so a type
error in one section does not hide a rule broken in another.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from confplan.guest import abi
from confplan.guest.layout import minimum_memory
from confplan.plan.models import (
    SEV_ONLY_FLAGS,
    SNP_ONLY_FLAGS,
    STAGE_NEEDS,
    Endpoint,
    Guest,
    Helper,
    PolicyFlags,
    Sev,
    StageSpec,
)
from confplan.plan.units import format_size
from confplan.plan.yamlsrc import DataPath, render_path
from confplan.sev.policy import SEV_DEFINED_MASK, SNP_DEFINED_MASK, SNP_RESERVED_ONE, SevPolicyFlag

Finding = tuple[DataPath, str]
RuleFn = Callable[..., Iterator[Finding]]
RULES: list[tuple[tuple[str, ...], RuleFn]] = []

HUGE_PAGE = abi.HUGE  # guest RAM is mapped in 2 MiB pages


def rule(*sections: str) -> Callable[[RuleFn], RuleFn]:
    """Register a rule over the named plan sections (passed positionally, in that order)."""

    def register(fn: RuleFn) -> RuleFn:
        RULES.append((sections, fn))
        return fn

    return register


def check_sections(sections: dict[str, Any]) -> list[Finding]:
    """Run every rule whose sections are all present (validated) in ``sections``."""
    findings: list[Finding] = []
    for names, fn in RULES:
        if all(name in sections for name in names):
            findings.extend(fn(*(sections[name] for name in names)))
    return findings


@rule("helper")
def helper_has_vcpus(helper: Helper) -> Iterator[Finding]:
    # The seed: "allow migration unless there are no aux vcpus" — the MH needs a vCPU to run on.
    if helper.aux_vcpus >= 1:
        return
    if helper.mode == "aux-vcpu":
        yield ("helper", "aux_vcpus"), "must be at least 1 when helper.mode is aux-vcpu"
    else:
        yield (
            ("helper", "aux_vcpus"),
            "must be at least 1 when helper.mode is mirror-vm: the mirror VM needs a vCPU to run the helper",
        )


@rule("guest")
def memory_in_huge_pages(guest: Guest) -> Iterator[Finding]:
    if guest.memory % HUGE_PAGE == 0:
        return
    lower = guest.memory - guest.memory % HUGE_PAGE
    options = [format_size(size) for size in (lower, lower + HUGE_PAGE) if size]
    yield (
        ("guest", "memory"),
        f"{format_size(guest.memory)} is not a multiple of 2MiB (guest memory is mapped in 2MiB pages); "
        f"use {' or '.join(options)}",
    )


@rule("guest")
def memory_within_the_vmm(guest: Guest) -> Iterator[Finding]:
    # RAM goes below the hole under 4 GiB, then on from 4 GiB; the guest's page tables map 64 GiB of
    # guest-physical space (docs/memory-map.md): the VMM cannot map more.
    if guest.memory > abi.MAX_RAM:
        yield (
            ("guest", "memory"),
            f"{format_size(guest.memory)} is above the {format_size(abi.MAX_RAM)} this VMM supports "
            f"({format_size(abi.MAX_RAM_TOP)} of guest-physical space less the hole under 4 GiB for "
            "devices); "
            f"use at most {format_size(abi.MAX_RAM)}",
        )


@rule("guest", "helper")
def vcpus_within_the_vmm(guest: Guest, helper: Helper) -> Iterator[Finding]:
    # The firmware has per-vCPU tables (TSS, stacks) for MAX_VCPUS in all, helpers included.
    total, helpers = guest.vcpus + helper.mh_vcpus, helper.mh_vcpus
    if helpers > abi.MAX_MH_VCPUS:
        yield (
            ("helper", "aux_vcpus"),
            f"{helpers} helper vCPUs are more than the {abi.MAX_MH_VCPUS} this VMM supports; "
            f"use at most {abi.MAX_MH_VCPUS}",
        )
    elif total > abi.MAX_VCPUS:
        yield (
            ("guest", "vcpus"),
            f"{_count(guest.vcpus, 'vCPU')} and {_count(helpers, 'helper vCPU')} ({helper.mode}) make "
            f"{total}, more than the {abi.MAX_VCPUS} this VMM supports (helpers included); "
            f"use at most {abi.MAX_VCPUS - helpers}",
        )


def _count(number: int, thing: str) -> str:
    return f"{number} {thing}{'' if number == 1 else 's'}"


@rule("guest", "helper")
def memory_holds_the_guest(guest: Guest, helper: Helper) -> Iterator[Finding]:
    # The helper's area (mailboxes, per-page tables, VMSA slots) comes first; the workload needs room after.
    if guest.memory % HUGE_PAGE or guest.memory > abi.MAX_RAM or helper.mh_vcpus > abi.MAX_MH_VCPUS:
        return  # the rules above speak
    batch = helper.batch_for(guest.memory)
    minimum = minimum_memory(guest.vcpus, helper.mh_vcpus, batch)
    if guest.memory < minimum:
        yield (
            ("guest", "memory"),
            f"{format_size(guest.memory)} is too small for {_count(guest.vcpus, 'vCPU')} with "
            f"{_count(helper.mh_vcpus, 'helper vCPU')} and batch_pages {batch}: the helper's "
            f"area and the workload need {format_size(minimum)}; use at least {format_size(minimum)}",
        )


@rule("sev")
def policy_flags_match_generation(sev: Sev) -> Iterator[Finding]:
    if not isinstance(sev.policy, PolicyFlags):
        return
    snp = sev.generation == "sev-snp"
    foreign, own = (SEV_ONLY_FLAGS, SNP_ONLY_FLAGS) if snp else (SNP_ONLY_FLAGS, SEV_ONLY_FLAGS)
    for flag in foreign:
        if getattr(sev.policy, flag) is not None:
            yield (
                ("sev", "policy", flag),
                f"is not a policy flag of generation {sev.generation}; remove it "
                f"(flags for {sev.generation}: {', '.join(own)}, api_major, api_minor)",
            )


@rule("sev")
def policy_allows_sending(sev: Sev) -> Iterator[Finding]:
    if sev.generation == "sev-snp" or not sev.policy_int & SevPolicyFlag.NOSEND:
        return
    if isinstance(sev.policy, PolicyFlags):
        yield (
            ("sev", "policy", "nosend"),
            "the guest owner forbade sending this guest to another machine, so it cannot be migrated; "
            "set nosend: false only if the guest owner allows migration",
        )
    else:
        yield (
            ("sev", "policy"),
            f"NOSEND (bit 3) is set in {sev.policy_int:#x}: the guest owner forbade sending this guest to "
            "another machine, so it cannot be migrated; use "
            f"{sev.policy_int & ~SevPolicyFlag.NOSEND:#x} only if the guest owner allows migration",
        )


@rule("sev")
def es_matches_generation(sev: Sev) -> Iterator[Finding]:
    if sev.generation == "sev-snp":
        return
    has_es = bool(sev.policy_int & SevPolicyFlag.ES)
    if has_es == (sev.generation == "sev-es"):
        return
    flags = isinstance(sev.policy, PolicyFlags)
    path: DataPath = ("sev", "policy", "es") if flags else ("sev", "policy")
    if sev.generation == "sev-es":
        fix = "remove 'es: false'" if flags else f"use {sev.policy_int | SevPolicyFlag.ES:#x}"
        yield path, f"an sev-es guest's policy must set ES (bit 2), or it cannot launch with SEV-ES; {fix}"
    else:
        yield (
            path,
            "the policy asks for SEV-ES (bit 2) but sev.generation is sev; "
            "set generation: sev-es or clear ES (bit 2)",
        )


@rule("sev")
def raw_policy_is_defined(sev: Sev) -> Iterator[Finding]:
    if isinstance(sev.policy, PolicyFlags):
        return
    snp = sev.generation == "sev-snp"
    mask = SNP_DEFINED_MASK if snp else SEV_DEFINED_MASK
    fixed = sev.policy & mask | (SNP_RESERVED_ONE if snp else 0)
    undefined = sev.policy & ~mask
    if undefined:
        bits = [str(bit) for bit in range(undefined.bit_length()) if undefined >> bit & 1]
        named = (
            f"bit {bits[0]} ({undefined:#x}) is"
            if len(bits) == 1
            else f"bits {', '.join(bits)} ({undefined:#x}) are"
        )
        yield (
            ("sev", "policy"),
            f"{named} not defined for generation {sev.generation} and the secure processor would refuse the "
            f"policy; use {fixed:#x}",
        )
    if snp and not sev.policy & SNP_RESERVED_ONE:
        yield (
            ("sev", "policy"),
            f"bit 17 must be set in an SEV-SNP policy (the SNP ABI reserves it as one); use {fixed:#x}",
        )


@rule("source", "target")
def target_is_elsewhere(source: Endpoint, target: Endpoint) -> Iterator[Finding]:
    if not target.is_local and target.address == source.address:
        yield (
            ("target", "host"),
            f"{target.host} is also the source; a remote target must be a different agent than the source",
        )


@rule("source", "stages")
def source_is_local(source: Endpoint, stages: list[StageSpec]) -> Iterator[Finding]:
    # launch-source starts the source VMM as a child of `confplan apply`, on this host.
    if not source.is_local and any(stage.name == "launch-source" for stage in stages):
        yield (
            ("source", "host"),
            f"{source.host} is remote, but launch-source starts the source on the host that runs "
            "`confplan apply`; write host: local and run apply on the source's host",
        )


@rule("stages")
def stage_order(stages: list[StageSpec]) -> Iterator[Finding]:
    first: dict[str, int] = {}
    for index, stage in enumerate(stages):
        if stage.name in first:
            yield (
                ("stages", index),
                f"{stage.name} is already listed at {render_path(('stages', first[stage.name]))}; "
                "each stage runs once, remove one",
            )
        first.setdefault(stage.name, index)
    for needing, needs in STAGE_NEEDS.items():
        for before, why in needs.items():
            yield from _needs_before(first, needing, before, why, required=True)
    yield from _needs_before(
        first,
        "stop-and-copy",
        "precopy",
        "after stop-and-copy the guest is paused and there is nothing left to pre-copy",
        required=False,
    )
    yield from _cleanup_last(stages, first)


def _needs_before(
    first: dict[str, int], stage: str, before: str, why: str, *, required: bool
) -> Iterator[Finding]:
    if stage not in first:
        return
    where = ("stages", first[stage])
    if before not in first:
        if required:
            yield where, f"{stage} needs {before} before it: {why}; add {before} earlier in stages"
    elif first[before] > first[stage]:
        yield where, f"{stage} must come after {before} (at {render_path(('stages', first[before]))}): {why}"


def _cleanup_last(stages: list[StageSpec], first: dict[str, int]) -> Iterator[Finding]:
    if "cleanup-source" not in first:
        return
    index = first["cleanup-source"]
    where = ("stages", index)
    if index != len(stages) - 1:
        yield where, "cleanup-source must be the last stage: it destroys the source guest; move it to the end"
