"""One export's run folder: its state on disk (:class:`ExportState`, :class:`ExportRun`), the restart
policy, the summary (:func:`summarize`) and the error policy (:func:`apply_error_policy`). No HTTP here.

Layout of a run folder::

    {run}/_state/export.json          request, status URL (saved before anything else), stage,
                                      transactionTime, restarts, final summary (never tokens)
    {run}/_state/files/<file>.json    one checkpoint per stored+verified file (sha256, bytes, lines)
    {run}/manifest.json               the manifest, file URLs without their (signed) query strings
    {run}/output/<Type>.0001.ndjson   resources; error/OperationOutcome.*.ndjson; deleted/Bundle.*.ndjson
    {run}/SHA256SUMS                  ``sha256sum -c`` compatible, written when every file is stored
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Any

from airflow_provider_modmed.client.bulk.errors import DownloadError, ExportErrorsReported, ExportGoneError
from airflow_provider_modmed.client.bulk.manifest import CHECKPOINTS, SECTIONS, Manifest, ManifestItem
from airflow_provider_modmed.client.bulk.request import ExportRequest
from airflow_provider_modmed.client.bulk.sink import BLOCK_BYTES, MAX_LINE_BYTES, FileRecord, NdjsonSink, replace_file
from airflow_provider_modmed.errors import ConfigurationError

log = logging.getLogger("airflow_provider_modmed.client.bulk")

#: error-file severities that count as fatal for the error policy
FATAL_SEVERITIES = frozenset({"fatal", "error"})
#: error policies for the manifest's ``error`` files
ERROR_POLICIES = ("fail", "warn", "ignore")

STATE_FILE = "_state/export.json"
MANIFEST_FILE = "manifest.json"
SUMS_FILE = "SHA256SUMS"
STATE_VERSION = 1


def _write_json(path: Any, obj: Any) -> None:
    """Write JSON atomically (temp file + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f"{path.name}.tmp"
    with tmp.open("wb") as fh:
        fh.write(json.dumps(obj, indent=1, sort_keys=True).encode())
    replace_file(tmp, path)


def _read_json(path: Any) -> Any:
    try:
        with path.open("rb") as fh:
            return json.loads(fh.read())
    except FileNotFoundError:
        return None
    except ValueError:
        log.warning("modmed: ignoring unreadable bulk state file %s", path.name)
        return None


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

    def restart_if_allowed(self, max_restarts: int, why: str | BaseException, count: bool = True) -> None:
        """THE restart policy: a job that is gone is kicked off again at most ``max_restarts`` times,
        counted in the state file. Raises :class:`ExportGoneError` once they are spent; else forgets the
        job and its files (:meth:`restart`), so the next start kicks off a new export. ``count=False``
        restarts without counting (there was no saved job to lose)."""
        if count and self.state.restarts >= max_restarts:
            raise ExportGoneError(
                f"the bulk export job is gone ({why}) and max_restarts={max_restarts} kick-offs were already "
                "made for this run", status_code=getattr(why, "status_code", None),
                issues=getattr(why, "issues", ())) from (why if isinstance(why, BaseException) else None)
        log.warning("modmed: %s; kicking off a new bulk export (restart %d of at most %d)", why,
                    self.state.restarts + int(count), max_restarts)
        self.restart(count=count)

    def _clear_files(self) -> None:
        for sub in (CHECKPOINTS, *SECTIONS):
            folder = self.folder / sub
            if folder.exists():
                for path in folder.iterdir():
                    path.unlink()
        for name in (MANIFEST_FILE, SUMS_FILE):
            (self.folder / name).unlink(missing_ok=True)

    # -- files ------------------------------------------------------------------------------------
    def sink(self, item: ManifestItem, max_line_bytes: int = MAX_LINE_BYTES,
             block_bytes: int = BLOCK_BYTES) -> NdjsonSink:
        return NdjsonSink(self.folder, item, max_line_bytes, block_bytes)

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
        if item.expected_lines is not None and record.lines != item.expected_lines:
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
