"""Airflow Connection -> :class:`ClientConfig`: one pure mapping used by the sync and async hook faces.

Field names are those of the connection form (:mod:`airflow_provider_modmed.connection_form`); every
error names the field as the user sees it in the Airflow UI and says how to fix it.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote, urlsplit

import httpx

from airflow_provider_modmed import profile
from airflow_provider_modmed.capabilities import Track
from airflow_provider_modmed.client.config import ClientConfig, check_firm, origin
from airflow_provider_modmed.client.egress import shown_proxy
from airflow_provider_modmed.client.limiter import shown_storage_uri, storage_uri_passwords
from airflow_provider_modmed.connection_form import (
    CONN_FIELDS,
    CUSTOM_HOST_EXAMPLES,
    ENVIRONMENTS,
    HOST_LABEL,
    PORT_LABEL,
)
from airflow_provider_modmed.errors import ConfigurationError

log = logging.getLogger("airflow_provider_modmed.hooks")


def _clean(value: Any) -> Any:
    """The UI saves every declared field, unset ones as null or ""; treat both as absent."""
    if isinstance(value, str):
        value = value.strip()
        return value or None
    return value


_PEM = re.compile(r"-----BEGIN ([A-Z0-9 ]+)-----(.*?)-----END \1-----", re.S)


def normalize_pem(text: str) -> str:
    """PEM text as pasted into a one-line input (newlines lost, or typed as ``\\n``), re-wrapped: a key, or
    every certificate of a CA bundle. Text holding no PEM block (e.g. a file path) is returned stripped."""
    text = text.strip().replace("\\n", "\n")
    blocks = []
    for match in _PEM.finditer(text):
        label, body = match.group(1), "".join(match.group(2).split())
        lines = [body[i:i + 64] for i in range(0, len(body), 64)]
        blocks.append("\n".join([f"-----BEGIN {label}-----", *lines, f"-----END {label}-----"]) + "\n")
    return "".join(blocks) or text


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


def url_with_password(uri: str, password: str | None, *, field: str, masked_field: str, what: str,
                      shown: str, example: str) -> str:
    """``uri`` with ``password`` (its own, masked connection field) put into its user info, URL-quoted.

    A URI field is shown in clear in Airflow's UI and REST API, which mask only fields whose name holds
    "password" (or another sensitive word): so the password has a field of its own. A password left in the
    URI still works (with a warning); one given both ways is refused. Messages show ``shown`` (no secret).
    """
    if storage_uri_passwords(uri):
        if password:
            label = CONN_FIELDS[masked_field]["label"]
            raise ConfigurationError(f"the {what} password is given twice: in {field} and in {masked_field} "
                                     f"({label!r}); keep it only in {masked_field}")
        log.warning("modmed: %s holds a password, which Airflow shows in clear in the UI and the REST API: move it "
                    "to the extra field %s", field, masked_field)
    if not password:
        return uri
    try:
        netloc = urlsplit(uri).netloc
    except ValueError:
        netloc = ""
    if not netloc:
        raise ConfigurationError(f"{masked_field} is set but {field} ({shown}) names no host to send it to: "
                                 f"use a URI such as {example}, or clear the password")
    user, _, hosts = netloc.rpartition("@")
    scheme, _, rest = uri.partition("://")
    return f"{scheme}://{user}:{quote(password, safe='')}@{hosts}{rest[len(netloc):]}"


def storage_uri(uri: str, password: str | None) -> str:
    """``rate_limit_storage_uri`` with ``rate_limit_storage_password`` put into its user info."""
    return url_with_password(uri, password, field="rate_limit_storage_uri",
                             masked_field="rate_limit_storage_password", what="rate-limit storage",
                             shown=shown_storage_uri(uri), example="redis://host:6379/0")


def proxy_url(uri: str | None, password: str | None) -> str | None:
    """``proxy`` with ``proxy_password`` put into its user info (after the user name, if any)."""
    if not uri:
        if password:
            raise ConfigurationError("proxy_password ('Proxy password') is set but proxy ('HTTPS proxy') is empty: "
                                     "set proxy to http://host:port, or clear the password")
        return None
    return url_with_password(uri, password, field="proxy", masked_field="proxy_password", what="proxy",
                             shown=shown_proxy(uri), example="http://user@proxy.hospital.internal:3128")


def fhir_base_for(track: Track, environment: str, firm: str, host: str | None) -> str:
    """The FHIR base URL of one practice on one track and environment.

    On the certified track only ``production`` has a documented host; ``sandbox`` and ``training`` are
    refused (never silently production): such a practice is reached with ``custom`` and its base URL.
    """
    if environment == "custom":
        if not host:
            raise ConfigurationError(
                f"host ({HOST_LABEL!r}) is required when environment='custom': for the proprietary track the "
                f"env base, e.g. {CUSTOM_HOST_EXAMPLES['proprietary']}; for the certified track the FHIR base, "
                f"e.g. {CUSTOM_HOST_EXAMPLES['certified']}")
        if "{firm}" in host.split("://", 1)[-1].split("/", 1)[0]:  # the firm as a subdomain
            check_firm(firm, subdomain=True)
        base = host.rstrip("/").replace("{firm}", firm)
        if track is Track.PROPRIETARY and not base.endswith(profile.PROPRIETARY_FHIR_SUFFIX):
            return profile.proprietary_fhir_base(base, firm)
        return base
    if host:
        raise ConfigurationError(
            f"host ({HOST_LABEL!r}) is set but environment={environment!r}: set environment to 'custom' to "
            "use your own base URL, or clear host to use ModMed's published URL")
    if track is Track.PROPRIETARY:
        return profile.proprietary_fhir_base(profile.PROPRIETARY_ENVIRONMENTS[environment], firm)
    template = profile.CERTIFIED_ENVIRONMENTS.get(environment)
    if template is None:
        raise ConfigurationError(
            f"environment={environment!r} (extra field 'Environment') has no published host on the certified "
            f"track: ModMed documents only production ({profile.CERTIFIED_BASE_TEMPLATE}). For a certified "
            f"{environment} practice set environment to 'custom' and put the practice's FHIR base URL in host "
            f"({HOST_LABEL!r}), e.g. {CUSTOM_HOST_EXAMPLES['certified']}; for production set environment to "
            "'production'")
    return template.format(firm=check_firm(firm, subdomain=True))


def with_port(base: str, port: int | None, environment: str) -> str:
    """Apply the connection's Port to the FHIR base URL.

    Empty (Airflow's UI sends 0 or null) leaves the URL as it is, so a port written inside the custom
    base URL is used. A Port fills in a custom URL that names no port, and must otherwise agree with
    the URL's port (for a published environment, https' 443): a disagreement is an error naming both.
    """
    if not port:
        return base
    try:
        url = httpx.URL(base)
    except httpx.InvalidURL:
        return base  # ClientConfig names the invalid URL
    if url.port is None and environment == "custom":
        return str(url.copy_with(port=int(port)))
    own = origin(url)[2]
    if own == int(port):
        return base
    if environment == "custom":
        raise ConfigurationError(f"port ({PORT_LABEL!r}) is {port} but host ({HOST_LABEL!r}) names port {own}: "
                                 f"clear Port to use {own}, or write the same port in both")
    raise ConfigurationError(f"port ({PORT_LABEL!r}) is {port} but ModMed's published {environment} URL uses "
                             f"port {own}: clear Port (or give {own}), or set environment to 'custom' with "
                             f"your own base URL in host ({HOST_LABEL!r})")


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
                                 "URL prefix, which ModMed hands the partner with the API key, e.g. "
                                 f"{profile.PUBLIC_SANDBOX_FIRM} for ModMed's public sandbox practice")
    check_firm(str(firm))  # before any URL is built from it
    default_method = "password" if track is Track.PROPRIETARY else "private_key_jwt"
    base = fhir_base_for(track, environment, firm, _clean(host))
    values: dict[str, Any] = {
        "track": track,
        "fhir_base": with_port(base, port, environment),
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
        "rate_limit_storage_uri": storage_uri(_clean(extra.get("rate_limit_storage_uri")) or "memory://",
                                              _clean(extra.get("rate_limit_storage_password"))),
        "timeout": float(_int(extra, "timeout", 30)),
        "proxy": proxy_url(_clean(extra.get("proxy")), _clean(extra.get("proxy_password"))),
        "ca_bundle": normalize_pem(bundle) if (bundle := _clean(extra.get("ca_bundle"))) else None,
    }
    values.update({k: v for k, v in overrides.items() if v is not None})
    return ClientConfig(**values)
