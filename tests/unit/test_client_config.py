"""ClientConfig validation: errors name the field, where it lives, and the fix."""

from __future__ import annotations

from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from airflow_provider_modmed.capabilities import Track
from airflow_provider_modmed.client.config import AuthMethod, ClientConfig, check_firm, is_loopback
from airflow_provider_modmed.errors import ConfigurationError
from airflow_provider_modmed.profile import certified_fhir_base, proprietary_fhir_base

BASE = "https://stage.ema-api.com/ema-dev/firm/apiportal/ema/fhir/v2"
CERT = "https://apiportal.mmi.prod.fhir.ema-api.com/fhir/r4"


def pem(key: Any) -> str:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption()).decode()


RSA_PEM = pem(rsa.generate_private_key(public_exponent=65537, key_size=2048))
P384_PEM = pem(ec.generate_private_key(ec.SECP384R1()))
P256_PEM = pem(ec.generate_private_key(ec.SECP256R1()))


def prop(**over: Any) -> ClientConfig:
    values: dict[str, Any] = {"track": "proprietary", "fhir_base": BASE, "firm": "apiportal",
                              "api_key": "k", "username": "u", "password": "p", **over}
    return ClientConfig(**values)


def cert(**over: Any) -> ClientConfig:
    values: dict[str, Any] = {"track": "certified", "fhir_base": CERT, "auth_method": "private_key_jwt",
                              "client_id": "c", "private_key": RSA_PEM, "key_id": "kid", **over}
    return ClientConfig(**values)


def test_defaults_and_normalisation() -> None:
    cfg = prop(track="Proprietary", fhir_base=BASE + "/")
    assert cfg.track is Track.PROPRIETARY
    assert cfg.auth_method is AuthMethod.PASSWORD
    assert cfg.fhir_base == BASE
    assert cfg.verify is True
    assert cfg.rate_limit_per_minute == 1000
    assert cfg.rate_limit_storage_uri == "memory://"
    assert cfg.password_grant_url == "https://stage.ema-api.com/ema-dev/firm/apiportal/ema/ws/oauth2/grant"
    assert proprietary_fhir_base("https://stage.ema-api.com/ema-dev/firm/", "apiportal") == BASE
    assert certified_fhir_base("apiportal") == CERT


def test_secrets_stay_out_of_repr_and_keys() -> None:
    cfg = prop(api_key="KEY-SECRET", password="PW-SECRET", rate_limit_storage_uri="redis://:REDIS-SECRET@h:6379/0")
    assert "KEY-SECRET" not in repr(cfg)
    assert "PW-SECRET" not in repr(cfg)
    assert "REDIS-SECRET" not in repr(cfg)
    assert "KEY-SECRET" not in cfg.budget_key
    assert cfg.budget_key.startswith("apiportal:")
    assert prop(api_key="other").budget_key != cfg.budget_key
    assert "PW-SECRET" not in cfg.credential_key


@pytest.mark.parametrize(("over", "needle"), [
    ({"api_key": None}, 'api_key is required for track=\'proprietary\' (extra field "api_key")'),
    ({"username": ""}, 'username is required for auth_method=\'password\' (connection field "Login")'),
    ({"password": None}, '(connection field "Password")'),
    ({"track": "sandbox"}, "track must be 'proprietary' or 'certified'"),
    ({"auth_method": "magic"}, 'auth_method must be one of'),
    ({"auth_method": "private_key_jwt"}, "is for track='certified'"),
    ({"auth_method": "client_secret", "client_id": "c", "client_secret": "s"},
     'token_url is required for auth_method=\'client_secret\' on track=\'proprietary\''),
    ({"fhir_base": ""}, "fhir_base is required"),
    ({"fhir_base": "ftp://x/y"}, "must be an absolute https:// URL"),
    ({"fhir_base": "stage.ema-api.com/fhir"}, "must be an absolute https:// URL"),
    ({"fhir_base": "http://stage.ema-api.com/ema/fhir/v2"}, "plain http://"),
    ({"fhir_base": BASE + "?x=1"}, "query"),
    ({"token_url": "http://10.0.0.5/token"}, 'token_url uses plain http://'),
    ({"rate_limit_per_minute": 0}, "rate_limit_per_minute must be a positive integer"),
    ({"rate_limit_storage_uri": "redis"}, "rate_limit_storage_uri"),
    ({"timeout": 0}, "timeout"),
    ({"max_retries": -1}, "max_retries"),
    ({"verify": "/no/such/ca.pem"}, "verify names a CA bundle that does not exist"),
    ({"fhir_base": "https://h/fhir"}, "token_url is required for auth_method='password'"),
])
def test_proprietary_errors_name_the_field(over: dict[str, Any], needle: str) -> None:
    with pytest.raises(ConfigurationError) as err:
        prop(**over)
    assert needle in str(err.value)


