"""Bulk Data Access v2 ``$export`` on the sandbox's certified track: kick-off, status, cancel, files.

A job "runs" for ``config.export_seconds`` after its kick-off (status answers 202 with ``Retry-After``
and ``X-Progress``), then its content is frozen and status answers the manifest. Freezing records, per
output file, only the first and last store ``seq`` and the count of the (at most
:data:`~airflow_provider_modmed.capabilities.BULK_FILE_MAX_RESOURCES`) matching rows: resource bodies
are never held in memory, but re-read from the store in ``seq`` order and streamed when a file is
downloaded from the storage listener. Only the small ``error`` and ``deleted`` lines are kept.

The files are the certified track's: every line carries its ids (:mod:`.certified_ids`), translated as
it streams.
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import threading
import time
import zlib
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from email.utils import formatdate
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from airflow_provider_modmed.capabilities import BULK_FILE_MAX_RESOURCES, EXPORT_LEVELS, MATRIX
from airflow_provider_modmed.client.instants import InvalidInstantError, format_instant, instant_ms
from airflow_provider_modmed.sandbox.certified_ids import certified_id, certify_json
from airflow_provider_modmed.sandbox.http import FhirError, InjectedFault, outcome
from airflow_provider_modmed.sandbox.smart import scope_allows
from airflow_provider_modmed.sandbox.state import SandboxState
from airflow_provider_modmed.sandbox.store import extract_params

__all__ = ["JOB_TTL_SECONDS", "NDJSON", "OUTPUT_FORMATS", "BulkExports", "TruncatedDownload"]

#: media type of every bulk file
NDJSON = "application/fhir+ndjson"
#: ``_outputFormat`` values a Bulk Data v2 server must accept (all mean FHIR NDJSON)
OUTPUT_FORMATS = frozenset({"application/fhir+ndjson", "application/ndjson", "ndjson"})
#: seconds after its kick-off a job (and its files) are forgotten; also the files' presigned TTL
JOB_TTL_SECONDS = 3600.0
#: kick-off parameters the sandbox implements (``_typeFilter`` is recognised, but refused)
_KNOWN_PARAMS = frozenset({"_outputFormat", "_since", "_type", "_typeFilter"})
#: rows read from the store per query (and lines per chunk) while a file streams
_STREAM_BATCH = 200


class TruncatedDownload(ConnectionError):
    """Raised inside a file's stream to drop the connection mid-body (fault, or a store that changed)."""


class _InjectedTruncation(TruncatedDownload, InjectedFault):
    """The ``truncate_downloads`` fault: logged as one line, not as an application error."""


def _is_certified(resource_type: str) -> bool:
    spec = MATRIX.get(resource_type)
    return spec is not None and bool(spec.certified)


def _issue_line(severity: str, code: str, diagnostics: str) -> str:
    """One ``error`` file line: an OperationOutcome with a single issue."""
    body = {"resourceType": "OperationOutcome",
            "issue": [{"severity": severity, "code": code, "diagnostics": diagnostics}]}
    return json.dumps(body, separators=(",", ":"))


def _deleted_line(resource_type: str, resource_id: str) -> str:
    """One ``deleted`` file line: a transaction Bundle with one DELETE entry (of the certified id)."""
    url = f"{resource_type}/{certified_id(resource_id)}"
    body = {"resourceType": "Bundle", "type": "transaction",
            "entry": [{"request": {"method": "DELETE", "url": url}}]}
    return json.dumps(body, separators=(",", ":"))


def _parse_since(value: str) -> int:
    """A FHIR instant that carries a zone -> milliseconds since the epoch; FhirError 400 otherwise."""
    hint = " (was a '+' sent unencoded? use %2B)" if " " in value.strip() else ""
    try:
        if hint:  # a server takes the FHIR form only: 'T' before the time
            raise InvalidInstantError("_since must be a FHIR instant with a time zone")
        return instant_ms(value, "_since")
    except InvalidInstantError:
        raise FhirError(400, "invalid", f"_since must be a FHIR instant with a time zone, e.g. "
                        f"2024-01-01T00:00:00Z; got {value!r}{hint}") from None


