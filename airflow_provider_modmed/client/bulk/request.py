"""What to export: :class:`ExportRequest` (level, ``_type``, ``_since``, ``_typeFilter``, patients), its
wire form (the kick-off request, sent once) and its checks, all made before any request exists."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import httpx

from airflow_provider_modmed.capabilities import EXPORT_LEVELS, Interaction
from airflow_provider_modmed.client._flows import FhirContext, validate_id
from airflow_provider_modmed.client.instants import normalize_since
from airflow_provider_modmed.client.retry import NO_RESEND, WHAT
from airflow_provider_modmed.errors import ConfigurationError

#: the NDJSON media type of bulk files (and the default ``_outputFormat``)
NDJSON = "application/fhir+ndjson"
#: ``_outputFormat`` values every Bulk Data v2 server must accept (all mean FHIR NDJSON)
OUTPUT_FORMATS = ("application/fhir+ndjson", "application/ndjson", "ndjson")

#: a FHIR resource type name
TYPE_RE = re.compile(r"^[A-Z][A-Za-z0-9]{0,63}$")


# -- the kick-off request ------------------------------------------------------------------------

def _type_names(value: Any, field_name: str) -> tuple[str, ...]:
    if value is None or value == "":
        return ()
    items = value.split(",") if isinstance(value, str) else list(value)
    names: list[str] = []
    for raw in items:
        name = str(raw).strip()
        if not name:
            continue
        if not TYPE_RE.match(name):
            raise ConfigurationError(f"{field_name}: {name[:80]!r} is not a FHIR resource type name")
        if name not in names:
            names.append(name)
    return tuple(names)


@dataclass(frozen=True)
class ExportRequest:
    """What to export: level (``system``, ``Patient``, ``Group`` with ``group_id``; ``"Group/<id>"`` is
    accepted as level), ``_type``, ``_since``, ``_typeFilter``, ``_outputFormat`` and, for Patient and Group
    levels, ``patient`` references (the only reason to POST). ``lenient`` adds ``handling=lenient``."""

    level: str = "system"
    group_id: str | None = None
    types: tuple[str, ...] = ()
    since: str | None = None
    type_filters: tuple[str, ...] = ()
    output_format: str = NDJSON
    patients: tuple[str, ...] = ()
    lenient: bool = False

    def __post_init__(self) -> None:
        level, group_id = str(self.level or "system").strip(), self.group_id
        if level.startswith("Group/"):
            level, group_id = "Group", level.split("/", 1)[1]
        if level.lower() == "system":
            level = "system"
        if level not in EXPORT_LEVELS:
            raise ConfigurationError(f"export level must be one of system, Patient, Group/<id>; got {self.level!r}")
        if level == "Group":
            group_id = validate_id(group_id, "group_id")
        elif group_id:
            raise ConfigurationError(f"group_id is only for the Group level, not {level!r}")
        object.__setattr__(self, "level", level)
        object.__setattr__(self, "group_id", group_id if level == "Group" else None)
        object.__setattr__(self, "types", _type_names(self.types, "_type"))
        object.__setattr__(self, "since", normalize_since(self.since))
        filters = (self.type_filters,) if isinstance(self.type_filters, str) else tuple(self.type_filters or ())
        for tf in filters:
            head = str(tf).split("?", 1)
            if len(head) != 2 or not TYPE_RE.match(head[0]) or not head[1]:
                raise ConfigurationError(f"_typeFilter must look like 'Type?search=params', got {str(tf)[:80]!r}")
            if self.types and head[0] not in self.types:
                raise ConfigurationError(f"_typeFilter names {head[0]!r}, which is not in _type")
        object.__setattr__(self, "type_filters", tuple(str(tf) for tf in filters))
        fmt = (self.output_format or NDJSON).strip()
        if fmt not in OUTPUT_FORMATS:
            raise ConfigurationError(f"_outputFormat must be one of {', '.join(OUTPUT_FORMATS)}; got {fmt!r}")
        object.__setattr__(self, "output_format", fmt)
        patients = (self.patients,) if isinstance(self.patients, str) else tuple(self.patients or ())
        patients = tuple(validate_id(str(p).removeprefix("Patient/"), "patients") for p in patients)
        if patients and level == "system":
            raise ConfigurationError("the patient parameter is for the Patient and Group levels only")
        object.__setattr__(self, "patients", patients)
        object.__setattr__(self, "lenient", bool(self.lenient))

    # -- wire form --------------------------------------------------------------------------------
    @property
    def method(self) -> str:
        """GET works everywhere; POST only when a parameter needs it (``patient``)."""
        return "POST" if self.patients else "GET"

    def path(self) -> str:
        if self.level == "system":
            return "$export"
        if self.level == "Patient":
            return "Patient/$export"
        return f"Group/{validate_id(self.group_id, 'group_id')}/$export"

    def params(self) -> list[tuple[str, str | int | float | bool | None]]:
        """Kick-off parameters as (name, value); httpx percent-encodes them (``+`` -> ``%2B``)."""
        pairs: list[tuple[str, str | int | float | bool | None]] = [("_outputFormat", self.output_format)]
        if self.since:
            pairs.append(("_since", self.since))
        if self.types:
            pairs.append(("_type", ",".join(self.types)))  # one comma-joined value (some servers want it)
        pairs.extend(("_typeFilter", tf) for tf in self.type_filters)
        return pairs

    def headers(self) -> dict[str, str]:
        prefer = "respond-async, handling=lenient" if self.lenient else "respond-async"
        return {"Accept": "application/fhir+json", "Prefer": prefer}

    def build(self, base: str) -> httpx.Request:
        """The kick-off ``httpx.Request`` against the FHIR ``base`` (sent once: :data:`NO_RESEND`)."""
        url = f"{base.rstrip('/')}/{self.path()}"
        extensions = {WHAT: f"bulk export kick-off ({self.level} level)", NO_RESEND: True}
        if self.method == "GET":
            return httpx.Request("GET", url, params=self.params(), headers=self.headers(), extensions=extensions)
        parameter: list[dict[str, Any]] = []
        for name, value in self.params():
            parameter.append({"name": name, "valueInstant" if name == "_since" else "valueString": value})
        parameter.extend({"name": "patient", "valueReference": {"reference": f"Patient/{p}"}}
                         for p in self.patients)
        body = {"resourceType": "Parameters", "parameter": parameter}
        return httpx.Request("POST", url, headers={**self.headers(), "Content-Type": "application/fhir+json"},
                             content=json.dumps(body, separators=(",", ":")).encode(), extensions=extensions)

    def preflight(self, ctx: FhirContext) -> None:
        """The capability pre-flight: export is certified-track only; every ``_type`` must be known.
        Raises :class:`~airflow_provider_modmed.errors.CapabilityError` before any request exists."""
        for resource_type in self.types or ("Group" if self.level == "Group" else "Patient",):
            ctx.capabilities.check(ctx.track, resource_type, Interaction.EXPORT)

    def describe(self) -> str:
        """For logs: level and types, never ids of patients or filter values."""
        what = f"{self.level}-level" if self.level != "Group" else f"Group/{self.group_id}"
        types = ",".join(self.types) if self.types else "all types"
        since = f" since {self.since}" if self.since else ""
        return f"{what} $export of {types}{since}"

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for key in ("types", "type_filters", "patients"):
            out[key] = list(out[key])
        return out

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> ExportRequest:
        known = {f for f in cls.__dataclass_fields__}
        values: dict[str, Any] = {k: (tuple(v) if isinstance(v, list) else v) for k, v in raw.items() if k in known}
        return cls(**values)
