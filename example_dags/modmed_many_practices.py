"""
### ModMed: many practices, one mapped task each

Every morning this DAG fans out over a list of **practice connections** with dynamic task mapping: one
`ModMedSearchResourcesOperator` per practice writes the Appointments that practice has in the coming
days (`date` in `[ds, ds + days_ahead)`) to its own NDJSON file, then a summary task logs one count
per practice. A failing practice fails only its own mapped task (and the run), never the others' output.

**The practices** (one Airflow connection each: every ModMed practice has its own firm, API key and
credentials) come from, in order: the run's `practices` param; the Airflow Variable `modmed_practices`
(a JSON list, e.g. `["practice_a", "practice_b"]`); the default `["modmed_default", "modmed_proprietary_cc"]`.
Connection ids name the output folders, so they must be letters, digits, `_`, `-` or `.`.

**One rate budget each.** ModMed allows 1,000 calls a minute per API key. The provider spends a budget per
practice (firm + API key) before each request, so practices never slow each other down, and two
connections with the same key (as the sandbox's two proprietary connections) share one budget. The default
budget (`memory://`) counts within one worker process: when mapped tasks of the same practice run on
several workers, or other DAGs use the same key, set the connection's extra `rate_limit_storage_uri` to
`redis://redis-host:6379/0` (the `[redis]` extra) so every worker draws from one shared budget per key. To
cap how many practices run at once, use a pool or `max_active_tis_per_dagrun` on the mapped task.

**Output**: `{output_base}/modmed_many_practices/{{ ds }}/{conn_id}/Appointment.ndjson`, where
`output_base` is the run's `output_base` param, else the `[modmed] output_base` setting
(`AIRFLOW__MODMED__OUTPUT_BASE`, e.g. `s3://aws_default@my-bucket/modmed`), else `file:///tmp/modmed`.

**Against the sandbox**: `make demo` runs it; or start `modmed-sandbox serve --port 8899`, export the
`airflow_connections` of `modmed-sandbox credentials --json --port 8899` as `AIRFLOW_CONN_MODMED_DEFAULT`
and `AIRFLOW_CONN_MODMED_PROPRIETARY_CC`, and run `airflow dags test modmed_many_practices`. Against
ModMed: one connection per practice (proprietary track: Appointment is not on the certified API), listed
in the `modmed_practices` Variable.

**Params**: `practices` (default: the Variable, then the two sandbox connections), `days_ahead` (14),
`output_base`.
"""

from __future__ import annotations

import logging
import re
from datetime import timedelta
from typing import Any

import pendulum
from airflow.sdk import Param, dag, task

from airflow_provider_modmed.operators.resources import ModMedSearchResourcesOperator

DAG_ID = "modmed_many_practices"
log = logging.getLogger(f"example_dags.{DAG_ID}")
DEFAULT_PRACTICES = ["modmed_default", "modmed_proprietary_cc"]
PRACTICES_VARIABLE = "modmed_practices"
DEFAULT_OUTPUT_BASE = "file:///tmp/modmed"
CONN_ID = re.compile(r"^[A-Za-z0-9_.\-]{1,250}$")


def modmed_output_base(override: str | None = None) -> str:
    """The run's ``output_base`` param, else ``[modmed] output_base``, else ``file:///tmp/modmed``."""
    if override:
        return str(override).rstrip("/")
    from airflow.sdk import conf

    return str(conf.get("modmed", "output_base", fallback=DEFAULT_OUTPUT_BASE)).rstrip("/")


@dag(
    dag_id=DAG_ID,
    schedule="0 5 * * *",
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    tags=["modmed", "example"],
    doc_md=__doc__,
    default_args={"retries": 2, "retry_delay": timedelta(minutes=1)},
    params={
        "practices": Param(None, type=["null", "array"], items={"type": "string"},
                           description="Practice connection ids. Empty: the Airflow Variable modmed_practices "
                                       "(a JSON list), else modmed_default and modmed_proprietary_cc."),
        "days_ahead": Param(14, type="integer", minimum=1, maximum=366,
                            description="Appointments from the run's date for this many days."),
        "output_base": Param(None, type=["null", "string"],
                             description="Where the NDJSON goes (file:///..., s3://conn_id@bucket/prefix). "
                                         "Empty: the [modmed] output_base setting, else file:///tmp/modmed."),
    },
)
def modmed_many_practices() -> None:
    @task
    def practices(ds: str | None = None, params: dict[str, Any] | None = None) -> list[dict[str, str]]:
        """The practice list -> one ``{modmed_conn_id, output_path}`` per practice (no ModMed call)."""
        from airflow.sdk import Variable
        from airflow.sdk.exceptions import AirflowFailException

        assert params is not None
        conn_ids = params.get("practices")
        source = "param"
        if not conn_ids:
            conn_ids = Variable.get(PRACTICES_VARIABLE, default=None, deserialize_json=True)
            source = f"Variable {PRACTICES_VARIABLE}"
        if not conn_ids:
            conn_ids, source = DEFAULT_PRACTICES, "default"
        if not isinstance(conn_ids, list) or not all(isinstance(c, str) and CONN_ID.match(c) for c in conn_ids):
            raise AirflowFailException(f"practices ({source}) must be a list of connection ids "
                                       "(letters, digits, _, - or .)")
        if len(set(conn_ids)) != len(conn_ids):
            raise AirflowFailException(f"practices ({source}) lists a connection twice")
        base = f"{modmed_output_base(params.get('output_base'))}/{DAG_ID}/{ds}"
        log.info("%d practice(s) from the %s: %s", len(conn_ids), source, ", ".join(conn_ids))
        return [{"modmed_conn_id": c, "output_path": f"{base}/{c}/Appointment.ndjson"} for c in conn_ids]

    practice_list = practices()

    # one mapped search per practice, each with its own connection (and so its own rate budget)
    appointments = ModMedSearchResourcesOperator.partial(
        task_id="appointments",
        resource_type="Appointment",
        search_params={"date": ["ge{{ ds }}", "lt{{ macros.ds_add(ds, params.days_ahead) }}"]},
        map_index_template="{{ task.modmed_conn_id }}",
    ).expand_kwargs(practice_list)

    @task
    def summary(chosen: list[dict[str, str]], results: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
        """One line per practice: its count and file (no patient data)."""
        out = {}
        for practice, result in zip(chosen, results[:], strict=True):  # [:]: every mapped result at once
            out[practice["modmed_conn_id"]] = {"count": result["count"], "path": result["path"]}
            log.info("%s: %d appointment(s) -> %s", practice["modmed_conn_id"], result["count"], result["path"])
        log.info("%d practice(s), %d appointment(s) in all", len(out), sum(v["count"] for v in out.values()))
        return out

    summary(practice_list, appointments.output)  # type: ignore[arg-type]


modmed_many_practices()
