"""Auth flows driven by hand with canned responses; SMART assertions decoded; host scoping; no stampede."""

from __future__ import annotations

import asyncio
import base64
import threading
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from joserfc import jwt
from joserfc.jwk import ECKey, RSAKey

from airflow_provider_modmed.client import auth as auth_mod
from airflow_provider_modmed.client import limiter as limiter_mod
from airflow_provider_modmed.client.auth import (
    NO_CREDENTIALS,
    ClientCredentialsAuth,
    PasswordGrantAuth,
    SmartBackendAuth,
    TokenCache,
    auth_from_config,
    credential_guard,
)
from airflow_provider_modmed.client.config import ClientConfig
from airflow_provider_modmed.client.fhir import AsyncFhirClient, FhirClient
from airflow_provider_modmed.client.retry import TOKEN_REQUEST
from airflow_provider_modmed.errors import (
    AuthError,
    ConfigurationError,
    ForbiddenError,
    RateLimitedError,
    ServerError,
)

BASE = "https://api.example/ema-dev/firm/apiportal/ema/fhir/v2"
GRANT = "https://api.example/ema-dev/firm/apiportal/ema/ws/oauth2/grant"
CERT_BASE = "https://apiportal.mmi.prod.fhir.ema-api.com/fhir/r4"
CERT_TOKEN = "https://auth.example/apiportal/auth/token"
STORAGE = "https://storage.example/bucket/obj?X-Amz-Signature=abc"


@pytest.fixture(autouse=True)
def _fresh_process_state(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(auth_mod, "_caches", {})
    monkeypatch.setattr(limiter_mod, "_sync_storages", {})


def form(request: httpx.Request) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(request.content.decode()).items()}


def walk(auth: httpx.Auth, request: httpx.Request,
         answer: Callable[[httpx.Request], httpx.Response]) -> list[httpx.Request]:
    """Drive ``auth.sync_auth_flow`` by hand; return a snapshot of every request it yielded."""
    flow = auth.sync_auth_flow(request)
    step = next(flow)
    seen: list[httpx.Request] = []
    while True:
        seen.append(_snapshot(step))
        try:
            step = flow.send(answer(step))
        except StopIteration:
            return seen


def _snapshot(r: httpx.Request) -> httpx.Request:
    # auth flows set headers on the request object they resend: copy what was sent each time
    return httpx.Request(r.method, r.url, headers=r.headers.copy(), content=r.content,
                         extensions=dict(r.extensions))


def password_auth(cache: TokenCache | None = None) -> PasswordGrantAuth:
    return PasswordGrantAuth(BASE, GRANT, api_key="KEY-1", username="u", password="pw-secret",
                             cache=cache)


def token(access: str, **extra: Any) -> httpx.Response:
    return httpx.Response(200, json={"access_token": access, "token_type": "Bearer", **extra})


# -- password grant ------------------------------------------------------------------------------

def test_password_grant_then_bearer_and_api_key() -> None:
    auth = password_auth()
    seen = walk(auth, httpx.Request("GET", f"{BASE}/Patient/1"),
                lambda r: token("T1", refresh_token="R1") if r.url == GRANT else httpx.Response(200))
    grant, call = seen
    assert grant.method == "POST"
    assert grant.headers["x-api-key"] == "KEY-1"
    assert "Authorization" not in grant.headers
    assert form(grant) == {"grant_type": "password", "username": "u", "password": "pw-secret"}
    assert grant.extensions[TOKEN_REQUEST] is True
    assert call.headers["Authorization"] == "Bearer T1"
    assert call.headers["x-api-key"] == "KEY-1"
    # the next call reuses the cached token: no token request
    seen = walk(auth, httpx.Request("GET", f"{BASE}/Patient/2"), lambda r: httpx.Response(200))
    assert len(seen) == 1


