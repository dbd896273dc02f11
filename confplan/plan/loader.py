"""Load a plan file: YAML with positions, pydantic types, then the rules; every problem reported at once.

Pydantic reports errors by ``loc`` (a tuple of keys and indexes in *its* view of the data); we map each loc
back to the YAML data path, find that node's line:column, and reword the message for plan authors.
"""

from __future__ import annotations

import difflib
import functools
import os
import re
from pathlib import Path
from typing import Annotated, Any, Union, get_args, get_origin

from pydantic import BaseModel, TypeAdapter, ValidationError
from pydantic_core import ErrorDetails

from confplan.plan.diagnostics import Diagnostic, PlanError
from confplan.plan.migration_plan import Plan
from confplan.plan.models import UNION_TAGS, stage_params_model
from confplan.plan.rules import check_sections
from confplan.plan.yamlsrc import DataPath, SourceMap, describe, read_yaml, render_path

MAX_PLAN_BYTES = 1 << 20  # a plan is a page of YAML; far more is a mistake or an attack on the parser


def load_plan(path: str | Path) -> Plan:
    """Read and check the plan at ``path``; raises ``PlanError`` listing every problem. A file over
    ``MAX_PLAN_BYTES`` is refused before it is parsed (by its size, then by a read that stops there)."""
    name = str(path)
    try:
        raw = _read_bounded(Path(path))
    except OSError as err:
        raise PlanError(
            name, [Diagnostic(name, 1, 1, "", f"cannot read the plan: {err.strerror or err}")]
        ) from None
    if raw is None:
        limit = MAX_PLAN_BYTES >> 20
        raise PlanError(name, [Diagnostic(name, 1, 1, "", f"the plan is larger than {limit} MiB, the most a "
                                          "plan may be; nothing was parsed (is this the right file?)")])
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise PlanError(name, [Diagnostic(name, line, 1, "", "the plan is not UTF-8 text")]) from None
    return load_plan_text(text, name)


def _read_bounded(path: Path) -> bytes | None:
    """The file's bytes, or None when it holds more than ``MAX_PLAN_BYTES`` (a pipe or a file that grows
    is read no further than that)."""
    with path.open("rb") as file:
        if path.is_file() and os.fstat(file.fileno()).st_size > MAX_PLAN_BYTES:
            return None
        raw = file.read(MAX_PLAN_BYTES + 1)
    return None if len(raw) > MAX_PLAN_BYTES else raw


def load_plan_text(text: str, filename: str = "<plan>") -> Plan:
    """Check plan ``text``; ``filename`` is used in messages and anchors a relative checkpoint.dir."""
    document = read_yaml(text, filename)
    if document.data is None:
        raise PlanError(filename, document.problems)
    context = {"base_dir": Path(filename).parent.absolute(), "file_stem": Path(filename).stem}
    plan, diagnostics = _validate(document.data, document.source, filename, context)
    # A value the YAML layer already refused (an unknown tag, say) is null to pydantic: say it once.
    refused = {render_path(path) for path in document.refused}
    diagnostics = [*document.problems, *(d for d in diagnostics if d.field not in refused)]
    if diagnostics or plan is None:
        raise PlanError(filename, diagnostics)
    return plan


def _validate(
    data: dict[str, Any], source: SourceMap, file: str, context: dict[str, Any]
) -> tuple[Plan | None, list[Diagnostic]]:
    try:
        plan = Plan.model_validate(data, context=context)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        diagnostics = [_from_pydantic(error, data, source, file) for error in errors]
        sections = _valid_sections(data, errors, context)
        return None, diagnostics + _rule_diagnostics(sections, source, file)
    sections = {name: getattr(plan, name) for name in Plan.model_fields}
    return plan, _rule_diagnostics(sections, source, file)


def _rule_diagnostics(sections: dict[str, Any], source: SourceMap, file: str) -> list[Diagnostic]:
    diagnostics = []
    for path, message in check_sections(sections):
        line, column = source.locate(path)
        diagnostics.append(Diagnostic(file, line, column, render_path(path), message))
    return diagnostics


def _valid_sections(
    data: dict[str, Any], errors: list[ErrorDetails], context: dict[str, Any]
) -> dict[str, Any]:
    """The sections (by field name) that validate on their own, so rules can still run on them.

    In a broken section the keys that failed are left out (their defaults stand in), so a rule on the
    section's other keys still runs: a bad vcpus does not hide a bad memory size.
    """
    bad_keys: dict[str | int, set[str | int]] = {}
    for error in errors:
        loc = error["loc"]
        if loc:
            bad_keys.setdefault(loc[0], set()).update(loc[1:2] if error["type"] != "missing" else ())
    sections: dict[str, Any] = {}
    for name, info in Plan.model_fields.items():
        key = info.alias or name
        if key not in data:
            if not info.is_required():
                sections[name] = info.get_default(call_default_factory=True)
            continue
        value = data[key]
        if key in bad_keys:
            if not isinstance(value, dict) or not bad_keys[key]:
                continue
            value = {k: v for k, v in value.items() if k not in bad_keys[key]}
        try:
            sections[name] = _adapter(name).validate_python(value, context=context)
        except (
            ValidationError
        ):  # still broken without the bad keys, or only the Plan field's own limits failed
            continue
    return sections


@functools.cache
def _adapter(field: str) -> TypeAdapter[Any]:
    annotation: Any = Plan.model_fields[field].annotation
    return TypeAdapter(annotation)


