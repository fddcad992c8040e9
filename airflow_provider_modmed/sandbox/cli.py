"""``modmed-sandbox``: run the ModMed emulator, or print its credentials."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import sys
from pathlib import Path
from typing import Any

from airflow_provider_modmed.sandbox.state import SandboxConfig


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="modmed-sandbox", description="An emulator of ModMed's two FHIR "
                                     "API tracks (proprietary partner API and ONC-certified API).")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("serve", "credentials"):
        p = sub.add_parser(name, help="run the sandbox" if name == "serve" else "print the credentials")
        p.add_argument("--host", default="127.0.0.1")
        p.add_argument("--port", type=int, default=8899)
        p.add_argument("--storage-port", type=int, default=None,
                       help="object-storage listener port (default: --port + 1)")
        p.add_argument("--data-dir", type=Path, default=None,
                       help="keep state (SQLite) and private keys here; default: in memory")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--firm", default=SandboxConfig.firm, help="firm URL prefix of the seeded practice")
        for flag in ("api-key", "username", "password", "client-id", "client-secret", "cert-client-id",
                     "cert-client-secret"):
            p.add_argument(f"--{flag}", default=None, help=f"override the seeded {flag.replace('-', ' ')}")
        p.add_argument("--json", action="store_true", help="print credentials as JSON")
        if name == "serve":
            p.add_argument("--patients", type=int, default=100)
            p.add_argument("--rate-limit-per-minute", type=int, default=1000)
            p.add_argument("--token-ttl", type=float, default=3600.0,
                           help="lifetime of proprietary access tokens, seconds")
            p.add_argument("--latency-ms", type=float, default=0.0)
            p.add_argument("--presign-ttl", type=float, default=300.0)
            p.add_argument("--export-seconds", type=float, default=2.0)
            p.add_argument("--expires-in", action="store_true",
                           help="send expires_in on password grants (ModMed omits it)")
    return parser


def _config(args: argparse.Namespace) -> SandboxConfig:
    overrides = {k: v for k in ("api_key", "username", "password", "client_id", "client_secret",
                                "cert_client_id", "cert_client_secret")
                 if (v := getattr(args, k)) is not None}
    config = SandboxConfig(host=args.host, port=args.port,
                           storage_port=args.storage_port if args.storage_port is not None else args.port + 1,
                           data_dir=args.data_dir, seed=args.seed, firm=args.firm,
                           credential_overrides=overrides)
    if args.command == "serve":
        config.patients = args.patients
        config.rate_limit_per_minute = args.rate_limit_per_minute
        config.token_ttl = args.token_ttl
        config.latency_ms = args.latency_ms
        config.presign_ttl = args.presign_ttl
        config.export_seconds = args.export_seconds
        config.omit_expires_in = not args.expires_in
    return config


def _print_credentials(doc: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(doc, indent=2))
        return
    prop, cert = doc["proprietary"], doc["certified"]
    print(f"ModMed sandbox: API {doc['api_url']}  object storage {doc['storage_url']}")
    print(f"  proprietary FHIR base  {prop['fhir_base']}")
    print(f"  certified FHIR base    {cert['fhir_base']}")
    print("  credentials: modmed-sandbox credentials --json (secrets are not printed here)")
    for conn_id in doc.get("airflow_connections", {}):
        print(f"  Airflow connection: {conn_id}")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    config = _config(args)
    if args.command == "credentials":
        from airflow_provider_modmed.sandbox.credentials import credentials_document, make_credentials

        creds = make_credentials(firm=config.firm, seed=config.seed, data_dir=config.data_dir,
                                 overrides=config.credential_overrides)
        host = config.host if ":" not in config.host else f"[{config.host}]"
        doc = credentials_document(creds, api_url=f"http://{host}:{config.port}",
                                   storage_url=f"http://{host}:{config.storage_port}")
        _print_credentials(doc, args.json)
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    from airflow_provider_modmed.sandbox.server import SandboxServer

    server = SandboxServer(config)

    async def run() -> None:
        task = asyncio.create_task(server.serve())
        while server.state is None or not all(s.started for s in server._servers):
            await asyncio.sleep(0.05)
            if task.done():
                await task
        _print_credentials(server.state.credentials_document(), args.json)
        sys.stdout.flush()
        await task

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
