"""The pydantic models of the plan's sections (the document itself, ``Plan``, is in ``migration_plan.py``).

Types and single-field limits live here; rules that relate several fields live in ``rules.py`` so each can
say why it exists. Every field carries a description: it ends up in the JSON Schema that editors show.
Quantities are human strings parsed by ``units``; the models hold plain numbers (bytes, seconds, bytes/s).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Annotated, Any, Literal, get_args

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from confplan.plan import units
from confplan.sev.policy import encode_sev_policy, encode_snp_policy

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"

StageName = Literal[
    "launch-source",
    "provision-target",
    "attest-target",
    "start-incoming",
    "precopy",
    "stop-and-copy",
    "verify",
    "resume-target",
    "cleanup-source",
]
STAGE_NAMES: tuple[StageName, ...] = get_args(StageName)
# The earlier stages each stage reads the results of, and why: the stage classes declare these as their
# ``needs`` (one source), and ``validate`` refuses a plan that lists a stage without them before it.
STAGE_NEEDS: dict[str, dict[str, str]] = {
    "attest-target": {
        "launch-source": "the owner's transport key is made when the source is launched",
        "provision-target": "it attests the target's helper",
    },
    "start-incoming": {
        "attest-target": "the target must prove it runs the measured helper before it is given the transport "
        "key",
    },
    "precopy": {"start-incoming": "the rounds stream into the target's incoming side"},
    "stop-and-copy": {"start-incoming": "the final pages stream into the target's incoming side"},
    "verify": {"stop-and-copy": "it checks the copy the pause completed"},
    "resume-target": {"verify": "the target may resume only once both sides' memory digests match"},
    "cleanup-source": {"resume-target": "destroying the source before the target runs would lose the guest"},
}
Generation = Literal["sev", "sev-es", "sev-snp"]
HelperMode = Literal["aux-vcpu", "mirror-vm"]

# Tags of the policy union; the loader drops them from error locations (they are not YAML keys).
POLICY_RAW_TAG = "raw-policy"
POLICY_FLAGS_TAG = "flag-policy"
UNION_TAGS = frozenset({POLICY_RAW_TAG, POLICY_FLAGS_TAG})


def plan_error(kind: str, message: str) -> PydanticCustomError:
    """A pydantic error whose message is ``message`` verbatim (templates would eat its braces)."""
    return PydanticCustomError(kind, "{reason}", {"reason": message})


def _unit_parser(parse: Callable[[object], float | None], *, positive: bool = False) -> BeforeValidator:
    """Wrap a ``units`` parser so its ValueError becomes a clean pydantic error (no "Value error," prefix)."""

    def validate(value: object) -> object:
        try:
            parsed = parse(value)
        except ValueError as err:
            raise plan_error("unit", str(err)) from None
        if positive and parsed is not None and parsed <= 0:
            raise plan_error("unit", f"must be greater than zero, got {value!r}")
        return parsed

    return BeforeValidator(validate)


def _either(pattern: str, number: str) -> WithJsonSchema:
    as_number = {"type": number, "exclusiveMinimum": 0}  # bytes, seconds or bytes/s
    return WithJsonSchema({"anyOf": [as_number, {"type": "string", "pattern": pattern}]})


Size = Annotated[int, _unit_parser(units.parse_size, positive=True), _either(units.SIZE_PATTERN, "integer")]
Duration = Annotated[
    float, _unit_parser(units.parse_duration, positive=True), _either(units.DURATION_PATTERN, "number")
]
Rate = Annotated[
    float | None, _unit_parser(units.parse_rate, positive=True), _either(units.RATE_PATTERN, "number")
]
EventRate = Annotated[
    float,
    _unit_parser(units.parse_event_rate),
    WithJsonSchema(
        {"anyOf": [{"type": "number", "minimum": 0}, {"type": "string", "pattern": units.EVENT_RATE_PATTERN}]}
    ),
]


class StrictModel(BaseModel):
    """The base of the plan's models: frozen, no unknown keys, no coercion."""

    # strict: YAML "2" (a string) is not silently taken as the number 2.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class Metadata(StrictModel):
    """Who this plan is: a name for logs, checkpoints and the migration's AEAD plan id."""

    name: str = Field(
        "plan",
        pattern=NAME_PATTERN,
        description="Plan name: letters, digits, '.', '_' and '-', at most 63. Default: the file's name.",
    )
    description: str = Field("", description="Free text for people reading the plan.")


