"""Bulk Data Access IG v2 (``$export``) client: kick-off, status polling, manifest, streaming download,
cancel and resume. Airflow-free; follows ``/work/shared/reference/bulk-data-and-smart.md``.

Written like :mod:`._flows`: the decisions (what to request, how long to wait, which answer is transient,
what to download, how to verify and record it) are generators that yield steps and never do I/O. Thin
faces run them:

* ``httpx.Request``: sent by the FHIR client (rate budget, auth, retries). A request carrying
  :data:`NO_RESEND` (the kick-off) is sent exactly once: a 5xx or a timeout may mean a job started.
* :class:`~._flows.Sleep`: wait.
* :class:`Fetch`: stream one file's body into its :class:`NdjsonSink` (the only byte-level I/O).
* :class:`Parallel`: run several file flows with bounded concurrency; answers their results (or errors).

:class:`BulkExportClient` (threads) and :class:`AsyncBulkExportClient` (anyio) are the two faces.
Errors the faces raise while sending (:class:`ModMedError`) are thrown into the flow, which may handle them.

Resume: an :class:`ExportRun` keeps the job's state beside its files, in the run folder::

    {run}/_state/export.json          request, status URL (saved before anything else), stage,
                                      transactionTime, restarts, final summary (never tokens)
    {run}/_state/files/<file>.json    one checkpoint per stored+verified file (sha256, bytes, lines)
    {run}/manifest.json               the manifest, file URLs without their (signed) query strings
    {run}/output/<Type>.0001.ndjson   resources; error/OperationOutcome.*.ndjson; deleted/Bundle.*.ndjson
    {run}/SHA256SUMS                  ``sha256sum -c`` compatible, written when every file is stored

A retried run resumes the saved status URL instead of kicking off again, and skips every file whose
checkpoint, size and source still match. Files are written to ``<name>.part`` and renamed when complete
and verified, so a killed run never leaves a half file under a final name: no line lost or repeated.
"""

from __future__ import annotations

import codecs
import contextlib
import functools
import hashlib
import itertools
import json
import logging
import re
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Literal, TypeVar

import anyio
import httpx

from airflow_provider_modmed.capabilities import EXPORT_LEVELS, Interaction
from airflow_provider_modmed.client._flows import FhirContext, Sleep, json_body, validate_id
from airflow_provider_modmed.client.auth import NO_CREDENTIALS
from airflow_provider_modmed.client.config import is_loopback, origin
from airflow_provider_modmed.client.retry import WHAT, retry_after_seconds
from airflow_provider_modmed.errors import (
    ConfigurationError,
    ModMedError,
    NotFoundError,
    RateLimitedError,
    ServerError,
    TransportError,
    error_for_status,
    issues_from_body,
)

try:  # a hard dependency of Airflow (task SDK); the client works without it, only slower
    import msgspec
except ImportError:  # pragma: no cover
    msgspec = None  # type: ignore[assignment]

log = logging.getLogger("airflow_provider_modmed.client.bulk")

T = TypeVar("T")

#: the NDJSON media type of bulk files (and the default ``_outputFormat``)
NDJSON = "application/fhir+ndjson"
#: ``_outputFormat`` values every Bulk Data v2 server must accept (all mean FHIR NDJSON)
OUTPUT_FORMATS = ("application/fhir+ndjson", "application/ndjson", "ndjson")
#: poll-failure ``issue.code`` values that mean "keep polling" (IG v2, status request)
TRANSIENT_ISSUE_CODES = frozenset({"transient", "lock-error", "no-store", "exception", "timeout",
                                   "incomplete", "throttled"})
#: answers without an OperationOutcome that are worth polling again
TRANSIENT_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
#: request extension: send once; never resend automatically (the kick-off is not idempotent)
NO_RESEND = "modmed.bulk.no_resend"
#: manifest sections, in the order files are stored and listed
SECTIONS = ("output", "deleted", "error")
#: error-file severities that count as fatal for the error policy
FATAL_SEVERITIES = frozenset({"fatal", "error"})
#: error policies for the manifest's ``error`` files
ERROR_POLICIES = ("fail", "warn", "ignore")

STATE_FILE = "_state/export.json"
CHECKPOINTS = "_state/files"
MANIFEST_FILE = "manifest.json"
SUMS_FILE = "SHA256SUMS"
STATE_VERSION = 1

_TYPE_RE = re.compile(r"^[A-Z][A-Za-z0-9]{0,63}$")
_INSTANT_RE = re.compile(
    r"^(\d{4})-(\d{2})-(\d{2})[T ](\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?(Z|[+-]\d{2}:?\d{2})$"
)
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]+")


# -- errors --------------------------------------------------------------------------------------

class ExportFailedError(ModMedError):
    """The server reports the export job failed (a non-transient status answer)."""


class ExportGoneError(NotFoundError):
    """The status URL answers 404/410: the job expired, was cancelled, or is unknown. Only now may a
    client kick off again."""


class DownloadError(ModMedError):
    """A bulk file could not be downloaded or verified (after its retries)."""


class VerificationError(DownloadError):
    """A bulk file's content is not what the manifest promised (not JSON, wrong type, wrong count)."""


class ExportErrorsReported(ModMedError):
    """The export's ``error`` files hold fatal/error issues and the error policy is ``fail``."""


# -- instants ------------------------------------------------------------------------------------

def parse_instant(text: str) -> datetime:
    """A FHIR instant (zone required; ``Z``, offsets with or without a colon, fractions) -> aware datetime."""
    m = _INSTANT_RE.match(text.strip())
    if m is None:
        raise ConfigurationError(f"not a FHIR instant with a time zone (e.g. 2024-01-01T00:00:00Z): {text!r}")
    year, month, day, hour, minute, second, fraction, zone = m.groups()
    if zone == "Z":
        tz = timezone.utc
    else:
        sign = 1 if zone[0] == "+" else -1
        digits = zone[1:].replace(":", "")
        tz = timezone(sign * timedelta(hours=int(digits[:2]), minutes=int(digits[2:])))
    try:
        return datetime(int(year), int(month), int(day), int(hour), int(minute), int(second),
                        int((fraction or "0").ljust(6, "0")[:6]), tzinfo=tz)
    except ValueError as exc:
        raise ConfigurationError(f"not a valid instant: {text!r} ({exc})") from None


