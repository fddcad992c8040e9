"""The rate budget waits (never fails) and is keyed by a digest of the API key plus the firm."""

from __future__ import annotations

import time
import uuid

import httpx
import pytest

from airflow_provider_modmed.client import auth as auth_mod
from airflow_provider_modmed.client import limiter as limiter_mod
from airflow_provider_modmed.client.config import ClientConfig
from airflow_provider_modmed.client.fhir import AsyncFhirClient, FhirClient
from airflow_provider_modmed.client.limiter import RateBudget, async_storage_uri, sync_storage_uri
from airflow_provider_modmed.errors import ConfigurationError, TransportError

BASE = "https://api.example/ema-dev/firm/apiportal/ema/fhir/v2"


@pytest.fixture(autouse=True)
def _fresh_process_state(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(auth_mod, "_caches", {})
    monkeypatch.setattr(limiter_mod, "_sync_storages", {})


def key() -> str:
    return f"test-{uuid.uuid4().hex}"


def test_over_budget_it_waits_instead_of_failing() -> None:
    budget = RateBudget("5/second", key=key())
    started = time.monotonic()
    waited = sum(budget.acquire() for _ in range(8))
    elapsed = time.monotonic() - started
    assert waited > 0.5
    assert elapsed >= 0.9  # the 6th request had to wait for the first to leave the window


async def test_async_face_waits_too() -> None:
    budget = RateBudget("5/second", key=key())
    started = time.monotonic()
    waited = 0.0
    for _ in range(8):
        waited += await budget.aacquire()
    assert waited > 0.5
    assert time.monotonic() - started >= 0.9


def test_sleep_is_until_the_window_frees() -> None:
    slept: list[float] = []
    budget = RateBudget("2/second", key=key(), sleep=lambda s: (slept.append(s), time.sleep(s)))
    for _ in range(3):
        budget.acquire()
    assert len(slept) >= 1
    assert 0 < slept[0] <= 1.0


def test_budgets_with_the_same_key_share_one_window() -> None:
    shared = key()
    a, b = RateBudget("3/minute", key=shared), RateBudget("3/minute", key=shared)
    other = RateBudget("3/minute", key=key())
    slept: list[float] = []
    c = RateBudget("3/minute", key=shared, sleep=lambda s: (slept.append(s), _stop()))
    a.acquire()
    b.acquire()
    a.acquire()
    assert other.acquire() == 0.0  # another key is not affected
    with pytest.raises(_Stop):
        c.acquire()  # the shared budget is spent: it would sleep
    assert 0 < slept[0] <= 60


class _Stop(Exception):
    pass


def _stop() -> None:
    raise _Stop


def test_from_config_keys_by_firm_and_key_digest() -> None:
    cfg = ClientConfig(track="proprietary", fhir_base=BASE, firm="apiportal", api_key="THE-API-KEY",
                       username="u", password="p", rate_limit_per_minute=250)
    budget = RateBudget.from_config(cfg)
    assert str(budget.item.amount) == "250"
    assert "THE-API-KEY" not in budget.key
    assert "THE-API-KEY" not in repr(budget)
    assert budget.key.startswith("apiportal:")


def test_storage_uri_faces() -> None:
    assert async_storage_uri("memory://") == "async+memory://"
    assert async_storage_uri("redis://h:6379/0") == "async+redis://h:6379/0"
    assert async_storage_uri("async+redis://h") == "async+redis://h"
    assert sync_storage_uri("async+redis://h") == "redis://h"
    assert limiter_mod._storage_options("memory://") == {"wrap_exceptions": True}
    assert limiter_mod._storage_options("async+redis://h").get("implementation") in (None, "redispy")


def test_unknown_storage_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="rate_limit_storage_uri"):
        RateBudget("5/second", "nosuch://x", key=key()).acquire()


def test_unreachable_storage_is_a_transport_error() -> None:
    with pytest.raises(TransportError, match="rate-limit storage redis:// is unreachable"):
        RateBudget("5/second", "redis://127.0.0.1:1/0", key=key()).acquire()


async def test_unreachable_storage_is_a_transport_error_async() -> None:
    with pytest.raises(TransportError, match="rate-limit storage redis:// is unreachable"):
        await RateBudget("5/second", "redis://127.0.0.1:1/0", key=key()).aacquire()


def _ok(request: httpx.Request) -> httpx.Response:
    if request.url.path.endswith("/grant"):
        return httpx.Response(200, json={"access_token": "t", "token_type": "Bearer"})
    return httpx.Response(200, json={"resourceType": "Patient", "id": "1"})


def test_client_calls_wait_for_the_budget() -> None:
    cfg = ClientConfig(track="proprietary", fhir_base=BASE, api_key=key(), username="u", password="p")
    budget = RateBudget("5/second", key=cfg.budget_key)
    with FhirClient(cfg, transport=httpx.MockTransport(_ok), budget=budget) as client:
        started = time.monotonic()
        for _ in range(7):  # one permit per FHIR call (the token request rides inside the first)
            assert client.read("Patient", "1")["id"] == "1"
        assert time.monotonic() - started >= 0.9


async def test_async_client_calls_wait_for_the_budget() -> None:
    cfg = ClientConfig(track="proprietary", fhir_base=BASE, api_key=key(), username="u", password="p")
    budget = RateBudget("5/second", key=cfg.budget_key)
    async with AsyncFhirClient(cfg, transport=httpx.MockTransport(_ok), budget=budget) as client:
        started = time.monotonic()
        for _ in range(7):
            assert (await client.read("Patient", "1"))["id"] == "1"
        assert time.monotonic() - started >= 0.9
