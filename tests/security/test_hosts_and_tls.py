"""Credentials never reach a host other than their own, TLS is verified by default, plain http:// only to
loopback. A hostile "FHIR server" on loopback answers redirects, ``next`` links, ``Location`` headers and
presigned URLs that point at a second loopback server (another port: another origin), which records every
request it gets."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import httpx
import pytest

from airflow_provider_modmed.client import ClientConfig, FhirClient
from airflow_provider_modmed.client.documents import PRESIGNED_URL_EXTENSION, upload_document
from airflow_provider_modmed.errors import ConfigurationError, ModMedError, TransportError
from airflow_provider_modmed.hooks.connection import config_from_connection
from tests.reliability._figures import Figures
from tests.security.servers import LoopbackServer, fhir_json, self_signed, token_answer

pytestmark = pytest.mark.integration

API_KEY = "hostile-test-api-key"
PASSWORD = "hostile-test-password"


def config(base: str, **over: Any) -> ClientConfig:
    values: dict[str, Any] = {"track": "proprietary", "fhir_base": f"{base}/firm/x/ema/fhir/v2", "firm": "x",
                              "api_key": API_KEY, "username": "u", "password": PASSWORD, "max_retries": 1}
    return ClientConfig(**{**values, **over})


def hostile(elsewhere: str) -> Any:
    """Answers the token grant, then points everything at ``elsewhere``."""
    def route(method: str, path: str, headers: dict[str, str], body: bytes) -> Any:
        p = path.split("?", 1)[0]
        if p.endswith("/oauth2/grant"):
            return token_answer()
        if p.endswith("/Patient/1"):
            return 302, {"Location": f"{elsewhere}/steal/Patient/1"}, b""
        if p.endswith("/Patient/2"):
            return 307, {"Location": f"{elsewhere}/steal/Patient/2"}, b""
        if p.endswith("/Patient/3"):
            return 301, {"Location": "https://ema.invalid/steal"}, b""
        if method == "GET" and p.endswith("/Patient"):
            return fhir_json({"resourceType": "Bundle", "type": "searchset",
                              "entry": [{"resource": {"resourceType": "Patient", "id": "1"}}],
                              "link": [{"relation": "next", "url": f"{elsewhere}/steal/Patient?page=2"}]})
        if method == "POST" and p.endswith("/Patient"):
            return 201, {"Location": f"{elsewhere}/steal/Patient/9/_history/1"}, b""
        if p.endswith("/ValueSet/document-category"):
            return fhir_json({"resourceType": "ValueSet", "status": "active", "expansion": {
                "timestamp": "2026-01-01T00:00:00Z",
                "contains": [{"system": "https://www.modmed.com/fhir/document-category", "code": "LAB"}]}})
        if method == "GET" and p.endswith("/DocumentReference"):
            return fhir_json({"resourceType": "Bundle", "type": "searchset"})
        if p.endswith("/Binary"):
            return fhir_json({"resourceType": "Binary", "id": "b1", "contentType": "application/pdf",
                              "extension": [{"url": PRESIGNED_URL_EXTENSION,
                                             "valueUrl": "http://storage.example.com/upload?sig=1"}]}, 201)
        return fhir_json({"resourceType": "OperationOutcome", "issue": []}, 404)
    return route


def test_redirects_next_links_and_locations_to_another_host_get_no_credentials(figures: Figures) -> None:
    with LoopbackServer() as recorder, LoopbackServer() as server:
        server.route = hostile(recorder.url)
        errors: dict[str, str] = {}
        with FhirClient(config(server.url), sleep=lambda s: None) as c:
            for rid in ("1", "2", "3"):
                with pytest.raises(ModMedError) as err:
                    c.read("Patient", rid)
                errors[f"read Patient/{rid} (redirect)"] = str(err.value)
            with pytest.raises(ModMedError) as err:
                list(c.search("Patient"))
            errors["next link"] = str(err.value)
            with pytest.raises(ModMedError) as err:
                c.create({"resourceType": "Patient", "gender": "male"}, if_none_exist={"identifier": "a|b"})
            errors["Location"] = str(err.value)
        assert recorder.requests == []  # not a single request reached the other origin
        assert server.credentials_seen()  # the FHIR server itself did get them
    assert errors["next link"].startswith("refusing a next link to http://127.0.0.1:")
    assert errors["Location"] == "the Location of a created resource is outside the FHIR base's origin"
    assert all(e.startswith("read Patient failed (HTTP 30") for k, e in errors.items() if "redirect" in k)
    figures.record(requests_to_other_host=0, errors=len(errors))


def test_a_client_that_follows_redirects_still_strips_credentials(figures: Figures) -> None:
    """A caller-supplied httpx client with follow_redirects=True: the credential guard runs on every hop."""
    with LoopbackServer() as recorder, LoopbackServer() as server:
        recorder.route = lambda m, p, h, b: fhir_json({"resourceType": "Patient", "id": "1"})
        server.route = hostile(recorder.url)
        with httpx.Client(follow_redirects=True) as http, FhirClient(config(server.url), http_client=http) as c:
            c.read("Patient", "1")
            c.read("Patient", "2")
        assert len(recorder.requests) == 2
        assert recorder.credentials_seen() == []
    figures.record(redirects_followed=2, credentials_seen_by_other_host=0)


def test_a_presigned_url_to_a_plain_http_host_is_refused_before_sending(figures: Figures) -> None:
    with LoopbackServer() as server:
        server.route = hostile("http://127.0.0.1:9")
        with FhirClient(config(server.url)) as c, pytest.raises(ModMedError) as err:
            upload_document(c, b"%PDF-1.4 x", filename="x.pdf", category="LAB")
        assert not any(r["method"] == "PUT" for r in server.requests)
    assert str(err.value) == ("refusing to upload over http:// to 'storage.example.com': a presigned URL must be "
                              "https:// (http:// only on loopback)")
    figures.record(error=str(err.value))


def test_tls_is_verified_by_default(tmp_path: Path, figures: Figures) -> None:
    tls, ca_file = self_signed(tmp_path)
    with LoopbackServer(tls=tls) as server:
        server.route = lambda m, p, h, b: token_answer() if p.endswith("/grant") else fhir_json(
            {"resourceType": "Patient", "id": "1"})
        assert ClientConfig.__dataclass_fields__["verify"].default is True
        with FhirClient(config(server.url)) as c, pytest.raises(TransportError) as err:
            c.read("Patient", "1")
        assert server.requests == []  # the handshake failed: not one byte of HTTP, no credentials
        with FhirClient(config(server.url, verify=ca_file)) as c:  # the practice's CA bundle: trusted
            assert c.read("Patient", "1")["id"] == "1"
        assert len(server.requests) == 2
    assert str(err.value).startswith("read Patient")  # the message itself: test_an_untrusted_certificate_says_so
    figures.record(error_untrusted=str(err.value))


def test_an_untrusted_certificate_says_so(tmp_path: Path) -> None:
    tls, _ = self_signed(tmp_path)
    with LoopbackServer(tls=tls) as server, FhirClient(config(server.url), sleep=lambda s: None) as c, \
            pytest.raises(TransportError) as err:
        c.read("Patient", "1")
    assert re.search(r"certificate.{0,20}verif", str(err.value), re.IGNORECASE), str(err.value)


@pytest.mark.parametrize("host", ["http://ema.example.com", "http://10.0.0.5", "http://0.0.0.0", "http://127.0.0.1.nip.io",
                                  "http://localhost.evil.example", "http://[::ffff:8.8.8.8]", "ftp://127.0.0.1",
                                  "file:///etc/passwd", "//127.0.0.1", "http://sandbox.localhost:8",
                                  "http://ema.example.com.localhost"])
def test_plain_http_is_refused_except_to_loopback(host: str) -> None:
    with pytest.raises(ConfigurationError) as err:
        config(host)
    assert "fhir_base" in str(err.value)
    with pytest.raises(ConfigurationError):
        config("http://127.0.0.1:1", token_url=f"{host}/token")


@pytest.mark.parametrize("host", ["http://127.0.0.1:8", "http://127.9.9.9:8", "http://localhost:8", "http://[::1]:8",
                                  "https://ema.example.com"])
def test_loopback_and_https_are_accepted(host: str) -> None:
    assert config(host).fhir_base.startswith(host)


def test_a_connection_with_plain_http_to_a_real_host_names_the_field() -> None:
    with pytest.raises(ConfigurationError) as err:
        config_from_connection(host="http://ema.example.com/ema-dev/firm", login="u", password=PASSWORD,
                               extra={"environment": "custom", "firm_url_prefix": "x", "api_key": API_KEY})
    assert "Custom base URL" in str(err.value) or "Host" in str(err.value)
    assert PASSWORD not in str(err.value) and API_KEY not in str(err.value)
    assert json.dumps(str(err.value))


def test_an_oversized_answer_is_handled(figures: Figures) -> None:
    """A 24 MB search page (one resource with a huge field) from a hostile server: read, emitted, no crash.
    FHIR JSON answers are read whole (ModMed bounds pages by _count); bulk files are streamed with a line cap."""
    import time

    huge = "x" * (24 << 20)
    page = json.dumps({"resourceType": "Bundle", "type": "searchset",
                       "entry": [{"resource": {"resourceType": "Patient", "id": "1", "text": {"div": huge}}}]}).encode()

    def route(method: str, path: str, headers: dict[str, str], body: bytes) -> Any:
        if path.split("?", 1)[0].endswith("/oauth2/grant"):
            return token_answer()
        return 200, {"Content-Type": "application/fhir+json"}, page

    with LoopbackServer(route) as server, FhirClient(config(server.url)) as c:
        started = time.monotonic()
        found = list(c.search("Patient"))
        seconds = time.monotonic() - started
    assert [r["id"] for r in found] == ["1"] and len(found[0]["text"]["div"]) == len(huge)
    figures.record(body_mb=round(len(page) / 2**20, 1), seconds=round(seconds, 2))
