"""
### ModMed: write allergies and conditions back from a file, safe to re-run

Reads a CSV (one allergy or condition per row), checks every row, then creates the AllergyIntolerance and
Condition resources on ModMed. **A second run creates nothing new**: each resource carries an identifier
derived from its row (system `urn:airflow-provider-modmed:write-back`, value a digest of
`kind|patient_id|code_system|code`), the task first looks that identifier up, and the create is
conditional on it (`If-None-Exist`), so a retried task or a lost answer cannot create a duplicate either.
A row whose display, status or onset changed is the same resource (same key) and is left as it is:
corrections belong in an update (`ModMedUpdateResourceOperator` with a patch). The task checks that what
ModMed answers carries the identifier: a server that ignored the identifier search, or dropped the
identifier, fails the task at once instead of letting later runs duplicate.

**The file** (`file` param; a local path or an object storage URL such as `s3://aws_default@bucket/wb.csv`):

| column | value |
| --- | --- |
| `kind` | `allergy` or `condition` |
| `patient_id` | ModMed's Patient id |
| `code_system`, `code`, `display` | the coding (e.g. SNOMED CT for allergies, ICD-10-CM for conditions) |
| `clinical_status` | `active`, `inactive` or `resolved` (sent upper-case on a Condition: ModMed's convention) |
| `category` | food, medication, environment, biologic (allergy); problem-list-item, encounter-diagnosis (condition) |
| `onset_date` | optional, `YYYY-MM-DD` |

An empty `category` means none for an allergy and `problem-list-item` for a condition.

The default is the synthetic `example_dags/data/write_back.csv` (patients 1 to 3), written only to a sandbox
(a loopback host): against ModMed, trigger with `{"file": "<your file>"}`. `check_file` validates every row
(FHIR R4 included) before anything is written: a bad row fails the run with its row number and column,
never its values, and nothing is created.

**Why not `ModMedCreateResourceOperator` mapped over the rows?** Mapping stores each row's resource in XCom,
and these are patient data. Here the rows stay in the file; XCom holds counts and ids only. For a few
resources from params, `ModMedCreateResourceOperator(resource=..., if_none_exist=True)` is the one-liner
(its rendered template is masked).

**Connection**: `modmed_default` (param `conn_id`), proprietary track (the certified API is read-only).

**Against the sandbox**: `make demo` runs it; or start `modmed-sandbox serve --port 8899`, export the
`airflow_connections` of `modmed-sandbox credentials --json --port 8899` as `AIRFLOW_CONN_MODMED_DEFAULT=...`
and run `airflow dags test modmed_write_back` twice: the second run reports 0 created.
"""

from __future__ import annotations

import csv
import hashlib
import logging
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pendulum
from airflow.sdk import ObjectStoragePath, Param, dag, task

DAG_ID = "modmed_write_back"
log = logging.getLogger(f"example_dags.{DAG_ID}")
SAMPLE_FILE = Path(__file__).resolve().parent / "data" / "write_back.csv"
#: the identifier system of the row keys: use your source system's URI
ROW_KEY_SYSTEM = "urn:airflow-provider-modmed:write-back"
RESOURCE_TYPES = ["AllergyIntolerance", "Condition"]
COLUMNS = ("kind", "patient_id", "code_system", "code", "display", "clinical_status", "category", "onset_date")
KINDS = {"allergy": "AllergyIntolerance", "condition": "Condition"}
CLINICAL_STATUS = {"active", "inactive", "resolved"}
ALLERGY_CATEGORIES = {"food", "medication", "environment", "biologic"}
CONDITION_CATEGORIES = {"problem-list-item", "encounter-diagnosis"}
HL7 = "http://terminology.hl7.org/CodeSystem"


class RowError(ValueError):
    """A row that cannot be written; the message names the row and the column, never the value."""


def file_path(text: str) -> ObjectStoragePath:
    text = str(text or "").strip()
    if "://" not in text:
        if not Path(text).is_absolute():
            raise RowError("file must be an absolute path or a URL (file://, s3://, ...)")
        text = "file://" + text
    return ObjectStoragePath(text)


