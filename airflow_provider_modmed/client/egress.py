"""How the client reaches the network: which CAs it trusts (``verify``, ``ca_bundle``) and the proxy (``proxy``).

Hospitals and vendors often allow egress only through an HTTPS proxy, and some practices' servers (or a
TLS-inspecting proxy) present certificates of a private CA. Both are settings of one connection:

* ``ca_bundle``: the CA certificates to trust, as PEM text or the path of a file or directory of them. It
  replaces the system's CAs for this connection (as ``curl --cacert`` does): a bundle that must also trust
  public CAs holds them too.
* ``proxy``: ``http://[user@]host:port`` (or ``https://``). It carries every ``https://`` request the
  client makes (token, FHIR, bulk status and files, presigned storage URLs) as a ``CONNECT`` tunnel: the
  proxy sees the host and port, never a header or a body, so the rules of which host gets which credential
  hold through it unchanged. Plain ``http://`` is allowed only to loopback (the sandbox) and never goes
  through the proxy: a proxy would see it in clear.

A failure to reach the proxy, or a proxy refusing the tunnel, is an error naming the ``proxy`` field
(:func:`proxy_failure`), never the proxy's password.
"""

from __future__ import annotations

import functools
import os
import ssl
from typing import TYPE_CHECKING, Any

import httpx

from airflow_provider_modmed.client.retry import cause_of

if TYPE_CHECKING:
    from airflow_provider_modmed.client.config import ClientConfig

#: where the settings live in an Airflow connection (error messages; :mod:`.config` names them the same)
PROXY_FIELD = 'extra field "proxy"'
PROXY_PASSWORD_FIELD = 'extra field "proxy_password"'  # noqa: S105  (a field name)
PEM_CERTIFICATE = "-----BEGIN CERTIFICATE-----"


def shown_proxy(url: str | httpx.URL) -> str:
    """How a proxy appears in messages and logs: ``scheme://host:port``, never its user info."""
    try:
        u = url if isinstance(url, httpx.URL) else httpx.URL(url)
    except (httpx.InvalidURL, TypeError):
        return "<invalid proxy URL>"
    port = u.port or {"http": 80, "https": 443}.get(u.scheme, 0)
    return f"{u.scheme}://{u.host}:{port}"


@functools.lru_cache(maxsize=32)
def _pem_context(pem: str) -> ssl.SSLContext:
    return ssl.create_default_context(cadata=pem)


def ca_context(ca_bundle: str) -> ssl.SSLContext:
    """An SSL context trusting exactly ``ca_bundle``: PEM text, a file of PEM certificates, or a directory
    prepared with ``c_rehash``. Raises ``ssl.SSLError``/``OSError`` when it holds no usable certificate."""
    if PEM_CERTIFICATE in ca_bundle:
        return _pem_context(ca_bundle)
    if os.path.isdir(ca_bundle):
        return ssl.create_default_context(capath=ca_bundle)
    return ssl.create_default_context(cafile=ca_bundle)


def tls_verify(config: ClientConfig) -> bool | ssl.SSLContext:
    """What the client's httpx transports verify TLS with: the ``ca_bundle``, a ``verify`` path, or the
    ``verify`` flag (True: the system's CAs)."""
    if config.ca_bundle:
        return ca_context(config.ca_bundle)
    if isinstance(config.verify, str):
        return ca_context(config.verify)
    return config.verify


class ProxyUnreachable(httpx.ConnectError):
    """No connection to the proxy (nothing was sent through it): retried like any connect failure."""


#: a proxy's answers to ``CONNECT`` that say "not now" (the server was unreachable or the proxy busy)
TRANSIENT_TUNNEL_STATUSES = ("502", "503", "504")


class ProxyRefused(httpx.ProxyError):
    """The proxy answered the ``CONNECT`` with an error status. ``transient`` (502, 503, 504: the proxy could
    not reach the server, or is busy) is retried, since nothing reached the server; any other status (407,
    403: its rules) is not."""

    def __init__(self, message: str, *, request: httpx.Request, transient: bool = False) -> None:
        super().__init__(message, request=request)
        self.transient = transient


