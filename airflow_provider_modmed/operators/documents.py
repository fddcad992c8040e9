"""ModMedDocumentUploadOperator: a file (local or object storage) -> a ModMed DocumentReference.

The upload goes through ModMed's three steps (Binary -> presigned PUT without credentials ->
DocumentReference; see :mod:`airflow_provider_modmed.client.documents`). A retried task does not create
a second DocumentReference: the upload carries an idempotency key (by default a digest of the bytes, the
file name and the patient) and the document found under it is returned instead.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from airflow_provider_modmed.capabilities import Interaction
from airflow_provider_modmed.client._flows import validate_id
from airflow_provider_modmed.client.documents import (
    DOCUMENT_CATEGORY_VALUE_SET,
    MAX_URL_ATTEMPTS,
    UploadResult,
    guess_content_type,
    upload_document,
)
from airflow_provider_modmed.errors import ConfigurationError
from airflow_provider_modmed.operators._common import ModMedBaseOperator, storage_dataset

if TYPE_CHECKING:
    from airflow.sdk import Context

__all__ = ["ModMedDocumentUploadOperator"]

log = logging.getLogger(__name__)

#: the largest file the operator uploads unless told otherwise (ModMed documents are scans and PDFs)
DEFAULT_MAX_BYTES = 100 * 1024 * 1024


class ModMedDocumentUploadOperator(ModMedBaseOperator):
    """Upload a document to ModMed and push the DocumentReference id.

    :param file_path: a local path (``/data/scan.pdf``) or an object storage URL (``s3://bucket/scan.pdf``,
        read through Airflow's ObjectStoragePath); templated.
    :param category: the document category: a code (``"LAB"``) or display name (``"Lab Result"``) from the
        firm's ``ValueSet/document-category`` (looked up), or a coding dict (used as is); templated.
    :param patient_id: the Patient the document belongs to; without one, ModMed files it in the
        unassociated documents queue. Templated.
    :param filename: the name ModMed shows; default the file's name. Templated.
    :param content_type: the MIME type; default guessed from the file name (``mimetypes``). Templated.
    :param description: a description of the document; templated (kept out of rendered templates).
    :param idempotency_key: identifies this upload across retries; default a digest of the bytes, the file
        name and the patient. Templated.
    :param deduplicate: search for the key before uploading and create conditionally (default True).
    :param input_conn_id: Airflow connection for the object storage of ``file_path``.
    :param max_bytes: refuse larger files (default 100 MiB).
    :return: ``{"resource_type": "DocumentReference", "id", "version_id", "created", "url_attempts", "size",
        "content_type", "category"}``; the id is also pushed as XCom ``document_reference_id``.
    """

    template_fields: Sequence[str] = ("modmed_conn_id", "file_path", "category", "patient_id", "filename",
                                      "content_type", "description", "idempotency_key")
    template_fields_renderers = {"category": "json"}
    phi_template_fields = ("description",)
    ui_color = "#eaf5ea"

    def __init__(self, *, file_path: str | os.PathLike[str], category: str | Mapping[str, Any],
                 patient_id: str | None = None, filename: str | None = None, content_type: str | None = None,
                 description: str | None = None, idempotency_key: str | None = None, deduplicate: bool = True,
                 input_conn_id: str | None = None, max_bytes: int = DEFAULT_MAX_BYTES,
                 max_url_attempts: int = MAX_URL_ATTEMPTS, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.file_path = file_path
        self.category = category
        self.patient_id = patient_id
        self.filename = filename
        self.content_type = content_type
        self.description = description
        self.idempotency_key = idempotency_key
        self.deduplicate = deduplicate
        self.input_conn_id = input_conn_id
        self.max_bytes = max_bytes
        self.max_url_attempts = max_url_attempts

    def _source(self) -> Any:
        """The file as a ``pathlib.Path`` (local) or ``ObjectStoragePath``; checked to exist."""
        raw = os.fspath(self.file_path) if isinstance(self.file_path, os.PathLike) else self.file_path
        if hasattr(self.file_path, "fs") or (isinstance(raw, str) and "://" in raw and not raw.startswith("file://")):
            from airflow.sdk import ObjectStoragePath

            path: Any = (self.file_path if hasattr(self.file_path, "fs") else
                         ObjectStoragePath(raw, conn_id=self.input_conn_id) if self.input_conn_id
                         else ObjectStoragePath(raw))
        elif isinstance(raw, str) and raw.strip():
            from pathlib import Path

            path = Path(raw[len("file://"):] if raw.startswith("file://") else raw).expanduser()
        else:
            raise ConfigurationError("file_path is required: a local path or an object storage URL")
        if not path.exists():
            raise ConfigurationError(f"file_path {str(path)!r} does not exist")
        if not path.is_file():
            raise ConfigurationError(f"file_path {str(path)!r} is not a file")
        return path

    def execute(self, context: Context) -> dict[str, Any]:
        with self.fail_fast():
            self.preflight("Binary", Interaction.CREATE)
            self.preflight("DocumentReference", Interaction.CREATE)
            if self.patient_id not in (None, ""):
                validate_id(str(self.patient_id).strip(), "patient_id")  # native templating may give an int
            category = self.category
            if category in (None, "", {}):
                raise ConfigurationError("category is required: a code or display name from the firm's "
                                         f"ValueSet/{DOCUMENT_CATEGORY_VALUE_SET}, or a coding dict")
            source = self._source()
            size = _size(source)
            if size is not None and size > self.max_bytes:
                raise ConfigurationError(f"file_path is {size} bytes, more than max_bytes={self.max_bytes}")
            filename = str(self.filename or source.name)
            content_type = str(self.content_type or guess_content_type(filename))
            content = source.read_bytes()
            if len(content) > self.max_bytes:
                raise ConfigurationError(f"file_path is {len(content)} bytes, more than max_bytes={self.max_bytes}")
        patient = str(self.patient_id).strip() if self.patient_id not in (None, "") else None
        client = self.hook.get_conn()
        with self.fail_fast():
            result: UploadResult = self.run_closing(lambda: upload_document(
                client, content, filename=filename, category=category, patient_id=patient,
                content_type=content_type, description=self.phi_value("description") or None,
                idempotency_key=self.idempotency_key or None, deduplicate=self.deduplicate,
                max_url_attempts=self.max_url_attempts))
        if result.created:
            log.info("Uploaded the document (%s, %d bytes, category %s) in %d presigned URL attempt(s)",
                     content_type, result.size, result.category_code, result.url_attempts)
        else:
            log.info("The document was uploaded by an earlier attempt; returning that DocumentReference")
        log.debug("DocumentReference id %s", result.id)
        context["ti"].xcom_push(key="document_reference_id", value=result.id)
        return result.to_dict()

    def lineage_datasets(self) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
        raw = os.fspath(self.file_path) if isinstance(self.file_path, os.PathLike) else str(self.file_path)
        return [storage_dataset(raw)], [(self.lineage_namespace(), "DocumentReference")]


def _size(path: Any) -> int | None:
    try:
        stat = path.stat()
    except (OSError, NotImplementedError):
        return None
    size = stat.get("size") if isinstance(stat, Mapping) else getattr(stat, "st_size", None)
    return int(size) if size is not None else None
