"""``modmed-sandbox``: run the ModMed emulator, print its credentials, make keys for the certified track.

Imports no Airflow (``airflow.cfg`` is never read): ``tests/integration/test_sandbox_cli.py`` checks it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from airflow_provider_modmed.sandbox.state import SandboxConfig

#: the environment variable ``credentials`` and ``keys register`` read the admin token from
ADMIN_TOKEN_ENV = "MODMED_SANDBOX_ADMIN_TOKEN"


class CliError(Exception):
    """A message for the user; ``main`` prints it and exits 1."""


TLS_CA_HELP = ("the CA certificate (PEM) of a sandbox served with --tls-cert: it is asked over https, verified "
               "with this CA")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="modmed-sandbox", description="An emulator of ModMed's two FHIR "
                                     "API tracks (proprietary partner API and ONC-certified API).")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("serve", "credentials"):
        p = sub.add_parser(name, help="run the sandbox" if name == "serve" else (
            "print the credentials of the sandbox running on --port (asked over its admin endpoint)"))
        p.add_argument("--host", default="127.0.0.1")
        p.add_argument("--port", type=int, default=8899)
        p.add_argument("--storage-port", type=int, default=None,
                       help="object-storage listener port (default: --port + 1)")
        p.add_argument("--data-dir", type=Path, default=None,
                       help="keep state (SQLite) and private keys here; default: in memory")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--firm", default=SandboxConfig.firm, help="firm URL prefix of the seeded practice")
        p.add_argument("--practices", type=int, default=1,
                       help="serve N practices: --firm, then {firm}2 ... {firm}N, each with its own API key, "
                       "credentials, seeded data and rate budget")
        for flag in ("api-key", "username", "password", "client-id", "client-secret", "cert-client-id",
                     "cert-client-secret"):
            p.add_argument(f"--{flag}", default=None, help=f"override the seeded {flag.replace('-', ' ')}")
        p.add_argument("--json", action="store_true", help="print credentials as JSON")
        if name == "credentials":
            p.add_argument("--admin-token", default=os.environ.get(ADMIN_TOKEN_ENV),
                           help="the admin token of a sandbox started with --allow-remote "
                           f"(default: ${ADMIN_TOKEN_ENV})")
            p.add_argument("--tls-ca", type=Path, default=None, help=TLS_CA_HELP)
        if name == "serve":
            p.add_argument("--allow-remote", action="store_true",
                           help="allow a --host beyond loopback (e.g. 0.0.0.0); /_sandbox/* then requires the "
                           "admin token printed at start")
            p.add_argument("--patients", type=int, default=100)
            p.add_argument("--rate-limit-per-minute", type=int, default=1000)
            p.add_argument("--token-ttl", type=float, default=3600.0,
                           help="lifetime of proprietary access tokens, seconds")
            p.add_argument("--latency-ms", type=float, default=0.0)
            p.add_argument("--presign-ttl", type=float, default=300.0)
            p.add_argument("--export-seconds", type=float, default=2.0)
            p.add_argument("--expires-in", action="store_true",
                           help="send expires_in on password grants (ModMed omits it)")
            p.add_argument("--tls-cert", type=Path, default=None,
                           help="serve both listeners over https with this PEM certificate (chain); needs --tls-key")
            p.add_argument("--tls-key", type=Path, default=None, help="the PEM private key of --tls-cert")
    _keys_parser(sub.add_parser("keys", help="make and combine key pairs for the certified track's "
                                "private_key_jwt (the JWKS to register with ModMed)"))
    return parser


def _keys_parser(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="keys_command", required=True)
    new = sub.add_parser("new", help="a new key pair: the private key (PEM) for the connection's private_key, "
                         "the public JWKS to register")
    new.add_argument("--alg", choices=("ES384", "RS384"), default="ES384", type=str.upper,
                     help="the connection's jwt_algorithm (ES384: EC P-384; RS384: RSA 2048)")
    new.add_argument("--kid", default=None, help="the key id (the connection's key_id); default: from the "
                     "key's thumbprint")
    new.add_argument("--private-key-out", type=Path, default=None,
                     help="write the private key to this new file (mode 0600) and print only the JWKS")
    new.add_argument("--json", action="store_true", help="print {kid, alg, private_key, jwks} as JSON")
    jwks = sub.add_parser("jwks", help="one public JWKS from JWKS/JWK files and PEM keys (rotation: the old "
                          "and the new key together; --retire drops a kid)")
    jwks.add_argument("sources", nargs="*", type=Path, help="JWKS or JWK JSON files ('-' for stdin)")
    jwks.add_argument("--pem", action="append", default=[], metavar="KID=PATH",
                      help="a PEM key (private or public) to publish under KID")
    jwks.add_argument("--retire", action="append", default=[], metavar="KID", help="leave this kid out")
    reg = sub.add_parser("register", help="register a client's JWKS in a running sandbox (replaces the "
                         "client's keys; a kid left out is retired)")
    reg.add_argument("jwks_file", type=Path, help="the JWKS JSON file ('-' for stdin)")
    reg.add_argument("--client-id", required=True)
    reg.add_argument("--host", default="127.0.0.1")
    reg.add_argument("--port", type=int, default=8899)
    reg.add_argument("--admin-token", default=os.environ.get(ADMIN_TOKEN_ENV))
    reg.add_argument("--tls-ca", type=Path, default=None, help=TLS_CA_HELP)


def _config(args: argparse.Namespace) -> SandboxConfig:
    overrides = {k: v for k in ("api_key", "username", "password", "client_id", "client_secret",
                                "cert_client_id", "cert_client_secret")
                 if (v := getattr(args, k)) is not None}
    if args.practices < 1:
        raise CliError(f"--practices must be at least 1 (got {args.practices})")
    config = SandboxConfig(host=args.host, port=args.port,
                           storage_port=args.storage_port if args.storage_port is not None else args.port + 1,
                           data_dir=args.data_dir, seed=args.seed, firm=args.firm, practices=args.practices,
                           credential_overrides=overrides)
    if args.command == "serve":
        config.patients = args.patients
        config.rate_limit_per_minute = args.rate_limit_per_minute
        config.token_ttl = args.token_ttl
        config.latency_ms = args.latency_ms
        config.presign_ttl = args.presign_ttl
        config.export_seconds = args.export_seconds
        config.omit_expires_in = not args.expires_in
        config.allow_remote = args.allow_remote
    return config


def _print_credentials(doc: dict[str, Any], as_json: bool, admin_token: str | None = None) -> None:
    if as_json:
        print(json.dumps({**doc, "admin_token": admin_token} if admin_token else doc, indent=2))
        return
    prop, cert = doc["proprietary"], doc["certified"]
    print(f"ModMed sandbox: API {doc['api_url']}  object storage {doc['storage_url']}")
    print(f"  proprietary FHIR base  {prop['fhir_base']}")
    print(f"  certified FHIR base    {cert['fhir_base']}")
    print("  credentials: modmed-sandbox credentials --json (secrets are not printed here)")
    for conn_id in doc.get("airflow_connections", {}):
        print(f"  Airflow connection: {conn_id}")
    if admin_token:
        print(f"  admin endpoints /_sandbox/* need: Authorization: Bearer {admin_token}")


def _remote_notice(config: SandboxConfig) -> None:
    print(f"modmed-sandbox: listening on {config.host} beyond loopback. The FHIR credentials are derived from "
          "--seed (anyone who knows it can compute them): pass --api-key, --password, --client-secret and "
          "--cert-client-secret for secrets of your own. The client sends credentials over plain http only "
          "to loopback: reach this sandbox through an SSH tunnel or a TLS proxy.", file=sys.stderr)


def _admin_url(host: str, port: int, path: str, tls_ca: Path | None = None) -> str:
    """The admin endpoint of a sandbox listening on ``host``: a wildcard address is reached on loopback;
    https when the sandbox's CA is given (``--tls-ca``)."""
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)  # noqa: S104
    return f"{'https' if tls_ca else 'http'}://{f'[{host}]' if ':' in host else host}:{port}{path}"


