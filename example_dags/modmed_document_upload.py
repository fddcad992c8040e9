"""
### ModMed: upload every PDF in a folder as a DocumentReference on the right patient

One mapped task per PDF: `ModMedDocumentUploadOperator` runs ModMed's three upload steps (Binary ->
presigned PUT, without credentials -> DocumentReference) and files the document on the patient named by
the file.

**File names**: `<patientId>_<anything>.pdf`, e.g. `1234_referral-letter.pdf` -> `Patient/1234`. The
patient id is ModMed's id (letters, digits, `-` and `.`), everything after the first `_` is free, and the
extension is `.pdf` (any case). Only the folder's top level is read; other files are ignored. A PDF whose
name does not follow the convention is skipped and counted (param `on_unmatched="fail"` fails the run
instead). Keep patient data out of file names: the name becomes the document's name in ModMed and appears
in the task's XCom and rendered template.

**Safe to re-run and to retry**: each upload carries an idempotency identifier (a digest of the bytes, the
file name and the patient). A retried task, or the next run over the same folder, finds the
DocumentReference created before and creates nothing (`created: false`). The files are left in place:
move or delete them downstream if the folder keeps growing (each known file still costs one search).

**Connection**: `modmed_default` (param `conn_id`), proprietary track (document upload is a proprietary
API). **Params**: `folder` (a local path or an object storage URL such as `s3://aws_default@bucket/inbox`;
default: the two synthetic sample PDFs in `example_dags/data/inbox/`, for patients 1 and 2), `category` (a
code or display name from the firm's `ValueSet/document-category`, default `CLINICAL`), `on_unmatched`.

**Against the sandbox**: `make demo` runs it; or start `modmed-sandbox serve --port 8899`, export the
`airflow_connections` of `modmed-sandbox credentials --json --port 8899` as `AIRFLOW_CONN_MODMED_DEFAULT=...`
and run `airflow dags test modmed_document_upload`. The bundled sample PDFs are uploaded only to a sandbox
(a loopback host): against ModMed, trigger with `{"folder": "<your inbox>"}`.
"""

from __future__ import annotations

import logging
import re
from datetime import timedelta
from pathlib import Path
from typing import Any

import pendulum
from airflow.sdk import ObjectStoragePath, Param, TriggerRule, dag, task

from airflow_provider_modmed.operators.documents import ModMedDocumentUploadOperator

DAG_ID = "modmed_document_upload"
log = logging.getLogger(f"example_dags.{DAG_ID}")
#: two synthetic PDFs (patients 1 and 2 of the sandbox)
SAMPLE_INBOX = Path(__file__).resolve().parent / "data" / "inbox"
#: ``<patientId>_<anything>.pdf``
FILE_NAME = re.compile(r"^(?P<patient_id>[A-Za-z0-9][A-Za-z0-9.\-]{0,63})_.+\.pdf$", re.IGNORECASE)


def is_sandbox(conn_id: str) -> bool:
    """True when the connection points at a loopback host (the modmed-sandbox), read from the connection only."""
    from airflow_provider_modmed.hooks.modmed import ModMedHook

    return ModMedHook(conn_id).targets_loopback


def folder_path(text: str) -> ObjectStoragePath:
    """The folder param as an ObjectStoragePath (an absolute local path or a URL)."""
    from airflow.sdk.exceptions import AirflowFailException

    text = str(text or "").strip()
    if "://" not in text:
        local = Path(text).expanduser()
        if not local.is_absolute():
            raise AirflowFailException("folder must be an absolute path or a URL (file://, s3://, ...)")
        text = "file://" + str(local)
    return ObjectStoragePath(text)


@dag(
    dag_id=DAG_ID,
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    tags=["modmed", "example"],
    doc_md=__doc__,
    params={
        "conn_id": Param("modmed_default", type="string", minLength=1,
                         description="The ModMed connection (proprietary track)."),
        "folder": Param(str(SAMPLE_INBOX), type="string", minLength=1,
                        description="Folder of <patientId>_<anything>.pdf files: an absolute path or an "
                                    "object storage URL (s3://conn_id@bucket/prefix)."),
        "category": Param("CLINICAL", type="string", minLength=1,
                          description="Document category: a code or display name of the firm's "
                                      "ValueSet/document-category."),
        "on_unmatched": Param("skip", enum=["skip", "fail"],
                              description="What to do with a PDF whose name does not start with <patientId>_."),
    },
)
def modmed_document_upload() -> None:
    @task(show_return_value_in_logs=False)  # file names stay out of the log
    def find_pdfs(params: dict[str, Any] | None = None) -> list[dict[str, str]]:
        """List the folder (no ModMed call): one ``{file_path, patient_id}`` per PDF named by the convention."""
        from airflow.sdk.exceptions import AirflowFailException

        assert params is not None
        folder = folder_path(params["folder"])
        if folder.protocol in ("", "file", "local") and Path(folder.path).resolve() == SAMPLE_INBOX \
                and not is_sandbox(params["conn_id"]):
            raise AirflowFailException("the bundled sample PDFs are synthetic and go to the modmed-sandbox only: "
                                       "trigger with {\"folder\": \"<your inbox>\"}")
        if not folder.is_dir():
            raise AirflowFailException("folder does not exist or is not a folder (param 'folder')")
        files, unmatched = [], 0
        for child in sorted(folder.iterdir(), key=lambda p: p.name):
            if not child.name.lower().endswith(".pdf") or not child.is_file():
                continue
            match = FILE_NAME.match(child.name)
            if match is None:
                unmatched += 1
                continue
            files.append({"file_path": str(child), "patient_id": match["patient_id"]})
        log.info("%d PDF(s) to upload; %d skipped (name not <patientId>_<anything>.pdf)", len(files), unmatched)
        if unmatched and params["on_unmatched"] == "fail":
            raise AirflowFailException(f"{unmatched} PDF(s) do not follow <patientId>_<anything>.pdf")
        return files

    # one mapped task per file; expand_kwargs pairs each file with its own patient
    upload = ModMedDocumentUploadOperator.partial(
        task_id="upload",
        modmed_conn_id="{{ params.conn_id }}",
        category="{{ params.category }}",
        retries=3,
        retry_delay=timedelta(seconds=30),
        map_index_template="Patient/{{ task.patient_id }}",
    ).expand_kwargs(find_pdfs())

    @task(trigger_rule=TriggerRule.NONE_FAILED)
    def report(results: list[dict[str, Any]]) -> dict[str, Any]:
        """Counts and DocumentReference ids only."""
        done = [r for r in results[:] if r]  # [:] fetches every mapped result in one request
        created = sum(1 for r in done if r["created"])
        log.info("DocumentReferences: %d uploaded, %d already there (uploaded by an earlier run or try)",
                 created, len(done) - created)
        return {"uploaded": created, "already_there": len(done) - created,
                "document_reference_ids": [r["id"] for r in done]}

    report(upload.output)  # type: ignore[arg-type]


modmed_document_upload()
