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
        "track": "certified", "environment": "production", "firm_url_prefix": "derm1", "client_id": "c",
        "private_key": mangle(pem), "key_id": "k"})
    assert config.private_key == pem


def test_certified_defaults_to_the_practice_url_and_private_key_jwt() -> None:
    pem = _pem()
    config = config_from_connection(host=None, login=None, password=None, extra={
        "track": "certified", "environment": "production", "firm_url_prefix": "derm1", "client_id": "c",
        "private_key": pem, "key_id": "kid-1"})
    assert config.resolved_track is Track.CERTIFIED
    assert config.fhir_base == "https://derm1.mmi.prod.fhir.ema-api.com/fhir/r4"
    assert config.resolved_auth_method.value == "private_key_jwt"


# -- issue 15, item 4: the port rules -------------------------------------------------------------------------

CUSTOM = {**PROP, "environment": "custom"}


def with_port(host: str | None, port: int | None, extra: dict[str, Any] = CUSTOM) -> str:
    return config_from_connection(host=host, port=port, login="u", password="p", extra=extra).fhir_base


@pytest.mark.parametrize("empty", [None, 0])  # Airflow's UI saves null, its list row sends 0
def test_a_port_written_in_the_host_url_is_used_when_port_is_empty(empty: int | None) -> None:
    assert with_port("http://127.0.0.1:8899/ema-dev/firm", empty) == \
        "http://127.0.0.1:8899/ema-dev/firm/apiportal/ema/fhir/v2"


def test_port_fills_in_a_host_url_without_a_port_and_may_repeat_the_urls_port() -> None:
    assert with_port("http://127.0.0.1/ema-dev/firm", 9900) == "http://127.0.0.1:9900/ema-dev/firm/apiportal/ema/fhir/v2"
    assert with_port("http://127.0.0.1:8899/ema-dev/firm", 8899) == \
        "http://127.0.0.1:8899/ema-dev/firm/apiportal/ema/fhir/v2"


def test_a_port_that_disagrees_with_the_host_urls_port_is_an_error_naming_both() -> None:
    with pytest.raises(ConfigurationError) as err:
        with_port("http://127.0.0.1:8899/ema-dev/firm", 9900)  # before: Port silently won (9900)
    message = str(err.value)
    assert "9900" in message and "8899" in message
    assert "'Port (custom base URL)'" in message and "'Custom base URL'" in message


def test_with_a_published_environment_port_must_be_empty_or_the_urls_443() -> None:
    published = {**PROP, "environment": "production"}
    assert with_port(None, 443, published) == with_port(None, None, published)  # lets the list-row Test work
    with pytest.raises(ConfigurationError) as err:
        with_port(None, 8899, published)
    assert "8899" in str(err.value) and "443" in str(err.value) and "'custom'" in str(err.value)


# -- issue 15, item 2: the certified track never falls back to production -----------------------------------------


@pytest.mark.parametrize("environment", ["sandbox", "training", None])  # None: the form's default, sandbox
def test_certified_sandbox_or_training_is_refused_not_production(environment: str | None) -> None:
    extra = {"track": "certified", "firm_url_prefix": "derm1", "auth_method": "client_secret", "client_id": "c",
             "client_secret": "s", **({"environment": environment} if environment else {})}
    with pytest.raises(ConfigurationError) as err:
        config_from_connection(host=None, login=None, password=None, extra=extra)
    message = str(err.value)
    assert f"environment={environment or 'sandbox'!r}" in message
    assert "'custom'" in message and "'Custom base URL'" in message
    production = config_from_connection(host=None, login=None, password=None,
                                        extra={**extra, "environment": "Production"})
    assert production.fhir_base == "https://derm1.mmi.prod.fhir.ema-api.com/fhir/r4"
    custom = config_from_connection(host="https://derm1.sandbox-fhir.example/fhir/r4", login=None, password=None,
                                    extra={**extra, "environment": "custom"})
    assert custom.fhir_base == "https://derm1.sandbox-fhir.example/fhir/r4"


# -- issue 15, item 5: choice fields and the firm prefix ---------------------------------------------------------


@pytest.mark.parametrize(("track", "environment", "host"), [
    ("proprietary", "sandbox", None), ("proprietary", "custom", "http://127.0.0.1:8899/ema-dev/firm"),
    ("certified", "production", None), ("certified", "custom", "https://{firm}.fhir.example/fhir/r4"),
])
@pytest.mark.parametrize("firm", ["my practice", "a/b", "..", "x?y"])
def test_a_firm_prefix_that_is_not_a_path_segment_fails_before_any_call(track: str, environment: str,
                                                                        host: str | None, firm: str) -> None:
    extra = {**PROP, "track": track, "environment": environment, "firm_url_prefix": firm,
             "auth_method": "password" if track == "proprietary" else "client_secret", "client_id": "c",
             "client_secret": "s"}
    with pytest.raises(ConfigurationError) as err:
        config_from_connection(host=host, login="u", password="p", extra=extra)
    assert "firm_url_prefix" in str(err.value) and repr(firm) in str(err.value)