def _admin_call(method: str, url: str, admin_token: str | None, tls_ca: Path | None = None, **kwargs: Any) -> Any:
    """One admin request (over https verified with ``tls_ca`` when given); ``None`` when nothing listens."""
    import ssl

    import httpx

    headers = {"Authorization": f"Bearer {admin_token}"} if admin_token else {}
    verify: ssl.SSLContext | bool = True
    if tls_ca is not None:
        try:
            verify = ssl.create_default_context(cafile=str(tls_ca))
        except (OSError, ssl.SSLError) as exc:
            raise CliError(f"--tls-ca {tls_ca}: not a readable PEM CA certificate ({type(exc).__name__})") from None
    try:
        response = httpx.request(method, url, headers=headers, timeout=10, verify=verify, **kwargs)
    except httpx.ConnectError as exc:
        if tls_ca is not None and "CERTIFICATE_VERIFY_FAILED" in str(exc):
            raise CliError(f"{url}: its certificate is not signed by --tls-ca {tls_ca}") from None
        return None
    except httpx.TransportError:
        return None
    if response.status_code in (401, 403):
        raise CliError(f"the sandbox at {url} wants its admin token (printed by `modmed-sandbox serve "
                       f"--allow-remote`): pass --admin-token or set ${ADMIN_TOKEN_ENV}")
    try:
        body = response.json()
    except ValueError:
        body = None
    if response.status_code >= 400 or not isinstance(body, dict):
        detail = body.get("error") if isinstance(body, dict) else response.text[:200]
        raise CliError(f"{method} {url} answered {response.status_code}: {detail}")
    return body