class Workload(StrictModel):
    """What runs inside the guest while it migrates."""

    kind: Literal["dirty-writer", "idle"] = Field(
        "dirty-writer",
        description="dirty-writer keeps writing pages (and checks them after migration); idle only halts.",
    )
    dirty_rate: Rate = Field(
        "16MiB/s",  # a unit string: validate_default parses it
        validate_default=True,
        description="How fast dirty-writer dirties memory, e.g. 64MiB/s, or 'unlimited' (as fast as it can).",
    )
    shared_fraction: float = Field(
        0.05, ge=0.0, le=1.0, description="Fraction of guest pages that are shared (unencrypted), 0 to 1."
    )
    conversion_rate: EventRate = Field(
        0.0,
        le=1_000_000,
        description=(
            "Pages dirty-writer converts between private and shared per second while it runs, through "
            "KVM_HC_MAP_GPA_RANGE as Linux does for bounce buffers, e.g. 200/s; 0: none after its fill."
        ),
    )
    seed: int = Field(
        1, ge=0, description="Seed of the workload's page-choice generator, for repeatable runs."
    )


class Guest(StrictModel):
    """The confidential guest to migrate."""

    memory: Size = Field(
        description="Guest RAM, e.g. 256MiB; a multiple of 2MiB (the guest maps 2MiB pages)."
    )
    vcpus: int = Field(1, ge=1, description="The guest's own vCPUs (aux vCPUs of the helper not counted).")
    timer_hz: int = Field(
        100,
        ge=0,
        le=1000,
        description=(
            "Ticks a second of the LAPIC timer each guest vCPU runs (a Linux kernel's HZ: 100, 250 or 1000); "
            "0: no timer."
        ),
    )
    workload: Workload = Field(default_factory=Workload, description="The workload the guest runs.")


BIG_GUEST = 1 << 30  # from this guest size on, the helper's default batch is BIG_GUEST_BATCH
BIG_GUEST_BATCH, SMALL_GUEST_BATCH = 1024, 256


class Helper(StrictModel):
    """The in-guest migration helper (MH) that seals and opens private pages."""

    mode: HelperMode = Field(
        "aux-vcpu",
        description=(
            "aux-vcpu: the MH runs on extra vCPUs of the guest itself; "
            "mirror-vm: on the vCPUs of a mirror VM sharing the guest's memory and encryption context."
        ),
    )
    aux_vcpus: int = Field(
        1,
        ge=0,
        description="MH vCPUs: aux vCPUs of the guest (aux-vcpu) or the mirror VM's vCPUs (mirror-vm).",
    )
    batch_pages: int | None = Field(
        None,
        ge=1,
        le=4096,
        description=(
            "Pages the MH seals or opens per mailbox request (1 to 4096). Default: "
            f"{BIG_GUEST_BATCH} for a guest of {BIG_GUEST >> 30} GiB or more (fewer, larger requests move it "
            f"faster), else {SMALL_GUEST_BATCH} (a smaller helper area in guest RAM)."
        ),
    )

    def batch_for(self, memory: int) -> int:
        """``batch_pages``, or its default for a guest of ``memory`` bytes. (Measured on 1 GiB: 1024 moved it
        in ~0.6 s where 256 took ~0.75 s; 2048 and 4096 were no faster. docs/migration.md, "Session 8".)"""
        if self.batch_pages is not None:
            return self.batch_pages
        return BIG_GUEST_BATCH if memory >= BIG_GUEST else SMALL_GUEST_BATCH

    @property
    def mh_vcpus(self) -> int:
        """The vCPUs the MH runs on: the guest's aux vCPUs, or the mirror VM's (at least one)."""
        return self.aux_vcpus if self.mode == "aux-vcpu" else max(1, self.aux_vcpus)