def test_the_certified_host_needs_a_dns_label_firm() -> None:
    extra = {"track": "certified", "environment": "production", "firm_url_prefix": "smith_derm",
             "auth_method": "client_secret", "client_id": "c", "client_secret": "s"}
    with pytest.raises(ConfigurationError, match="DNS label"):
        config_from_connection(host=None, login=None, password=None, extra=extra)
    with pytest.raises(ConfigurationError, match="DNS label"):  # {firm} as a subdomain of a custom host
        config_from_connection(host="https://{firm}.fhir.example/fhir/r4", login=None, password=None,
                               extra={**extra, "environment": "custom"})
    # a path segment on a custom host may keep its underscore
    assert config_from_connection(host="http://127.0.0.1:8899/certified/{firm}/fhir/r4", login=None, password=None,
                                  extra={**extra, "environment": "custom"}).firm == "smith_derm"


def test_jwt_algorithm_in_any_case_from_the_connection() -> None:
    pem = _pem()
    config = config_from_connection(host=None, login=None, password=None, extra={
        "track": "Certified", "environment": "production", "firm_url_prefix": "derm1", "client_id": "c",
        "auth_method": "PRIVATE_KEY_JWT", "private_key": pem, "key_id": "k", "jwt_algorithm": "rs384"})
    assert config.jwt_algorithm == "RS384"


# -- issue 15, item 4: the form ----------------------------------------------------------------------------------


def test_the_form_marks_the_firm_prefix_required_and_says_where_it_comes_from() -> None:
    from airflow_provider_modmed.connection_form import CONN_FIELDS

    firm = CONN_FIELDS["firm_url_prefix"]
    assert "null" not in firm["schema"]["type"]  # Airflow's form shows a field required when null is not allowed
    assert "API key" in firm["description"] and "subdomain" in firm["description"]
    assert all("null" in spec["schema"]["type"] for name, spec in CONN_FIELDS.items() if name != "firm_url_prefix")


def test_the_form_names_the_host_field_as_labelled_and_shows_real_urls() -> None:
    from airflow_provider_modmed.connection_form import CONN_FIELDS, UI_FIELD_BEHAVIOUR

    host_label = UI_FIELD_BEHAVIOUR["relabeling"]["host"]
    assert f"'{host_label}'" in CONN_FIELDS["environment"]["description"]
    placeholder = UI_FIELD_BEHAVIOUR["placeholders"]["host"]
    assert "https://stage.ema-api.com/ema-training/firm" in placeholder
    assert "https://{firm}.mmi.prod.fhir.ema-api.com/fhir/r4" in placeholder


def test_the_fields_of_one_track_stand_together() -> None:
    from airflow_provider_modmed.connection_form import CONN_FIELDS

    order = list(CONN_FIELDS)
    proprietary_only, certified_only = {"api_key"}, {"private_key", "key_id", "jwt_algorithm"}
    shared = {"client_id", "client_secret", "scope", "token_url"}
    positions = {name: order.index(name) for name in proprietary_only | certified_only | shared}
    # proprietary-only fields, then those both tracks use, then certified-only ones: each track is one run
    assert max(positions[n] for n in proprietary_only) < min(positions[n] for n in shared)
    assert max(positions[n] for n in shared) < min(positions[n] for n in certified_only)
    assert sorted(positions.values()) == list(range(min(positions.values()), max(positions.values()) + 1))
    for name in proprietary_only:
        assert CONN_FIELDS[name]["description"].startswith("Proprietary track")
    for name in certified_only:
        assert CONN_FIELDS[name]["description"].startswith("Certified track")


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


# -- the rate-limit storage password (issue 13, item 9) ------------------------------------------------------


def test_the_storage_password_field_goes_into_the_uri_url_quoted() -> None:
    config = make(rate_limit_storage_uri="redis://redis.example:6379/0", rate_limit_storage_password="p@ss/w:rd")
    assert config.rate_limit_storage_uri == "redis://:p%40ss%2Fw%3Ard@redis.example:6379/0"
    config = make(rate_limit_storage_uri="rediss://default@redis.example/1?ssl_cert_reqs=none",
                  rate_limit_storage_password="hunter22")
    assert config.rate_limit_storage_uri == "rediss://default:hunter22@redis.example/1?ssl_cert_reqs=none"
    assert make(rate_limit_storage_password="").rate_limit_storage_uri == "memory://"  # blank: unset