def row_key(row: dict[str, str]) -> str:
    """The identifier value of a row: stable across runs, no patient data in clear."""
    parts = (row["kind"], row["patient_id"], row["code_system"], row["code"])
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:32]


def to_resource(row: dict[str, str], number: int) -> dict[str, Any]:
    """One CSV row -> an AllergyIntolerance or Condition with its row-key identifier."""
    import re

    def need(column: str) -> str:
        value = (row.get(column) or "").strip()
        if not value:
            raise RowError(f"row {number}: column {column!r} is empty")
        return value

    kind = need("kind").lower()
    if kind not in KINDS:
        raise RowError(f"row {number}: column 'kind' must be allergy or condition")
    patient_id = need("patient_id")
    if not re.fullmatch(r"[A-Za-z0-9.\-]{1,64}", patient_id):
        raise RowError(f"row {number}: column 'patient_id' is not a ModMed id")
    status = need("clinical_status").lower()
    if status not in CLINICAL_STATUS:
        raise RowError(f"row {number}: column 'clinical_status' must be one of {sorted(CLINICAL_STATUS)}")
    category = (row.get("category") or "").strip().lower()
    onset = (row.get("onset_date") or "").strip()
    if onset and not re.fullmatch(r"\d{4}-\d{2}-\d{2}", onset):
        raise RowError(f"row {number}: column 'onset_date' must be YYYY-MM-DD")
    clean = {"kind": kind, "patient_id": patient_id, "code_system": need("code_system"), "code": need("code")}
    code = {"coding": [{"system": clean["code_system"], "code": clean["code"]}]}
    display = (row.get("display") or "").strip()
    if display:
        code["coding"][0]["display"] = display
        code["text"] = display
    resource: dict[str, Any] = {"identifier": [{"system": ROW_KEY_SYSTEM, "value": row_key(clean)}], "code": code}
    if kind == "allergy":
        if category and category not in ALLERGY_CATEGORIES:
            raise RowError(f"row {number}: column 'category' must be one of {sorted(ALLERGY_CATEGORIES)}")
        resource = {
            "resourceType": "AllergyIntolerance", **resource,
            "clinicalStatus": {"coding": [{"system": f"{HL7}/allergyintolerance-clinical", "code": status}]},
            "verificationStatus": {"coding": [{"system": f"{HL7}/allergyintolerance-verification",
                                               "code": "confirmed"}]},
            "type": "allergy", "patient": {"reference": f"Patient/{patient_id}"},
        }
        if category:
            resource["category"] = [category]
    else:
        category = category or "problem-list-item"
        if category not in CONDITION_CATEGORIES:
            raise RowError(f"row {number}: column 'category' must be one of {sorted(CONDITION_CATEGORIES)}")
        resource = {
            "resourceType": "Condition", **resource,
            # ModMed's Condition create takes the clinical status upper-case and refuses "active" with 400
            "clinicalStatus": {"coding": [{"system": f"{HL7}/condition-clinical", "code": status.upper()}]},
            "verificationStatus": {"coding": [{"system": f"{HL7}/condition-ver-status", "code": "confirmed"}]},
            "category": [{"coding": [{"system": f"{HL7}/condition-category", "code": category}]}],
            "subject": {"reference": f"Patient/{patient_id}"},
        }
    if onset:
        resource["onsetDateTime"] = onset
    return resource


def read_resources(text: str) -> Iterator[dict[str, Any]]:
    """Every row of the file as a validated resource; raises RowError on the first bad row."""
    from airflow_provider_modmed.client.validation import validate_resource
    from airflow_provider_modmed.errors import ValidationError

    seen: dict[str, int] = {}
    with file_path(text).open("r", encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in COLUMNS if c not in (reader.fieldnames or ())]
        if missing:
            raise RowError(f"the file lacks column(s) {', '.join(missing)}; expected {', '.join(COLUMNS)}")
        for number, row in enumerate(reader, start=2):  # row 1 is the header
            resource = to_resource(row, number)
            key = resource["identifier"][0]["value"]
            if key in seen:
                raise RowError(f"row {number} repeats row {seen[key]} (same kind, patient and code)")
            seen[key] = number
            try:
                validate_resource(resource, resource["resourceType"])
            except ValidationError as exc:
                raise RowError(f"row {number}: {exc}") from None
            yield resource