def _refusal(proxy: str, request: httpx.Request, exc: httpx.ProxyError) -> ProxyRefused:
    status = str(exc).strip()[:80]  # httpcore: "<status> <reason phrase>", from the proxy
    # 407 Proxy Authentication Required; some proxies (tinyproxy) answer a CONNECT with 401 instead
    target = f"{request.url.host}:{request.url.port or 443}"
    transient = status.startswith(TRANSIENT_TUNNEL_STATUSES)
    if status.startswith(("407", "401")):
        hint = f"check the user name in proxy and the password in proxy_password ({PROXY_PASSWORD_FIELD})"
    elif transient:
        hint = "the proxy could not reach the server or is busy (retried; nothing reached the server)"
    else:
        hint = "check that the proxy allows CONNECT to this host and port"
    return ProxyRefused(f"the proxy {proxy} ({PROXY_FIELD}) refused the tunnel to {target}: {status}; {hint}",
                        request=request, transient=transient)


def _translate(proxy: str, request: httpx.Request, exc: httpx.TransportError) -> httpx.TransportError:
    """The proxy's part of a transport error, named; a TLS failure with the server itself is left as is."""
    if isinstance(exc, httpx.ProxyError):
        return _refusal(proxy, request, exc)
    if isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout)) and cause_of(exc, ssl.SSLError) is None:
        return ProxyUnreachable(f"could not reach the proxy {proxy} ({PROXY_FIELD}): {type(exc).__name__}; check "
                                "its host and port, or clear proxy to connect directly", request=request)
    return exc


class _ProxyTransport(httpx.BaseTransport):
    """``httpx.HTTPTransport(proxy=...)`` whose proxy failures name the ``proxy`` field."""

    def __init__(self, proxy: httpx.Proxy, verify: bool | ssl.SSLContext, shown: str) -> None:
        self._inner = httpx.HTTPTransport(proxy=proxy, verify=verify)
        self._shown = shown

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        try:
            return self._inner.handle_request(request)
        except httpx.TransportError as exc:
            translated = _translate(self._shown, request, exc)
            if translated is exc:
                raise
            raise translated from exc

    def close(self) -> None:
        self._inner.close()


class _AsyncProxyTransport(httpx.AsyncBaseTransport):
    """The async twin of :class:`_ProxyTransport`."""

    def __init__(self, proxy: httpx.Proxy, verify: bool | ssl.SSLContext, shown: str) -> None:
        self._inner = httpx.AsyncHTTPTransport(proxy=proxy, verify=verify)
        self._shown = shown

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        try:
            return await self._inner.handle_async_request(request)
        except httpx.TransportError as exc:
            translated = _translate(self._shown, request, exc)
            if translated is exc:
                raise
            raise translated from exc

    async def aclose(self) -> None:
        await self._inner.aclose()


def _proxy(config: ClientConfig, verify: bool | ssl.SSLContext) -> httpx.Proxy:
    url = httpx.URL(config.proxy or "")
    # an https:// proxy's own certificate is checked with the same trust (a private CA signs both, typically)
    context = verify if isinstance(verify, ssl.SSLContext) and url.scheme == "https" else None
    return httpx.Proxy(url, ssl_context=context)  # user info becomes Proxy-Authorization on CONNECT only


def client_kwargs(config: ClientConfig, transport: Any, *, asynchronous: bool = False) -> dict[str, Any]:
    """TLS trust, proxy and transport arguments for the face's ``httpx.Client``/``AsyncClient``.

    With a ``proxy``, ``https://`` requests are mounted on a proxy transport. A ``transport`` given by the
    caller (tests, ASGI) carries everything itself: no proxy is mounted over it.
    """
    verify = tls_verify(config)
    kwargs: dict[str, Any] = {"verify": verify, "transport": transport}
    if config.proxy and transport is None:
        shown = shown_proxy(config.proxy)
        proxied = (_AsyncProxyTransport if asynchronous else _ProxyTransport)(_proxy(config, verify), verify, shown)
        kwargs["mounts"] = {"https://": proxied}
    return kwargs


def proxy_failure(exc: BaseException) -> str | None:
    """The message of a proxy failure (:class:`ProxyUnreachable`, :class:`ProxyRefused`), else None."""
    return str(exc) if isinstance(exc, (ProxyUnreachable, ProxyRefused)) else None
