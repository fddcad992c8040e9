"""Airflow Connection -> :class:`ClientConfig`: one pure mapping used by the sync and async hook faces.

Field names are those of the connection form (:mod:`airflow_provider_modmed.connection_form`); every
error names the field as the user sees it in the Airflow UI and says how to fix it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import httpx

from airflow_provider_modmed import profile
from airflow_provider_modmed.capabilities import Track
from airflow_provider_modmed.client.config import ClientConfig
from airflow_provider_modmed.connection_form import CONN_FIELDS, CUSTOM_HOST_EXAMPLES, ENVIRONMENTS
from airflow_provider_modmed.errors import ConfigurationError


def _clean(value: Any) -> Any:
    """The UI saves every declared field, unset ones as null or ""; treat both as absent."""
    if isinstance(value, str):
        value = value.strip()
        return value or None
    return value


_PEM = re.compile(r"-----BEGIN ([A-Z0-9 ]+)-----(.*?)-----END \1-----", re.S)


def normalize_pem(text: str) -> str:
    """A PEM key as pasted into a one-line password input (newlines lost, or typed as ``\\n``), re-wrapped."""
    text = text.strip().replace("\\n", "\n")
    match = _PEM.search(text)
    if match is None:
        return text
    label, body = match.group(1), "".join(match.group(2).split())
    lines = [body[i:i + 64] for i in range(0, len(body), 64)]
    return "\n".join([f"-----BEGIN {label}-----", *lines, f"-----END {label}-----"]) + "\n"


def _int(extra: Mapping[str, Any], name: str, default: int) -> int:
    value = _clean(extra.get(name))
    if value is None:
        return default
    try:
        number = int(value)
    except (TypeError, ValueError):
        label = CONN_FIELDS[name]["label"]
        raise ConfigurationError(f"{name} ({label!r} in the connection's extra) must be a whole number, "
                                 f"got {value!r}") from None
    return number


def fhir_base_for(track: Track, environment: str, firm: str, host: str | None) -> str:
    """The FHIR base URL of one practice on one track and environment."""
    if environment == "custom":
        if not host:
            raise ConfigurationError(
                "host ('Custom base URL') is required when environment='custom': for the proprietary track the "
                f"env base, e.g. {CUSTOM_HOST_EXAMPLES['proprietary']}; for the certified track the FHIR base, "
                f"e.g. {CUSTOM_HOST_EXAMPLES['certified']}")
        base = host.rstrip("/").replace("{firm}", firm)
        if track is Track.PROPRIETARY and not base.endswith(profile.PROPRIETARY_FHIR_SUFFIX):
            return profile.proprietary_fhir_base(base, firm)
        return base
    if host:
        raise ConfigurationError(
            f"host ('Custom base URL') is set but environment={environment!r}: set environment to 'custom' to "
            "use your own base URL, or clear host to use ModMed's published URL")
    if track is Track.PROPRIETARY:
        return profile.proprietary_fhir_base(profile.PROPRIETARY_ENVIRONMENTS[environment], firm)
    return profile.certified_fhir_base(firm)


def _with_port(host: str | None, port: int | None, environment: str) -> str | None:
    """Apply the connection's port to a custom base URL (the form shows Port beside Host)."""
    if not port:  # Airflow's UI sends 0 for an empty port
        return host
    if environment != "custom" or not host:
        raise ConfigurationError(f"port ({port}) is only used with environment='custom' and a host ('Custom base "
                                 "URL'): clear the port, or set environment to 'custom'")
    url = httpx.URL(host)
    return str(url.copy_with(port=int(port)))


def config_from_connection(*, host: str | None, login: str | None, password: str | None,
                           extra: Mapping[str, Any], port: int | None = None, **overrides: Any) -> ClientConfig:
    """Build and validate the client configuration of a ModMed connection.

    ``overrides`` (e.g. ``rate_limit_per_minute``, ``timeout``) win over the connection's values.
    """
    track_raw = _clean(extra.get("track")) or "proprietary"
    try:
        track = Track(str(track_raw).lower())
    except ValueError:
        raise ConfigurationError(f"track (extra field 'Track') must be 'proprietary' or 'certified', "
                                 f"got {track_raw!r}") from None
    environment = str(_clean(extra.get("environment")) or ("custom" if _clean(host) else "sandbox")).lower()
    if environment not in ENVIRONMENTS:
        raise ConfigurationError(f"environment (extra field 'Environment') must be one of "
                                 f"{', '.join(ENVIRONMENTS)}, got {environment!r}")
    firm = _clean(extra.get("firm_url_prefix"))
    if not firm:
        raise ConfigurationError("firm_url_prefix (extra field 'Firm URL prefix') is required: the practice's "
                                 f"firm prefix, e.g. {profile.PUBLIC_SANDBOX_FIRM} for ModMed's public sandbox")
    default_method = "password" if track is Track.PROPRIETARY else "private_key_jwt"
    values: dict[str, Any] = {
        "track": track,
        "fhir_base": fhir_base_for(track, environment, firm, _with_port(_clean(host), port, environment)),
        "firm": firm,
        "auth_method": _clean(extra.get("auth_method")) or default_method,
        "api_key": _clean(extra.get("api_key")),
        "username": _clean(login),
        "password": _clean(password),
        "client_id": _clean(extra.get("client_id")),
        "client_secret": _clean(extra.get("client_secret")),
        "private_key": normalize_pem(key) if (key := _clean(extra.get("private_key"))) else None,
        "key_id": _clean(extra.get("key_id")),
        "jwt_algorithm": _clean(extra.get("jwt_algorithm")) or "RS384",
        "scope": _clean(extra.get("scope")),
        "token_url": _clean(extra.get("token_url")),
        "rate_limit_per_minute": _int(extra, "rate_limit_per_minute", 1000),
        "rate_limit_storage_uri": _clean(extra.get("rate_limit_storage_uri")) or "memory://",
        "timeout": float(_int(extra, "timeout", 30)),
    }
    values.update({k: v for k, v in overrides.items() if v is not None})
    return ClientConfig(**values)