def test_401_refreshes_once_then_retries() -> None:
    auth = password_auth()
    walk(auth, httpx.Request("GET", f"{BASE}/Patient/1"),
         lambda r: token("T1", refresh_token="R1") if r.url == GRANT else httpx.Response(200))

    def answer(r: httpx.Request) -> httpx.Response:
        if r.url == GRANT:
            return token("T2")  # ModMed: the refresh token stays the same, may be omitted
        return httpx.Response(401) if r.headers["Authorization"] == "Bearer T1" else httpx.Response(200)

    call, refresh, again = walk(auth, httpx.Request("GET", f"{BASE}/Patient/1"), answer)
    assert call.headers["Authorization"] == "Bearer T1"
    assert form(refresh) == {"grant_type": "refresh_token", "refresh_token": "R1"}
    assert again.headers["Authorization"] == "Bearer T2"
    assert auth.cache.token is not None
    assert auth.cache.token["refresh_token"] == "R1"


def test_refused_refresh_falls_back_to_password() -> None:
    auth = password_auth()
    walk(auth, httpx.Request("GET", f"{BASE}/x"),
         lambda r: token("T1", refresh_token="R1") if r.url == GRANT else httpx.Response(200))

    def answer(r: httpx.Request) -> httpx.Response:
        if r.url == GRANT:
            if form(r)["grant_type"] == "refresh_token":
                return httpx.Response(401, json={"error": "invalid_grant"})
            return token("T3", refresh_token="R3")
        return httpx.Response(401) if r.headers["Authorization"] == "Bearer T1" else httpx.Response(200)

    seen = walk(auth, httpx.Request("GET", f"{BASE}/x"), answer)
    assert [form(r)["grant_type"] for r in seen if r.url == GRANT] == ["refresh_token", "password"]
    assert seen[-1].headers["Authorization"] == "Bearer T3"


def test_a_second_401_is_returned_not_looped() -> None:
    auth = password_auth()
    seen = walk(auth, httpx.Request("GET", f"{BASE}/x"),
                lambda r: token(f"T{time.monotonic_ns()}") if r.url == GRANT else httpx.Response(401))
    assert [r.url == GRANT for r in seen] == [True, False, True, False]


def test_known_expiry_is_renewed_before_it_runs_out() -> None:
    auth = password_auth()
    walk(auth, httpx.Request("GET", f"{BASE}/x"),
         lambda r: token("T1", expires_in=60) if r.url == GRANT else httpx.Response(200))
    assert auth.cache.leeway == 15
    assert auth.cache.token is not None
    auth.cache.token["expires_at"] = int(time.time()) + 10  # inside the leeway
    seen = walk(auth, httpx.Request("GET", f"{BASE}/x"),
                lambda r: token("T2", expires_in=60) if r.url == GRANT else httpx.Response(200))
    assert [str(r.url) for r in seen] == [GRANT, f"{BASE}/x"]
    assert seen[-1].headers["Authorization"] == "Bearer T2"


@pytest.mark.parametrize(("status", "body", "cls"), [
    (401, {"error": "invalid_grant", "error_description": "bad password"}, AuthError),
    (400, {"error": "invalid_request"}, AuthError),
    (403, {"message": "Forbidden"}, ForbiddenError),
    (404, b"", AuthError),
    (429, b"", RateLimitedError),
    (503, b"<html>down</html>", ServerError),
])
def test_token_endpoint_failures_are_typed_without_secrets(status: int, body: Any, cls: type) -> None:
    auth = password_auth()
    kwargs = {"json": body} if isinstance(body, dict) else {"content": body}
    with pytest.raises(cls) as err:
        walk(auth, httpx.Request("GET", f"{BASE}/x"), lambda r: httpx.Response(status, **kwargs))
    assert err.value.status_code == status
    text = str(err.value)
    assert "pw-secret" not in text
    assert "KEY-1" not in text
    if isinstance(body, dict) and "error" in body:
        assert body["error"] in text


def test_a_200_without_access_token_or_non_bearer_is_refused() -> None:
    with pytest.raises(AuthError, match="no access_token"):
        walk(password_auth(), httpx.Request("GET", f"{BASE}/x"), lambda r: httpx.Response(200, json={}))
    with pytest.raises(AuthError, match="token_type"):
        walk(password_auth(), httpx.Request("GET", f"{BASE}/x"),
             lambda r: httpx.Response(200, json={"access_token": "a", "token_type": "mac"}))