def _credentials(config: SandboxConfig, admin_token: str | None, tls_ca: Path | None = None) -> dict[str, Any]:
    """The credentials the sandbox on ``--port`` accepts: asked over its admin endpoint.

    Only when no sandbox answers, and ``--data-dir`` holds (or will hold) its keys, are they computed here
    from ``--seed``, ``--data-dir`` and the overrides: valid for a sandbox started with the same flags.
    Without ``--data-dir`` a sandbox generates its keys at start, so there is nothing to compute.
    """
    url = _admin_url(config.host, config.port, "/_sandbox/credentials", tls_ca)
    served = _admin_call("GET", url, admin_token, tls_ca)
    if served is not None:
        if "airflow_connections" not in served:
            raise CliError(f"{url} is not a modmed-sandbox (its answer holds no airflow_connections)")
        return dict(served)
    if config.data_dir is None:
        raise CliError(f"no sandbox answers on {url}: start it first (`modmed-sandbox serve --port {config.port}`)"
                       ", then run this again (one served over https, with --tls-cert: pass --tls-ca). "
                       "Its private_key_jwt keys are generated at start unless "
                       "--data-dir keeps them; with the same --data-dir (and --seed) given here, the "
                       "credentials can be printed before it starts")
    from airflow_provider_modmed.sandbox.credentials import make_practice_credentials, practices_document

    print(f"modmed-sandbox: no sandbox answers on {url}; printing the credentials of a sandbox started with "
          f"--data-dir {config.data_dir} --seed {config.seed} (and the same overrides)", file=sys.stderr)
    creds = make_practice_credentials(firm=config.firm, practices=config.practices, seed=config.seed,
                                      data_dir=config.data_dir, overrides=config.credential_overrides)
    host = config.host if ":" not in config.host else f"[{config.host}]"
    return practices_document(creds, api_url=f"http://{host}:{config.port}",
                              storage_url=f"http://{host}:{config.storage_port}")


def _read_json(path: Path) -> Any:
    text = sys.stdin.read() if str(path) == "-" else path.read_text()
    try:
        return json.loads(text)
    except ValueError as exc:
        raise CliError(f"{path}: not JSON ({exc})") from None


