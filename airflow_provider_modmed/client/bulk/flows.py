"""The bulk export's flows (see :mod:`..drivers`): kick-off, status polling, cancel, one file's download,
start (or resume), finish, and the whole export with its restarts. They yield steps and never do I/O:
requests (the kick-off marked ``NO_RESEND``: sent once), sleeps, :class:`~..drivers.Fetch` (stream a file
into its verifying sink) and :class:`~..drivers.Parallel` (bounded concurrent downloads)."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any

import httpx

from airflow_provider_modmed.client._flows import FhirContext
from airflow_provider_modmed.client.auth import NO_CREDENTIALS
from airflow_provider_modmed.client.bulk.errors import (
    DownloadError,
    ExportFailedError,
    ExportGoneError,
    VerificationError,
)
from airflow_provider_modmed.client.bulk.manifest import Manifest, ManifestItem
from airflow_provider_modmed.client.bulk.request import NDJSON, ExportRequest
from airflow_provider_modmed.client.bulk.run import ExportRun
from airflow_provider_modmed.client.bulk.sink import BLOCK_BYTES, MAX_LINE_BYTES, FileRecord
from airflow_provider_modmed.client.config import origin
from airflow_provider_modmed.client.drivers import Fetch, Fetched, Flow, Parallel, Sleep
from airflow_provider_modmed.client.retry import FLOW_RETRIES, WHAT, backoff, retry_after_seconds
from airflow_provider_modmed.errors import (
    ConfigurationError,
    ModMedError,
    RateLimitedError,
    ServerError,
    TransportError,
    error_for_status,
    issues_from_body,
    json_body,
)

log = logging.getLogger("airflow_provider_modmed.client.bulk")

#: poll-failure ``issue.code`` values that mean "keep polling" (IG v2, status request)
TRANSIENT_ISSUE_CODES = frozenset({"transient", "lock-error", "no-store", "exception", "timeout",
                                   "incomplete", "throttled"})
#: answers without an OperationOutcome that are worth polling again
TRANSIENT_STATUSES = frozenset({408, 429, 500, 502, 503, 504})

_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]+")


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
        retry_after = retry_after_seconds(response, cap=self.max_wait) if response is not None else None
        return backoff(attempt, self.initial_wait, self.max_wait, factor=1.5, floor=self.min_wait,
                       retry_after=retry_after)


@dataclass(frozen=True)
class DownloadPolicy:
    """Downloads: ``concurrency`` files at a time, ``retries`` more tries per file (429/5xx, broken or
    unverifiable transfers), ``max_line_bytes`` the longest accepted NDJSON line (memory bound),
    ``block_bytes`` how much of the body is gathered before it is written, hashed and checked (CPU per
    chunk vs memory; 1 processes every network chunk as it comes)."""

    concurrency: int = 4
    retries: int = 3
    backoff: float = 1.0
    max_line_bytes: int = MAX_LINE_BYTES
    block_bytes: int = BLOCK_BYTES

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise ConfigurationError("download concurrency must be >= 1")
        if self.retries < 0:
            raise ConfigurationError("download retries must be >= 0")
        if self.block_bytes < 1:
            raise ConfigurationError("download block_bytes must be >= 1")

    def wait(self, fetched: Fetched, attempt: int) -> float:
        return backoff(attempt, self.backoff, 60.0, retry_after=fetched.retry_after, retry_after_cap=120.0)


# -- flows ---------------------------------------------------------------------------------------

def kick_off(ctx: FhirContext, request: ExportRequest, *, max_throttled: int = 5,
             policy: PollPolicy | None = None) -> Flow[str]:
    """Kick off ``request``; returns the absolute status URL (``Content-Location``).

    The capability pre-flight runs now, before any request exists. The request is sent once: 429 is
    waited out (the server refused before acting), but a 5xx or a timeout may mean a job exists, so it
    is an error, never a silent second kick-off.
    """
    request.preflight(ctx)
    return _kick_off(ctx, request, max_throttled, policy or PollPolicy())


def _kick_off(ctx: FhirContext, request: ExportRequest, max_throttled: int, policy: PollPolicy) -> Flow[str]:
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


def poll_status(status_url: str, policy: PollPolicy | None = None, logger: Any = None) -> Flow[Manifest]:
    """Poll the status URL until the manifest (200). 202: log ``X-Progress``, wait ``Retry-After``.
    Transient failures (OperationOutcome with a transient code, bare 5xx, 429, no answer at all) are
    polled again up to ``policy.max_errors`` in a row; 404/410 raise :class:`ExportGoneError`; other
    failures :class:`ExportFailedError` (or the typed error for 401/403).

    This loop is the one poll policy: each poll is sent once (``FLOW_RETRIES``), never resent by the
    generic retry layer, so every failed answer counts here, against ``max_errors``."""
    policy = policy or PollPolicy()
    logger = logger or log
    what = "bulk export status"
    waits = errors = 0
    while True:
        try:
            response = yield httpx.Request("GET", status_url, headers={"Accept": "application/json"},
                                           extensions={WHAT: what, FLOW_RETRIES: True})
        except (TransportError, ServerError, RateLimitedError) as exc:
            # no answer (or the token endpoint failed before the poll left): transient too
            if errors >= policy.max_errors:
                raise type(exc)(f"{what} kept failing ({errors + 1} transient failures in a row; the last: "
                                f"{exc.message})", status_code=exc.status_code, issues=exc.issues) from exc
            errors += 1
            wait = policy.wait(None, errors)
            logger.warning(f"modmed: {what} got no answer ({type(exc).__name__}); transient, polling again "
                           f"({errors}/{policy.max_errors}) in {wait:.1f}s")
            yield Sleep(wait)
            continue
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
            shown = f" [{', '.join(sorted({i.label for i in issues}))}]" if issues else ""
            logger.warning(f"modmed: {what} answered HTTP {status}{shown}; transient, polling again "
                           f"({errors}/{policy.max_errors}) in {wait:.1f}s")
            yield Sleep(wait)
            continue
        if transient:
            cls = RateLimitedError if status == 429 else ServerError
            raise cls(f"{what} kept failing ({errors + 1} transient failures in a row)", status_code=status,
                      issues=issues)
        raise ExportFailedError(f"the bulk export job failed ({what})", status_code=status, issues=issues)


def cancel(status_url: str) -> Flow[bool]:
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
                  policy: DownloadPolicy | None = None) -> Flow[FileRecord]:
    """Store one file (``.part`` + verification + rename + checkpoint), retrying 408/429/5xx, broken
    transfers and failed verifications up to ``policy.retries`` times. A line count that differs from the
    manifest's ``count`` after a complete transfer fails at once, naming both numbers: the same bytes
    again would not change it (a broken transfer is fetched again, as any other)."""
    policy = policy or DownloadPolicy()
    attempt = 0
    while True:
        attempt += 1
        sink = run.sink(item, policy.max_line_bytes, policy.block_bytes)
        fetched = yield Fetch(file_request(item, requires_access_token), sink)
        if fetched.ok:
            record = sink.commit()
            run.file_done(record, item)
            return record
        if sink.miscount is not None:
            lines, count = sink.miscount
            raise VerificationError(f"bulk file {item.name} has {lines} resources but the manifest says {count} "
                                    f"(a complete transfer, attempt {attempt}; not fetched again)")
        retryable = fetched.error is not None or fetched.status_code in TRANSIENT_STATUSES
        if not retryable or attempt > policy.retries:
            cls = VerificationError if fetched.verification else DownloadError
            raise cls(f"bulk file {item.name}: {fetched.describe()} after {attempt} attempt(s)",
                      status_code=fetched.status_code if not fetched.error else None)
        wait = policy.wait(fetched, attempt)
        log.warning("modmed: bulk file %s: %s; retry %d/%d in %.1fs", item.name, fetched.describe(), attempt,
                    policy.retries, wait)
        yield Sleep(wait)


def start(ctx: FhirContext, run: ExportRun, policy: PollPolicy | None = None) -> Flow[str]:
    """The status URL of the run's export: the saved one (resume), or a new kick-off saved at once."""
    run.request.preflight(ctx)
    return _start(ctx, run, policy or PollPolicy())