def _prefer_tokens(prefer: str) -> set[str]:
    """``Prefer`` preferences, lower-cased, without parameters or quotes (``handling=lenient``)."""
    tokens = set()
    for part in prefer.split(","):
        token = part.split(";", 1)[0].strip().lower().replace('"', "")
        token = re.sub(r"\s*=\s*", "=", token)
        if token:
            tokens.add(token)
    return tokens


def _accepts_fhir_json(accept: str) -> bool:
    return any(part.split(";", 1)[0].strip().lower() == "application/fhir+json" for part in accept.split(","))


def _member_patient_id(reference: str) -> str | None:
    """``Patient/123`` (or an absolute URL ending so) -> ``123``; other references -> None."""
    parts = reference.rstrip("/").split("/")
    if len(parts) >= 2 and parts[-2] == "Patient" and parts[-1]:
        return parts[-1]
    return None


@dataclass(frozen=True)
class _Selection:
    """Which rows of a type a job selects: its level, Group members and ``_since``."""

    level: str
    #: Group level: JSON array of member Patient ids; None at the other levels
    members_json: str | None = None
    members: frozenset[str] = frozenset()
    since_ms: int | None = None

    def where(self, resource_type: str) -> tuple[str, list[Any]]:
        """SQL condition on ``resources r`` (current, not deleted rows) and its arguments."""
        sql = ["r.type = ?", "r.deleted = 0"]
        args: list[Any] = [resource_type]
        if self.since_ms is not None:
            sql.append("r.lu_ms > ?")
            args.append(self.since_ms)
        if self.level != "system":
            if resource_type == "Patient":
                if self.members_json is not None:
                    sql.append("r.id IN (SELECT value FROM json_each(?))")
                    args.append(self.members_json)
            else:
                cond = ("EXISTS (SELECT 1 FROM params p WHERE p.type = r.type AND p.id = r.id "
                        "AND p.name = 'patient'")
                if self.members_json is not None:
                    cond += " AND p.value IN (SELECT value FROM json_each(?))"
                    args.append(self.members_json)
                sql.append(cond + ")")
        return " AND ".join(sql), args

    def deleted_matches(self, resource_type: str, resource_id: str, body: dict[str, Any]) -> bool:
        """Whether a deleted resource (its last body) belongs to this selection."""
        if self.level == "system":
            return True
        if resource_type == "Patient":
            return self.members_json is None or resource_id in self.members
        owners = {v for k, v in extract_params(body) if k == "patient"}
        return bool(owners) and (self.members_json is None or bool(owners & self.members))


@dataclass(frozen=True)
class _OutputFile:
    """A frozen output file: rows of one type with ``first_seq <= seq <= last_seq`` that match."""

    name: str
    resource_type: str
    count: int
    first_seq: int
    last_seq: int


@dataclass(frozen=True)
class _LineFile:
    """An ``error`` or ``deleted`` file, whose (short) lines are kept."""

    name: str
    resource_type: str
    lines: tuple[str, ...]

    @property
    def count(self) -> int:
        return len(self.lines)


@dataclass
class _Job:
    id: str
    started: float  # BulkExports.clock() at kick-off
    transaction_time: str
    request_url: str
    selection: _Selection
    types: tuple[str, ...]
    errors: list[str]
    lock: threading.Lock = field(default_factory=threading.Lock)
    #: set at completion: manifest section -> files, in manifest order
    sections: dict[str, list[_OutputFile | _LineFile]] | None = None
    files: dict[str, _OutputFile | _LineFile] = field(default_factory=dict)


def _line_files(prefix: str, resource_type: str, lines: Sequence[str]) -> list[_OutputFile | _LineFile]:
    size = BULK_FILE_MAX_RESOURCES
    return [_LineFile(f"{prefix}.{i // size + 1}.ndjson", resource_type, tuple(lines[i:i + size]))
            for i in range(0, len(lines), size)]