def _keys(args: argparse.Namespace) -> int:
    from airflow_provider_modmed.sandbox import keys

    if args.keys_command == "new":
        key = keys.generate_key(args.alg)
        kid = args.kid or keys.thumbprint_kid(key, args.alg)
        pem = key.as_pem(private=True).decode("ascii")
        jwks = {"keys": [keys.public_jwk(key, kid=kid, algorithm=args.alg)]}
        if args.json:
            print(json.dumps({"kid": kid, "alg": args.alg, "private_key": pem, "jwks": jwks}, indent=2))
            return 0
        if args.private_key_out is not None:
            if not keys.write_private_key(args.private_key_out, pem.encode()):
                raise CliError(f"{args.private_key_out} exists; choose a new file (keys are never overwritten)")
            print(f"private key written to {args.private_key_out} (mode 0600)", file=sys.stderr)
        else:
            print(pem, end="")
        print(json.dumps(jwks, indent=2))
        print(f"connection extra: auth_method=private_key_jwt, jwt_algorithm={args.alg}, key_id={kid}, "
              "private_key=<the PEM>; register the JWKS with ModMed (keep it: `keys jwks` adds the next key "
              "for a rotation)", file=sys.stderr)
        return 0
    if args.keys_command == "jwks":
        sources = [keys.public_jwks(_read_json(path), where=str(path)) for path in args.sources]
        for item in args.pem:
            kid, sep, path = item.partition("=")
            if not sep or not kid or not path:
                raise CliError(f"--pem {item!r}: expected KID=PATH")
            key, alg = keys.key_from_pem(Path(path).read_bytes(), where=path)
            sources.append([keys.public_jwk(key, kid=kid, algorithm=alg)])
        if not sources:
            raise CliError("name at least one JWKS file or --pem KID=PATH")
        print(json.dumps(keys.combine_jwks(sources, retire=args.retire), indent=2))
        return 0
    published = keys.public_jwks(_read_json(args.jwks_file), where=str(args.jwks_file))
    url = _admin_url(args.host, args.port, f"/_sandbox/clients/{args.client_id}/jwks", args.tls_ca)
    registered = _admin_call("PUT", url, args.admin_token, args.tls_ca, json={"keys": published})
    if registered is None:
        raise CliError(f"no sandbox answers on {url}: start it with `modmed-sandbox serve --port {args.port}`")
    kids = [k["kid"] for k in registered["keys"]]
    print(f"client {args.client_id!r} now authenticates with kid(s) {', '.join(kids)}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "keys":
            return _keys(args)
        config = _config(args)
        if args.command == "credentials":
            _print_credentials(_credentials(config, args.admin_token, args.tls_ca), args.json)
            return 0
    except (CliError, ValueError, OSError) as exc:  # InvalidKey is a ValueError
        print(f"modmed-sandbox: {exc}", file=sys.stderr)
        return 1
    return _serve(args, config)


def _serve(args: argparse.Namespace, config: SandboxConfig) -> int:
    from airflow_provider_modmed.sandbox.server import RemoteBindRefused, SandboxServer, check_bind

    try:
        config = check_bind(config)  # before anything is bound
    except RemoteBindRefused as exc:
        print(f"modmed-sandbox: {exc}", file=sys.stderr)
        return 2
    if config.admin_token:
        _remote_notice(config)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if (args.tls_cert is None) != (args.tls_key is None):
        print("modmed-sandbox: serving over https needs both --tls-cert and --tls-key", file=sys.stderr)
        return 2
    server = SandboxServer(config, tls_cert=args.tls_cert, tls_key=args.tls_key)

    async def run() -> None:
        task = asyncio.create_task(server.serve())
        while server.state is None or not all(s.started for s in server._servers):
            await asyncio.sleep(0.05)
            if task.done():
                await task
        _print_credentials(server.state.credentials_document(), args.json, server.admin_token)
        sys.stdout.flush()
        await task

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
