"""Retry policy decisions (POST only when safe), Retry-After, bounded attempts, both faces."""

from __future__ import annotations

import email.utils
import time
from typing import Any

import httpx
import pytest

from airflow_provider_modmed.capabilities import Track
from airflow_provider_modmed.client import auth as auth_mod
from airflow_provider_modmed.client import limiter as limiter_mod
from airflow_provider_modmed.client._flows import FhirContext
from airflow_provider_modmed.client.bulk.flows import DownloadPolicy, PollPolicy, kick_off
from airflow_provider_modmed.client.bulk.request import ExportRequest
from airflow_provider_modmed.client.config import ClientConfig
from airflow_provider_modmed.client.drivers import Fetched, Sleep
from airflow_provider_modmed.client.fhir import AsyncFhirClient, FhirClient
from airflow_provider_modmed.client.retry import (
    BACKOFF_INITIAL,
    MAX_WAIT,
    RETRY_AFTER_CAP,
    SAFE_TO_RETRY,
    TOKEN_REQUEST,
    backoff,
    retry_after_seconds,
    should_retry_exception,
    should_retry_response,
)
from airflow_provider_modmed.errors import (
    AuthError,
    NotFoundError,
    RateLimitedError,
    ServerError,
    TransportError,
    ValidationError,
)
from airflow_provider_modmed.profile import TRANSACTION_ID_SYSTEM

BASE = "https://api.example/ema-dev/firm/apiportal/ema/fhir/v2"
CERT_BASE = "https://apiportal.mmi.prod.fhir.ema-api.com/fhir/r4"