class PolicyFlags(StrictModel):
    """The policy as named flags; unset flags take the defaults of the guest's generation."""

    nodbg: bool | None = Field(None, description="SEV/SEV-ES: refuse debugging the guest. Default true.")
    noks: bool | None = Field(
        None, description="SEV/SEV-ES: refuse sharing keys with other guests. Default true."
    )
    es: bool | None = Field(
        None,
        description="SEV/SEV-ES: the guest needs SEV-ES. Default: true exactly when generation is sev-es.",
    )
    nosend: bool | None = Field(
        None,
        description="SEV/SEV-ES: forbid sending the guest elsewhere (migration is refused). Default false.",
    )
    domain: bool | None = Field(
        None, description="SEV/SEV-ES: send only within the same domain. Default false."
    )
    sev: bool | None = Field(
        None, description="SEV/SEV-ES: send only to SEV-capable platforms. Default false."
    )
    smt: bool | None = Field(None, description="SEV-SNP: SMT may be enabled on the host. Default true.")
    migrate_ma: bool | None = Field(
        None, description="SEV-SNP: a migration agent may be associated. Default false."
    )
    debug: bool | None = Field(None, description="SEV-SNP: debugging is allowed. Default false.")
    single_socket: bool | None = Field(None, description="SEV-SNP: run on one socket only. Default false.")
    api_major: int = Field(0, ge=0, le=255, description="Minimum firmware API major version (0 to 255).")
    api_minor: int = Field(0, ge=0, le=255, description="Minimum firmware API minor version (0 to 255).")

    def encode(self, generation: Generation) -> int:
        """The policy word for ``generation`` (the other family's flags are ignored; rules refuse them)."""
        if generation == "sev-snp":
            return encode_snp_policy(
                smt=_or(self.smt, True),
                migrate_ma=_or(self.migrate_ma, False),
                debug=_or(self.debug, False),
                single_socket=_or(self.single_socket, False),
                api_major=self.api_major,
                api_minor=self.api_minor,
            )
        return encode_sev_policy(
            nodbg=_or(self.nodbg, True),
            noks=_or(self.noks, True),
            es=_or(self.es, generation == "sev-es"),
            nosend=_or(self.nosend, False),
            domain=_or(self.domain, False),
            sev=_or(self.sev, False),
            api_major=self.api_major,
            api_minor=self.api_minor,
        )


SEV_ONLY_FLAGS = ("nodbg", "noks", "es", "nosend", "domain", "sev")
SNP_ONLY_FLAGS = ("smt", "migrate_ma", "debug", "single_socket")


def _or(value: bool | None, default: bool) -> bool:
    return default if value is None else value


def _policy_tag(value: object) -> str | None:
    if isinstance(value, PolicyFlags | dict):
        return POLICY_FLAGS_TAG
    if isinstance(value, int) and not isinstance(value, bool):
        return POLICY_RAW_TAG
    return None


Policy = Annotated[
    Annotated[int, Tag(POLICY_RAW_TAG), Field(ge=0, lt=1 << 64)]
    | Annotated[PolicyFlags, Tag(POLICY_FLAGS_TAG)],
    Discriminator(
        _policy_tag,
        custom_error_type="policy_type",
        custom_error_message="must be a raw integer (e.g. 0x3) or a mapping of named flags ({nodbg: true})",
    ),
]


class Sev(StrictModel):
    """The confidential-computing generation and the guest owner's policy."""

    generation: Generation = Field(
        "sev", description="sev, sev-es or sev-snp; the secure processor is emulated on hosts without one."
    )
    policy: Policy = Field(
        default_factory=PolicyFlags,
        description="Guest policy: a raw integer (the word the secure processor gets) or named flags.",
    )

    @property
    def policy_int(self) -> int:
        """The policy word handed to the (emulated) secure processor."""
        if isinstance(self.policy, PolicyFlags):
            return self.policy.encode(self.generation)
        return self.policy


_TCP = re.compile(
    r"^tcp://(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?):(?P<port>[0-9]{1,5})$"
)