async def _rechunk(chunks: AsyncIterator[bytes], lines: int) -> AsyncIterator[bytes]:
    """The same bytes, ``lines`` NDJSON lines per chunk (the ``bulk_chunk_lines`` fault)."""
    async for chunk in chunks:
        rows = chunk.splitlines(keepends=True)
        for i in range(0, len(rows), lines):
            yield b"".join(rows[i:i + lines])


async def _gzip(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """The stream gzip-encoded (the ``bulk_gzip`` fault), flushed after every chunk so chunks stay chunks."""
    encoder = zlib.compressobj(6, zlib.DEFLATED, 31)
    async for chunk in chunks:
        yield encoder.compress(chunk) + encoder.flush(zlib.Z_SYNC_FLUSH)
    yield encoder.flush()


def _not_found_xml() -> Response:
    body = ('<?xml version="1.0" encoding="UTF-8"?><Error><Code>NoSuchKey</Code>'
            "<Message>The specified key does not exist.</Message></Error>")
    return Response(body, status_code=404, media_type="application/xml")


class BulkExports:
    """The export jobs of one sandbox (``state.exports``); thread-safe."""

    def __init__(self, state: SandboxState) -> None:
        self.state = state
        self._jobs: dict[str, _Job] = {}
        self._lock = threading.Lock()
        #: monotonic seconds; tests may replace it to age jobs
        self.clock: Callable[[], float] = time.monotonic

    # -- kick-off ----------------------------------------------------------------------------
    def kick_off(self, *, level: str, group_id: str | None, params: Mapping[str, str], prefer: str,
                 accept: str, request_url: str, fhir_base: str, scopes: Sequence[str]) -> str:
        """Validate and start a job; return the absolute status URL
        ``{fhir_base}/fhir-services/$export-status/{job_id}``; raise FhirError on a bad request."""
        if not _accepts_fhir_json(accept):
            raise FhirError(400, "not-supported",
                            f"$export needs 'Accept: application/fhir+json' (got {accept or 'none'!r})")
        preferences = _prefer_tokens(prefer)
        if "respond-async" not in preferences:
            raise FhirError(400, "not-supported",
                            f"$export needs 'Prefer: respond-async' (got {prefer or 'none'!r})")
        lenient = "handling=lenient" in preferences
        if level not in EXPORT_LEVELS:
            raise FhirError(400, "not-supported", f"unknown export level {level!r}")
        errors: list[str] = []

        for name in params:
            if name not in _KNOWN_PARAMS:
                if not lenient:
                    raise FhirError(400, "not-supported", f"$export parameter {name!r} is not supported")
                errors.append(_issue_line("warning", "not-supported",
                                          f"$export parameter {name!r} is not supported; ignored "
                                          "(handling=lenient)"))
        fmt = params.get("_outputFormat")
        if fmt is not None and fmt.strip() not in OUTPUT_FORMATS:
            hint = " (was a '+' sent unencoded? use %2B)" if " " in fmt else ""
            raise FhirError(400, "not-supported", f"_outputFormat {fmt!r} is not supported; use "
                            f"application/fhir+ndjson{hint}")
        since = params.get("_since")
        since_ms = _parse_since(since) if since is not None else None
        if "_typeFilter" in params:
            if not lenient:
                raise FhirError(400, "not-supported", "_typeFilter is not supported")
            errors.append(_issue_line("warning", "not-supported",
                                      "_typeFilter is not supported; ignored, every resource of the "
                                      "requested types is exported (handling=lenient)"))

        requested: list[str] | None = None
        if "_type" in params:
            requested = []
            names = [raw.strip() for raw in params["_type"].split(",") if raw.strip()]
            if not names:
                raise FhirError(400, "invalid", "_type names no resource type")
            for rt in names:
                if rt in requested:
                    continue
                if not _is_certified(rt):
                    if not lenient:
                        raise FhirError(400, "not-supported",
                                        f"_type {rt!r} is not served by the ONC-certified API")
                    errors.append(_issue_line("error", "not-supported",
                                              f"resource type {rt!r} is not served by the ONC-certified "
                                              "API; skipped (handling=lenient)"))
                    continue
                requested.append(rt)

        store = self.state.store
        selection = _Selection(level, since_ms=since_ms)
        if level == "Group":
            if not group_id:
                raise FhirError(400, "invalid", "Group-level $export needs a Group id")
            group = store.get("Group", group_id)
            if group is None or group.deleted:
                raise FhirError(404, "not-found", f"Group/{group_id} is not known")
            members = sorted({pid for member in group.body.get("member") or ()
                              for pid in [_member_patient_id(str((member.get("entity") or {})
                                                                 .get("reference", "")))]
                              if pid is not None})
            selection = _Selection(level, json.dumps(members), frozenset(members), since_ms)

        def in_scope(rt: str) -> bool:
            """Whether the level covers a type (Patient/Group: the Patient compartment)."""
            if not _is_certified(rt):
                return False
            return level == "system" or rt == "Patient" or store.has_patient_link(rt)

        if requested is not None:
            types = [t for t in requested if in_scope(t)]
        elif level == "system":
            types = [t for t in store.types() if in_scope(t)]
        else:
            types = ["Patient", *(t for t in store.types() if t != "Patient" and in_scope(t))]

        allowed: list[str] = []
        for rt in types:
            if scope_allows(scopes, rt, "search-type"):
                allowed.append(rt)
            else:
                explicit = requested is not None
                errors.append(_issue_line("error" if explicit else "warning", "forbidden",
                                          f"the access token's scopes do not allow {rt}; not exported"))

        job = _Job(secrets.token_hex(16), self.clock(), format_instant(self.state.now_ms()), request_url,
                   selection, tuple(allowed), errors)
        with self._lock:
            self._purge()
            self._jobs[job.id] = job
        return f"{fhir_base}/fhir-services/$export-status/{job.id}"

    # -- status and cancel -------------------------------------------------------------------
    def status(self, job_id: str) -> Response:
        """202 with ``Retry-After`` and ``X-Progress`` while running, then 200 with the manifest.

        404 (OperationOutcome) for an unknown, cancelled or expired job.
        """
        job = self._job(job_id)
        if job is None:
            return outcome(404, "not-found", f"No export job {job_id!r} (unknown, cancelled or expired)")
        elapsed = self.clock() - job.started
        duration = self.state.config.export_seconds
        if elapsed < duration:
            total = len(job.types)
            fraction = max(0.0, elapsed / duration) if duration > 0 else 1.0
            done = min(total, int(total * fraction))
            progress = f"{min(99, int(100 * fraction))}% ({done} of {total} types)"
            return Response(b"", status_code=202, headers={
                "Retry-After": str(self.state.config.export_retry_after), "X-Progress": progress})
        sections = self._freeze(job)
        remaining = max(1.0, JOB_TTL_SECONDS - elapsed)

        error_count = self.state.faults.bulk_error_count

        def items(files: Iterable[_OutputFile | _LineFile]) -> list[dict[str, Any]]:
            return [{"type": f.resource_type,
                     "count": error_count if error_count >= 0 and f.resource_type == "OperationOutcome" else f.count,
                     "url": self.state.presign(f"/bulk/{job.id}/{f.name}", ttl=remaining)} for f in files]

        manifest: dict[str, Any] = {
            "transactionTime": job.transaction_time,
            "request": job.request_url,
            "requiresAccessToken": False,
            "output": items(sections["output"]),
            "error": items(sections["error"]),
        }
        if job.selection.since_ms is not None:
            manifest["deleted"] = items(sections["deleted"])
        expires = formatdate(self.state.now() + remaining, usegmt=True)
        return Response(json.dumps(manifest, separators=(",", ":")), status_code=200,
                        media_type="application/json", headers={"Expires": expires})

    def cancel(self, job_id: str) -> Response:
        """Forget a job: 202 with an informational OperationOutcome; 404 if unknown."""
        job = self._job(job_id)
        with self._lock:
            removed = self._jobs.pop(job_id, None) if job is not None else None
        if removed is None:
            return outcome(404, "not-found", f"No export job {job_id!r} (unknown, cancelled or expired)")
        return outcome(202, "informational", f"Export job {job_id} cancelled; its files are deleted",
                       severity="information")

    # -- files -------------------------------------------------------------------------------
    async def download(self, request: Request, job_id: str, file_name: str) -> Response:
        """Serve one output/error/deleted file on the storage listener (the caller has already
        checked the presigned signature and refused Authorization headers)."""
        job = self._job(job_id)
        entry = job.files.get(file_name) if job is not None and job.sections is not None else None
        if job is None or entry is None:
            return _not_found_xml()
        state = self.state
        with state.lock:
            state.stats["bulk_downloads"] += 1
            state.stats[f"bulk_downloads:{file_name}"] += 1
            lines_per_chunk = state.faults.bulk_chunk_lines
            gzip = state.faults.bulk_gzip and "gzip" in request.headers.get("accept-encoding", "")
            truncate = state.faults.truncate_downloads > 0
            if truncate:
                state.faults.truncate_downloads -= 1
                state.stats["truncated_downloads"] += 1
        if isinstance(entry, _OutputFile):
            with state.lock:
                state.stats["served"] += entry.count
            length = await run_in_threadpool(self._output_length, job.selection, entry)
            chunks = self._output_chunks(job.selection, entry)
        else:
            length = sum(len(line.encode()) + 1 for line in entry.lines)
            chunks = self._line_chunks(entry.lines)
        if lines_per_chunk > 0:  # one chunk per n lines
            chunks = _rechunk(chunks, lines_per_chunk)
        body = self._stream(chunks, length, truncate)
        if gzip:  # without Content-Length: chunked encoding, one gzip chunk per chunk
            return StreamingResponse(_gzip(body), media_type=NDJSON, headers={"Content-Encoding": "gzip"})
        if lines_per_chunk > 0:  # without Content-Length: chunked encoding
            return StreamingResponse(body, media_type=NDJSON)
        return StreamingResponse(body, media_type=NDJSON, headers={"Content-Length": str(length)})

    async def _stream(self, chunks: AsyncIterator[bytes], length: int,
                      truncate: bool) -> AsyncIterator[bytes]:
        """Send exactly ``length`` bytes, pausing per the slow-download fault, or drop mid-body."""
        limit = max(1, length // 2) if truncate else length
        sent = 0
        async for chunk in chunks:
            delay = self.state.faults.slow_download_ms
            if delay:
                await asyncio.sleep(delay / 1000)
            if sent + len(chunk) > limit:
                yield chunk[: limit - sent]
                sent = limit
                break
            sent += len(chunk)
            yield chunk
        if truncate:
            raise _InjectedTruncation("sandbox fault: bulk download truncated mid-body (truncate_downloads)")
        if sent != length:
            # the store changed under the file since Content-Length was computed: fail loudly
            raise TruncatedDownload("bulk file changed while it was being sent")

    @staticmethod
    async def _line_chunks(lines: Sequence[str]) -> AsyncIterator[bytes]:
        for i in range(0, len(lines), _STREAM_BATCH):
            yield "".join(f"{line}\n" for line in lines[i:i + _STREAM_BATCH]).encode()

    async def _output_chunks(self, selection: _Selection, entry: _OutputFile) -> AsyncIterator[bytes]:
        after = entry.first_seq - 1
        while after < entry.last_seq:
            rows = await run_in_threadpool(self._read_batch, selection, entry, after)
            if not rows:
                return
            after = rows[-1][0]
            yield "".join(f"{line}\n" for _, line in rows).encode()

    # -- store access (read-only; store.py has no range queries) ------------------------------
    def _read_batch(self, selection: _Selection, entry: _OutputFile, after: int) -> list[tuple[int, str]]:
        """(seq, NDJSON line in certified ids) of the next rows of a file after ``seq`` ``after``."""
        where, args = selection.where(entry.resource_type)
        store = self.state.store
        with store._lock:
            rows = store._db.execute(
                f"SELECT r.seq, r.id, r.body FROM resources r WHERE {where} AND r.seq > ? AND r.seq <= ? "  # noqa: S608
                "ORDER BY r.seq LIMIT ?", [*args, after, entry.last_seq, _STREAM_BATCH]).fetchall()
        return [(int(seq), certify_json(str(rid), str(body))) for seq, rid, body in rows]

    def _output_length(self, selection: _Selection, entry: _OutputFile) -> int:
        """Bytes of the file: each line's UTF-8 length plus its newline."""
        size = 0
        after = entry.first_seq - 1
        while rows := self._read_batch(selection, entry, after):
            size += sum(len(line.encode()) + 1 for _, line in rows)
            after = rows[-1][0]
        return size

    def _seq_chunks(self, selection: _Selection, resource_type: str) -> Iterable[tuple[int, int, int]]:
        """(first_seq, last_seq, count) of consecutive runs of at most BULK_FILE_MAX_RESOURCES rows."""
        where, args = selection.where(resource_type)
        store = self.state.store
        after = 0
        while True:
            with store._lock:
                seqs = [int(r[0]) for r in store._db.execute(
                    f"SELECT r.seq FROM resources r WHERE {where} AND r.seq > ? "  # noqa: S608
                    "ORDER BY r.seq LIMIT ?", [*args, after, BULK_FILE_MAX_RESOURCES]).fetchall()]
            if not seqs:
                return
            yield seqs[0], seqs[-1], len(seqs)
            if len(seqs) < BULK_FILE_MAX_RESOURCES:
                return
            after = seqs[-1]

    def _deleted_lines(self, selection: _Selection, resource_type: str) -> Iterable[str]:
        """Bundle lines for resources of a type deleted after ``_since`` that the selection covers."""
        assert selection.since_ms is not None
        store = self.state.store
        after = 0
        while True:
            with store._lock:
                rows = store._db.execute(
                    "SELECT seq, id, body FROM resources WHERE type = ? AND deleted = 1 AND lu_ms > ? "
                    "AND seq > ? ORDER BY seq LIMIT ?",
                    (resource_type, selection.since_ms, after, _STREAM_BATCH)).fetchall()
            if not rows:
                return
            for seq, rid, body in rows:
                after = int(seq)
                if selection.level == "system" or selection.deleted_matches(resource_type, str(rid),
                                                                             json.loads(body)):
                    yield _deleted_line(resource_type, rid)

    # -- jobs --------------------------------------------------------------------------------
    def _freeze(self, job: _Job) -> dict[str, list[_OutputFile | _LineFile]]:
        """Fix the job's files once, at its completion (boundaries and counts only, no bodies)."""
        with job.lock:
            if job.sections is not None:
                return job.sections
            output: list[_OutputFile | _LineFile] = []
            deleted_lines: list[str] = []
            for rt in job.types:
                for n, (first, last, count) in enumerate(self._seq_chunks(job.selection, rt), start=1):
                    output.append(_OutputFile(f"{rt}.{n}.ndjson", rt, count, first, last))
                if job.selection.since_ms is not None:
                    deleted_lines.extend(self._deleted_lines(job.selection, rt))
            sections: dict[str, list[_OutputFile | _LineFile]] = {
                "output": output,
                "error": _line_files("error", "OperationOutcome", job.errors),
                "deleted": _line_files("deleted", "Bundle", deleted_lines),
            }
            job.files = {f.name: f for files in sections.values() for f in files}
            job.sections = sections
            return sections

    def _job(self, job_id: str) -> _Job | None:
        """The live job, or None (unknown, cancelled, or older than JOB_TTL_SECONDS)."""
        with self._lock:
            job = self._jobs.get(job_id)
            if job is not None and self.clock() - job.started >= JOB_TTL_SECONDS:
                del self._jobs[job_id]
                return None
            return job

    def _purge(self) -> None:
        now = self.clock()
        for job_id in [j.id for j in self._jobs.values() if now - j.started >= JOB_TTL_SECONDS]:
            del self._jobs[job_id]