@pytest.mark.parametrize(("over", "needle"), [
    ({"auth_method": "password"}, "auth_method='password' is for track='proprietary'"),
    ({"client_id": None}, 'client_id is required for auth_method=\'private_key_jwt\' (extra field "client_id")'),
    ({"private_key": None}, 'private_key is required'),
    ({"key_id": None}, 'key_id is required'),
    ({"jwt_algorithm": "RS256"}, "jwt_algorithm must be RS384 or ES384"),
    ({"private_key": "not a pem"}, "private_key is not an RSA private key"),
    ({"private_key": P384_PEM}, "private_key is not an RSA private key"),
    ({"private_key": RSA_PEM, "jwt_algorithm": "ES384"}, "not an EC P-384"),
    ({"private_key": P256_PEM, "jwt_algorithm": "ES384"}, "P-256 key but ES384 needs P-384"),
    ({"auth_method": "client_secret"}, "client_secret is required"),
])
def test_certified_errors_name_the_field(over: dict[str, Any], needle: str) -> None:
    with pytest.raises(ConfigurationError) as err:
        cert(**over)
    assert needle in str(err.value)
    assert "BEGIN" not in str(err.value)


def test_valid_certified_configs() -> None:
    assert cert().track is Track.CERTIFIED
    assert cert(private_key=P384_PEM, jwt_algorithm="ES384").jwt_algorithm == "ES384"
    assert cert(auth_method="client_secret", private_key=None, client_secret="s").auth_method is \
        AuthMethod.CLIENT_SECRET


@pytest.mark.parametrize(("host", "loop"), [
    ("127.0.0.1", True), ("127.5.6.7", True), ("localhost", True), ("::1", True), ("[::1]", True),
    ("10.0.0.1", False), ("example.com", False), ("128.0.0.1", False),
    # only localhost itself: a *.localhost name may resolve anywhere (issue 13, item 7)
    ("sandbox.localhost", False), ("a.b.localhost", False), ("localhost.", False),
    ("::ffff:127.0.0.1", False), ("0.0.0.0", False), ("::", False),  # noqa: S104
])
def test_loopback(host: str, loop: bool) -> None:
    assert is_loopback(host) is loop


@pytest.mark.parametrize("base", ["http://127.0.0.1:8899/ema-dev/firm/apiportal/ema/fhir/v2",
                                  "http://localhost:1/ema/fhir/v2", "http://[::1]:80/ema/fhir/v2"])
def test_plain_http_only_for_loopback(base: str) -> None:
    assert prop(fhir_base=base).fhir_base == base


def test_verify_accepts_a_ca_bundle(tmp_path: Any) -> None:
    import certifi

    assert prop(verify=certifi.where()).verify == certifi.where()
    assert prop(verify=False).verify is False


# -- issue 15, item 5: choice fields in any case, the firm prefix checked before any call ------------------------


@pytest.mark.parametrize(("algorithm", "key"), [("rs384", RSA_PEM), (" Es384 ", P384_PEM), ("Rs384", RSA_PEM)])
def test_jwt_algorithm_accepts_any_case_like_track_and_auth_method(algorithm: str, key: str) -> None:
    cfg = cert(jwt_algorithm=algorithm, private_key=key, track="CERTIFIED", auth_method="Private_Key_JWT")
    assert cfg.jwt_algorithm == algorithm.strip().upper()
    assert cfg.track is Track.CERTIFIED and cfg.auth_method is AuthMethod.PRIVATE_KEY_JWT


@pytest.mark.parametrize("firm", ["apiportal", "derm-1", "Smith_Derm", "acme.ny", "A1"])
def test_a_firm_prefix_is_one_url_path_segment(firm: str) -> None:
    assert prop(firm=firm).firm == firm
    assert check_firm(firm) == firm


@pytest.mark.parametrize("firm", ["my practice", "a/b", "..", ".", "ac%20me", "firm?x=1", "naïve", "a#b"])
def test_a_firm_prefix_that_is_not_a_path_segment_is_refused_naming_the_field(firm: str) -> None:
    with pytest.raises(ConfigurationError) as err:
        prop(firm=firm)
    assert 'firm (extra field "firm_url_prefix")' in str(err.value) and repr(firm) in str(err.value)