def _start(ctx: FhirContext, run: ExportRun, policy: PollPolicy) -> Flow[str]:
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
           download: DownloadPolicy | None = None, logger: Any = None) -> Flow[dict[str, Any]]:
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
            (download_file(run, item, manifest.requires_access_token, download) for item in todo),
            download.concurrency)
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
           max_restarts: int = 2, logger: Any = None) -> Flow[dict[str, Any]]:
    """The whole export, resumable: start (or resume), poll, download, complete. A job that is gone
    (404/410) is kicked off again at most ``max_restarts`` times (counted in the state file)."""
    run.request.preflight(ctx)
    return _export(ctx, run, poll or PollPolicy(), download or DownloadPolicy(), max_restarts, logger)


def _export(ctx: FhirContext, run: ExportRun, poll: PollPolicy, download: DownloadPolicy, max_restarts: int,
            logger: Any) -> Flow[dict[str, Any]]:
    if run.state.stage == "complete" and run.state.result is not None:
        log.info("modmed: the bulk export in %s is already complete", run.folder)
        return run.state.result
    while True:
        status_url = yield from _start(ctx, run, poll)
        try:
            return (yield from finish(run, status_url, poll, download, logger))
        except ExportGoneError as gone:
            run.restart_if_allowed(max_restarts, gone)
