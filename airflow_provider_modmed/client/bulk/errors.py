"""The bulk export's errors: what the server reported about the job, and what a file turned out to hold."""

from __future__ import annotations

from airflow_provider_modmed.errors import ModMedError, NotFoundError


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