def normalize_since(value: Any, now: datetime | None = None) -> str | None:
    """The ``_since`` to send: None for no value, else a FHIR instant string (kept exactly as given,
    so a manifest's ``transactionTime`` round-trips; a space before the time becomes ``T``).

    Refuses values without a zone and values in the future (a server would silently miss changes).
    """
    if value is None or (isinstance(value, str) and value.strip() in ("", "None")):
        return None
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise ConfigurationError("_since must carry a time zone; got a naive datetime")
        when = value
        text = value.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")
    elif isinstance(value, str):
        text = value.strip()
        when = parse_instant(text)
        if text[10] == " ":
            text = f"{text[:10]}T{text[11:]}"
    else:
        raise ConfigurationError(f"_since must be a string or an aware datetime, got {type(value).__name__}")
    if when > (now or datetime.now(timezone.utc)) + timedelta(seconds=1):
        raise ConfigurationError(f"_since {text!r} is in the future: the export would miss every change")
    return text


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
        if not _TYPE_RE.match(name):
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
            if len(head) != 2 or not _TYPE_RE.match(head[0]) or not head[1]:
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


# -- the manifest --------------------------------------------------------------------------------

def strip_query(url: str) -> str:
    """``url`` without its query and fragment: presigned signatures are credentials, never stored or logged."""
    return url.split("#", 1)[0].split("?", 1)[0]


@dataclass(frozen=True)
class ManifestItem:
    """One file of the manifest: ``section`` (output/error/deleted), resource ``type``, ``url``, optional
    ``count``, and ``name``: where it is stored under the run folder (``output/Patient.0001.ndjson``)."""

    section: str
    type: str
    url: str
    count: int | None
    name: str
    #: the URL without its query (the file's identity across manifest refreshes); derived
    source: str = field(default="", compare=False)
    #: the checkpoint's path under the run folder; derived
    checkpoint: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "source", strip_query(self.url))
        object.__setattr__(self, "checkpoint", f"{CHECKPOINTS}/{self.name.replace('/', '.')}.json")


@dataclass(frozen=True)
class Manifest:
    """The completion manifest, read leniently: unknown keys ignored, ``count``/``deleted``/``error``
    optional, relative URLs resolved against the status URL."""

    transaction_time: str | None
    request: str | None
    requires_access_token: bool
    output: tuple[ManifestItem, ...]
    error: tuple[ManifestItem, ...] = ()
    deleted: tuple[ManifestItem, ...] = ()
    expires: str | None = None

    @property
    def items(self) -> tuple[ManifestItem, ...]:
        return (*self.output, *self.deleted, *self.error)

    @classmethod
    def parse(cls, body: Any, *, base: str | None = None, expires: str | None = None) -> Manifest:
        if not isinstance(body, Mapping):
            raise ModMedError("the bulk export status answered 200 without a JSON manifest")
        transaction_time = body.get("transactionTime")
        if not isinstance(transaction_time, str) or not transaction_time:
            log.warning("modmed: the bulk manifest has no transactionTime; incremental exports cannot chain")
            transaction_time = None
        requires = body.get("requiresAccessToken")
        if not isinstance(requires, bool):
            log.warning("modmed: the bulk manifest has no boolean requiresAccessToken; assuming true (the "
                        "token still goes only to the FHIR server's own origin)")
            requires = True
        sections: dict[str, tuple[ManifestItem, ...]] = {}
        for section in SECTIONS:
            raw = body.get(section)
            if raw is None:
                sections[section] = ()
                continue
            if not isinstance(raw, list):
                raise ModMedError(f"the bulk manifest's {section!r} is not a list")
            sections[section] = tuple(_items(section, raw, base))
        request = body.get("request")
        return cls(transaction_time, request if isinstance(request, str) else None, requires,
                   sections["output"], sections["error"], sections["deleted"], expires)

    def to_dict(self) -> dict[str, Any]:
        """The manifest as stored in ``manifest.json``: URLs without their query strings."""
        def entries(items: Iterable[ManifestItem]) -> list[dict[str, Any]]:
            return [{"type": i.type, "url": i.source, **({"count": i.count} if i.count is not None else {}),
                     "file": i.name} for i in items]

        return {"transactionTime": self.transaction_time,
                "request": strip_query(self.request) if self.request else None,
                "requiresAccessToken": self.requires_access_token, "expires": self.expires,
                "output": entries(self.output), "deleted": entries(self.deleted), "error": entries(self.error)}


def _check_file_url(section: str, url: str) -> None:
    """Bulk files carry patient data: https only (plain http only on loopback, e.g. the sandbox)."""
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL:
        raise ModMedError(f"the bulk manifest has a {section!r} entry whose url is not a URL") from None
    if parsed.scheme == "https" or (parsed.scheme == "http" and is_loopback(parsed.host)):
        return
    raise ModMedError(f"refusing a bulk {section} file over {parsed.scheme or 'no scheme'}:// from {parsed.host!r}: "
                      "bulk file URLs must be https:// (http:// only on loopback)")


def _items(section: str, raw: Sequence[Any], base: str | None) -> Iterator[ManifestItem]:
    per_type: Counter[str] = Counter()
    default_type = {"error": "OperationOutcome", "deleted": "Bundle"}.get(section)
    for entry in raw:
        if not isinstance(entry, Mapping) or not isinstance(entry.get("url"), str) or not entry["url"]:
            raise ModMedError(f"the bulk manifest has a {section!r} entry without a url")
        rtype = entry.get("type") or default_type
        if not isinstance(rtype, str) or not _TYPE_RE.match(rtype):
            raise ModMedError(f"the bulk manifest has a {section!r} entry whose type is not a FHIR type name")
        count = entry.get("count")
        count = count if isinstance(count, int) and not isinstance(count, bool) and count >= 0 else None
        url = entry["url"]
        if base and not url.startswith(("https://", "http://")):
            url = str(httpx.URL(base).join(url))
        _check_file_url(section, url)
        per_type[rtype] += 1
        yield ManifestItem(section, rtype, url, count, f"{section}/{rtype}.{per_type[rtype]:04d}.ndjson")


# -- steps the faces run -------------------------------------------------------------------------

@dataclass(frozen=True)
class Fetch:
    """A flow step: GET ``request`` (redirects followed, credentials per the auth's origin rule) and
    stream the body into ``sink``. The face answers a :class:`Fetched`."""

    request: httpx.Request
    sink: NdjsonSink


@dataclass(frozen=True)
class Fetched:
    """What happened to a :class:`Fetch`: the status (None: no answer), the error kind, Retry-After."""

    status_code: int | None
    error: str | None = None
    verification: bool = False
    retry_after: float | None = None

    @property
    def ok(self) -> bool:
        return self.status_code == 200 and self.error is None

    def describe(self) -> str:
        if self.error:
            return self.error if self.verification else f"{self.error} (transfer broken)"
        return f"HTTP {self.status_code}"