def _from_pydantic(error: ErrorDetails, data: dict[str, Any], source: SourceMap, file: str) -> Diagnostic:
    path = _data_path(error["loc"], data)
    is_key = error["type"] == "extra_forbidden"
    if error["type"] == "missing":
        line, column = source.locate(path[:-1], key=True)
    else:
        line, column = source.locate(path, key=is_key)
    return Diagnostic(file, line, column, render_path(path), _message(error, path))


def _data_path(loc: tuple[str | int, ...], data: Any) -> DataPath:
    """Pydantic's loc -> the path in the YAML (union tags dropped; a stage's name/params seen as written)."""
    path: list[str | int] = []
    for part in loc:
        if part in UNION_TAGS:
            continue
        if len(path) == 2 and path[0] == "stages" and part in ("name", "params"):
            written = _at(data, path)
            if not (isinstance(written, dict) and "name" in written):
                # written as "precopy" or {precopy: {...}}: point at the stage, or at its parameters
                if part == "params" and isinstance(written, dict) and len(written) == 1:
                    path.append(next(iter(written)))
                continue
        path.append(part)
    return tuple(path)


def _at(data: Any, path: list[str | int]) -> Any:
    for part in path:
        in_list = isinstance(data, list) and isinstance(part, int) and 0 <= part < len(data)
        if in_list or (isinstance(data, dict) and part in data):
            data = data[part]
        else:
            return None
    return data


_SIMPLE = {
    "int_type": "must be an integer",
    "int_parsing": "must be an integer",
    "int_from_float": "must be a whole number",
    "float_type": "must be a number",
    "float_parsing": "must be a number",
    "bool_type": "must be true or false",
    "bool_parsing": "must be true or false",
    "string_type": "must be a string",
    "model_type": "must be a mapping",
    "model_attributes_type": "must be a mapping",
    "dict_type": "must be a mapping",
    "list_type": "must be a list",
    "path_type": "must be a path (a string)",
    "none_required": "must be null",
}


def _message(error: ErrorDetails, path: DataPath) -> str:
    kind, ctx, value = error["type"], error.get("ctx", {}), error.get("input")
    if kind in _SIMPLE:
        return f"{_SIMPLE[kind]}, got {describe(value)}"
    if kind == "missing":
        return "is required"
    if kind == "extra_forbidden":
        return _unknown_key(path)
    if kind == "literal_error":
        choices = re.findall(r"'([^']*)'", str(ctx.get("expected", "")))
        return f"must be one of {', '.join(choices)}, got {describe(value)}" + _did_you_mean(value, choices)
    bounds = {
        "greater_than_equal": ("at least", "ge"),
        "less_than_equal": ("at most", "le"),
        "greater_than": ("greater than", "gt"),
        "less_than": ("less than", "lt"),
    }
    if kind in bounds:
        words, key = bounds[kind]
        return f"must be {words} {ctx.get(key)}, got {describe(value)}"
    if kind == "too_short":
        minimum = ctx.get("min_length")
        return "must not be empty" if minimum == 1 else f"must have at least {minimum} items"
    if kind == "string_pattern_mismatch":
        return f"{describe(value)} does not match the pattern {ctx.get('pattern')}"
    message = error["msg"]
    return message[:1].lower() + message[1:]


def _unknown_key(path: DataPath) -> str:
    key = str(path[-1])
    allowed = _keys_at(path[:-1])
    if not allowed and len(path) == 4 and path[0] == "stages":
        return f"unknown key {key!r}: stage {path[2]} takes no parameters"
    hint = _did_you_mean(key, allowed)
    if hint or not allowed:
        return f"unknown key {key!r}{hint}"
    return f"unknown key {key!r}; expected one of {', '.join(allowed)}"


def _did_you_mean(value: object, choices: list[str]) -> str:
    if not isinstance(value, str):
        return ""
    match = difflib.get_close_matches(value, choices, n=1, cutoff=0.6)
    if not match and value:  # a cut-short name: "launch" for "launch-source"
        match = [choice for choice in choices if choice.startswith(value)]
    return f"; did you mean {match[0]!r}?" if len(match) == 1 else ""


def _keys_at(path: DataPath) -> list[str]:
    """The keys the model at ``path`` accepts (empty when ``path`` is not a model)."""
    if len(path) == 3 and path[0] == "stages" and isinstance(path[2], str):  # {precopy: {...}}: its params
        return list(stage_params_model(path[2]).model_fields)
    annotation: Any = Plan
    for part in path:
        model = _model_of(annotation)
        if isinstance(part, int):
            annotation = _list_item(annotation)
        elif model is not None:
            fields = {info.alias or name: info.annotation for name, info in model.model_fields.items()}
            annotation = fields.get(part)
        else:
            return []
    model = _model_of(annotation)
    return [info.alias or name for name, info in model.model_fields.items()] if model else []


def _unwrap(annotation: Any) -> Any:
    while get_origin(annotation) is Annotated:
        annotation = get_args(annotation)[0]
    return annotation


def _model_of(annotation: Any) -> type[BaseModel] | None:
    annotation = _unwrap(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if get_origin(annotation) is Union or type(annotation).__name__ == "UnionType":
        for member in get_args(annotation):
            model = _model_of(member)
            if model is not None:
                return model
    return None


def _list_item(annotation: Any) -> Any:
    annotation = _unwrap(annotation)
    return get_args(annotation)[0] if get_origin(annotation) is list else None