class Endpoint(StrictModel):
    """Where one side of the migration runs."""

    host: str = Field(
        "local",
        description="'local' (a VMM child process on this machine) or tcp://HOST:PORT of a 'confplan agent'.",
    )
    fingerprint: str | None = Field(
        None,
        description=(
            "The agent's certificate fingerprint (sha256:..., printed by 'confplan agent' and 'confplan "
            "identity show' on its host): the orchestrator talks only to the agent that holds it. Without "
            "it, only agents enrolled with 'confplan trust add --agent' are trusted."
        ),
    )

    @field_validator("fingerprint")
    @classmethod
    def _check_fingerprint(cls, value: str | None) -> str | None:
        if value is None:
            return value
        from confplan.transport.identity import parse_fingerprint

        try:
            return parse_fingerprint(value)
        except ValueError as err:
            raise plan_error("endpoint", f"{err}; copy it from `confplan agent`'s first line") from None

    @model_validator(mode="after")
    def _fingerprint_needs_an_agent(self) -> Endpoint:
        if self.fingerprint is not None and self.is_local:
            raise plan_error(
                "endpoint", "a fingerprint pins a remote agent; a local endpoint has none: remove it"
            )
        return self

    @field_validator("host")
    @classmethod
    def _check_host(cls, value: str) -> str:
        if value == "local":
            return value
        match = _TCP.match(value)
        if match is None or not 1 <= int(match["port"]) <= 65535:
            raise plan_error(
                "endpoint",
                f"{value!r} is not an endpoint; write 'local' or tcp://HOST:PORT with a port from 1 to 65535 "
                "(e.g. tcp://10.0.0.2:4444)",
            )
        return value

    @property
    def is_local(self) -> bool:
        return self.host == "local"

    @property
    def address(self) -> tuple[str, int] | None:
        """(host, port) of a remote agent (IPv6 without brackets, host lower-cased); None when local."""
        match = _TCP.match(self.host)
        if match is None:
            return None
        return match["host"].strip("[]").lower(), int(match["port"])


class Limits(StrictModel):
    """How long and how fast the migration may go."""

    max_downtime: Duration = Field(
        "300ms",
        validate_default=True,
        description="Longest pause of the guest's vCPUs in stop-and-copy, e.g. 50ms.",
    )
    completion_timeout_per_gib: Duration = Field(
        "120s",
        validate_default=True,
        description="Time allowed for the whole migration per GiB of guest memory, e.g. 800s.",
    )
    bandwidth: Rate = Field(
        "unlimited",
        validate_default=True,
        description="Cap on the page stream, e.g. 64MiB/s or 1Gbit/s, or 'unlimited'.",
    )
    progress_timeout: Duration = Field(
        "30s",
        validate_default=True,
        description=(
            "A page stream that makes no progress (nothing acknowledged) this long fails; the source "
            "guest keeps running (like KubeVirt's progressTimeout)."
        ),
    )
    handover_grace: Duration = Field(
        "1s",
        validate_default=True,
        description=(
            "How long past max_downtime the source waits for the target's verdict before it takes the "
            "guest back (docs/handover.md): the pause never lasts longer than max_downtime plus this."
        ),
    )
    max_precopy_rounds: int = Field(
        30, ge=1, description="Most precopy rounds; never exceeded (then on_timeout decides)."
    )
    on_timeout: Literal["abort", "throttle", "force-complete"] = Field(
        "abort",
        description=(
            "When what is left will not fit max_downtime before the rounds or the completion timeout run "
            "out: abort (the source keeps running, non-zero exit), throttle (slow the guest until it fits, "
            "else abort), or force-complete (accept the longer pause; the report says so)."
        ),
    )


class StageParams(StrictModel):
    """The parameters of a stage that takes none."""


class ProvisionTargetParams(StageParams):
    """provision-target's parameters."""

    firmware: str | None = Field(
        None,
        description="A folder holding another firmware build for the target; attest-target then decides "
        "whether it may have the key.",
    )
    prefault: bool = Field(
        True,
        description="Allocate all of the target's guest RAM before the migration starts, so the stream does "
        "not pay for it page by page and a host short of memory fails here, not halfway.",
    )