# -- client credentials (Keycloak) -----------------------------------------------------------------

def test_keycloak_client_credentials() -> None:
    kc = "https://keycloak.example/auth/realms/ema-fhir/protocol/openid-connect/token"
    auth = ClientCredentialsAuth(BASE, kc, client_id="cid", client_secret="cs-secret", api_key="KEY-1")
    seen = walk(auth, httpx.Request("GET", f"{BASE}/x"),
                lambda r: token("K1", expires_in=900) if r.url == kc else httpx.Response(200))
    tok, call = seen
    assert form(tok) == {"grant_type": "client_credentials", "client_id": "cid", "client_secret": "cs-secret"}
    assert "x-api-key" not in tok.headers  # the API key goes to ModMed, not to Keycloak
    assert call.headers["Authorization"] == "Bearer K1"
    assert call.headers["x-api-key"] == "KEY-1"
    assert auth.cache.leeway == 30


# -- SMART backend services ------------------------------------------------------------------------

def _keys(alg: str) -> tuple[str, Any]:
    if alg == "ES384":
        priv: Any = ec.generate_private_key(ec.SECP384R1())
        kind: Any = ECKey
    else:
        priv = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        kind = RSAKey
    pem = priv.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption()).decode()
    public = kind.import_key(priv.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return pem, public


def smart_config(**extra: Any) -> dict[str, Any]:
    return {"token_endpoint": CERT_TOKEN,
            "token_endpoint_auth_methods_supported": ["private_key_jwt", "client_secret_post"],
            "token_endpoint_auth_signing_alg_values_supported": ["RS384", "ES384"],
            "capabilities": ["client-confidential-asymmetric", "permission-v1"], **extra}


def smart_server(config: dict[str, Any] | None = None) -> Callable[[httpx.Request], httpx.Response]:
    def answer(r: httpx.Request) -> httpx.Response:
        if r.url.path.endswith("/.well-known/smart-configuration"):
            return httpx.Response(200, json=config or smart_config())
        if str(r.url) == CERT_TOKEN:
            return httpx.Response(200, json={"access_token": "S1", "token_type": "bearer",
                                             "expires_in": 300, "scope": "system/*.read"})
        return httpx.Response(200)
    return answer


@pytest.mark.parametrize("alg", ["RS384", "ES384"])
def test_smart_private_key_jwt_assertion(alg: str) -> None:
    pem, public = _keys(alg)
    auth = SmartBackendAuth(CERT_BASE, "client-1", private_key=pem, key_id="kid-7", algorithm=alg)
    seen = walk(auth, httpx.Request("GET", f"{CERT_BASE}/Patient"), smart_server())
    discovery, tok, call = seen
    assert str(discovery.url) == f"{CERT_BASE}/.well-known/smart-configuration"
    assert "Authorization" not in discovery.headers
    fields = form(tok)
    assert fields["grant_type"] == "client_credentials"
    assert fields["scope"] == "system/*.read"
    assert fields["client_assertion_type"] == "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
    assert "client_secret" not in fields
    assert "client_id" not in fields
    now = time.time()
    decoded = jwt.decode(fields["client_assertion"], public, algorithms=[alg])
    assert decoded.header == {"alg": alg, "kid": "kid-7", "typ": "JWT"}
    claims = decoded.claims
    assert claims["iss"] == claims["sub"] == "client-1"
    assert claims["aud"] == CERT_TOKEN
    assert isinstance(claims["exp"], int)
    assert claims["exp"] - claims["iat"] <= 300
    assert claims["exp"] <= now + 300
    assert claims["exp"] >= now + 200
    assert call.headers["Authorization"] == "Bearer S1"
    assert "x-api-key" not in call.headers

    # every assertion has a fresh jti (force two more fetches)
    jtis = {claims["jti"]}
    for _ in range(2):
        auth.cache.token = None
        fields = form(walk(auth, httpx.Request("GET", f"{CERT_BASE}/Patient"), smart_server())[0])
        jtis.add(jwt.decode(fields["client_assertion"], public, algorithms=[alg]).claims["jti"])
    assert len(jtis) == 3


def test_es384_signature_is_raw_r_s() -> None:
    pem, _ = _keys("ES384")
    auth = SmartBackendAuth(CERT_BASE, "c", private_key=pem, key_id="k", algorithm="ES384")
    signature = auth.assertion(CERT_TOKEN).split(".")[2]
    assert len(base64.urlsafe_b64decode(signature + "==")) == 96  # 48-byte r || 48-byte s, not DER


def test_smart_v2_scope_and_client_secret_post() -> None:
    auth = SmartBackendAuth(CERT_BASE, "c", client_secret="sec")
    cfg = smart_config(capabilities=["permission-v2"])
    _, tok, _ = walk(auth, httpx.Request("GET", f"{CERT_BASE}/Patient"), smart_server(cfg))
    assert form(tok) == {"grant_type": "client_credentials", "scope": "system/*.rs", "client_id": "c",
                         "client_secret": "sec"}
    assert "Authorization" not in tok.headers


def test_smart_client_secret_basic_when_only_basic_is_offered() -> None:
    auth = SmartBackendAuth(CERT_BASE, "c:1", client_secret="s/2")
    cfg = smart_config(token_endpoint_auth_methods_supported=["client_secret_basic"])
    _, tok, _ = walk(auth, httpx.Request("GET", f"{CERT_BASE}/Patient"), smart_server(cfg))
    assert tok.headers["Authorization"] == "Basic " + base64.b64encode(b"c%3A1:s%2F2").decode()
    assert "client_secret" not in form(tok)


def test_smart_refuses_what_the_server_does_not_offer() -> None:
    pem, _ = _keys("ES384")
    auth = SmartBackendAuth(CERT_BASE, "c", private_key=pem, key_id="k", algorithm="ES384")
    cfg = smart_config(token_endpoint_auth_signing_alg_values_supported=["RS384"])
    with pytest.raises(ConfigurationError, match="jwt_algorithm"):
        walk(auth, httpx.Request("GET", f"{CERT_BASE}/Patient"), smart_server(cfg))
    auth = SmartBackendAuth(CERT_BASE, "c", private_key=pem, key_id="k", algorithm="ES384")
    cfg = smart_config(token_endpoint_auth_methods_supported=["client_secret_post"])
    with pytest.raises(ConfigurationError, match="auth_method"):
        walk(auth, httpx.Request("GET", f"{CERT_BASE}/Patient"), smart_server(cfg))


def test_smart_without_discovery() -> None:
    auth = SmartBackendAuth(CERT_BASE, "c", client_secret="s")
    with pytest.raises(ConfigurationError, match="token_url"):
        walk(auth, httpx.Request("GET", f"{CERT_BASE}/Patient"), lambda r: httpx.Response(404))
    auth = SmartBackendAuth(CERT_BASE, "c", client_secret="s", token_url=CERT_TOKEN)
    seen = walk(auth, httpx.Request("GET", f"{CERT_BASE}/Patient"),
                lambda r: httpx.Response(404) if "well-known" in str(r.url) else smart_server()(r))
    assert [str(r.url) for r in seen][1:] == [CERT_TOKEN, f"{CERT_BASE}/Patient"]
    # token_url and scope both configured: no discovery at all
    auth = SmartBackendAuth(CERT_BASE, "c", client_secret="s", token_url=CERT_TOKEN, scope="system/Patient.read")
    seen = walk(auth, httpx.Request("GET", f"{CERT_BASE}/Patient"), smart_server())
    assert [str(r.url) for r in seen] == [CERT_TOKEN, f"{CERT_BASE}/Patient"]
    assert form(seen[0])["scope"] == "system/Patient.read"


def test_smart_invalid_client_is_an_auth_error() -> None:
    pem, _ = _keys("RS384")
    auth = SmartBackendAuth(CERT_BASE, "c", private_key=pem, key_id="k")

    def answer(r: httpx.Request) -> httpx.Response:
        if str(r.url) == CERT_TOKEN:
            return httpx.Response(400, json={"error": "invalid_client"})
        return smart_server()(r)

    with pytest.raises(AuthError, match="invalid_client"):
        walk(auth, httpx.Request("GET", f"{CERT_BASE}/Patient"), answer)


# -- credentials stay on their host ----------------------------------------------------------------

@pytest.mark.parametrize("url", [STORAGE, "http://api.example/ema-dev/x", "https://api.example:8443/x",
                                 "https://evil.example/ema-dev/firm/apiportal/ema/fhir/v2/Patient"])
def test_no_credentials_to_other_origins(url: str) -> None:
    auth = password_auth()
    request = httpx.Request("PUT", url, headers={"Authorization": "Bearer leaked", "x-api-key": "leaked"})
    (only,) = walk(auth, request, lambda r: httpx.Response(200))  # no token request either
    assert "Authorization" not in only.headers
    assert "x-api-key" not in only.headers


def test_no_credentials_when_opted_out_on_the_same_host() -> None:
    auth = password_auth()
    request = httpx.Request("GET", f"{BASE}/bulk/file.ndjson", extensions={NO_CREDENTIALS: True})
    (only,) = walk(auth, request, lambda r: httpx.Response(200))
    assert "Authorization" not in only.headers


def test_redirects_to_another_host_lose_the_credentials() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if str(request.url) == GRANT:
            return token("T1")
        if request.url.host == "api.example":
            return httpx.Response(307, headers={"Location": STORAGE})
        return httpx.Response(200)

    auth = password_auth()
    with httpx.Client(transport=httpx.MockTransport(handler), follow_redirects=True,
                      event_hooks={"request": [credential_guard(auth)]}) as client:
        assert client.get(f"{BASE}/Binary/1", auth=auth).status_code == 200
    fhir_call, storage_call = seen[1], seen[2]
    assert fhir_call.headers["x-api-key"] == "KEY-1"
    assert storage_call.url.host == "storage.example"
    assert "Authorization" not in storage_call.headers
    assert "x-api-key" not in storage_call.headers


# -- one token per credential set, one renewal at a time -----------------------------------------

def _config(**over: Any) -> ClientConfig:
    values: dict[str, Any] = {"track": "proprietary", "fhir_base": BASE, "firm": "apiportal",
                              "api_key": "KEY-1", "username": "u", "password": "pw-secret", **over}
    return ClientConfig(**values)


def test_token_cache_is_per_credential_set() -> None:
    assert auth_from_config(_config()).cache is auth_from_config(_config()).cache
    assert auth_from_config(_config()).cache is not auth_from_config(_config(password="other")).cache


class _Counting:
    def __init__(self) -> None:
        self.token_calls = 0
        self.lock = threading.Lock()


def _stampede_handler(counter: _Counting) -> Callable[[httpx.Request], httpx.Response]:
    def handler(request: httpx.Request) -> httpx.Response:
        if str(request.url) == GRANT:
            with counter.lock:
                counter.token_calls += 1
            time.sleep(0.2)
            return token("T1", refresh_token="R1")
        assert request.headers["Authorization"] == "Bearer T1"
        return httpx.Response(200, json={"resourceType": "Patient", "id": "1"})
    return handler


def test_concurrent_threads_share_one_token_fetch() -> None:
    counter = _Counting()
    client = FhirClient(_config(), transport=httpx.MockTransport(_stampede_handler(counter)))
    errors: list[BaseException] = []

    def work() -> None:
        try:
            client.read("Patient", "1")
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert counter.token_calls == 1
    client.close()


async def test_concurrent_tasks_share_one_token_fetch() -> None:
    counter = _Counting()
    sync_handler = _stampede_handler(counter)

    async def handler(request: httpx.Request) -> httpx.Response:
        if str(request.url) == GRANT:
            counter.token_calls += 1
            await asyncio.sleep(0.2)
            return token("T1")
        return sync_handler(request)

    async with AsyncFhirClient(_config(), transport=httpx.MockTransport(handler)) as client:
        results = await asyncio.gather(*(client.read("Patient", "1") for _ in range(10)))
    assert len(results) == 10
    assert counter.token_calls == 1


async def test_async_flow_by_hand_matches_sync() -> None:
    auth = password_auth()
    flow = auth.async_auth_flow(httpx.Request("GET", f"{BASE}/x"))
    grant = await flow.__anext__()
    assert str(grant.url) == GRANT
    call = await flow.asend(token("T9"))
    assert call.headers["Authorization"] == "Bearer T9"
    with pytest.raises(StopAsyncIteration):
        await flow.asend(httpx.Response(200))


def test_token_requests_carry_the_client_headers_and_timeout_of_the_request_that_needed_them() -> None:
    auth = smart_secret_auth_for_headers()
    fhir_request = httpx.Client(headers={"User-Agent": "ua/1", "Accept-Encoding": "gzip"}, timeout=7).build_request(
        "GET", f"{CERT_BASE}/Patient/1")

    def answer(r: httpx.Request) -> httpx.Response:
        if r.url.path.endswith("smart-configuration"):
            return httpx.Response(200, json={"token_endpoint": CERT_TOKEN})
        return token("T1") if str(r.url) == CERT_TOKEN else httpx.Response(200)

    discovery, grant, call = walk(auth, fhir_request, answer)
    for made_by_the_flow in (discovery, grant):
        assert made_by_the_flow.headers["User-Agent"] == "ua/1"
        assert made_by_the_flow.headers["Accept-Encoding"] == "gzip"
        assert made_by_the_flow.headers["Accept"] == "application/json"  # the flow's own header is kept
        assert made_by_the_flow.extensions["timeout"] == fhir_request.extensions["timeout"]
    assert call.headers["Authorization"] == "Bearer T1"


def smart_secret_auth_for_headers() -> SmartBackendAuth:
    return SmartBackendAuth(CERT_BASE, "client", client_secret="s", scope=None)


async def test_the_async_driver_releases_the_lock_when_the_token_request_fails() -> None:
    auth = password_auth()
    flow = auth.async_auth_flow(httpx.Request("GET", f"{BASE}/x"))
    await flow.__anext__()  # the grant: the renewal lock is held now
    with pytest.raises(AuthError):
        await flow.asend(httpx.Response(401, json={"error": "invalid_grant"}))
    assert not auth.cache.async_lock().locked()
    flow = auth.async_auth_flow(httpx.Request("GET", f"{BASE}/x"))
    assert str((await flow.__anext__()).url) == GRANT  # not blocked: the next call renews


def test_the_sync_driver_releases_the_lock_when_closed_mid_renewal() -> None:
    auth = password_auth()
    flow = auth.sync_auth_flow(httpx.Request("GET", f"{BASE}/x"))
    next(flow)  # the grant: the renewal lock is held now
    assert auth.cache.thread_lock.locked()
    flow.close()  # httpx closes the flow when sending the grant fails
    assert not auth.cache.thread_lock.locked()



def test_concurrent_401s_renew_once() -> None:
    valid = {"T1"}
    grants: list[str] = []
    lock = threading.Lock()

    def handler(request: httpx.Request) -> httpx.Response:
        if str(request.url) == GRANT:
            kind = form(request)["grant_type"]
            with lock:
                grants.append(kind)
                new = f"T{len(grants)}"
                valid.add(new)
            time.sleep(0.1)
            return token(new, refresh_token="R")
        if request.headers["Authorization"][7:] not in valid:
            return httpx.Response(401)
        return httpx.Response(200, json={"resourceType": "Patient", "id": "1"})

    client = FhirClient(_config(), transport=httpx.MockTransport(handler))
    client.read("Patient", "1")
    valid.clear()  # the server forgets every token: all threads get a 401 together
    results: list[str] = []
    threads = [threading.Thread(target=lambda: results.append(client.read("Patient", "1")["id"]))
               for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == ["1"] * 8
    assert grants == ["password", "refresh_token"]
    client.close()