@pytest.fixture(autouse=True)
def _fresh_process_state(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(auth_mod, "_caches", {})
    monkeypatch.setattr(limiter_mod, "_sync_storages", {})


def req(method: str, **kwargs: Any) -> httpx.Request:
    return httpx.Request(method, f"{BASE}/Patient", **kwargs)


# -- decisions -------------------------------------------------------------------------------------

@pytest.mark.parametrize(("request_", "status", "retry"), [
    (req("GET"), 503, True), (req("GET"), 500, True), (req("GET"), 502, True), (req("GET"), 504, True),
    (req("PUT"), 502, True), (req("DELETE"), 504, True),
    (req("GET"), 501, False), (req("GET"), 400, False), (req("GET"), 404, False), (req("GET"), 200, False),
    (req("POST"), 503, False), (req("POST"), 500, False),
    (req("POST", headers={"If-None-Exist": "identifier=a|1"}), 503, True),
    (req("POST", extensions={SAFE_TO_RETRY: True}), 502, True),
    (req("POST", extensions={TOKEN_REQUEST: True}), 503, True),
    (req("POST"), 429, True),  # refused before it was acted on
])
def test_response_decisions(request_: httpx.Request, status: int, retry: bool) -> None:
    assert should_retry_response(httpx.Response(status, request=request_)) is retry


def _exc(cls: type[httpx.RequestError], request: httpx.Request | None) -> httpx.RequestError:
    exc = cls("boom")
    if request is not None:
        exc.request = request
    return exc


@pytest.mark.parametrize(("exc", "retry"), [
    (_exc(httpx.ConnectError, req("POST")), True),       # never left
    (_exc(httpx.ConnectTimeout, req("POST")), True),
    (_exc(httpx.PoolTimeout, req("POST")), True),
    (_exc(httpx.ReadTimeout, req("POST")), False),       # may have been acted on
    (_exc(httpx.RemoteProtocolError, req("POST")), False),
    (_exc(httpx.ReadError, req("POST")), False),
    (_exc(httpx.ReadTimeout, req("GET")), True),
    (_exc(httpx.ReadError, req("PUT")), True),
    (_exc(httpx.ReadTimeout, req("POST", headers={"If-None-Exist": "x=1"})), True),
    (_exc(httpx.ReadTimeout, None), False),
    (ServerError("token request failed", status_code=503), True),   # raised by the auth flow
    (RateLimitedError("token request failed", status_code=429), True),
    (AuthError("token request failed", status_code=401), False),
    (ValueError("x"), False),
])
def test_exception_decisions(exc: BaseException, retry: bool) -> None:
    assert should_retry_exception(exc) is retry


NOW = 1_800_000_000.0


@pytest.mark.parametrize(("value", "expected"), [
    ("7", 7.0), ("1.5", 1.5), ("100000", RETRY_AFTER_CAP), ("soon", None), (None, None),
    # no usable wait: the caller backs off normally (issue 13: these retried with no wait at all)
    ("0", None), ("-5", None), ("-0", None), ("nan", None), ("", None),
    # above 10^9 a number is an instant (epoch seconds), waited until; a past instant is no wait
    (str(int(NOW) + 40), 40.0), (str(NOW + 2.5), 2.5), (str(int(NOW) - 40), None), (str(int(NOW) + 10**6), 120.0),
    ("inf", RETRY_AFTER_CAP), ("1e400", RETRY_AFTER_CAP),
])
def test_retry_after_seconds(value: str | None, expected: float | None) -> None:
    headers = {"Retry-After": value} if value is not None else {}
    assert retry_after_seconds(httpx.Response(429, headers=headers), now=NOW) == expected


def test_retry_after_http_date() -> None:
    future = email.utils.formatdate(NOW + 30, usegmt=True)
    past = email.utils.formatdate(NOW - 30, usegmt=True)
    assert retry_after_seconds(httpx.Response(503, headers={"Retry-After": future}), now=NOW) == 30.0
    assert retry_after_seconds(httpx.Response(503, headers={"Retry-After": past}), now=NOW) is None
    far = email.utils.formatdate(NOW + 3600, usegmt=True)
    assert retry_after_seconds(httpx.Response(503, headers={"Retry-After": far}), now=NOW) == RETRY_AFTER_CAP
    # a poll interval (202) is not a refusal: honoured up to the caller's cap, never above MAX_WAIT
    assert retry_after_seconds(httpx.Response(202, headers={"Retry-After": far}), cap=300, now=NOW) == 300
    assert retry_after_seconds(httpx.Response(202, headers={"Retry-After": "86400"}), cap=10**6) == MAX_WAIT


@pytest.mark.parametrize("value", ["0", "-5", "PAST"])
def test_a_retry_after_asking_for_no_wait_gets_the_normal_backoff(value: str) -> None:
    """Through the client: each retry waits the backoff (> 0), not the server's zero."""
    if value == "PAST":
        value = email.utils.formatdate(1_000_000_000, usegmt=True)
    server = Server([httpx.Response(429, headers={"Retry-After": value})] * 3 + [200])
    c, slept = client(server)
    assert c.read("Patient", "1")["id"] == "1"
    assert len(slept) == 3 and all(s >= BACKOFF_INITIAL for s in slept), slept


def test_an_epoch_retry_after_waits_until_that_instant() -> None:
    server = Server([httpx.Response(503, headers={"Retry-After": str(int(time.time()) + 45)}), 200])
    c, slept = client(server)
    c.read("Patient", "1")
    assert len(slept) == 1 and 30 <= slept[0] <= 45, slept  # not 120 (the cap) nor 1.8e9 seconds


def test_every_wait_is_capped_by_one_constant() -> None:
    assert backoff(30, 1.0, 10**6) == MAX_WAIT
    assert backoff(1, 1.0, 10**6, retry_after=10**6, retry_after_cap=10**6) == MAX_WAIT
    assert backoff(1, 1.0, 10.0, floor=10**6) == MAX_WAIT
    assert backoff(3, 1.0, 60.0, retry_after=0.0) == 4.0  # a zero Retry-After is no Retry-After
    policy = PollPolicy(min_wait=1, max_wait=10**6)  # a policy cannot lift the cap
    assert policy.wait(httpx.Response(202, headers={"Retry-After": "86400"}), 1) == MAX_WAIT
    assert policy.wait(None, 60) == MAX_WAIT
    assert DownloadPolicy().wait(Fetched(503, retry_after=10**6), 1) <= RETRY_AFTER_CAP


def test_a_throttled_kick_off_waits_at_most_the_refusal_cap_per_try() -> None:
    """Five 429s answering Retry-After: 600 (the poll policy's max_wait) on the kick-off: 5 x 120 s, not 5 x 600 s."""
    throttled = httpx.Response(429, headers={"Retry-After": "600"})
    location = httpx.Response(202, headers={"Content-Location": "fhir-services/$export-status/9"})
    flow = kick_off(FhirContext(Track.CERTIFIED, CERT_BASE), ExportRequest(), policy=PollPolicy(max_wait=600))
    sleeps: list[float] = []
    out: Any = None
    answers = [throttled] * 5 + [location]
    while True:
        try:
            step = flow.send(out)
        except StopIteration:
            break
        if isinstance(step, Sleep):
            sleeps.append(step.seconds)
            out = None
        else:
            out = answers.pop(0)
    assert sleeps == [RETRY_AFTER_CAP] * 5
    assert sum(sleeps) <= MAX_WAIT


# -- through the client ----------------------------------------------------------------------------

class Server:
    """A scripted ModMed: token endpoint plus a queue of answers (or exceptions) per method."""

    def __init__(self, script: list[Any], token_script: list[Any] | None = None) -> None:
        self.script = script
        self.token_script = token_script or []
        self.calls: list[httpx.Request] = []
        self.token_calls = 0

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/oauth2/grant"):
            self.token_calls += 1
            step = self.token_script.pop(0) if self.token_script else 200
            if isinstance(step, int) and step != 200:
                return httpx.Response(step)
            return httpx.Response(200, json={"access_token": "t", "token_type": "Bearer"})
        self.calls.append(request)
        step = self.script.pop(0) if self.script else 200
        if isinstance(step, BaseException):
            raise step
        if isinstance(step, httpx.Response):
            return step
        body = {"resourceType": "Patient", "id": "1"} if step in (200, 201) else None
        return httpx.Response(step, json=body)


def client(server: Server, max_retries: int = 3) -> tuple[FhirClient, list[float]]:
    slept: list[float] = []
    cfg = ClientConfig(track="proprietary", fhir_base=BASE, api_key="k", username="u", password="p",
                       max_retries=max_retries)
    return FhirClient(cfg, transport=httpx.MockTransport(server), sleep=slept.append), slept


def test_get_5xx_is_retried_then_succeeds() -> None:
    server = Server([503, 502, 200])
    c, slept = client(server)
    assert c.read("Patient", "1")["id"] == "1"
    assert len(server.calls) == 3
    assert len(slept) == 2
    assert all(0 < s <= 30 for s in slept)


def test_attempts_are_bounded_and_end_in_a_typed_error() -> None:
    server = Server([503] * 10)
    c, slept = client(server, max_retries=3)
    with pytest.raises(ServerError) as err:
        c.read("Patient", "1")
    assert err.value.status_code == 503
    assert len(server.calls) == 4
    assert len(slept) == 3


def test_429_without_retry_after_backs_off_exponentially() -> None:
    server = Server([429, 429, 429, 200])
    c, slept = client(server)
    c.read("Patient", "1")
    assert len(slept) == 3
    # initial 0.5 doubling, plus up to 0.5 jitter
    assert 0.5 <= slept[0] <= 1.0
    assert 1.0 <= slept[1] <= 1.5
    assert 2.0 <= slept[2] <= 2.5


def test_429_honours_retry_after() -> None:
    server = Server([httpx.Response(429, headers={"Retry-After": "3"}), 200])
    c, slept = client(server)
    c.read("Patient", "1")
    assert slept == [3.0]


def test_rate_limited_error_when_429_persists() -> None:
    server = Server([429] * 5)
    c, _ = client(server, max_retries=2)
    with pytest.raises(RateLimitedError):
        c.read("Patient", "1")


def test_plain_post_is_not_retried_on_5xx() -> None:
    server = Server([503, 201])
    c, slept = client(server)
    with pytest.raises(ServerError):
        c.create({"resourceType": "Patient"})
    assert len(server.calls) == 1
    assert slept == []


def test_plain_post_is_not_retried_on_read_timeout() -> None:
    server = Server([httpx.ReadTimeout("slow"), 201])
    c, _ = client(server)
    with pytest.raises(TransportError, match="ReadTimeout"):
        c.create({"resourceType": "Patient"})
    assert len(server.calls) == 1


def test_post_is_retried_when_it_never_left() -> None:
    server = Server([httpx.ConnectError("refused"), 201])
    c, _ = client(server)
    assert c.create({"resourceType": "Patient"})["id"] == "1"
    assert len(server.calls) == 2


def test_conditional_create_and_transaction_id_are_retried() -> None:
    server = Server([503, 201])
    c, _ = client(server)
    c.create({"resourceType": "Patient"}, if_none_exist="identifier=sys|1")
    assert len(server.calls) == 2
    assert all(r.headers["If-None-Exist"] == "identifier=sys|1" for r in server.calls)

    server = Server([502, 201])
    c, _ = client(server)
    charge = {"resourceType": "ChargeItem", "identifier": [{"system": TRANSACTION_ID_SYSTEM, "value": "t1"}]}
    server.script = [502, httpx.Response(201, json={**charge, "id": "CHG|1"})]
    assert c.create(charge)["id"] == "CHG|1"
    assert len(server.calls) == 2


def test_token_endpoint_5xx_is_retried_even_for_a_post() -> None:
    server = Server([201], token_script=[503, 200])
    c, slept = client(server)
    assert c.create({"resourceType": "Patient"})["id"] == "1"
    assert server.token_calls == 2
    assert len(server.calls) == 1
    assert len(slept) == 1


def test_connect_errors_exhausted_become_transport_error() -> None:
    server = Server([httpx.ConnectError("refused")] * 10)
    c, _ = client(server, max_retries=2)
    with pytest.raises(TransportError) as err:
        c.read("Patient", "1")
    assert "read Patient" in str(err.value)
    assert len(server.calls) == 3


def test_client_errors_are_not_retried() -> None:
    server = Server([httpx.Response(422, json={"resourceType": "OperationOutcome", "issue": [
        {"severity": "error", "code": "invalid", "diagnostics": "birthDate"}]})])
    c, slept = client(server)
    with pytest.raises(ValidationError) as err:
        c.create({"resourceType": "Patient"})
    assert err.value.codes == ("invalid",)
    assert slept == []


async def test_async_face_applies_the_same_policy() -> None:
    slept: list[float] = []

    async def asleep(seconds: float) -> None:
        slept.append(seconds)

    cfg = ClientConfig(track="proprietary", fhir_base=BASE, api_key="k", username="u", password="p",
                       max_retries=3)
    server = Server([503, httpx.Response(429, headers={"Retry-After": "2"}), 200, 503])
    async with AsyncFhirClient(cfg, transport=httpx.MockTransport(server), sleep=asleep) as c:
        assert (await c.read("Patient", "1"))["id"] == "1"
        assert len(slept) == 2
        assert slept[1] == 2.0
        with pytest.raises(ServerError):
            await c.create({"resourceType": "Patient"})
    assert len(server.calls) == 4



# -- what counts as a resend (issue 13, item 5: delete) --------------------------------------------

@pytest.mark.parametrize(("first", "deleted_by_us"), [
    (httpx.RemoteProtocolError("answer lost"), True),  # may have landed: a 404 now is our own delete
    (503, True),
    (429, False),                                      # refused before acting: a 404 is a real "not there"
    (httpx.ConnectError("refused"), False),            # never left
])
def test_a_delete_resend_meets_a_404(first: Any, deleted_by_us: bool) -> None:
    server = Server([first, 404])
    c, _ = client(server)
    if deleted_by_us:
        assert c.delete("Patient", "1") is True
    else:
        with pytest.raises(NotFoundError):
            c.delete("Patient", "1")
        server.script = [429, 404]
        assert c.delete("Patient", "1", missing_ok=True) is False
    assert len(server.calls) >= 2