@dataclass(frozen=True)
class Parallel:
    """A flow step: run ``flows`` (consumed lazily: one at a time as a slot frees) with bounded
    concurrency; the face answers the list of exceptions the flows raised (empty: all succeeded).
    Results are not kept: flows record what they did (checkpoints), so memory does not grow with files."""

    flows: Iterable[BulkFlow[Any]]


BulkStep = httpx.Request | Sleep | Fetch | Parallel
BulkFlow = Generator[BulkStep, Any, T]


# -- policies ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PollPolicy:
    """Waits between status polls: the server's ``Retry-After`` (seconds or HTTP-date) clamped to
    ``[min_wait, max_wait]``; without it, exponential backoff from ``initial_wait``. ``max_errors``
    consecutive transient failures end the poll."""

    min_wait: float = 1.0
    max_wait: float = 600.0
    initial_wait: float = 2.0
    max_errors: int = 10

    def __post_init__(self) -> None:
        if not 0 <= self.min_wait <= self.max_wait:
            raise ConfigurationError("poll waits must satisfy 0 <= min_wait <= max_wait")
        if self.max_errors < 0:
            raise ConfigurationError("max_errors must be >= 0")

    @classmethod
    def between(cls, min_wait: float, max_wait: float, max_errors: int = 10) -> PollPolicy:
        """Retry-After clamped to ``[min_wait, max_wait]``; the backoff starts at 2 s within that range."""
        return cls(float(min_wait), float(max_wait), max(float(min_wait), min(2.0, float(max_wait))), int(max_errors))

    def wait(self, response: httpx.Response | None, attempt: int) -> float:
        seconds = retry_after_seconds(response, cap=self.max_wait) if response is not None else None
        if seconds is None:
            seconds = self.initial_wait * 1.5 ** max(0, attempt - 1)
        return max(self.min_wait, min(self.max_wait, seconds))


@dataclass(frozen=True)
class DownloadPolicy:
    """Downloads: ``concurrency`` files at a time, ``retries`` more tries per file (429/5xx, broken or
    unverifiable transfers), ``max_line_bytes`` the longest accepted NDJSON line (memory bound)."""

    concurrency: int = 4
    retries: int = 3
    backoff: float = 1.0
    max_line_bytes: int = 64 * 1024 * 1024

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise ConfigurationError("download concurrency must be >= 1")
        if self.retries < 0:
            raise ConfigurationError("download retries must be >= 0")

    def wait(self, fetched: Fetched, attempt: int) -> float:
        if fetched.retry_after is not None:
            return min(fetched.retry_after, 120.0)
        return min(60.0, self.backoff * 2 ** (attempt - 1))


# -- storage: one file ---------------------------------------------------------------------------

if msgspec is not None:
    class _Head(msgspec.Struct):
        resourceType: str

    _HEAD_DECODER: Any = msgspec.json.Decoder(_Head)

    def _resource_type(line: bytes) -> Any:
        """The line's ``resourceType``; the whole line is validated as JSON, only one field is built."""
        try:
            return _HEAD_DECODER.decode(line).resourceType
        except msgspec.ValidationError:
            return None  # valid JSON, but no object with a string resourceType
        except msgspec.DecodeError:
            raise ValueError("not JSON") from None

    @functools.lru_cache(maxsize=256)
    def _lines_decoder(resource_type: str) -> Any:
        """Validates a block of NDJSON lines in C: each one JSON, an object, ``resourceType`` = the type."""
        head = msgspec.defstruct(f"{resource_type}Line", [("resourceType", Literal[resource_type])], gc=False)
        return msgspec.json.Decoder(head)

    def _count_lines(block: Any, resource_type: str) -> int | None:
        """Lines in ``block`` (complete lines, blank ones skipped) if all are valid; None if one is not."""
        try:
            return len(_lines_decoder(resource_type).decode_lines(block))
        except (msgspec.ValidationError, msgspec.DecodeError):
            return None
else:  # pragma: no cover
    def _resource_type(line: bytes) -> Any:
        obj = json.loads(line)
        return obj.get("resourceType") if isinstance(obj, dict) else None

    def _count_lines(block: Any, resource_type: str) -> int | None:
        return None


def _replace(src: Any, dst: Any) -> None:
    """Rename ``src`` over ``dst`` (pathlib.Path, ObjectStoragePath/UPath)."""
    if hasattr(src, "replace"):
        src.replace(dst)
    else:  # pragma: no cover
        if dst.exists():
            dst.unlink()
        src.rename(dst)


