"""FHIR R4 validation of outgoing resources with ``fhir.resources.R4B``, listing every failing path.

ModMed speaks FHIR R4; ``fhir.resources`` has no R4 package, and R4B (4.3) keeps R4's clinical
resources, so writes are checked against the R4B models before they are sent. Two rules keep the check
useful and safe:

* ModMed's composite ids (``pay|7225``, ``CHG|12``) are outside FHIR's ``id`` pattern but are what
  ModMed issues: an ``id`` that fails only the pattern and is a valid ModMed id is not reported.
* Problems name the path and the rule, never the value: a resource being written is patient data.
  (pydantic's own ``str(ValidationError)`` echoes ``input_value=...``; it is not used.)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Any

from airflow_provider_modmed.client._flows import InvalidIdError, validate_id
from airflow_provider_modmed.errors import ConfigurationError, ValidationError

__all__ = ["resource_problems", "validate_resource"]

#: at most this many problems are listed in one error (the count of the rest is given)
MAX_LISTED = 20


@lru_cache(maxsize=64)
def _model(resource_type: str) -> Any:
    from fhir.resources.R4B import get_fhir_model_class

    try:
        return get_fhir_model_class(resource_type)
    except (KeyError, ValueError):
        return None


def _path(resource_type: str, loc: Sequence[Any]) -> str:
    out = resource_type
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part == "resource_type":
            out += ".resourceType"
        else:
            out += f".{part}"
    return out


def _is_modmed_id(error: Mapping[str, Any]) -> bool:
    """A pattern failure on an ``id`` holding one of ModMed's composite ids (``pay|7225``)."""
    loc: Sequence[Any] = error.get("loc") or ()
    value = error.get("input")
    if not (len(loc) > 0 and loc[-1] == "id" and error.get("type") == "string_pattern_mismatch"
            and isinstance(value, str) and "|" in value):
        return False
    try:
        validate_id(value)
    except InvalidIdError:
        return False
    return True


def _message(error: Mapping[str, Any]) -> str:
    msg = str(error.get("msg") or error.get("type") or "invalid")
    value = error.get("input")
    # a custom validator could quote the value: never let it through (it may be a name or a date of birth)
    if isinstance(value, (str, int, float)) and len(str(value)) >= 3 and str(value) in msg:
        msg = msg.replace(str(value), "<value>")
    return " ".join(msg.split())[:200]


def resource_problems(resource: Any, resource_type: str | None = None) -> list[str]:
    """Every R4B validation problem of ``resource`` as ``"Patient.name[0].family: <rule>"``; ``[]`` if valid.

    ``resource_type`` (optional) is the type the caller expects; a mismatch is a problem too.
    """
    if not isinstance(resource, Mapping):
        return [f"resource: must be a FHIR resource (a JSON object), got {type(resource).__name__}"]
    rt = resource.get("resourceType")
    if not isinstance(rt, str) or not rt:
        return ["resourceType: missing; every FHIR resource names its type"]
    if resource_type is not None and rt != resource_type:
        return [f"resourceType: expected {resource_type!r}, got {rt!r}"]
    model = _model(rt)
    if model is None:
        return [f"resourceType: {rt!r} is not a FHIR R4 resource type"]
    from pydantic import ValidationError as PydanticValidationError

    try:
        model.model_validate(dict(resource))
    except PydanticValidationError as exc:
        return [f"{_path(rt, e.get('loc') or ())}: {_message(e)}" for e in exc.errors()
                if not _is_modmed_id(e)]
    return []


def validate_resource(resource: Any, resource_type: str | None = None, *, what: str = "resource") -> None:
    """Raise :class:`~airflow_provider_modmed.errors.ValidationError` listing each failing path.

    The message holds paths and rules only (no values). ``what`` names the argument in the message.
    """
    if not isinstance(resource, Mapping):
        raise ConfigurationError(f"{what} must be a FHIR resource dict, got {type(resource).__name__}")
    problems = resource_problems(resource, resource_type)
    if not problems:
        return
    rt = resource.get("resourceType") or "resource"
    listed = problems[:MAX_LISTED]
    more = f"; and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
    raise ValidationError(
        f"{what} is not a valid FHIR R4 {rt} ({len(problems)} problem{'s' if len(problems) != 1 else ''}, "
        f"checked with fhir.resources.R4B; pass validate=False to skip): " + "; ".join(listed) + more
    )
