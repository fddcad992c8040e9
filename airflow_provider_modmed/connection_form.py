"""The ModMed connection form: one declaration read by Airflow's UI, the hook and the docs.

Field names are the keys users put in the connection's Extra JSON. Secret fields carry a word from
Airflow's sensitive-name list (``api_key``, ``secret``, ``private_key``, ``password``) so their values are
masked in logs and in the REST API; ``token_url`` contains "token" and is masked too (documented).
``rate_limit_storage_uri`` is not a secret name, so a Redis password goes in ``rate_limit_storage_password``;
likewise a proxy's password goes in ``proxy_password``, not in ``proxy``.
"""

from __future__ import annotations

from typing import Any

from airflow_provider_modmed.profile import (
    CERTIFIED_BASE_TEMPLATE,
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
#: the standard fields as the form labels them (``relabeling`` below); help texts and errors use these
HOST_LABEL = "Custom base URL"
PORT_LABEL = "Port (custom base URL)"
LOGIN_LABEL = "Username (proprietary, password)"
PASSWORD_LABEL = "Password (proprietary, password)"  # noqa: S105  (a label)
#: a real practice's URLs, for placeholders and help texts
_TRAINING_ENV_BASE = PROPRIETARY_ENVIRONMENTS["training"]
_CERTIFIED_HOST = CERTIFIED_BASE_TEMPLATE.format(firm="{firm}")


def _string(label: str, description: str, *, secret: bool = False, default: str | None = None,
            enum: list[str] | None = None, multiline: bool = False, required: bool = False,
            examples: list[str] | None = None) -> dict[str, Any]:
    # Airflow's form marks a field required when its schema type does not admit null
    schema: dict[str, Any] = {"type": "string", "minLength": 1} if required else {"type": ["string", "null"]}
    if secret:
        schema["format"] = "password"
    elif multiline:
        schema["format"] = "multiline"
    if default is not None:
        schema["default"] = default
    if enum is not None:
        schema["enum"] = enum
    if examples is not None:  # the UI offers them as suggestions under the input
        schema["examples"] = examples
    return {"label": label, "description": description, "schema": schema}


def _integer(label: str, description: str, default: int) -> dict[str, Any]:
    return {"label": label, "description": description,
            "schema": {"type": ["integer", "null"], "default": default, "minimum": 1}}


#: Airflow renders these in this order and cannot hide fields per track, so they stand in groups: every
#: connection (track .. auth_method), the proprietary track (api_key, token_url), the client credentials
#: both tracks share (client_id, client_secret, scope), the certified track's signed JWT (private_key ..
#: jwt_algorithm), then tuning (rate limits, timeout). Each help text starts with who needs the field.
CONN_FIELDS: dict[str, dict[str, Any]] = {
    "track": _string(
        "Track", "Every connection. proprietary: ModMed's partner API (read and write; needs API key, plus "
        "Username/Password or Client ID/secret). certified: the "
        "ONC-certified API (read-only US Core, Immunization, Vitals, Bulk export; needs Client ID plus a private "
        "key or a client secret). One connection per practice and track.",
        default="proprietary", enum=["proprietary", "certified"]),
    "environment": _string(
        "Environment", "Every connection. sandbox, training or production use ModMed's published URL (leave "
        f"'{HOST_LABEL}' empty); custom uses '{HOST_LABEL}' as the base URL (the modmed-sandbox emulator, a "
        "proxy). Certified track: ModMed publishes only the production host "
        f"({_CERTIFIED_HOST}); for a certified sandbox or training practice choose custom and put the base "
        f"URL ModMed gives you in '{HOST_LABEL}'.",
        default="sandbox", enum=list(ENVIRONMENTS)),
    "firm_url_prefix": _string(
        "Firm URL prefix", "Required, every connection. The practice's URL prefix, which ModMed hands the "
        "partner together with the API key (one per practice), e.g. "
        f"{PUBLIC_SANDBOX_FIRM} for ModMed's public sandbox practice. Proprietary: a URL path segment "
        f"({PROPRIETARY_ENVIRONMENTS['production']}/{{firm}}/ema/fhir/v2); certified: the same prefix is "
        f"the subdomain of the practice's host ({_CERTIFIED_HOST}), so there only letters, digits and '-'. "
        "Letters, digits, '-', '_' and '.'.",
        required=True),
    "auth_method": _string(
        "Auth method", "Every connection. Proprietary: password (password grant: fill Username and "
        "Password above) or client_secret "
        "(client credentials: Client ID, Client secret, Token URL). Certified: private_key_jwt (SMART backend "
        "services: Client ID, Private key, Key ID, JWT algorithm) or client_secret (Client ID, Client secret). "
        "Empty: password on the proprietary track, private_key_jwt on the certified track.",
        default="password", enum=["password", "client_secret", "private_key_jwt"]),
    # -- proprietary track
    "api_key": _string(
        "API key (proprietary)", "Proprietary track, every auth method: the vendor API key ModMed issues "
        "to the partner, sent as x-api-key on every call. Not used on the certified track.", secret=True),
    "token_url": _string(
        "Token URL", "Proprietary track with client_secret: required, the Keycloak realm's token URL, e.g. "
        "https://<keycloak host>/auth/realms/ema-fhir/protocol/openid-connect/token. Otherwise leave empty: "
        "the password grant URL is derived from the environment, and the certified track discovers its token "
        "endpoint at <base>/.well-known/smart-configuration."),
    # -- client credentials, both tracks
    "client_id": _string(
        "Client ID", "Auth methods client_secret (both tracks) and private_key_jwt (certified): the OAuth2 "
        "client id of your registered app, e.g. acme-ehr-sync."),
    "client_secret": _string(
        "Client secret", "Auth method client_secret (both tracks): the OAuth2 client secret.", secret=True),
    "scope": _string(
        "Scope", "Auth methods client_secret and private_key_jwt: space-separated scopes, e.g. "
        "system/*.read or system/Patient.read system/Immunization.read. Empty: none on the "
        "proprietary track; system/*.read on the certified track (system/*.rs where the server speaks SMART "
        "v2).",
        examples=["system/*.read", "system/*.rs", "system/Patient.read system/Immunization.read"]),
    # -- certified track, SMART backend services
    "private_key": _string(
        "Private key, PEM (certified)", "Certified track, auth method private_key_jwt: the PEM private key "
        "(RSA, or EC P-384) whose public key you registered in your JWKS; pasting it into this one-line input "
        "is fine. Never written to disk.", secret=True),
    "key_id": _string(
        "Key ID, kid (certified)", "Certified track, auth method private_key_jwt: the kid of that public key "
        "in your registered JWKS, e.g. acme-2026-01."),
    "jwt_algorithm": _string(
        "JWT algorithm (certified)", "Certified track, auth method private_key_jwt: RS384 (RSA key) or ES384 "
        "(EC P-384 key).", default="RS384", enum=["RS384", "ES384"]),
    # -- tuning, every connection
    "rate_limit_per_minute": _integer(
        "Rate limit per minute", "Every connection (optional): calls per minute per API key; ModMed's default "
        "is 1000.", 1000),
    "rate_limit_storage_uri": _string(
        "Rate-limit storage URI", "Every connection (optional): memory:// (one process) or "
        "redis://redis.internal:6379/0 to share one budget across workers. Shown in clear: put a Redis "
        "password in 'Rate-limit storage password'.",
        default="memory://", examples=["memory://", "redis://redis.internal:6379/0"]),
    "rate_limit_storage_password": _string(
        "Rate-limit storage password", "With a redis:// rate-limit storage URI that needs one: the Redis "
        "password (AUTH); added to the URI when connecting.", secret=True),
    "timeout": _integer("Timeout (seconds)", "Every connection (optional): read timeout of one HTTP call.", 30),
    # -- egress, every connection
    "proxy": _string(
        "HTTPS proxy", "Every connection (optional), where egress must go through a proxy: http://host:port "
        "(or https://), with a user name if the proxy asks for one (http://user@host:port). Every https:// "
        "call (token, FHIR, bulk files, presigned uploads) goes through it as a CONNECT tunnel. Shown in clear: "
        "put the proxy's password in 'Proxy password'.",
        examples=["http://proxy.hospital.internal:3128"]),
    "proxy_password": _string(
        "Proxy password", "With a proxy that needs one: the proxy user's password (Basic "
        "Proxy-Authorization); added to the proxy URL when connecting.", secret=True),
    "ca_bundle": _string(
        "CA bundle, PEM", "Every connection (optional), where the server (or a TLS-inspecting proxy) presents "
        "certificates of a private CA: the CA certificates to trust, as PEM text (-----BEGIN CERTIFICATE-----"
        "...; several may follow each other), or the path of a file or directory of them on every worker. "
        "Replaces the system's CAs for this connection.", multiline=True),
}

UI_FIELD_BEHAVIOUR: dict[str, Any] = {
    "hidden-fields": ["schema"],
    "relabeling": {
        "host": HOST_LABEL,
        "port": PORT_LABEL,
        "login": LOGIN_LABEL,
        "password": PASSWORD_LABEL,
    },
    "placeholders": {
        "host": f"Only with Environment custom. Proprietary: the environment base, e.g. {_TRAINING_ENV_BASE}; "
        f"certified: the practice's FHIR base, e.g. {_CERTIFIED_HOST} ({{firm}} is replaced). "
        f"The modmed-sandbox: {CUSTOM_HOST_EXAMPLES['proprietary']}",
        "port": "The URL's own port, e.g. 443 (must match the URL; fill it so the list's Test button works)",
        "login": "Proprietary track, auth password: the practice's ModMed API username",
        "password": "Proprietary track, auth password: that user's password",
    },
}

CONNECTION_TYPE: dict[str, Any] = {
    "connection-type": CONN_TYPE,
    "hook-class-name": "airflow_provider_modmed.hooks.modmed.ModMedHook",
    "hook-name": HOOK_NAME,
    "ui-field-behaviour": UI_FIELD_BEHAVIOUR,
    "conn-fields": CONN_FIELDS,
}