def _write_json(path: Any, obj: Any) -> None:
    """Write JSON atomically (temp file + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f"{path.name}.tmp"
    with tmp.open("wb") as fh:
        fh.write(json.dumps(obj, indent=1, sort_keys=True).encode())
    _replace(tmp, path)


def _read_json(path: Any) -> Any:
    try:
        with path.open("rb") as fh:
            return json.loads(fh.read())
    except FileNotFoundError:
        return None
    except ValueError:
        log.warning("modmed: ignoring unreadable bulk state file %s", path.name)
        return None


@dataclass(frozen=True)
class FileRecord:
    """A stored, verified file: its checkpoint."""

    name: str
    section: str
    type: str
    source: str
    lines: int
    bytes: int
    sha256: str
    #: error files only: issues counted by ``severity/code``
    issues: dict[str, int] = field(default_factory=dict)


class NdjsonSink:
    """Streams one bulk file into storage: writes ``<name>.part``, checks every line as it passes (JSON,
    ``resourceType`` = the item's type; error files also tallied by severity and code), hashes the bytes,
    and on :meth:`commit` renames to the final name. Memory: one chunk plus one partial line."""

    def __init__(self, folder: Any, item: ManifestItem, max_line_bytes: int = DownloadPolicy.max_line_bytes):
        self.item = item
        self.target = folder / item.name
        self.part = folder / f"{item.name}.part"
        self.max_line_bytes = max_line_bytes
        self._fh: Any = None
        self._reset()

    def _reset(self) -> None:
        self._parts: list[bytes | memoryview] = []  # the current, incomplete line
        self._pending_len = 0
        self._hash = hashlib.sha256()
        self._utf8 = codecs.getincrementaldecoder("utf-8")()
        self.lines = 0
        self.bytes = 0
        self.issues: Counter[str] = Counter()

    def open(self) -> None:
        self._reset()
        self.part.parent.mkdir(parents=True, exist_ok=True)
        self._fh = self.part.open("wb")

    def write(self, chunk: bytes) -> None:
        """Take the next piece of the body (any size); raises :class:`VerificationError`."""
        if not chunk:
            return
        self._fh.write(chunk)
        self._hash.update(chunk)
        self.bytes += len(chunk)
        try:
            self._utf8.decode(chunk)
        except UnicodeDecodeError:
            raise self._bad(f"is not UTF-8 near byte {self.bytes}") from None
        first = chunk.find(b"\n")
        if first < 0:  # still inside one line
            self._parts.append(chunk)
            self._pending_len += len(chunk)
        else:
            view = memoryview(chunk)
            start = 0
            if self._parts:  # the line that straddles chunks
                self._parts.append(view[:first + 1])
                self._block(b"".join(self._parts))
                start = first + 1
            last = chunk.rfind(b"\n")
            if last >= start:
                self._block(view[start:last + 1])  # complete lines, not copied
            tail = chunk[last + 1:]
            self._parts = [tail] if tail else []
            self._pending_len = len(tail)
        if self._pending_len > self.max_line_bytes:
            raise self._bad(f"has a line longer than {self.max_line_bytes} bytes")

    def _block(self, block: bytes | memoryview) -> None:
        """Complete lines: checked in one C call; line by line only for error files (their issues are
        tallied) and to say which line is wrong."""
        if self.item.section != "error":
            count = _count_lines(block, self.item.type)
            if count is not None:
                self.lines += count
                return
        for raw in bytes(block).split(b"\n"):
            self._line(raw)

    def close(self) -> None:
        """End of body: check the last line and ``count``; the ``.part`` file is complete."""
        try:
            self._utf8.decode(b"", final=True)
        except UnicodeDecodeError:
            raise self._bad("ends inside a UTF-8 sequence") from None
        if self._parts:
            self._line(b"".join(self._parts))
            self._parts, self._pending_len = [], 0
        self._fh.close()
        self._fh = None
        if self.item.count is not None and self.lines != self.item.count:
            raise self._bad(f"has {self.lines} resources but the manifest says {self.item.count}")

    def abort(self) -> None:
        """Drop the partial file (a retry starts over: the IG has no range requests)."""
        if self._fh is not None:
            with contextlib.suppress(OSError):
                self._fh.close()
            self._fh = None
        with contextlib.suppress(OSError):
            self.part.unlink(missing_ok=True)

    def commit(self) -> FileRecord:
        """Rename ``.part`` to the final name; answer the record to checkpoint."""
        _replace(self.part, self.target)
        return FileRecord(self.item.name, self.item.section, self.item.type, self.item.source, self.lines,
                          self.bytes, self._hash.hexdigest(), dict(self.issues))

    def _line(self, raw: bytes) -> None:
        raw = raw.strip()
        if not raw:
            return
        number = self.lines + 1
        try:
            rtype = _resource_type(raw)
        except ValueError:
            raise self._bad(f"line {number} is not JSON") from None
        if rtype != self.item.type:
            got = repr(rtype[:64]) if isinstance(rtype, str) else "no resourceType"
            raise self._bad(f"line {number} is {got}, expected {self.item.type!r}")
        self.lines = number
        if self.item.section == "error":
            for issue in issues_from_body(json.loads(raw)):
                self.issues[f"{issue.severity}/{issue.code}"] += 1

    def _bad(self, what: str) -> VerificationError:
        return VerificationError(f"bulk file {self.item.name} {what}")


# -- storage: the run ----------------------------------------------------------------------------

@dataclass
class ExportState:
    """What a retried or resumed run needs to continue the same export (stored as ``_state/export.json``)."""

    request: dict[str, Any]
    stage: str = "new"  # new | kicked-off | ready | complete | cancelled
    status_url: str | None = None
    kicked_off_at: str | None = None
    transaction_time: str | None = None
    expires: str | None = None
    restarts: int = 0
    result: dict[str, Any] | None = None
    version: int = STATE_VERSION

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> ExportState:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in raw.items() if k in known})


class ExportRun:
    """One export's run folder: its state file, checkpoints, files and summary. No HTTP here.

    ``folder`` is a ``pathlib.Path`` or an ``ObjectStoragePath`` (any UPath); it is created if missing.
    A saved state whose request differs from ``request`` is discarded (with a warning): a different
    request is a different export.
    """

    def __init__(self, folder: Any, request: ExportRequest) -> None:
        self.folder = folder
        self.request = request
        self._lock = threading.Lock()
        self._stored = 0
        self._stored_bytes = 0
        self._total = 0
        self._last_log = 0.0
        folder.mkdir(parents=True, exist_ok=True)
        raw = _read_json(folder / STATE_FILE)
        state = ExportState.from_dict(raw) if isinstance(raw, Mapping) else None
        if state is not None and state.request != request.to_dict():
            log.warning("modmed: %s holds the state of a different export request; starting a new export",
                        STATE_FILE)
            self.state = ExportState(request.to_dict())
            self._clear_files()
            self.save()
        else:
            self.state = state or ExportState(request.to_dict())

    # -- state transitions ------------------------------------------------------------------------
    def save(self) -> None:
        _write_json(self.folder / STATE_FILE, asdict(self.state))

    def kicked_off(self, status_url: str) -> None:
        self.state.stage, self.state.status_url = "kicked-off", status_url
        self.state.kicked_off_at = datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")
        self.save()

    def got_manifest(self, manifest: Manifest) -> None:
        _write_json(self.folder / MANIFEST_FILE, manifest.to_dict())
        self.state.stage = "ready"
        self.state.transaction_time = manifest.transaction_time
        self.state.expires = manifest.expires
        self.save()

    def cancelled(self) -> None:
        self.state.stage = "cancelled"
        self.save()

    def restart(self, count: bool = True) -> None:
        """Forget the job and every stored file: the next start kicks off a new export."""
        self._clear_files()
        self.state = ExportState(self.request.to_dict(), restarts=self.state.restarts + int(count))
        self.save()

    def _clear_files(self) -> None:
        for sub in (CHECKPOINTS, *SECTIONS):
            folder = self.folder / sub
            if folder.exists():
                for path in folder.iterdir():
                    path.unlink()
        for name in (MANIFEST_FILE, SUMS_FILE):
            (self.folder / name).unlink(missing_ok=True)

    # -- files ------------------------------------------------------------------------------------
    def sink(self, item: ManifestItem, max_line_bytes: int = DownloadPolicy.max_line_bytes) -> NdjsonSink:
        return NdjsonSink(self.folder, item, max_line_bytes)

    def record(self, item: ManifestItem) -> FileRecord | None:
        """The checkpoint of ``item`` if its file is stored, verified, and still from the same source."""
        raw = _read_json(self.folder / item.checkpoint)
        if not isinstance(raw, Mapping):
            return None
        try:
            record = FileRecord(**raw)
        except TypeError:
            return None
        if record.name != item.name or record.type != item.type or record.source != item.source:
            return None
        if item.count is not None and record.lines != item.count:
            return None
        target = self.folder / item.name
        try:
            if not target.exists() or target.stat().st_size != record.bytes:
                return None
        except OSError:
            return None
        return record

    def pending(self, manifest: Manifest) -> list[ManifestItem]:
        """The manifest's files that are not stored and verified yet (a retried run skips the others)."""
        done_names = set()
        folder = self.folder / CHECKPOINTS
        if folder.exists():
            done_names = {p.name for p in folder.iterdir()}
        todo = [i for i in manifest.items
                if i.checkpoint.rsplit("/", 1)[1] not in done_names or self.record(i) is None]
        skipped = len(manifest.items) - len(todo)
        with self._lock:
            self._total, self._stored, self._stored_bytes = len(manifest.items), skipped, 0
        if skipped:
            log.info("modmed: bulk export resumed: %d of %d files already stored and verified; %d to fetch",
                     skipped, len(manifest.items), len(todo))
        return todo

    def file_done(self, record: FileRecord, item: ManifestItem) -> None:
        _write_json(self.folder / item.checkpoint, asdict(record))
        with self._lock:
            self._stored += 1
            self._stored_bytes += record.bytes
            now = time.monotonic()
            if self._total and (now - self._last_log >= 10 or self._stored == self._total):
                self._last_log = now
                log.info("modmed: bulk export: %d of %d files stored (%.1f MB this run)", self._stored,
                         self._total, self._stored_bytes / 1e6)

    def complete(self, manifest: Manifest) -> dict[str, Any]:
        """Every file is stored: write SHA256SUMS, the summary and the state; answer the summary."""
        records: list[FileRecord] = []
        for item in manifest.items:
            record = self.record(item)
            if record is None:
                raise DownloadError(f"bulk file {item.name} is not stored; cannot complete the export")
            records.append(record)
        with (self.folder / SUMS_FILE).open("wb") as fh:
            fh.write("".join(f"{r.sha256}  {r.name}\n" for r in records).encode())
        result = summarize(self.folder, manifest, records)
        self.state.stage, self.state.result = "complete", result
        self.save()
        return result


def summarize(folder: Any, manifest: Manifest, records: Sequence[FileRecord]) -> dict[str, Any]:
    """The small result (XCom): run folder, per-type counts and files, transactionTime, error counts."""
    output: dict[str, dict[str, Any]] = {}
    deleted: dict[str, Any] = {"count": 0, "files": []}
    by_severity: Counter[str] = Counter()
    by_code: Counter[str] = Counter()
    error_files: list[str] = []
    for r in records:
        if r.section == "output":
            entry = output.setdefault(r.type, {"count": 0, "files": []})
            entry["count"] += r.lines
            entry["files"].append(r.name)
        elif r.section == "deleted":
            deleted["count"] += r.lines
            deleted["files"].append(r.name)
        else:
            error_files.append(r.name)
            for key, n in r.issues.items():
                severity, _, code = key.partition("/")
                by_severity[severity] += n
                by_code[code] += n
    fatal = sum(n for s, n in by_severity.items() if s in FATAL_SEVERITIES)
    return {
        "run_folder": str(folder),
        "transaction_time": manifest.transaction_time,
        "output": output,
        "resources": sum(e["count"] for e in output.values()),
        "deleted": deleted,
        "errors": {"count": sum(by_severity.values()), "fatal": fatal, "by_severity": dict(by_severity),
                   "by_code": dict(by_code), "files": error_files},
        "files": len(records),
        "bytes": sum(r.bytes for r in records),
    }


def apply_error_policy(result: Mapping[str, Any], policy: str, logger: Any = log) -> None:
    """Surface the export's error files: counts and OperationOutcome codes in the log (never diagnostics:
    they may name patients); ``fail`` raises :class:`ExportErrorsReported` when any issue is fatal/error."""
    if policy not in ERROR_POLICIES:
        raise ConfigurationError(f"error policy must be one of {', '.join(ERROR_POLICIES)}; got {policy!r}")
    errors = result.get("errors") or {}
    if not errors.get("count"):
        return
    codes = ", ".join(f"{c}={n}" for c, n in sorted((errors.get("by_code") or {}).items()))
    severities = ", ".join(f"{s}={n}" for s, n in sorted((errors.get("by_severity") or {}).items()))
    message = (f"modmed: the bulk export reported {errors['count']} issue(s) in {len(errors.get('files') or ())} "
               f"error file(s) kept under {result.get('run_folder')}/error: severity {severities}; codes {codes}")
    fatal = int(errors.get("fatal") or 0)
    if fatal and policy == "fail":
        logger.error(message)
        raise ExportErrorsReported(f"the bulk export reported {fatal} fatal/error issue(s) ({codes}); the files "
                                   "are kept beside the output (error policy 'fail'; use 'warn' or 'ignore' to "
                                   "accept partial exports)")
    if fatal and policy == "warn":
        logger.warning(message)
    else:
        logger.info(message)


# -- flows ---------------------------------------------------------------------------------------

def kick_off(ctx: FhirContext, request: ExportRequest, *, max_throttled: int = 5,
             policy: PollPolicy | None = None) -> BulkFlow[str]:
    """Kick off ``request``; returns the absolute status URL (``Content-Location``).

    The capability pre-flight runs now, before any request exists. The request is sent once: 429 is
    waited out (the server refused before acting), but a 5xx or a timeout may mean a job exists, so it
    is an error, never a silent second kick-off.
    """
    request.preflight(ctx)
    return _kick_off(ctx, request, max_throttled, policy or PollPolicy())


def _kick_off(ctx: FhirContext, request: ExportRequest, max_throttled: int, policy: PollPolicy) -> BulkFlow[str]:
    what = "bulk export kick-off"
    throttled = 0
    while True:
        response = yield request.build(ctx.base)
        if response.status_code == 202:
            location = response.headers.get("Content-Location")
            if not location:
                raise ModMedError(f"{what} answered 202 without Content-Location", status_code=202)
            status_url = str(httpx.URL(ctx.base.rstrip("/") + "/").join(location))
            if origin(status_url) != origin(ctx.base):
                log.warning("modmed: the bulk status URL is on another origin than the FHIR base; no token "
                            "will be sent to it")
            log.info("modmed: %s accepted", request.describe())
            return status_url
        if response.status_code == 429 and throttled < max_throttled:
            throttled += 1
            wait = policy.wait(response, throttled)
            log.info("modmed: %s answered 429 (throttled, or an export is already running); retry %d/%d "
                     "in %.1fs", what, throttled, max_throttled, wait)
            yield Sleep(wait)
            continue
        error = error_for_status(response.status_code, json_body(response), what)
        if isinstance(error, ServerError):
            error.message += (" (the server may have started a job anyway; the kick-off is not resent "
                              "automatically)")
        raise error


def poll_status(status_url: str, policy: PollPolicy | None = None, logger: Any = None) -> BulkFlow[Manifest]:
    """Poll the status URL until the manifest (200). 202: log ``X-Progress``, wait ``Retry-After``.
    Transient failures (OperationOutcome with a transient code, bare 5xx, 429) are polled again up to
    ``policy.max_errors`` in a row; 404/410 raise :class:`ExportGoneError`; other failures
    :class:`ExportFailedError` (or the typed error for 401/403)."""
    policy = policy or PollPolicy()
    logger = logger or log
    what = "bulk export status"
    waits = errors = 0
    while True:
        response = yield httpx.Request("GET", status_url, headers={"Accept": "application/json"},
                                       extensions={WHAT: what})
        status = response.status_code
        if status == 200:
            return Manifest.parse(json_body(response), base=status_url, expires=response.headers.get("Expires"))
        if status == 202:
            errors, waits = 0, waits + 1
            wait = policy.wait(response, waits)
            progress = _CONTROL_RE.sub(" ", response.headers.get("X-Progress", "")).strip()[:100]
            shown = f" ({progress})" if progress else ""
            logger.info(f"modmed: bulk export in progress{shown}; next poll in {wait:.1f}s")
            yield Sleep(wait)
            continue
        body = json_body(response)
        issues = issues_from_body(body)
        if status in (404, 410):
            raise ExportGoneError(f"{what}: the export job is gone (expired, cancelled or unknown)",
                                  status_code=status, issues=issues)
        if status in (401, 403):
            raise error_for_status(status, body, what)
        codes = {i.code for i in issues}
        transient = bool(codes & TRANSIENT_ISSUE_CODES) if issues else status in TRANSIENT_STATUSES
        if transient and errors < policy.max_errors:
            errors += 1
            wait = policy.wait(response, errors)
            shown = f" [{', '.join(sorted(codes))}]" if codes else ""
            logger.warning(f"modmed: {what} answered HTTP {status}{shown}; transient, polling again "
                           f"({errors}/{policy.max_errors}) in {wait:.1f}s")
            yield Sleep(wait)
            continue
        if transient:
            cls = RateLimitedError if status == 429 else ServerError
            raise cls(f"{what} kept failing ({errors + 1} transient failures in a row)", status_code=status,
                      issues=issues)
        raise ExportFailedError(f"the bulk export job failed ({what})", status_code=status, issues=issues)


def cancel(status_url: str) -> BulkFlow[bool]:
    """DELETE the status URL: True when the server accepted, False when the job was already gone."""
    response = yield httpx.Request("DELETE", status_url, headers={"Accept": "application/fhir+json"},
                                   extensions={WHAT: "bulk export cancel"})
    if response.status_code in (200, 202, 204):
        return True
    if response.status_code in (404, 410):
        return False
    raise error_for_status(response.status_code, json_body(response), "bulk export cancel")


def file_request(item: ManifestItem, requires_access_token: bool) -> httpx.Request:
    """GET for one bulk file. With ``requiresAccessToken: false`` no credential goes with it at all
    (presigned storage refuses them); with true, the auth still sends the token only to the FHIR origin."""
    extensions: dict[str, Any] = {WHAT: f"bulk file ({item.section} {item.type})"}
    if not requires_access_token:
        extensions[NO_CREDENTIALS] = True
    return httpx.Request("GET", item.url, headers={"Accept": NDJSON}, extensions=extensions)


def download_file(run: ExportRun, item: ManifestItem, requires_access_token: bool,
                  policy: DownloadPolicy | None = None) -> BulkFlow[FileRecord]:
    """Store one file (``.part`` + verification + rename + checkpoint), retrying 408/429/5xx, broken
    transfers and failed verifications up to ``policy.retries`` times."""
    policy = policy or DownloadPolicy()
    attempt = 0
    while True:
        attempt += 1
        sink = run.sink(item, policy.max_line_bytes)
        fetched = yield Fetch(file_request(item, requires_access_token), sink)
        if fetched.ok:
            record = sink.commit()
            run.file_done(record, item)
            return record
        retryable = fetched.error is not None or fetched.status_code in TRANSIENT_STATUSES
        if not retryable or attempt > policy.retries:
            cls = VerificationError if fetched.verification else DownloadError
            raise cls(f"bulk file {item.name}: {fetched.describe()} after {attempt} attempt(s)",
                      status_code=fetched.status_code if not fetched.error else None)
        wait = policy.wait(fetched, attempt)
        log.warning("modmed: bulk file %s: %s; retry %d/%d in %.1fs", item.name, fetched.describe(), attempt,
                    policy.retries, wait)
        yield Sleep(wait)


def start(ctx: FhirContext, run: ExportRun, policy: PollPolicy | None = None) -> BulkFlow[str]:
    """The status URL of the run's export: the saved one (resume), or a new kick-off saved at once."""
    run.request.preflight(ctx)
    return _start(ctx, run, policy or PollPolicy())


def _start(ctx: FhirContext, run: ExportRun, policy: PollPolicy) -> BulkFlow[str]:
    state = run.state
    if state.stage == "cancelled":
        run.restart(count=False)
    elif state.status_url and state.stage in ("kicked-off", "ready"):
        log.info("modmed: resuming the saved bulk export job (kicked off at %s); not kicking off again",
                 state.kicked_off_at)
        return state.status_url
    status_url = yield from _kick_off(ctx, run.request, 5, policy)
    run.kicked_off(status_url)
    return status_url


def finish(run: ExportRun, status_url: str, poll: PollPolicy | None = None,
           download: DownloadPolicy | None = None, logger: Any = None) -> BulkFlow[dict[str, Any]]:
    """Read the manifest (polling if the job still runs), store every file not stored yet, write the
    summary, then DELETE the job on the server (non-fatal). Answers the summary.

    Links refused with 401/403/404/410 (expired presigned URLs) get one fresh manifest and another pass.
    """
    poll, download = poll or PollPolicy(), download or DownloadPolicy()
    manifest = yield from poll_status(status_url, poll, logger)
    run.got_manifest(manifest)
    for refresh in (False, True):
        todo = run.pending(manifest)
        failures: list[Exception] = yield Parallel(
            download_file(run, item, manifest.requires_access_token, download) for item in todo)
        if not failures:
            break
        expired = all(isinstance(f, DownloadError) and f.status_code in (401, 403, 404, 410) for f in failures)
        if refresh or not expired:
            if len(failures) > 1:
                log.error("modmed: %d bulk files failed; the first: %s", len(failures), failures[0])
            raise failures[0]
        log.warning("modmed: %d bulk file link(s) refused (expired?); fetching a fresh manifest", len(failures))
        manifest = yield from poll_status(status_url, poll, logger)
        run.got_manifest(manifest)
    result = run.complete(manifest)
    try:
        yield from cancel(status_url)  # after success: the server may free the files now
    except ModMedError as exc:
        log.info("modmed: releasing the finished bulk job on the server failed (non-fatal): %s", exc)
    log.info("modmed: bulk export stored: %d resources in %d files (%.1f MB), %d deleted entries, %d issues",
             result["resources"], result["files"], result["bytes"] / 1e6, result["deleted"]["count"],
             result["errors"]["count"])
    return result


def export(ctx: FhirContext, run: ExportRun, poll: PollPolicy | None = None, download: DownloadPolicy | None = None,
           max_restarts: int = 2, logger: Any = None) -> BulkFlow[dict[str, Any]]:
    """The whole export, resumable: start (or resume), poll, download, complete. A job that is gone
    (404/410) is kicked off again at most ``max_restarts`` times (counted in the state file)."""
    run.request.preflight(ctx)
    return _export(ctx, run, poll or PollPolicy(), download or DownloadPolicy(), max_restarts, logger)


def _export(ctx: FhirContext, run: ExportRun, poll: PollPolicy, download: DownloadPolicy, max_restarts: int,
            logger: Any) -> BulkFlow[dict[str, Any]]:
    if run.state.stage == "complete" and run.state.result is not None:
        log.info("modmed: the bulk export in %s is already complete", run.folder)
        return run.state.result
    while True:
        status_url = yield from _start(ctx, run, poll)
        try:
            return (yield from finish(run, status_url, poll, download, logger))
        except ExportGoneError:
            if run.state.restarts >= max_restarts:
                raise
            log.warning("modmed: the bulk export job is gone; kicking off a new one (restart %d/%d)",
                        run.state.restarts + 1, max_restarts)
            run.restart()


# -- drivers -------------------------------------------------------------------------------------

def drive_bulk(flow: BulkFlow[T], send: Callable[[httpx.Request], httpx.Response], sleep: Callable[[float], Any],
               fetch: Callable[[Fetch], Fetched],
               parallel: Callable[[Iterable[BulkFlow[Any]]], list[Exception]]) -> T:
    """Run a bulk flow on the sync face. A :class:`ModMedError` raised while running a step is thrown
    into the flow (which may handle it)."""
    out: Any = None
    error: ModMedError | None = None
    try:
        while True:
            try:
                step = flow.throw(error) if error is not None else flow.send(out)
            except StopIteration as done:
                return done.value
            out = error = None
            try:
                if isinstance(step, Sleep):
                    out = sleep(step.seconds)
                elif isinstance(step, Fetch):
                    out = fetch(step)
                elif isinstance(step, Parallel):
                    out = parallel(step.flows)
                elif isinstance(step, httpx.Request):
                    out = send(step)
                else:
                    raise TypeError(f"unknown bulk flow step {type(step).__name__}")
            except ModMedError as exc:
                error = exc
    finally:
        flow.close()


async def adrive_bulk(flow: BulkFlow[T], send: Callable[[httpx.Request], Awaitable[httpx.Response]],
                      sleep: Callable[[float], Awaitable[Any]], fetch: Callable[[Fetch], Awaitable[Fetched]],
                      parallel: Callable[[Iterable[BulkFlow[Any]]], Awaitable[list[Exception]]]) -> T:
    """:func:`drive_bulk` on the async face."""
    out: Any = None
    error: ModMedError | None = None
    try:
        while True:
            try:
                step = flow.throw(error) if error is not None else flow.send(out)
            except StopIteration as done:
                return done.value
            out = error = None
            try:
                if isinstance(step, Sleep):
                    out = await sleep(step.seconds)
                elif isinstance(step, Fetch):
                    out = await fetch(step)
                elif isinstance(step, Parallel):
                    out = await parallel(step.flows)
                elif isinstance(step, httpx.Request):
                    out = await send(step)
                else:
                    raise TypeError(f"unknown bulk flow step {type(step).__name__}")
            except ModMedError as exc:
                error = exc
    finally:
        flow.close()


def _fetch_failure(exc: BaseException) -> Fetched:
    if isinstance(exc, VerificationError):
        return Fetched(200, str(exc), verification=True)
    return Fetched(None, type(exc).__name__)


class _BulkFace:
    """What both faces share: the FHIR client's context and the policies."""

    def __init__(self, client: Any, poll: PollPolicy | None, download: DownloadPolicy | None,
                 max_restarts: int) -> None:
        self.client = client
        self.context: FhirContext = client.context
        self.poll_policy = poll or PollPolicy()
        self.download_policy = download or DownloadPolicy()
        self.max_restarts = max_restarts

    def run_for(self, folder: Any, request: ExportRequest) -> ExportRun:
        """The :class:`ExportRun` of ``request`` in ``folder`` (pre-flight first: no storage touched if the
        connection cannot export)."""
        request.preflight(self.context)
        return ExportRun(folder, request)


class BulkExportClient(_BulkFace):
    """Bulk export on the sync face of a :class:`~airflow_provider_modmed.client.fhir.FhirClient`.

    Downloads run in a pool of ``download.concurrency`` threads sharing the client's connection pool::

        with FhirClient(config) as fhir:
            result = BulkExportClient(fhir).export(ExportRequest(types=("Patient",)), Path("/data/run1"))
    """

    def __init__(self, client: Any, *, poll: PollPolicy | None = None, download: DownloadPolicy | None = None,
                 max_restarts: int = 2) -> None:
        super().__init__(client, poll, download, max_restarts)

    # -- the face's I/O ---------------------------------------------------------------------------
    def _send(self, request: httpx.Request) -> httpx.Response:
        if not request.extensions.get(NO_RESEND):
            response: httpx.Response = self.client.send(request)
            return response
        try:
            response = self.client._send_once(request)
        except httpx.RequestError as exc:
            raise TransportError(f"bulk export kick-off got no answer ({type(exc).__name__}); not resent: a "
                                 "job may exist") from exc
        return response

    def _fetch(self, step: Fetch) -> Fetched:
        try:
            response = self.client.http.send(step.request, auth=self.client.auth, stream=True,
                                             follow_redirects=True)
        except httpx.HTTPError as exc:
            return _fetch_failure(exc)
        try:
            if response.status_code != 200:
                return Fetched(response.status_code, retry_after=retry_after_seconds(response))
            step.sink.open()
            for chunk in response.iter_bytes():
                step.sink.write(chunk)
            step.sink.close()
            return Fetched(200)
        except (httpx.HTTPError, VerificationError) as exc:
            step.sink.abort()
            return _fetch_failure(exc)
        except BaseException:
            step.sink.abort()
            raise
        finally:
            response.close()

    def _parallel(self, flows: Iterable[BulkFlow[Any]]) -> list[Exception]:
        failures: list[Exception] = []
        pending = iter(flows)
        slots = self.download_policy.concurrency
        with ThreadPoolExecutor(max_workers=slots, thread_name_prefix="modmed-bulk") as pool:
            running = {pool.submit(self.run, flow) for flow in itertools.islice(pending, slots)}
            while running:
                done, running = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    error = future.exception()
                    if error is not None and not isinstance(error, Exception):
                        for other in running:
                            other.cancel()
                        raise error  # KeyboardInterrupt, SystemExit: stop, do not swallow
                    if error is not None:
                        failures.append(error)
                    following = next(pending, None)
                    if following is not None:
                        running.add(pool.submit(self.run, following))
        return failures

    def run(self, flow: BulkFlow[T]) -> T:
        """Drive any bulk flow to its result."""
        return drive_bulk(flow, self._send, self.client._sleep, self._fetch, self._parallel)

    # -- one line each ----------------------------------------------------------------------------
    def kick_off(self, request: ExportRequest) -> str:
        """Kick off; answers the status URL (save it before anything else)."""
        return self.run(kick_off(self.context, request, policy=self.poll_policy))

    def poll(self, status_url: str, logger: Any = None) -> Manifest:
        """Poll until the manifest."""
        return self.run(poll_status(status_url, self.poll_policy, logger))

    def cancel(self, status_url: str) -> bool:
        """DELETE the job; False when it was already gone."""
        return self.run(cancel(status_url))

    def start(self, run: ExportRun) -> str:
        """Resume the run's saved job or kick off (and save) a new one; answers the status URL."""
        return self.run(start(self.context, run, self.poll_policy))

    def finish(self, run: ExportRun, status_url: str, logger: Any = None) -> dict[str, Any]:
        """Manifest, downloads, summary, release on the server."""
        return self.run(finish(run, status_url, self.poll_policy, self.download_policy, logger))

    def export(self, request: ExportRequest, folder: Any, logger: Any = None) -> dict[str, Any]:
        """The whole export into ``folder`` (resumable: run it again after a crash)."""
        run = self.run_for(folder, request)
        return self.run(export(self.context, run, self.poll_policy, self.download_policy, self.max_restarts,
                               logger))


class AsyncBulkExportClient(_BulkFace):
    """Bulk export on the async face of an :class:`~airflow_provider_modmed.client.fhir.AsyncFhirClient`
    (triggers poll with it). Same flows; downloads run as anyio tasks, ``download.concurrency`` at a time.
    Storage writes are blocking calls (fine on a worker; the triggerer only polls)."""

    def __init__(self, client: Any, *, poll: PollPolicy | None = None, download: DownloadPolicy | None = None,
                 max_restarts: int = 2) -> None:
        super().__init__(client, poll, download, max_restarts)

    async def _send(self, request: httpx.Request) -> httpx.Response:
        if not request.extensions.get(NO_RESEND):
            response: httpx.Response = await self.client.send(request)
            return response
        try:
            response = await self.client._send_once(request)
        except httpx.RequestError as exc:
            raise TransportError(f"bulk export kick-off got no answer ({type(exc).__name__}); not resent: a "
                                 "job may exist") from exc
        return response

    async def _fetch(self, step: Fetch) -> Fetched:
        try:
            response = await self.client.http.send(step.request, auth=self.client.auth, stream=True,
                                                   follow_redirects=True)
        except httpx.HTTPError as exc:
            return _fetch_failure(exc)
        try:
            if response.status_code != 200:
                return Fetched(response.status_code, retry_after=retry_after_seconds(response))
            step.sink.open()
            chunks: AsyncIterator[bytes] = response.aiter_bytes()
            async for chunk in chunks:
                step.sink.write(chunk)
            step.sink.close()
            return Fetched(200)
        except (httpx.HTTPError, VerificationError) as exc:
            step.sink.abort()
            return _fetch_failure(exc)
        except BaseException:
            step.sink.abort()
            raise
        finally:
            await response.aclose()

    async def _parallel(self, flows: Iterable[BulkFlow[Any]]) -> list[Exception]:
        failures: list[Exception] = []
        slots = anyio.Semaphore(self.download_policy.concurrency)

        async def one(flow: BulkFlow[Any]) -> None:
            try:
                await self.run(flow)
            except Exception as exc:
                failures.append(exc)
            finally:
                slots.release()

        async with anyio.create_task_group() as group:
            for flow in flows:  # taken one at a time, as a slot frees
                await slots.acquire()
                group.start_soon(one, flow)
        return failures

    async def run(self, flow: BulkFlow[T]) -> T:
        """Drive any bulk flow to its result."""
        return await adrive_bulk(flow, self._send, self.client._asleep, self._fetch, self._parallel)

    async def kick_off(self, request: ExportRequest) -> str:
        return await self.run(kick_off(self.context, request, policy=self.poll_policy))

    async def poll(self, status_url: str, logger: Any = None) -> Manifest:
        return await self.run(poll_status(status_url, self.poll_policy, logger))

    async def cancel(self, status_url: str) -> bool:
        return await self.run(cancel(status_url))

    async def start(self, run: ExportRun) -> str:
        return await self.run(start(self.context, run, self.poll_policy))

    async def finish(self, run: ExportRun, status_url: str, logger: Any = None) -> dict[str, Any]:
        return await self.run(finish(run, status_url, self.poll_policy, self.download_policy, logger))

    async def export(self, request: ExportRequest, folder: Any, logger: Any = None) -> dict[str, Any]:
        run = self.run_for(folder, request)
        return await self.run(export(self.context, run, self.poll_policy, self.download_policy,
                                     self.max_restarts, logger))