@pytest.mark.parametrize("firm", ["Smith_Derm", "acme.ny", "-acme", "acme-", "a" * 64])
def test_the_certified_subdomain_must_be_a_dns_label(firm: str) -> None:
    with pytest.raises(ConfigurationError, match="DNS label"):
        check_firm(firm, subdomain=True)
    assert check_firm("derm-1", subdomain=True) == "derm-1"
    assert check_firm("a" * 63, subdomain=True) == "a" * 63


# -- egress: proxy and CA bundle (issue 14, item 5) ------------------------------------------------------------


def _ca_pem() -> str:
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "unit CA")])
    now = datetime.datetime.now(datetime.timezone.utc)
    ca = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
          .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True).sign(key, hashes.SHA256()))
    return ca.public_bytes(serialization.Encoding.PEM).decode()


def test_proxy_and_ca_bundle_default_to_none_and_stay_out_of_repr() -> None:
    cfg = prop(proxy="http://user:proxy-secret@proxy.hospital.internal:3128", ca_bundle=_ca_pem())
    assert "proxy-secret" not in repr(cfg) and "BEGIN CERTIFICATE" not in repr(cfg)
    assert prop().proxy is None and prop().ca_bundle is None


@pytest.mark.parametrize("proxy", ["socks5://127.0.0.1:1080", "proxy.hospital.internal:3128", "http://",
                                   "http://user:pw-secret@proxy.example/path", "http://proxy.example:3128?x=1",
                                   "http://:3128"])
def test_a_bad_proxy_names_the_field_and_not_its_password(proxy: str) -> None:
    with pytest.raises(ConfigurationError) as err:
        prop(proxy=proxy)
    assert 'extra field "proxy"' in str(err.value) and "pw-secret" not in str(err.value)


@pytest.mark.parametrize("proxy", ["http://127.0.0.1:3128", "https://proxy.example:8443/", "http://u:p@proxy:80"])
def test_http_and_https_proxies_are_accepted(proxy: str) -> None:
    assert prop(proxy=proxy).proxy == proxy


def test_a_ca_bundle_is_pem_text_or_an_existing_path(tmp_path: Any) -> None:
    pem_text = _ca_pem()
    assert prop(ca_bundle=pem_text).ca_bundle == pem_text
    (tmp_path / "ca.pem").write_text(pem_text)
    assert prop(ca_bundle=str(tmp_path / "ca.pem")).ca_bundle == str(tmp_path / "ca.pem")
    with pytest.raises(ConfigurationError) as err:
        prop(ca_bundle="/nonexistent/ca.pem")
    assert 'extra field "ca_bundle"' in str(err.value) and "no such file" in str(err.value)
    with pytest.raises(ConfigurationError, match="no usable CA certificate"):
        prop(ca_bundle="-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    (tmp_path / "empty.pem").write_text("nothing here")
    with pytest.raises(ConfigurationError, match="no usable CA certificate"):
        prop(ca_bundle=str(tmp_path / "empty.pem"))


def test_a_ca_bundle_conflicts_with_verify_false_or_a_verify_path(tmp_path: Any) -> None:
    with pytest.raises(ConfigurationError, match="verify is false"):
        prop(ca_bundle=_ca_pem(), verify=False)
    (tmp_path / "ca.pem").write_text(_ca_pem())
    with pytest.raises(ConfigurationError, match="given twice"):
        prop(ca_bundle=_ca_pem(), verify=str(tmp_path / "ca.pem"))


def test_the_client_mounts_the_proxy_for_https_only_and_trusts_the_bundle() -> None:
    import ssl

    import httpx

    from airflow_provider_modmed.client import egress

    pem_text = _ca_pem()
    cfg = prop(proxy="http://u:p@127.0.0.1:3128", ca_bundle=pem_text)
    kwargs = egress.client_kwargs(cfg, None)
    assert isinstance(kwargs["verify"], ssl.SSLContext) and list(kwargs["mounts"]) == ["https://"]
    assert len(kwargs["verify"].get_ca_certs()) == 1  # exactly the bundle, not the system's CAs too
    assert "mounts" not in egress.client_kwargs(prop(), None)
    assert "mounts" not in egress.client_kwargs(cfg, httpx.MockTransport(lambda r: httpx.Response(200)))
    assert isinstance(egress.client_kwargs(cfg, None, asynchronous=True)["mounts"]["https://"],
                      httpx.AsyncBaseTransport)
    assert egress.shown_proxy("http://u:secret@proxy.example") == "http://proxy.example:80"
