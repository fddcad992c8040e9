"""The completion manifest: :class:`Manifest` and its :class:`ManifestItem` files, read leniently, each file
URL checked (https, or http on loopback) and named where it is stored under the run folder."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from airflow_provider_modmed.client.bulk.request import TYPE_RE
from airflow_provider_modmed.client.config import secure_url
from airflow_provider_modmed.errors import ModMedError

log = logging.getLogger("airflow_provider_modmed.client.bulk")

#: manifest sections, in the order files are stored and listed
SECTIONS = ("output", "deleted", "error")
#: where the checkpoints of stored files live under the run folder
CHECKPOINTS = "_state/files"


def strip_query(url: str) -> str:
    """``url`` without its query and fragment: presigned signatures are credentials, never stored or logged."""
    return url.split("#", 1)[0].split("?", 1)[0]


@dataclass(frozen=True)
class ManifestItem:
    """One file of the manifest: ``section`` (output/error/deleted), resource ``type``, ``url``, optional
    ``count``, and ``name``: where it is stored under the run folder (``output/Patient.0001.ndjson``)."""

    section: str
    type: str
    url: str
    count: int | None
    name: str
    #: the URL without its query (the file's identity across manifest refreshes); derived
    source: str = field(default="", compare=False)
    #: the checkpoint's path under the run folder; derived
    checkpoint: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "source", strip_query(self.url))
        object.__setattr__(self, "checkpoint", f"{CHECKPOINTS}/{self.name.replace('/', '.')}.json")

    @property
    def expected_lines(self) -> int | None:
        """The line count a stored file must have: ``count`` for output and deleted files. Error files
        are reports: servers put other numbers there (the count of the output file that failed), so
        their ``count`` is only compared for a warning, never verified."""
        return None if self.section == "error" else self.count


@dataclass(frozen=True)
class Manifest:
    """The completion manifest, read leniently: unknown keys ignored, ``count``/``deleted``/``error``
    optional, relative URLs resolved against the status URL."""

    transaction_time: str | None
    request: str | None
    requires_access_token: bool
    output: tuple[ManifestItem, ...]
    error: tuple[ManifestItem, ...] = ()
    deleted: tuple[ManifestItem, ...] = ()
    expires: str | None = None

    @property
    def items(self) -> tuple[ManifestItem, ...]:
        return (*self.output, *self.deleted, *self.error)

    @classmethod
    def parse(cls, body: Any, *, base: str | None = None, expires: str | None = None) -> Manifest:
        if not isinstance(body, Mapping):
            raise ModMedError("the bulk export status answered 200 without a JSON manifest")
        transaction_time = body.get("transactionTime")
        if not isinstance(transaction_time, str) or not transaction_time:
            log.warning("modmed: the bulk manifest has no transactionTime; incremental exports cannot chain")
            transaction_time = None
        requires = body.get("requiresAccessToken")
        if not isinstance(requires, bool):
            log.warning("modmed: the bulk manifest has no boolean requiresAccessToken; assuming true (the "
                        "token still goes only to the FHIR server's own origin)")
            requires = True
        sections: dict[str, tuple[ManifestItem, ...]] = {}
        for section in SECTIONS:
            raw = body.get(section)
            if raw is None:
                sections[section] = ()
                continue
            if not isinstance(raw, list):
                raise ModMedError(f"the bulk manifest's {section!r} is not a list")
            sections[section] = tuple(_items(section, raw, base))
        request = body.get("request")
        return cls(transaction_time, request if isinstance(request, str) else None, requires,
                   sections["output"], sections["error"], sections["deleted"], expires)

    def to_dict(self) -> dict[str, Any]:
        """The manifest as stored in ``manifest.json``: URLs without their query strings."""
        def entries(items: Iterable[ManifestItem]) -> list[dict[str, Any]]:
            return [{"type": i.type, "url": i.source, **({"count": i.count} if i.count is not None else {}),
                     "file": i.name} for i in items]

        return {"transactionTime": self.transaction_time,
                "request": strip_query(self.request) if self.request else None,
                "requiresAccessToken": self.requires_access_token, "expires": self.expires,
                "output": entries(self.output), "deleted": entries(self.deleted), "error": entries(self.error)}


def _items(section: str, raw: Sequence[Any], base: str | None) -> Iterator[ManifestItem]:
    per_type: Counter[str] = Counter()
    default_type = {"error": "OperationOutcome", "deleted": "Bundle"}.get(section)
    for entry in raw:
        if not isinstance(entry, Mapping) or not isinstance(entry.get("url"), str) or not entry["url"]:
            raise ModMedError(f"the bulk manifest has a {section!r} entry without a url")
        rtype = entry.get("type") or default_type
        if not isinstance(rtype, str) or not TYPE_RE.match(rtype):
            raise ModMedError(f"the bulk manifest has a {section!r} entry whose type is not a FHIR type name")
        if section == "error" and rtype != "OperationOutcome":
            # error files hold OperationOutcomes whatever the entry says (some servers name the type
            # whose export failed); every line is checked to be one
            log.info("modmed: a bulk manifest error entry says type %r; error files hold OperationOutcomes",
                     rtype)
            rtype = "OperationOutcome"
        count = entry.get("count")
        count = count if isinstance(count, int) and not isinstance(count, bool) and count >= 0 else None
        url = entry["url"]
        if base and not url.startswith(("https://", "http://")):
            url = str(httpx.URL(base).join(url))
        secure_url(url, f"a bulk {section} file", "a bulk file URL")
        per_type[rtype] += 1
        yield ManifestItem(section, rtype, url, count, f"{section}/{rtype}.{per_type[rtype]:04d}.ndjson")
