"""Hostile input cannot change the request path or reach another resource (hypothesis, bounded examples).

Ids and search values full of ``/``, ``?``, ``#``, ``..``, ``%2F``, control characters, unicode and huge sizes
go through the client against the seeded sandbox. For each, either the client refused before sending (the
sandbox's request counter did not move), or every request the sandbox saw (``recent_requests``: raw paths
and query strings) stays on ``/{Type}`` or ``/{Type}/{one encoded segment}`` decoding to exactly the id, and
a search's query string decodes to exactly the parameters given."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qsl, unquote

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from airflow_provider_modmed.client import FhirClient
from airflow_provider_modmed.client._flows import InvalidIdError
from airflow_provider_modmed.errors import CapabilityError, ConfigurationError, ModMedError, NotFoundError
from airflow_provider_modmed.sandbox.server import SandboxServer
from tests.reliability._figures import Figures
from tests.reliability.conftest import prop_config

pytestmark = pytest.mark.integration

SETTINGS = settings(max_examples=60, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
NASTY = ["/", "?", "#", "..", "%2F", "%2f", "%00", "%", "&", "=", "\\", "|", " ", "\t", "\r\n", "\x00", "\x7f",
         "\u202e", "\ufeff", "é", "../", "./", "//", "?_count=1000", "#frag", "Observation", "_history", ";", "@",
         "http://evil.example/", "%252F", "\u2215", "\uff0f"]
hostile_text = st.one_of(
    st.lists(st.sampled_from(NASTY) | st.text(max_size=4), min_size=1, max_size=8).map("".join),
    st.text(min_size=1, max_size=40),
    st.builds(lambda s, n: s * n, st.sampled_from(["a", "/", "%2F", "..", "1"]), st.integers(64, 20_000)),
)

Counter = dict[str, int]
#: what the hypothesis examples did, over the module (reported by the last test)
TOTALS: Counter = {"ids_refused": 0, "ids_sent": 0, "search_values_sent": 0, "search_values_failed": 0,
                   "search_requests_checked": 0}


@pytest.fixture(scope="module")
def hostile_client(seeded: SandboxServer) -> Iterator[tuple[SandboxServer, FhirClient]]:
    with FhirClient(prop_config(seeded, max_retries=0), sleep=lambda s: None) as c:
        c.metadata()  # the token first: every later request is one FHIR call
        yield seeded, c


def seen_since(sb: SandboxServer, before: int) -> list[str]:
    n = sb.stats()["requests"] - before
    return list(sb.app_state.recent_requests)[-n:] if n else []


def prefix(c: FhirClient) -> str:
    return httpx.URL(c.config.fhir_base).raw_path.decode()


def check_read(sb: SandboxServer, c: FhirClient, rid: str, counts: Counter) -> None:
    before = sb.stats()["requests"]
    try:
        c.read("Patient", rid)
        counts["answered"] += 1
    except InvalidIdError:
        assert sb.stats()["requests"] == before, "refused, but something was sent"
        counts["refused"] += 1
        return
    except (NotFoundError, ModMedError):
        counts["answered"] += 1
    for raw in seen_since(sb, before):
        path, _, query = raw.partition("?")
        m = re.fullmatch(re.escape(prefix(c)) + r"/Patient/([^/?#]+)", path)
        assert m and unquote(m.group(1)) == rid and not query, raw


@given(rid=hostile_text)
@SETTINGS
def test_hostile_ids_stay_one_path_segment(hostile_client: tuple[SandboxServer, FhirClient], rid: str) -> None:
    sb, c = hostile_client
    counts: Counter = {"refused": 0, "answered": 0}
    check_read(sb, c, rid, counts)
    TOTALS["ids_refused"] += counts["refused"]
    TOTALS["ids_sent"] += counts["answered"]
    for call in (lambda: c.delete("Patient", rid), lambda: c.update({"resourceType": "Patient", "id": rid})):
        before = sb.stats()["requests"]
        with pytest.raises((InvalidIdError, ModMedError)):
            call()
        for raw in seen_since(sb, before):
            m = re.fullmatch(re.escape(prefix(c)) + r"/Patient/([^/?#]+)", raw)
            assert m and unquote(m.group(1)) == rid, raw


@pytest.mark.parametrize("rid", ["pay|7225", "1.120182.1.5", "a-b.c", "CHG|12", "x" * 64, "a..b", "1..2.3"])
def test_modmed_ids_are_sent_as_one_encoded_segment(hostile_client: tuple[SandboxServer, FhirClient],
                                                   rid: str) -> None:
    sb, c = hostile_client
    counts: Counter = {"refused": 0, "answered": 0}
    check_read(sb, c, rid, counts)
    assert counts["answered"] == 1


@given(value=hostile_text, name=st.sampled_from(["family", "given", "identifier", "name", "birthdate"]))
@SETTINGS
def test_hostile_search_values_stay_in_their_parameter(hostile_client: tuple[SandboxServer, FhirClient], value: str,
                                                       name: str) -> None:
    sb, c = hostile_client
    before = sb.stats()["requests"]
    try:
        list(c.search("Patient", {name: value}, count=50))
        TOTALS["search_values_sent"] += 1
    except ModMedError:  # a 400 from the server, or no answer to a URL too long: nothing reached elsewhere
        TOTALS["search_values_failed"] += 1
    seen = seen_since(sb, before)
    TOTALS["search_requests_checked"] += len(seen)
    assert len(seen) <= 2
    for raw in seen:
        path, _, query = raw.partition("?")
        assert path == f"{prefix(c)}/Patient", raw
        pairs = parse_qsl(query, keep_blank_values=True)
        assert [v for k, v in pairs if k == name] == [value], raw
        assert {k for k, _ in pairs} <= {name, "_count", "page"}, raw


@pytest.mark.parametrize("rtype", ["Patient/../Observation", "Patient?x=1", "Patient#", "../Patient", "Patient/1",
                                   "", "patient", "Patient\x00", "%50atient"])
def test_hostile_resource_types_are_refused_before_sending(hostile_client: tuple[SandboxServer, FhirClient],
                                                          rtype: str) -> None:
    sb, c = hostile_client
    before = sb.stats()["requests"]
    with pytest.raises((CapabilityError, ConfigurationError)):
        c.read(rtype, "1")
    with pytest.raises((CapabilityError, ConfigurationError)):
        list(c.search(rtype))
    assert sb.stats()["requests"] == before


def test_hostile_input_figures(hostile_client: tuple[SandboxServer, FhirClient], figures: Figures) -> None:
    """Counts over a fixed sample: how many hostile ids are refused before sending."""
    import random

    sb, c = hostile_client
    rng = random.Random(8)
    counts: Counter = {"refused": 0, "answered": 0}
    samples: list[Any] = [rng.choice(NASTY) + str(rng.randint(1, 9)) + rng.choice(NASTY) for _ in range(200)]
    before = sb.stats()["requests"]
    for rid in samples:
        check_read(sb, c, rid, counts)
    figures.record(hostile_ids=len(samples), refused_before_sending=counts["refused"],
                   sent_as_one_segment=counts["answered"], requests=sb.stats()["requests"] - before,
                   **{f"hypothesis_{k}": v for k, v in TOTALS.items()})
    assert counts["refused"] + counts["answered"] == len(samples)
