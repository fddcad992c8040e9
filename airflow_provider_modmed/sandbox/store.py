"""The sandbox's state: FHIR resources with versions, in SQLite (a file with ``--data-dir``, else memory).

Search parameters are extracted once, when a resource is written, into an index table, so that a
search of a large practice is an indexed query and not a scan of JSON.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from airflow_provider_modmed.client.instants import format_instant, instant_ms

SCHEMA = """
CREATE TABLE IF NOT EXISTS resources (
    type TEXT NOT NULL, id TEXT NOT NULL, seq INTEGER NOT NULL, version INTEGER NOT NULL,
    lu_ms INTEGER NOT NULL, deleted INTEGER NOT NULL DEFAULT 0, body TEXT NOT NULL,
    PRIMARY KEY (type, id));
CREATE INDEX IF NOT EXISTS resources_seq ON resources (type, seq);
CREATE INDEX IF NOT EXISTS resources_lu ON resources (type, lu_ms);
CREATE TABLE IF NOT EXISTS history (
    type TEXT NOT NULL, id TEXT NOT NULL, version INTEGER NOT NULL, lu_ms INTEGER NOT NULL,
    deleted INTEGER NOT NULL, body TEXT NOT NULL, PRIMARY KEY (type, id, version));
CREATE TABLE IF NOT EXISTS params (type TEXT NOT NULL, id TEXT NOT NULL, name TEXT NOT NULL,
    value TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS params_lookup ON params (type, name, value);
CREATE INDEX IF NOT EXISTS params_owner ON params (type, id);
CREATE TABLE IF NOT EXISTS counters (type TEXT PRIMARY KEY, next INTEGER NOT NULL);
"""


def _refs(value: Any) -> Iterator[str]:
    if isinstance(value, dict):
        ref = value.get("reference")
        if isinstance(ref, str):
            yield ref
    elif isinstance(value, list):
        for item in value:
            yield from _refs(item)


def _codes(value: Any) -> Iterator[str]:
    """Codes (and lower-cased displays/texts) of a CodeableConcept, a list of them, or a Coding."""
    items = value if isinstance(value, list) else [value]
    for cc in items:
        if not isinstance(cc, dict):
            continue
        for coding in cc.get("coding") or ([cc] if "code" in cc else []):
            if coding.get("code"):
                yield str(coding["code"])
                if coding.get("system"):
                    yield f"{coding['system']}|{coding['code']}"
            if coding.get("display"):
                yield str(coding["display"]).lower()
        if cc.get("text"):
            yield str(cc["text"]).lower()


def extract_params(resource: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """The search parameters the sandbox supports, as (name, value) pairs."""
    rt = resource.get("resourceType")
    for field in ("subject", "patient", "beneficiary"):
        for ref in _refs(resource.get(field)):
            if ref.startswith("Patient/"):
                yield "patient", ref.split("/", 1)[1]
            yield "subject" if field == "subject" else field, ref
    for participant in resource.get("participant") or ():
        for ref in _refs(participant.get("actor")):
            if ref.startswith("Patient/"):
                yield "patient", ref.split("/", 1)[1]
            yield "actor", ref
    for ident in resource.get("identifier") or ():
        if ident.get("value"):
            yield "identifier", str(ident["value"])
            if ident.get("system"):
                yield "identifier", f"{ident['system']}|{ident['value']}"
    context = resource.get("context")
    for ref in _refs((context.get("encounter") if isinstance(context, dict) else None) or resource.get("encounter")):
        yield "encounter", ref
    if isinstance(resource.get("status"), str):
        yield "status", resource["status"]
    for name in ("category", "code", "type", "class", "appointmentType", "clinicalStatus", "vaccineCode"):
        param = {"appointmentType": "appointment-type", "clinicalStatus": "clinical-status",
                 "vaccineCode": "vaccine-code"}.get(name, name)
        for code in _codes(resource.get(name)):
            yield param, code
    if rt in ("Patient", "Practitioner", "RelatedPerson"):
        for hn in resource.get("name") or ():
            if hn.get("family"):
                yield "family", hn["family"].lower()
                yield "name", hn["family"].lower()
            for given in hn.get("given") or ():
                yield "given", given.lower()
                yield "name", given.lower()
        if resource.get("birthDate"):
            yield "birthdate", resource["birthDate"]
    elif rt in ("Organization", "Location") and resource.get("name"):
        yield "name", str(resource["name"]).lower()
    for field in ("start", "effectiveDateTime", "occurrenceDateTime", "date", "authoredOn",
                  "recordedDate", "onsetDateTime", "issued"):
        if isinstance(resource.get(field), str):
            yield "date", resource[field]
            break
    else:
        period = resource.get("period")
        if isinstance(period, dict) and period.get("start"):
            yield "date", period["start"]
    for ext in resource.get("extension") or ():
        if str(ext.get("url", "")).endswith("/reconciliation-id") and ext.get("valueString"):
            yield "reconciliationId", ext["valueString"]
    if rt == "Group":
        for member in resource.get("member") or ():
            for ref in _refs(member.get("entity")):
                yield "member", ref


@dataclass(frozen=True)
class Row:
    """One stored resource version."""

    type: str
    id: str
    version: int
    lu_ms: int
    deleted: bool
    body: dict[str, Any]


@dataclass(frozen=True)
class Filter:
    """A search filter: ``param`` matches ``values`` (OR), with a string comparison ``op``."""

    param: str
    values: tuple[str, ...]
    op: str = "eq"  # eq | prefix | ge | gt | le | lt


class Store:
    """Thread-safe resource store. One writer at a time; versions kept in ``history``."""

    def __init__(self, path: Path | None = None, *, clock: Any = None) -> None:
        self._db = sqlite3.connect(str(path) if path else ":memory:", check_same_thread=False,
                                   isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL" if path else "PRAGMA journal_mode=MEMORY")
        self._db.execute("PRAGMA synchronous=OFF")
        self._db.executescript(SCHEMA)
        self._lock = threading.RLock()
        self._clock = clock or (lambda: int(time.time() * 1000))

    # -- writing -----------------------------------------------------------------------------
    def is_empty(self) -> bool:
        return self._db.execute("SELECT 1 FROM resources LIMIT 1").fetchone() is None

    def load(self, resources: Iterable[dict[str, Any]], batch: int = 5000) -> int:
        """Bulk-insert seed resources (they carry their own id and meta)."""
        n = 0
        rows: list[tuple[Any, ...]] = []
        params: list[tuple[str, str, str, str]] = []
        with self._lock, self._tx():
            seq = self._max_seq()
            # indexes are cheaper built once after a bulk load than kept up to date row by row
            indexes = self._db.execute("SELECT name, sql FROM sqlite_master WHERE type='index' AND sql IS NOT NULL "
                                       "AND tbl_name IN ('params', 'resources')").fetchall()
            for name, _ in indexes:
                self._db.execute(f"DROP INDEX {name}")
            for res in resources:
                seq += 1
                n += 1
                rt, rid = res["resourceType"], res["id"]
                lu = instant_ms(res["meta"]["lastUpdated"], "meta.lastUpdated")
                body = json.dumps(res, separators=(",", ":"))
                rows.append((rt, rid, seq, int(res["meta"].get("versionId", "1")), lu, body))
                params.extend((rt, rid, k, v) for k, v in extract_params(res))
                if len(rows) >= batch:
                    self._flush(rows, params)
            self._flush(rows, params)
            self._db.execute(
                "INSERT OR REPLACE INTO counters SELECT type, MAX(CAST(id AS INTEGER)) + 1 FROM resources "
                "WHERE id GLOB '[0-9]*' AND id NOT GLOB '*[^0-9]*' GROUP BY type")
            for _, sql in indexes:
                self._db.execute(sql)
        return n

    def _flush(self, rows: list[tuple[Any, ...]], params: list[tuple[str, str, str, str]]) -> None:
        self._db.executemany("INSERT INTO resources (type,id,seq,version,lu_ms,body) VALUES (?,?,?,?,?,?)",
                             rows)
        self._db.executemany("INSERT INTO history (type,id,version,lu_ms,deleted,body) "
                             "VALUES (?,?,?,?,0,?)", [(r[0], r[1], r[3], r[4], r[5]) for r in rows])
        self._db.executemany("INSERT INTO params VALUES (?,?,?,?)", params)
        rows.clear()
        params.clear()

    def _max_seq(self) -> int:
        return int(self._db.execute("SELECT COALESCE(MAX(seq), 0) FROM resources").fetchone()[0])

    def new_id(self, resource_type: str, prefix: str = "") -> str:
        with self._lock:
            row = self._db.execute("SELECT next FROM counters WHERE type=?", (resource_type,)).fetchone()
            nxt = int(row[0]) if row else 1
            while self._db.execute("SELECT 1 FROM resources WHERE type=? AND id=?",
                                   (resource_type, f"{prefix}{nxt}")).fetchone():
                nxt += 1
            self._db.execute("INSERT OR REPLACE INTO counters VALUES (?, ?)", (resource_type, nxt + 1))
            return f"{prefix}{nxt}"

    @contextmanager
    def _tx(self) -> Iterator[None]:
        self._db.execute("BEGIN")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def now_ms(self) -> int:
        return int(self._clock())

    def _write(self, res: dict[str, Any], version: int, seq: int | None, deleted: bool = False) -> Row:
        rt, rid = res["resourceType"], res["id"]
        lu = self.now_ms()
        res["meta"] = {**(res.get("meta") or {}), "versionId": str(version), "lastUpdated": format_instant(lu)}
        body = json.dumps(res, separators=(",", ":"))
        if seq is None:
            seq = self._max_seq() + 1
        self._db.execute("INSERT OR REPLACE INTO resources (type,id,seq,version,lu_ms,deleted,body) "
                         "VALUES (?,?,?,?,?,?,?)", (rt, rid, seq, version, lu, int(deleted), body))
        self._db.execute("INSERT INTO history VALUES (?,?,?,?,?,?)", (rt, rid, version, lu, int(deleted), body))
        self._db.execute("DELETE FROM params WHERE type=? AND id=?", (rt, rid))
        if not deleted:
            self._db.executemany("INSERT INTO params VALUES (?,?,?,?)",
                                 [(rt, rid, k, v) for k, v in extract_params(res)])
        return Row(rt, rid, version, lu, deleted, res)

    def create(self, resource: dict[str, Any], *, id_prefix: str = "") -> Row:
        with self._lock:
            res = dict(resource)
            res["id"] = self.new_id(res["resourceType"], id_prefix)
            res.pop("meta", None)
            with self._tx():
                return self._write(res, 1, None)

    def update(self, resource: dict[str, Any]) -> Row:
        """Write a new version of an existing (not deleted) resource."""
        with self._lock:
            current = self.get(resource["resourceType"], resource["id"])
            if current is None or current.deleted:
                raise KeyError(resource["id"])
            seq = self._db.execute("SELECT seq FROM resources WHERE type=? AND id=?",
                                   (current.type, current.id)).fetchone()[0]
            with self._tx():
                return self._write(dict(resource), current.version + 1, seq)

    def delete(self, resource_type: str, resource_id: str) -> Row | None:
        with self._lock:
            current = self.get(resource_type, resource_id)
            if current is None or current.deleted:
                return None
            seq = self._db.execute("SELECT seq FROM resources WHERE type=? AND id=?",
                                   (resource_type, resource_id)).fetchone()[0]
            with self._tx():
                return self._write(dict(current.body), current.version + 1, seq, deleted=True)

    # -- reading -----------------------------------------------------------------------------
    def get(self, resource_type: str, resource_id: str) -> Row | None:
        with self._lock:
            r = self._db.execute("SELECT version, lu_ms, deleted, body FROM resources WHERE type=? AND id=?",
                                 (resource_type, resource_id)).fetchone()
        if r is None:
            return None
        return Row(resource_type, resource_id, r[0], r[1], bool(r[2]), json.loads(r[3]))

    def _where(self, resource_type: str, filters: Sequence[Filter], lu_range: tuple[int | None, int | None],
               since_ms: int | None = None) -> tuple[str, list[Any]]:
        sql = ["r.type = ?", "r.deleted = 0"]
        args: list[Any] = [resource_type]
        low, high = lu_range
        if low is not None:
            sql.append("r.lu_ms >= ?")
            args.append(low)
        if high is not None:
            sql.append("r.lu_ms < ?")
            args.append(high)
        if since_ms is not None:
            sql.append("r.lu_ms > ?")
            args.append(since_ms)
        for f in filters:
            if f.param == "_id":
                sql.append(f"r.id IN ({','.join('?' * len(f.values))})")
                args.extend(f.values)
                continue
            if f.op == "eq":
                cond = f"p.value IN ({','.join('?' * len(f.values))})"
                cargs: list[Any] = list(f.values)
            elif f.op == "prefix":
                cond = " OR ".join("p.value LIKE ? ESCAPE '\\'" for _ in f.values)
                cargs = [v.replace("%", "\\%").replace("_", "\\_") + "%" for v in f.values]
            else:
                cmp = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}[f.op]
                cond = f"p.value {cmp} ?"
                cargs = [f.values[0]]
            sql.append("EXISTS (SELECT 1 FROM params p WHERE p.type = r.type AND p.id = r.id "  # noqa: S608
                       f"AND p.name = ? AND ({cond}))")
            args.append(f.param)
            args.extend(cargs)
        return " AND ".join(sql), args

    def search(self, resource_type: str, filters: Sequence[Filter] = (),
               lu_range: tuple[int | None, int | None] = (None, None), *, offset: int = 0,
               count: int = 50, with_total: bool = False) -> tuple[list[Row], int | None]:
        where, args = self._where(resource_type, filters, lu_range)
        with self._lock:
            rows = self._db.execute(
                f"SELECT r.id, r.version, r.lu_ms, r.body FROM resources r WHERE {where} "  # noqa: S608
                "ORDER BY r.seq LIMIT ? OFFSET ?", [*args, count, offset]).fetchall()
            total = None
            if with_total:
                total = int(self._db.execute(f"SELECT COUNT(*) FROM resources r WHERE {where}",  # noqa: S608
                                             args).fetchone()[0])
        return [Row(resource_type, r[0], r[1], r[2], False, json.loads(r[3])) for r in rows], total

    def iter_bodies(self, resource_type: str, *, since_ms: int | None = None,
                    patients: set[str] | None = None, batch: int = 2000) -> Iterator[str]:
        """Stream stored JSON bodies (for bulk export) without holding them all in memory."""
        where, args = self._where(resource_type, (), (None, None), since_ms)
        last_seq = 0
        while True:
            with self._lock:
                rows = self._db.execute(
                    f"SELECT r.seq, r.id, r.body FROM resources r WHERE {where} AND r.seq > ? "  # noqa: S608
                    "ORDER BY r.seq LIMIT ?", [*args, last_seq, batch]).fetchall()
                owners: dict[str, str] = {}
                if patients is not None and resource_type != "Patient" and rows:
                    ids = [r[1] for r in rows]
                    owners = dict(self._db.execute(
                        f"SELECT id, value FROM params WHERE type=? AND name='patient' "  # noqa: S608
                        f"AND id IN ({','.join('?' * len(ids))})", [resource_type, *ids]).fetchall())
            if not rows:
                return
            for seq, rid, body in rows:
                last_seq = seq
                if patients is not None:
                    owner = rid if resource_type == "Patient" else owners.get(rid)
                    if owner not in patients:
                        continue
                yield body

    def deleted_since(self, resource_type: str, since_ms: int) -> list[str]:
        with self._lock:
            return [r[0] for r in self._db.execute(
                "SELECT id FROM resources WHERE type=? AND deleted=1 AND lu_ms > ? ORDER BY seq",
                (resource_type, since_ms)).fetchall()]

    def has_patient_link(self, resource_type: str) -> bool:
        with self._lock:
            return self._db.execute("SELECT 1 FROM params WHERE type=? AND name='patient' LIMIT 1",
                                    (resource_type,)).fetchone() is not None

    def types(self) -> list[str]:
        with self._lock:
            return [r[0] for r in self._db.execute("SELECT DISTINCT type FROM resources ORDER BY type")]

    def ground_truth(self, resource_type: str) -> list[dict[str, Any]]:
        """Every id of a type with its current version, lastUpdated and deleted flag."""
        with self._lock:
            rows = self._db.execute("SELECT id, version, lu_ms, deleted FROM resources WHERE type=? "
                                    "ORDER BY seq", (resource_type,)).fetchall()
        return [{"id": r[0], "versionId": str(r[1]), "lastUpdated": format_instant(r[2]),
                 "deleted": bool(r[3])} for r in rows]

    def count(self, resource_type: str) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM resources WHERE type=? AND deleted=0",
                                        (resource_type,)).fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._db.close()
