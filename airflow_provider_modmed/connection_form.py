"""The ModMed connection form: one declaration read by Airflow's UI, the hook and the docs.

Field names are the keys users put in the connection's Extra JSON. Secret fields carry a word from
Airflow's sensitive-name list (``api_key``, ``secret``, ``private_key``) so their values are masked in
logs and in the REST API; ``token_url`` contains "token" and is masked too (documented).
"""

from __future__ import annotations

from typing import Any

from airflow_provider_modmed.profile import (
    CERTIFIED_FHIR_SUFFIX,
    PROPRIETARY_ENVIRONMENTS,
    PUBLIC_SANDBOX_FIRM,
    environment_path,
)

CONN_TYPE = "modmed"
HOOK_NAME = "ModMed"

#: the ``environment`` choices: ModMed's published environments, or ``custom`` (Host is the base URL)
ENVIRONMENTS = (*PROPRIETARY_ENVIRONMENTS, "custom")
#: example custom base URLs (the modmed-sandbox emulator on its default port), for help texts and errors
CUSTOM_HOST_EXAMPLES = {
    "proprietary": f"http://127.0.0.1:8899{environment_path('sandbox')}",
    "certified": f"http://127.0.0.1:8899/certified/{PUBLIC_SANDBOX_FIRM}{CERTIFIED_FHIR_SUFFIX}",
}


def _string(label: str, description: str, *, secret: bool = False, default: str | None = None,
            enum: list[str] | None = None, multiline: bool = False) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": ["string", "null"]}
    if secret:
        schema["format"] = "password"
    elif multiline:
        schema["format"] = "multiline"
    if default is not None:
        schema["default"] = default
    if enum is not None:
        schema["enum"] = enum
    return {"label": label, "description": description, "schema": schema}


def _integer(label: str, description: str, default: int) -> dict[str, Any]:
    return {"label": label, "description": description,
            "schema": {"type": ["integer", "null"], "default": default, "minimum": 1}}


CONN_FIELDS: dict[str, dict[str, Any]] = {
    "track": _string("Track", "proprietary (partner API: CRUD, x-api-key) or certified (ONC API: "
                     "read-only US Core, Immunizations, Vitals, Bulk export).",
                     default="proprietary", enum=["proprietary", "certified"]),
    "environment": _string("Environment", "sandbox, training or production; custom uses Host as the base "
                           "URL (e.g. the modmed-sandbox emulator).", default="sandbox",
                           enum=list(ENVIRONMENTS)),
    "firm_url_prefix": _string("Firm URL prefix", f"The practice's firm prefix, e.g. {PUBLIC_SANDBOX_FIRM} "
                               "(ModMed's public sandbox firm)."),
    "auth_method": _string("Auth method", "password (proprietary password grant + API key), "
                           "client_secret (client credentials) or private_key_jwt (SMART backend "
                           "services, certified track).", default="password",
                           enum=["password", "client_secret", "private_key_jwt"]),
    "api_key": _string("API key", "Vendor API key sent as x-api-key (proprietary track).", secret=True),
    "client_id": _string("Client ID", "OAuth2 client id, e.g. my-vendor-app (client_secret and "
                         "private_key_jwt)."),
    "client_secret": _string("Client secret", "OAuth2 client secret (auth method client_secret).",
                             secret=True),
    "private_key": _string("Private key (PEM)", "PEM private key for private_key_jwt (RSA or EC P-384); "
                           "never written to disk.", secret=True),
    "key_id": _string("Key ID (kid)", "The kid of the public key registered in your JWKS, e.g. "
                      "modmed-2026-01."),
    "jwt_algorithm": _string("JWT algorithm", "RS384 or ES384 (SMART backend services).",
                             default="RS384", enum=["RS384", "ES384"]),
    "scope": _string("Scope", "Space-separated scopes, e.g. system/*.read (certified track). Empty: the "
                     "track's default."),
    "token_url": _string("Token URL", "Override the token endpoint (e.g. the Keycloak realm URL for "
                         "client_secret on the proprietary track). Empty: discovered or derived."),
    "rate_limit_per_minute": _integer("Rate limit per minute", "Calls per minute per API key; ModMed's "
                                      "default is 1000.", 1000),
    "rate_limit_storage_uri": _string("Rate-limit storage URI", "memory:// (one process) or "
                                      "redis://host:6379/0 to share one budget across workers.",
                                      default="memory://"),
    "timeout": _integer("Timeout (seconds)", "Read timeout of one HTTP call.", 30),
}

UI_FIELD_BEHAVIOUR: dict[str, Any] = {
    "hidden-fields": ["schema"],
    "relabeling": {
        "host": "Custom base URL",
        "port": "Port (custom base URL)",
        "login": "Username",
        "password": "Password",
    },
    "placeholders": {
        "host": f"{CUSTOM_HOST_EXAMPLES['proprietary']} (proprietary) or "
        f"{CUSTOM_HOST_EXAMPLES['certified']} (certified)",
        "port": "8899 (only with environment custom; overrides the URL's port)",
        "login": "ModMed username (password grant)",
        "password": "ModMed password (password grant)",
    },
}

CONNECTION_TYPE: dict[str, Any] = {
    "connection-type": CONN_TYPE,
    "hook-class-name": "airflow_provider_modmed.hooks.modmed.ModMedHook",
    "hook-name": HOOK_NAME,
    "ui-field-behaviour": UI_FIELD_BEHAVIOUR,
    "conn-fields": CONN_FIELDS,
}
