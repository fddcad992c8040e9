"""Bulk Data Access IG v2 (``$export``) client: kick-off, status polling, manifest, streaming download,
cancel and resume. Airflow-free.

Written like :mod:`.._flows`: the decisions (what to request, how long to wait, which answer is transient,
what to download, how to verify and record it) are flows that yield steps and never do I/O; the FHIR
client's two faces run every step kind (:mod:`..drivers`). The package holds one concern per module:

* :mod:`.request`: :class:`ExportRequest`, what to export and its kick-off request (sent once);
* :mod:`.manifest`: :class:`Manifest` and its files (URLs checked: https, or http on loopback);
* :mod:`.sink`: :class:`NdjsonSink`, the verifying NDJSON writer, and its :class:`FileRecord`;
* :mod:`.run`: :class:`ExportRun`, the run folder's state on disk, the restart policy, the summary;
* :mod:`.flows`: :func:`kick_off`, :func:`poll_status`, :func:`cancel`, :func:`download_file`,
  :func:`start`, :func:`finish`, :func:`export`, and their policies;
* :mod:`.faces`: :class:`BulkExportClient` and :class:`AsyncBulkExportClient`.

A retried run resumes the saved status URL instead of kicking off again, and skips every file whose
checkpoint, size and source still match. Files are written to ``<name>.part`` and renamed when complete
and verified, so a killed run never leaves a half file under a final name: no line lost or repeated.
"""

from airflow_provider_modmed.client.bulk.errors import (
    DownloadError,
    ExportErrorsReported,
    ExportFailedError,
    ExportGoneError,
    VerificationError,
)
from airflow_provider_modmed.client.bulk.faces import AsyncBulkExportClient, BulkExportClient
from airflow_provider_modmed.client.bulk.flows import (
    TRANSIENT_ISSUE_CODES,
    TRANSIENT_STATUSES,
    DownloadPolicy,
    PollPolicy,
    cancel,
    download_file,
    export,
    file_request,
    finish,
    kick_off,
    poll_status,
    start,
)
from airflow_provider_modmed.client.bulk.manifest import SECTIONS, Manifest, ManifestItem, strip_query
from airflow_provider_modmed.client.bulk.request import (
    NDJSON,
    OUTPUT_FORMATS,
    ExportRequest,
)
from airflow_provider_modmed.client.bulk.run import (
    ERROR_POLICIES,
    FATAL_SEVERITIES,
    MANIFEST_FILE,
    STATE_FILE,
    SUMS_FILE,
    ExportRun,
    ExportState,
    apply_error_policy,
    summarize,
)
from airflow_provider_modmed.client.bulk.sink import MAX_LINE_BYTES, FileRecord, NdjsonSink
from airflow_provider_modmed.client.drivers import Fetch, Fetched, Parallel
from airflow_provider_modmed.client.instants import normalize_since, parse_instant
from airflow_provider_modmed.client.retry import NO_RESEND

__all__ = [
    "ERROR_POLICIES",
    "FATAL_SEVERITIES",
    "MANIFEST_FILE",
    "MAX_LINE_BYTES",
    "NDJSON",
    "NO_RESEND",
    "OUTPUT_FORMATS",
    "SECTIONS",
    "STATE_FILE",
    "SUMS_FILE",
    "TRANSIENT_ISSUE_CODES",
    "TRANSIENT_STATUSES",
    "AsyncBulkExportClient",
    "BulkExportClient",
    "DownloadError",
    "DownloadPolicy",
    "ExportErrorsReported",
    "ExportFailedError",
    "ExportGoneError",
    "ExportRequest",
    "ExportRun",
    "ExportState",
    "Fetch",
    "Fetched",
    "FileRecord",
    "Manifest",
    "ManifestItem",
    "NdjsonSink",
    "Parallel",
    "PollPolicy",
    "VerificationError",
    "apply_error_policy",
    "cancel",
    "download_file",
    "export",
    "file_request",
    "finish",
    "kick_off",
    "normalize_since",
    "parse_instant",
    "poll_status",
    "start",
    "strip_query",
    "summarize",
]