class StartIncomingParams(StageParams):
    """start-incoming's parameters."""

    listen_port: int = Field(
        0, ge=0, le=65535, description="TCP port the target listens on for the page stream (0: any free one)."
    )
    connect_to: str | None = Field(
        None, description="HOST:PORT the source dials instead of the target's own address (e.g. a relay)."
    )
    channels: int = Field(
        1, ge=1, le=64,
        description=(
            "TCP connections of the page stream (wire v4 parallel streams, like QEMU's multifd channels): "
            "at most one per helper vCPU (helper.aux_vcpus); each carries its own helpers' sealed pages."
        ),
    )  # fmt: skip

    @field_validator("connect_to")
    @classmethod
    def _host_port(cls, value: str | None) -> str | None:
        host, _, port = (value or "").rpartition(":")
        if value is not None and not (host and port.isdigit() and 0 < int(port) < 65536):
            raise PydanticCustomError(
                "host_port", "must be HOST:PORT with a port 1..65535, e.g. relay.example:4444, got '{value}'",
                {"value": value},
            )
        return value


class PrecopyParams(StageParams):
    """precopy's parameters."""

    max_rounds: int | None = Field(None, ge=1, description="Overrides limits.max_precopy_rounds.")


class StopAndCopyParams(StageParams):
    """stop-and-copy's parameters."""

    pause_in_cpl0: int = Field(
        0,
        ge=0,
        le=100_000,
        description=(
            "A test of the CPL0 area's migration: pause the guest up to this many times, back to back, "
            "until one of its vCPUs stops in a CPL0 service (its timer interrupt handler); 0: pause once."
        ),
    )


STAGE_PARAMS: dict[str, type[StageParams]] = {
    "provision-target": ProvisionTargetParams,
    "start-incoming": StartIncomingParams,
    "precopy": PrecopyParams,
    "stop-and-copy": StopAndCopyParams,
}


def stage_params_model(name: str) -> type[StageParams]:
    """The parameter model of stage ``name`` (``StageParams``, no parameters, for most)."""
    return STAGE_PARAMS.get(name, StageParams)


class StageSpec(StrictModel):
    """One stage of the plan: its name and optional parameters for it."""

    name: StageName = Field(description="The stage to run.")
    params: dict[str, Any] = Field(default_factory=dict, description="Parameters handed to the stage.")

    @model_validator(mode="before")
    @classmethod
    def _from_yaml(cls, data: Any) -> Any:
        # YAML form: "precopy" or {precopy: {max_rounds: 5}}; {name:, params:} is the model's own form.
        if isinstance(data, str):
            return {"name": data}
        model_form = isinstance(data, dict) and "name" in data and set(data) <= {"name", "params"}
        if isinstance(data, StageSpec) or model_form:
            return data
        if not isinstance(data, dict) or len(data) != 1:
            raise plan_error(
                "stage_form", "a stage is a name or a one-key mapping: {precopy: {max_rounds: 5}}"
            )
        ((name, params),) = data.items()
        if params is not None and not isinstance(params, dict):
            shown = name if str(name).isprintable() else repr(name)  # a line break in a name stays escaped
            example = f"{{{shown}: {{key: value}}}}"
            raise plan_error(
                "stage_form", f"the parameters of stage {name!r} must be a mapping, e.g. {example}"
            )
        return {"name": name, "params": params or {}}

    @field_validator("params")
    @classmethod
    def _params_of_stage(cls, params: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        # Each stage declares its parameters (STAGE_PARAMS): a misspelt or mistyped one is an error at its
        # own line, not a silent default. The stage reads them back through the same model.
        name = info.data.get("name")
        if name is not None:
            stage_params_model(name).model_validate(params)
        return params


_STAGE_SCHEMA = {
    "anyOf": [
        {"type": "string", "enum": list(STAGE_NAMES)},
        {
            "type": "object",
            "properties": {
                name: {
                    "description": f"{name}'s parameters"
                    if name in STAGE_PARAMS else f"{name} takes no parameters (null or {{}})",
                    "anyOf": [stage_params_model(name).model_json_schema(), {"type": "null"}],
                }
                for name in STAGE_NAMES
            },
            "additionalProperties": False,
            "minProperties": 1,
            "maxProperties": 1,
        },
    ]
}
Stage = Annotated[StageSpec, WithJsonSchema(_STAGE_SCHEMA)]