def test_a_storage_password_in_the_uri_still_works_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING", logger="airflow_provider_modmed.hooks"):
        config = make(rate_limit_storage_uri="redis://:in-uri-secret@redis.example/0")
    assert config.rate_limit_storage_uri == "redis://:in-uri-secret@redis.example/0"
    assert "rate_limit_storage_password" in caplog.text and "in-uri-secret" not in caplog.text


@pytest.mark.parametrize(("uri", "needle"), [
    ("redis://:twice-secret@redis.example/0", "given twice"),
    ("memory://", "names no host"),
])
def test_storage_password_errors_name_the_field_without_the_password(uri: str, needle: str) -> None:
    with pytest.raises(ConfigurationError) as err:
        make(rate_limit_storage_uri=uri, rate_limit_storage_password="field-secret")
    assert needle in str(err.value) and "rate_limit_storage_password" in str(err.value)
    assert "field-secret" not in str(err.value) and "twice-secret" not in str(err.value)


def test_the_storage_password_field_is_secret_in_the_form() -> None:
    from airflow_provider_modmed.connection_form import CONN_FIELDS

    assert CONN_FIELDS["rate_limit_storage_password"]["schema"]["format"] == "password"
    assert "password" in CONN_FIELDS["rate_limit_storage_uri"]["description"]  # says where it goes


def test_storage_errors_show_the_scheme_only() -> None:
    from airflow_provider_modmed.client.limiter import RateBudget, _build, storage_uri_passwords

    assert storage_uri_passwords("redis://u:p%40w@h/0?password=qp-secret") == {"p%40w", "p@w", "qp-secret"}
    assert storage_uri_passwords("redis://h:6379/0") == set()
    with pytest.raises(ConfigurationError) as err:
        _build("nosuch://:limits-quotes-me@h/0", {})  # limits' own message quotes the whole URI
    assert "nosuch://" in str(err.value) and "limits-quotes-me" not in str(err.value)
    assert "limits-quotes-me" not in repr(RateBudget(storage_uri="redis://:limits-quotes-me@h/0"))


# -- egress: proxy and CA bundle (issue 14, item 5) ------------------------------------------------------------


def test_the_proxy_password_field_goes_into_the_proxy_url_after_the_user() -> None:
    config = make(proxy="http://egress@proxy.hospital.internal:3128", proxy_password="p@ss:w/rd")
    assert config.proxy == "http://egress:p%40ss%3Aw%2Frd@proxy.hospital.internal:3128"
    assert make(proxy="http://proxy.example:3128").proxy == "http://proxy.example:3128"
    assert make(proxy="", proxy_password="").proxy is None  # the UI's blanks: unset


@pytest.mark.parametrize(("extra", "needle"), [
    ({"proxy": "http://u:twice-secret@proxy.example:3128", "proxy_password": "field-secret"}, "given twice"),
    ({"proxy_password": "field-secret"}, "proxy ('HTTPS proxy') is empty"),
    ({"proxy": "ftp://proxy.example", "proxy_password": "field-secret"}, 'extra field "proxy"'),
])
def test_proxy_errors_name_the_field_without_the_password(extra: dict[str, Any], needle: str) -> None:
    with pytest.raises(ConfigurationError) as err:
        make(**extra)
    assert needle in str(err.value)
    assert "field-secret" not in str(err.value) and "twice-secret" not in str(err.value)


def test_a_proxy_password_in_the_url_still_works_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING", logger="airflow_provider_modmed.hooks"):
        config = make(proxy="http://u:in-url-secret@proxy.example:3128")
    assert config.proxy == "http://u:in-url-secret@proxy.example:3128"
    assert "proxy_password" in caplog.text and "in-url-secret" not in caplog.text


def test_a_ca_bundle_pasted_into_one_line_is_rewrapped_certificate_by_certificate() -> None:
    from tests.unit.test_client_config import _ca_pem

    first, second = _ca_pem(), _ca_pem()
    one_line = (first + second).replace("\n", " ")
    config = make(ca_bundle=one_line)
    assert config.ca_bundle == first + second
    assert make(ca_bundle="  ").ca_bundle is None


def test_the_egress_fields_in_the_form() -> None:
    from airflow_provider_modmed.connection_form import CONN_FIELDS

    assert CONN_FIELDS["proxy_password"]["schema"]["format"] == "password"
    assert "format" not in CONN_FIELDS["proxy"]["schema"] and "Proxy password" in CONN_FIELDS["proxy"]["description"]
    assert CONN_FIELDS["ca_bundle"]["schema"]["format"] == "multiline"
