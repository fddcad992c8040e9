"""The sandbox's two ASGI apps: the API (both tracks + admin) and the object-storage listener."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qsl

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from airflow_provider_modmed.capabilities import Interaction, Track
from airflow_provider_modmed.client.instants import format_instant
from airflow_provider_modmed.profile import (
    CERTIFIED_FHIR_SUFFIX,
    KEYCLOAK_TOKEN_PATH,
    PROPRIETARY_FHIR_SUFFIX,
    PROPRIETARY_GRANT_SUFFIX,
)
from airflow_provider_modmed.sandbox import certified_ids, interactions
from airflow_provider_modmed.sandbox.http import (
    FhirError,
    error_response,
    fault_gate,
    fhir_response,
    finish,
    outcome,
    read_json,
)
from airflow_provider_modmed.sandbox.metadata import capability_statement
from airflow_provider_modmed.sandbox.state import ENVIRONMENT_PATHS, SandboxState, Token, key_label

Handler = Callable[[SandboxState, Track, Request, str], Awaitable[Response]]

#: ``{env_base}/{firm}`` as served on loopback: ``/{env}/firm`` is one of ModMed's environment paths
PROPRIETARY_PREFIX = "/{env}/firm/{firm}"
#: the certified track on loopback: one path per practice instead of ModMed's one host per practice
CERTIFIED_PREFIX = "/certified/{firm}"


def _oauth_error(status: int, error: str, description: str) -> JSONResponse:
    return JSONResponse({"error": error, "error_description": description}, status_code=status)


#: the header that carries the admin token (``Authorization: Bearer <token>`` works too)
ADMIN_TOKEN_HEADER = "x-sandbox-admin-token"


def _admin_refusal(request: Request, token: str | None) -> Response | None:
    """``None`` when ``/_sandbox/*`` may answer ``request``: no token configured, or the right one sent."""
    if not token:
        return None
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    sent = request.headers.get(ADMIN_TOKEN_HEADER) or (value.strip() if scheme.lower() == "bearer" else "")
    if sent and hmac.compare_digest(sent.encode(), token.encode()):
        return None
    status = 403 if sent else 401
    return JSONResponse({"error": "the admin endpoints need the admin token printed by `modmed-sandbox serve` "
                         f"at start: send 'Authorization: Bearer <token>' or '{ADMIN_TOKEN_HEADER}: <token>'"},
                        status_code=status, headers={"WWW-Authenticate": 'Bearer realm="modmed-sandbox-admin"'})


async def _form(request: Request) -> dict[str, str]:
    return dict(parse_qsl((await request.body()).decode(errors="replace"), keep_blank_values=True))


def build_api_app(state: SandboxState) -> Starlette:
    """The API listener: proprietary track, Keycloak token URL, certified track, admin endpoints.

    ``state`` is the root practice; each request is served by the practice its ``{firm}`` names.
    """

    def practice_of(request: Request) -> SandboxState:
        practice = state.practice(request.path_params["firm"])
        if practice is None:
            raise FhirError(404, "not-found", f"Unknown firm URL prefix '{request.path_params['firm']}'")
        return practice

    def proprietary_base(request: Request) -> str:
        p = request.path_params
        return f"{state.api_url}/{p['env']}/firm/{p['firm']}{PROPRIETARY_FHIR_SUFFIX}"

    def certified_base(request: Request) -> str:
        return f"{state.api_url}/certified/{request.path_params['firm']}{CERTIFIED_FHIR_SUFFIX}"

    def check_path(request: Request) -> None:
        p = request.path_params
        if "env" in p and f"/{p['env']}/firm" not in ENVIRONMENT_PATHS:
            raise FhirError(404, "not-found", f"Unknown environment '{p['env']}'")
        practice_of(request)

    def check_api_key(request: Request) -> str:
        api_key = request.headers.get("x-api-key")
        practice = practice_of(request)
        if not api_key or api_key != practice.credentials.api_key:
            state.stats["forbidden_api_key"] += 1
            raise FhirError(403, "forbidden", "Missing or unknown x-api-key")
        if state.faults.rate_storm > 0:
            with state.lock:
                state.faults.rate_storm -= 1
            state.stats["throttled"] += 1
            raise FhirError(429, "throttled", "Rate limit exceeded")
        if not practice.take_budget(api_key):
            state.stats["throttled"] += 1
            state.stats[f"throttled:{key_label(api_key)}"] += 1
            raise FhirError(429, "throttled", "Rate limit exceeded")
        label = key_label(api_key)
        state.stats[f"requests:{label}"] += 1
        state.stats[f"peak_window:{label}"] = practice.peak_calls(api_key)  # the most in any 60 s window
        return api_key

    def bearer(request: Request, track: str) -> Token:
        header = request.headers.get("authorization", "")
        scheme, _, value = header.partition(" ")
        token = practice_of(request).valid_token(value.strip(), track) if scheme.lower() == "bearer" else None
        if token is None:
            state.stats["unauthorized"] += 1
            raise FhirError(401, "login", "Missing, unknown or expired access token",
                            headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})
        return token

    async def guarded(request: Request, kind: str, work: Callable[[], Awaitable[Response]]) -> Response:
        state.recent_requests.append(request.scope.get("raw_path", b"").decode("latin-1") + (
            "?" + request.scope["query_string"].decode("latin-1") if request.scope.get("query_string") else ""))
        state.stats["requests"] += 1
        state.stats[f"requests:{kind}"] += 1
        try:
            check_path(request)
            injected = await fault_gate(state, request)
            if injected is not None:
                return injected
            return finish(state, await work())
        except FhirError as exc:
            return error_response(exc)

    # -- proprietary track -------------------------------------------------------------------
    async def proprietary_grant(request: Request) -> Response:
        async def work() -> Response:
            check_api_key(request)
            practice = practice_of(request)
            creds = practice.credentials
            form = await _form(request)
            state.stats["token_requests"] += 1
            grant = form.get("grant_type")
            if grant == "password":
                if form.get("username") != creds.username or form.get("password") != creds.password:
                    return _oauth_error(401, "invalid_grant", "Bad username or password")
                refresh = practice.refresh_tokens_by_user.get(creds.username)
                if refresh is None:
                    refresh = secrets.token_urlsafe(32)
                    practice.refresh_tokens_by_user[creds.username] = refresh
                    practice.refresh_tokens[refresh] = creds.username
            elif grant == "refresh_token":
                refresh = form.get("refresh_token", "")
                if refresh not in practice.refresh_tokens:
                    return _oauth_error(401, "invalid_grant", "Unknown or revoked refresh token")
            else:
                return _oauth_error(400, "unsupported_grant_type", "grant_type must be password or refresh_token")
            token = practice.issue("proprietary", creds.username, state.config.token_ttl, api_key=creds.api_key)
            body: dict[str, Any] = {"access_token": token.value, "refresh_token": refresh,
                                    "token_type": "Bearer", "scope": request.path_params["firm"]}
            if not state.config.omit_expires_in:
                body["expires_in"] = int(state.config.token_ttl)
            return JSONResponse(body)

        return await guarded(request, "token", work)

    async def keycloak_token(request: Request) -> Response:
        state.stats["requests"] += 1
        state.stats["token_requests"] += 1
        injected = await fault_gate(state, request)
        if injected is not None:
            return injected
        form = await _form(request)
        if form.get("grant_type") != "client_credentials":
            return _oauth_error(400, "unsupported_grant_type", "grant_type must be client_credentials")
        # one realm for every practice: the client id names the practice
        practice = next((p for p in state.practices if p.credentials.cc_client_id == form.get("client_id")), None)
        if practice is None or form.get("client_secret") != practice.credentials.cc_client_secret:
            return _oauth_error(401, "invalid_client", "Invalid client credentials")
        token = practice.issue("proprietary", practice.credentials.cc_client_id, state.config.keycloak_token_ttl)
        return JSONResponse({"access_token": token.value, "expires_in": int(state.config.keycloak_token_ttl),
                             "token_type": "Bearer", "not-before-policy": 0, "scope": "profile email"})

    def proprietary(handler: Handler) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            async def work() -> Response:
                check_api_key(request)
                bearer(request, "proprietary")
                return await handler(practice_of(request), Track.PROPRIETARY, request, proprietary_base(request))
            return await guarded(request, "proprietary", work)
        return endpoint

    async def proprietary_metadata(request: Request) -> Response:
        async def work() -> Response:
            return fhir_response(capability_statement(Track.PROPRIETARY, proprietary_base(request),
                                                      format_instant(state.now_ms())))
        return await guarded(request, "proprietary", work)

    # -- certified track ---------------------------------------------------------------------
    from airflow_provider_modmed.sandbox import smart

    def token_url(request: Request) -> str:
        return f"{state.api_url}/certified/{request.path_params['firm']}/auth/token"

    async def smart_configuration(request: Request) -> Response:
        async def work() -> Response:
            return JSONResponse(smart.smart_configuration(fhir_base=certified_base(request),
                                                          token_url=token_url(request)))
        return await guarded(request, "certified", work)

    async def certified_token(request: Request) -> Response:
        async def work() -> Response:
            state.stats["token_requests"] += 1
            form = await _form(request)
            try:
                client_id, scopes = smart.issue_certified_token(
                    form, token_url=token_url(request), creds=practice_of(request).credentials, now=state.now(),
                    seen_jti=state.seen_jti)
            except smart.OAuthError as exc:
                return _oauth_error(exc.status, exc.error, exc.description)
            ttl = state.config.certified_token_ttl
            token = practice_of(request).issue("certified", client_id, ttl, tuple(scopes))
            return JSONResponse({"access_token": token.value, "token_type": "bearer",
                                 "expires_in": int(ttl), "scope": " ".join(scopes)})
        return await guarded(request, "token", work)

    def certified(handler: Handler, interaction: Interaction | None) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            async def work() -> Response:
                token = bearer(request, "certified")
                rt = request.path_params.get("rtype")
                if rt and interaction in (Interaction.READ, Interaction.SEARCH) and \
                        not smart.scope_allows(token.scopes, rt, interaction.value):
                    raise FhirError(403, "forbidden", f"Token scopes do not allow {interaction.value} on {rt}")
                # the track's own ids: the handlers see stored ids, the client only certified ones
                return await certified_ids.at_boundary(request, lambda inner: handler(
                    practice_of(request), Track.CERTIFIED, inner, certified_base(request)))
            return await guarded(request, "certified", work)
        return endpoint

    async def certified_metadata(request: Request) -> Response:
        async def work() -> Response:
            return fhir_response(capability_statement(Track.CERTIFIED, certified_base(request),
                                                      format_instant(state.now_ms())))
        return await guarded(request, "certified", work)

    async def export(state_: SandboxState, track: Track, request: Request, fhir_base: str) -> Response:
        token = bearer(request, "certified")
        level = request.path_params.get("level", "system")
        params: dict[str, str] = dict(request.query_params)
        if request.method == "POST":
            body = await read_json(request)
            for p in (body or {}).get("parameter") or ():
                value = next((v for k, v in p.items() if k.startswith("value")), None)
                if value is not None:
                    text = value if isinstance(value, str) else str(value)
                    params[p["name"]] = f"{params[p['name']]},{text}" if p["name"] in params else text
        status_url = state_.exports.kick_off(
            level=level, group_id=request.path_params.get("gid"), params=params,
            prefer=request.headers.get("prefer", ""), accept=request.headers.get("accept", ""),
            request_url=str(request.url), fhir_base=fhir_base, scopes=token.scopes)
        state.stats["exports_started"] += 1
        return Response(b"", status_code=202, headers={"Content-Location": status_url})

    async def export_status(state_: SandboxState, track: Track, request: Request, fhir_base: str) -> Response:
        bearer(request, "certified")
        if request.method == "DELETE":
            return state_.exports.cancel(request.path_params["job"])
        return state_.exports.status(request.path_params["job"])

    async def refuse_export(request: Request) -> Response:
        async def work() -> Response:
            check_api_key(request)
            bearer(request, "proprietary")
            raise FhirError(403, "forbidden", "Bulk Data $export is not available on the proprietary API; "
                            "use the ONC-certified API")
        return await guarded(request, "proprietary", work)

    # -- admin -------------------------------------------------------------------------------
    def admin(handler: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            refused = _admin_refusal(request, state.config.admin_token)
            if refused is not None:
                state.stats["admin_refused"] += 1
                return refused
            return await handler(request)
        return endpoint

    async def admin_credentials(request: Request) -> Response:
        return JSONResponse(state.credentials_document())

    async def admin_faults(request: Request) -> Response:
        if request.method == "DELETE":
            state.reset_faults()
        elif request.method == "POST":  # GET reads the current faults
            try:
                state.apply_faults(await request.json())
            except (KeyError, TypeError, ValueError) as exc:
                return JSONResponse({"error": f"unknown or bad fault: {exc}"}, status_code=400)
        return JSONResponse(state.faults.__dict__)

    async def admin_client_jwks(request: Request) -> Response:
        client_id = request.path_params["client_id"]
        try:
            creds = admin_practice(request, client_id).credentials
        except LookupError as exc:
            return JSONResponse({"error": str(exc)}, status_code=404)
        if request.method == "PUT":  # register or replace: a JWKS without a kid retires that key
            try:
                creds.register_jwks(client_id, await request.json())
            except ValueError as exc:  # InvalidKey, or a body that is not JSON
                return JSONResponse({"error": str(exc)}, status_code=400)
        keys = creds.client_jwks().get(client_id)
        if keys is None:
            return JSONResponse({"error": f"no JWKS is registered for client {client_id!r}"}, status_code=404)
        return JSONResponse({"keys": keys})

    async def admin_stats(request: Request) -> Response:
        if request.method == "DELETE":
            state.stats.clear()
        return JSONResponse(dict(state.stats))

    def admin_practice(request: Request, client_id: str | None = None) -> SandboxState:
        """The practice ``?firm=`` names; else the one that knows ``client_id``; else practice 1."""
        firm = request.query_params.get("firm")
        if firm is not None:
            practice = state.practice(firm)
            if practice is None:
                raise LookupError(f"no practice is served under firm {firm!r}")
            return practice
        known = (p for p in state.practices if client_id is not None and client_id in p.credentials.client_jwks())
        return next(known, state)

    async def admin_resources(request: Request) -> Response:
        rt = request.path_params["rtype"]
        try:
            store = admin_practice(request).store
        except LookupError as exc:
            return JSONResponse({"error": str(exc)}, status_code=404)
        if request.method == "GET":
            return JSONResponse(store.ground_truth(rt))
        body = await request.json()
        if request.method == "DELETE":
            row = store.delete(rt, request.path_params["rid"])
        elif request.method == "PUT":
            row = store.update({**body, "resourceType": rt, "id": request.path_params["rid"]})
        else:
            row = store.create({**body, "resourceType": rt})
        return JSONResponse(row.body if row else {}, status_code=201 if request.method == "POST" else 200)

    async def not_found(request: Request) -> Response:
        return outcome(404, "not-found", f"No route for {request.method} {request.url.path}")

    pp = PROPRIETARY_PREFIX + PROPRIETARY_FHIR_SUFFIX
    cp = CERTIFIED_PREFIX + CERTIFIED_FHIR_SUFFIX
    routes = [
        Route(PROPRIETARY_PREFIX + PROPRIETARY_GRANT_SUFFIX, proprietary_grant, methods=["POST"]),
        Route(KEYCLOAK_TOKEN_PATH, keycloak_token, methods=["POST"]),
        Route(pp + "/metadata", proprietary_metadata, methods=["GET"]),
        Route(pp + "/$export", refuse_export, methods=["GET", "POST"]),
        Route(pp + "/{level:str}/$export", refuse_export, methods=["GET", "POST"]),
        Route(pp + "/Group/{gid}/$export", refuse_export, methods=["GET", "POST"]),
        Route(pp + "/{rtype}", proprietary(interactions.search_type), methods=["GET"]),
        Route(pp + "/{rtype}/_search", proprietary(interactions.search_type), methods=["POST"]),
        Route(pp + "/{rtype}", proprietary(interactions.create), methods=["POST"]),
        Route(pp + "/{rtype}/{rid}", proprietary(interactions.read), methods=["GET"]),
        Route(pp + "/{rtype}/{rid}", proprietary(interactions.update), methods=["PUT"]),
        Route(pp + "/{rtype}/{rid}", proprietary(interactions.delete), methods=["DELETE"]),
        Route(cp + "/.well-known/smart-configuration", smart_configuration, methods=["GET"]),
        Route(CERTIFIED_PREFIX + "/auth/token", certified_token, methods=["POST"]),
        Route(cp + "/metadata", certified_metadata, methods=["GET"]),
        Route(cp + "/$export", certified(export, None), methods=["GET", "POST"]),
        Route(cp + "/Patient/$export", certified(_with_level(export, "Patient"), None), methods=["GET", "POST"]),
        Route(cp + "/Group/{gid}/$export", certified(_with_level(export, "Group"), None), methods=["GET", "POST"]),
        Route(cp + "/fhir-services/$export-status/{job}", certified(export_status, None),
              methods=["GET", "DELETE"]),
        Route(cp + "/{rtype}", certified(interactions.search_type, Interaction.SEARCH), methods=["GET"]),
        Route(cp + "/{rtype}/_search", certified(interactions.search_type, Interaction.SEARCH), methods=["POST"]),
        Route(cp + "/{rtype}", certified(interactions.create, Interaction.CREATE), methods=["POST"]),
        Route(cp + "/{rtype}/{rid}", certified(interactions.read, Interaction.READ), methods=["GET"]),
        Route(cp + "/{rtype}/{rid}", certified(interactions.update, Interaction.UPDATE), methods=["PUT"]),
        Route(cp + "/{rtype}/{rid}", certified(interactions.delete, Interaction.DELETE), methods=["DELETE"]),
        Route("/_sandbox/credentials", admin(admin_credentials), methods=["GET"]),
        Route("/_sandbox/faults", admin(admin_faults), methods=["GET", "POST", "DELETE"]),
        Route("/_sandbox/stats", admin(admin_stats), methods=["GET", "DELETE"]),
        Route("/_sandbox/clients/{client_id}/jwks", admin(admin_client_jwks), methods=["GET", "PUT"]),
        Route("/_sandbox/resources/{rtype}", admin(admin_resources), methods=["GET", "POST"]),
        Route("/_sandbox/resources/{rtype}/{rid}", admin(admin_resources), methods=["PUT", "DELETE"]),
        Route("/_sandbox/{path:path}", admin(not_found), methods=["GET", "POST", "PUT", "DELETE", "PATCH"]),
        Route("/{path:path}", not_found, methods=["GET", "POST", "PUT", "DELETE", "PATCH"]),
    ]
    return Starlette(routes=routes)


def _with_level(handler: Handler, level: str) -> Handler:
    async def wrapped(state: SandboxState, track: Track, request: Request, fhir_base: str) -> Response:
        request.path_params["level"] = level
        return await handler(state, track, request, fhir_base)
    return wrapped


def _s3_error(status: int, code: str, message: str) -> Response:
    body = f"<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>{code}</Code><Message>{message}</Message></Error>"
    return Response(body, status_code=status, media_type="application/xml")


def build_storage_app(state: SandboxState) -> Starlette:
    """The "object storage" listener: presigned uploads and bulk output files. Refuses credentials."""

    async def gate(request: Request) -> Response | None:
        state.stats["storage_requests"] += 1
        if "authorization" in request.headers or "x-api-key" in request.headers:
            state.stats["auth_headers_seen_by_storage"] += 1
            return _s3_error(400, "InvalidArgument", "Only one auth mechanism allowed; presigned URLs take no "
                             "Authorization or x-api-key header")
        q = request.query_params
        reason = state.check_presigned(request.url.path, q.get("X-Amz-Date", ""), q.get("X-Amz-Expires", ""),
                                       q.get("X-Amz-Signature", ""))
        if reason:
            state.stats["storage_refused"] += 1
            return _s3_error(403, "AccessDenied", reason)
        return None

    async def upload(request: Request) -> Response:
        refused = await gate(request)
        if refused is not None:
            return refused
        key = request.url.path
        if request.method == "PUT":
            state.uploads[key] = await request.body()
            state.stats["uploads"] += 1
            return Response(b"", status_code=200, headers={"ETag": f'"{hashlib.md5(state.uploads[key]).hexdigest()}"'})  # noqa: S324
        if key not in state.uploads:
            return _s3_error(404, "NoSuchKey", "The specified key does not exist.")
        return Response(state.uploads[key], media_type="application/octet-stream")

    async def bulk_file(request: Request) -> Response:
        refused = await gate(request)
        if refused is not None:
            return refused
        if state.faults.latency_ms:
            await asyncio.sleep(state.faults.latency_ms / 1000)
        job = request.path_params["job"]
        practice = next((p for p in state.practices if p.exports._job(job) is not None), state)
        response: Response = await practice.exports.download(request, job, request.path_params["name"])
        return response

    return Starlette(routes=[
        Route("/uploads/{key}", upload, methods=["PUT", "GET"]),
        Route("/bulk/{job}/{name}", bulk_file, methods=["GET"]),
    ])