def require_key(resource: dict[str, Any], key: dict[str, str]) -> dict[str, Any]:
    """The resource, if it carries the row key: a server that ignored the identifier search (lenient FHIR
    search skips unknown parameters) would answer some other resource, and re-runs could not be safe."""
    from airflow.sdk.exceptions import AirflowFailException

    if not any(i.get("system") == key["system"] and i.get("value") == key["value"]
               for i in resource.get("identifier") or ()):
        raise AirflowFailException(f"ModMed answered a {resource.get('resourceType')} without the row key "
                                   "identifier: it ignores the identifier search or drops the identifier, so "
                                   "a re-run could duplicate; stopping")
    return resource


def is_sandbox(conn_id: str) -> bool:
    """True when the connection points at a loopback host (the modmed-sandbox), read from the connection only."""
    from airflow_provider_modmed.hooks.modmed import ModMedHook

    return ModMedHook(conn_id).targets_loopback


@dag(
    dag_id=DAG_ID,
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    tags=["modmed", "example"],
    doc_md=__doc__,
    # a task whose worker dies (no heartbeat) is retried: every step is safe to run again
    default_args={"retries": 2, "retry_delay": timedelta(seconds=30)},
    params={
        "conn_id": Param("modmed_default", type="string", minLength=1,
                         description="The ModMed connection (proprietary track)."),
        "file": Param(str(SAMPLE_FILE), type="string", minLength=1,
                      description="The CSV: an absolute path or an object storage URL (s3://conn_id@bucket/key)."),
    },
)
def modmed_write_back() -> None:
    @task
    def check_file(params: dict[str, Any] | None = None) -> dict[str, int]:
        """Validate every row before anything is written (no ModMed call); return counts per type."""
        from airflow.sdk.exceptions import AirflowFailException

        assert params is not None
        if Path(str(params["file"]).removeprefix("file://")).resolve() == SAMPLE_FILE \
                and not is_sandbox(params["conn_id"]):
            raise AirflowFailException("the bundled write_back.csv is synthetic and goes to the modmed-sandbox "
                                       "only: trigger with {\"file\": \"<your file>\"}")
        counts = dict.fromkeys(RESOURCE_TYPES, 0)
        try:
            for resource in read_resources(params["file"]):
                counts[resource["resourceType"]] += 1
        except (RowError, FileNotFoundError) as exc:
            raise AirflowFailException(f"{type(exc).__name__}: {exc}") from None
        log.info("The file holds %s", ", ".join(f"{n} {t}" for t, n in counts.items()))
        return counts

    @task
    def write(resource_type: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        """Create the file's resources of one type that ModMed does not have yet (by row key)."""
        from airflow_provider_modmed.hooks.modmed import ModMedHook

        assert params is not None
        hook = ModMedHook(params["conn_id"])
        client = hook.get_conn()
        created: list[str] = []
        existing: list[str] = []
        try:
            for resource in read_resources(params["file"]):
                if resource["resourceType"] != resource_type:
                    continue
                key = resource["identifier"][0]
                condition = {"identifier": f"{ROW_KEY_SYSTEM}|{key['value']}"}
                found = next(iter(client.search(resource_type, condition, count=1)), None)
                if found is not None:
                    existing.append(str(require_key(found, key)["id"]))
                    continue
                # conditional: a retry after a lost answer finds the first one instead of creating another
                created.append(str(require_key(client.create(resource, if_none_exist=condition), key)["id"]))
        finally:
            hook.close()
        log.info("%s: %d created, %d already there", resource_type, len(created), len(existing))
        return {"resource_type": resource_type, "created": len(created), "existing": len(existing),
                "created_ids": created, "existing_ids": existing}

    @task
    def report(results: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
        out = {r["resource_type"]: {"created": r["created"], "existing": r["existing"]}
               for r in results[:]}  # [:]: every mapped result in one request
        log.info("Write-back: %s", "; ".join(f"{t}: {v['created']} created, {v['existing']} already there"
                                             for t, v in out.items()))
        return out

    written = write.expand(resource_type=RESOURCE_TYPES)
    check_file() >> written
    report(written)


modmed_write_back()
