"""Connection -> client config: every field, each environment, and errors that name the field."""

from __future__ import annotations

from typing import Any

import pytest

from airflow_provider_modmed.capabilities import Track
from airflow_provider_modmed.errors import ConfigurationError
from airflow_provider_modmed.hooks.connection import config_from_connection

PROP = {"track": "proprietary", "firm_url_prefix": "apiportal", "api_key": "k" * 20}


def make(host: str | None = None, login: str | None = "user", password: str | None = "pw",
         **extra: Any) -> Any:
    return config_from_connection(host=host, login=login, password=password, extra={**PROP, **extra})


@pytest.mark.parametrize(("environment", "base"), [
    ("sandbox", "https://stage.ema-api.com/ema-dev/firm/apiportal/ema/fhir/v2"),
    ("training", "https://stage.ema-api.com/ema-training/firm/apiportal/ema/fhir/v2"),
    ("production", "https://mmapi.ema-api.com/ema-prod/firm/apiportal/ema/fhir/v2"),
])
def test_published_environments(environment: str, base: str) -> None:
    config = make(environment=environment)
    assert config.fhir_base == base
    assert config.password_grant_url == base.replace("/fhir/v2", "/ws/oauth2/grant")


def test_custom_proprietary_host_is_the_env_base() -> None:
    config = make(host="http://127.0.0.1:8899/ema-dev/firm", environment="custom")
    assert config.fhir_base == "http://127.0.0.1:8899/ema-dev/firm/apiportal/ema/fhir/v2"


def _pem() -> str:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    return rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()).decode()


@pytest.mark.parametrize("mangle", [lambda p: p.replace("\n", " "), lambda p: p.replace("\n", "\\n"),
                                    lambda p: p.replace("\n", "")])
def test_a_pem_pasted_into_a_one_line_input_still_works(mangle: Any) -> None:
    pem = _pem()
    config = config_from_connection(host=None, login=None, password=None, extra={
        "track": "certified", "firm_url_prefix": "derm1", "client_id": "c", "private_key": mangle(pem),
        "key_id": "k"})
    assert config.private_key == pem


def test_certified_defaults_to_the_practice_url_and_private_key_jwt() -> None:
    pem = _pem()
    config = config_from_connection(host=None, login=None, password=None, extra={
        "track": "certified", "environment": "production", "firm_url_prefix": "derm1", "client_id": "c",
        "private_key": pem, "key_id": "kid-1"})
    assert config.resolved_track is Track.CERTIFIED
    assert config.fhir_base == "https://derm1.mmi.prod.fhir.ema-api.com/fhir/r4"
    assert config.resolved_auth_method.value == "private_key_jwt"


def test_port_overrides_the_custom_base_urls_port() -> None:
    config = config_from_connection(host="http://127.0.0.1:8899/ema-dev/firm", port=9900, login="u", password="p",
                                    extra={**PROP, "environment": "custom"})
    assert config.fhir_base == "http://127.0.0.1:9900/ema-dev/firm/apiportal/ema/fhir/v2"
    assert config_from_connection(host="http://127.0.0.1:8899/ema-dev/firm", port=0, login="u", password="p",
                                  extra={**PROP, "environment": "custom"}).fhir_base.startswith("http://127.0.0.1:8899/")
    with pytest.raises(ConfigurationError, match="port"):
        config_from_connection(host=None, port=443, login="u", password="p", extra=PROP)


def test_ui_nulls_and_blanks_count_as_unset() -> None:
    config = make(client_id="", client_secret=None, scope="  ", rate_limit_per_minute=None, timeout="")
    assert config.client_id is None and config.scope is None
    assert config.rate_limit_per_minute == 1000 and config.timeout == 30.0


def test_overrides_win() -> None:
    assert make(rate_limit_per_minute="500").rate_limit_per_minute == 500
    assert config_from_connection(host=None, login="u", password="p", extra=PROP,
                                  rate_limit_per_minute=10).rate_limit_per_minute == 10


@pytest.mark.parametrize(("kwargs", "needle"), [
    ({"firm_url_prefix": ""}, "firm_url_prefix"),
    ({"track": "partner"}, "track"),
    ({"environment": "staging"}, "environment"),
    ({"environment": "custom"}, "host"),
    ({"host": "https://example.org", "environment": "sandbox"}, "environment to 'custom'"),
    ({"api_key": None}, "api_key"),
    ({"login": None}, "username"),
    ({"rate_limit_per_minute": "lots"}, "rate_limit_per_minute"),
    ({"host": "http://modmed.example.org/ema-dev/firm", "environment": "custom"}, "http://"),
    ({"auth_method": "private_key_jwt"}, "certified"),
])
def test_errors_name_the_field_and_the_fix(kwargs: dict[str, Any], needle: str) -> None:
    host = kwargs.pop("host", None)
    login = kwargs.pop("login", "user")
    with pytest.raises(ConfigurationError) as err:
        make(host=host, login=login, **kwargs)
    assert needle in str(err.value)
