"""sandbox/keys.py: key pairs and JWKS for private_key_jwt (issue 15, item 11), and `modmed-sandbox keys`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from joserfc.jwk import ECKey

from airflow_provider_modmed.client.config import load_signing_key
from airflow_provider_modmed.sandbox import cli
from airflow_provider_modmed.sandbox.credentials import make_credentials
from airflow_provider_modmed.sandbox.keys import (
    InvalidKey,
    combine_jwks,
    generate_key,
    key_from_pem,
    public_jwk,
    public_jwks,
    thumbprint_kid,
)


def jwk_of(alg: str, kid: str) -> dict[str, object]:
    return public_jwk(generate_key(alg), kid=kid, algorithm=alg)


@pytest.mark.parametrize(("alg", "kty"), [("ES384", "EC"), ("RS384", "RSA")])
def test_keys_new_prints_a_private_key_the_client_loads_and_its_public_jwks(
        alg: str, kty: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["keys", "new", "--alg", alg.lower(), "--kid", "my-key-1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["kid"], out["alg"]) == ("my-key-1", alg)
    key = load_signing_key(out["private_key"], alg)  # what the connection's private_key goes through
    (published,) = out["jwks"]["keys"]
    assert published["kid"] == "my-key-1" and published["alg"] == alg and published["kty"] == kty
    assert published["use"] == "sig" and "d" not in published  # public only
    assert published == public_jwk(key, kid="my-key-1", algorithm=alg)


def test_keys_new_writes_the_private_key_to_a_new_0600_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pem = tmp_path / "key.pem"
    assert cli.main(["keys", "new", "--private-key-out", str(pem)]) == 0
    out = capsys.readouterr()
    jwks = json.loads(out.out)  # stdout is the JWKS alone: `> jwks.json` works
    assert pem.stat().st_mode & 0o777 == 0o600 and "PRIVATE KEY" not in out.out + out.err
    key, alg = key_from_pem(pem.read_bytes())
    assert alg == "ES384" and jwks["keys"][0]["kid"] == thumbprint_kid(key, "ES384")
    before = pem.read_bytes()
    assert cli.main(["keys", "new", "--private-key-out", str(pem)]) == 1  # never overwritten
    assert "exists" in capsys.readouterr().err and pem.read_bytes() == before


def test_keys_jwks_combines_files_and_pem_keys_and_retires(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    old, new = jwk_of("ES384", "old"), jwk_of("RS384", "new")
    (tmp_path / "old.json").write_text(json.dumps({"keys": [old]}))
    (tmp_path / "new.json").write_text(json.dumps(new))  # one JWK works too
    assert cli.main(["keys", "jwks", str(tmp_path / "old.json"), str(tmp_path / "new.json")]) == 0
    assert json.loads(capsys.readouterr().out) == {"keys": [old, new]}
    assert cli.main(["keys", "jwks", str(tmp_path / "old.json"), str(tmp_path / "new.json"), "--retire", "old"]) == 0
    assert json.loads(capsys.readouterr().out) == {"keys": [new]}
    pem = tmp_path / "k.pem"
    pem.write_bytes(generate_key("ES384").as_pem(private=True))
    assert cli.main(["keys", "jwks", "--pem", f"from-pem={pem}"]) == 0
    (published,) = json.loads(capsys.readouterr().out)["keys"]
    assert published["kid"] == "from-pem" and published["alg"] == "ES384" and "d" not in published


def test_public_jwks_checks_each_key_and_drops_private_members() -> None:
    es = jwk_of("ES384", "a")
    private = {str(k): v for k, v in generate_key("ES384").as_dict(private=True).items()}
    assert "d" not in public_jwks({"keys": [{**private, "kid": "p", "alg": "ES384"}]})[0]
    with pytest.raises(InvalidKey, match="appears twice"):
        public_jwks({"keys": [es, es]})
    with pytest.raises(InvalidKey, match="needs a kid"):
        public_jwks({"keys": [{k: v for k, v in es.items() if k != "kid"}]})
    with pytest.raises(InvalidKey, match="RS256"):
        public_jwks({"keys": [{**es, "alg": "RS256"}]})
    with pytest.raises(InvalidKey, match="not a valid"):
        public_jwks({"keys": [{**jwk_of("RS384", "r"), "alg": "ES384"}]})  # an RSA key claiming ES384
    p256 = {**{str(k): v for k, v in ECKey.generate_key("P-256").as_dict(private=False).items()},
            "kid": "c", "alg": "ES384"}
    with pytest.raises(InvalidKey, match="P-384"):
        public_jwks({"keys": [p256]})
    with pytest.raises(InvalidKey, match="no keys"):
        public_jwks({"keys": []})


def test_combine_jwks_refuses_a_reused_kid_and_retiring_everything() -> None:
    a, b = jwk_of("ES384", "a"), jwk_of("ES384", "b")
    assert combine_jwks([[a], [a, b]]) == {"keys": [a, b]}  # the same key twice is kept once
    with pytest.raises(InvalidKey, match="two different keys"):
        combine_jwks([[a], [{**b, "kid": "a"}]])
    with pytest.raises(InvalidKey, match="no such kid"):
        combine_jwks([[a, b]], retire=["c"])
    with pytest.raises(InvalidKey, match="unable to authenticate"):
        combine_jwks([[a]], retire=["a"])


def test_a_registered_jwks_replaces_the_clients_keys() -> None:
    creds = make_credentials()
    assert creds.client_jwks()["sbx-certified-es384"] == [creds.es384.public_jwk]
    new = jwk_of("ES384", "rotated")
    creds.register_jwks("sbx-certified-es384", {"keys": [new]})
    assert creds.client_jwks()["sbx-certified-es384"] == [new]
    assert creds.client_jwks()["sbx-certified-rs384"] == [creds.rs384.public_jwk]
    with pytest.raises(InvalidKey, match="client secret"):
        creds.register_jwks(creds.cert_client_id, {"keys": [new]})
