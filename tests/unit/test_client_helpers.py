"""The small helpers written once, in the lowest layer: the backoff formula (retry), status -> error class
and the JSON body (errors), the transport rule for URLs a server hands us (config)."""

from __future__ import annotations

import httpx
import pytest

from airflow_provider_modmed.client.config import check_url, is_secure, secure_url
from airflow_provider_modmed.client.retry import backoff
from airflow_provider_modmed.errors import (
    AuthError,
    ConfigurationError,
    ConflictError,
    ForbiddenError,
    ModMedError,
    NotFoundError,
    RateLimitedError,
    ServerError,
    ValidationError,
    error_class,
    error_for_status,
    json_body,
)


def test_backoff_grows_by_its_factor_and_is_clamped() -> None:
    assert [backoff(n, 1.0, 10.0) for n in (1, 2, 3, 4, 5)] == [1.0, 2.0, 4.0, 8.0, 10.0]
    assert [backoff(n, 2.0, 600.0, factor=1.5) for n in (1, 2, 3)] == [2.0, 3.0, 4.5]
    assert backoff(0, 2.0, 600.0) == 2.0  # attempt 0 counts as the first
    assert backoff(10_000, 1.0, 60.0) == 60.0  # no overflow
    assert backoff(1, 0.1, 10.0, floor=1.0) == 1.0


def test_backoff_prefers_the_servers_retry_after_within_its_cap() -> None:
    assert backoff(5, 1.0, 60.0, retry_after=7.0) == 7.0
    assert backoff(1, 1.0, 60.0, retry_after=500.0) == 60.0  # capped at maximum by default
    assert backoff(1, 1.0, 60.0, retry_after=500.0, retry_after_cap=120.0) == 120.0
    assert backoff(1, 1.0, 60.0, retry_after=0.0, floor=2.0) == 2.0


@pytest.mark.parametrize(("status", "plain", "auth"), [
    (400, ValidationError, AuthError),
    (401, AuthError, AuthError),
    (403, ForbiddenError, ForbiddenError),
    (404, NotFoundError, AuthError),
    (409, ConflictError, AuthError),
    (410, NotFoundError, AuthError),
    (412, ConflictError, AuthError),
    (422, ValidationError, AuthError),
    (429, RateLimitedError, RateLimitedError),
    (500, ServerError, ServerError),
    (503, ServerError, ServerError),
    (302, ModMedError, AuthError),
    (418, ModMedError, AuthError),
])
def test_one_status_mapping_for_fhir_and_token_answers(status: int, plain: type, auth: type) -> None:
    assert error_class(status) is plain
    assert error_class(status, auth=True) is auth
    error = error_for_status(status, {"resourceType": "OperationOutcome", "issue": [{"code": "x"}]}, "read Patient",
                             detail=": why")
    assert type(error) is plain and str(error).startswith("read Patient failed: why") and error.codes == ("x",)


def test_json_body() -> None:
    assert json_body(httpx.Response(200, json={"a": 1})) == {"a": 1}
    assert json_body(httpx.Response(200)) is None
    assert json_body(httpx.Response(502, text="<html>bad gateway</html>")) is None


@pytest.mark.parametrize(("url", "secure"), [
    ("https://storage.example/p?sig=1", True),
    ("http://127.0.0.1:8080/p", True),
    ("http://localhost/p", True),
    ("http://[::1]/p", True),
    ("http://storage.example/p", False),
    ("ftp://storage.example/p", False),
])
def test_the_transport_rule_is_one_function(url: str, secure: bool) -> None:
    assert is_secure(httpx.URL(url)) is secure
    if secure:
        assert secure_url(url, "a bulk output file", "a bulk file URL") == httpx.URL(url)
    else:
        with pytest.raises(ModMedError, match=r"^refusing a bulk output file over \w+:// to 'storage.example': a "
                                              r"bulk file URL must be https:// \(http:// only on loopback\)$"):
            secure_url(url, "a bulk output file", "a bulk file URL")
    if url.startswith("http") and "?" not in url:
        if secure:
            assert check_url("token_url", url) == url
        else:
            with pytest.raises(ConfigurationError, match="plain http://"):
                check_url("token_url", url)


def test_secure_url_refuses_what_is_not_a_url() -> None:
    with pytest.raises(ModMedError, match="refusing to upload: a presigned URL is not a valid URL"):
        secure_url("https://a:b:c", "to upload", "a presigned URL")
