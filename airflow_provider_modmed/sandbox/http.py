"""HTTP helpers shared by the sandbox's routes: FHIR JSON answers, OperationOutcomes, fault gates."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from airflow_provider_modmed.sandbox.state import SandboxState

FHIR_JSON = "application/fhir+json"


class FhirError(Exception):
    """Raised inside a handler; answered as an OperationOutcome."""

    def __init__(self, status: int, code: str, diagnostics: str, *, headers: dict[str, str] | None = None):
        super().__init__(diagnostics)
        self.status = status
        self.code = code
        self.diagnostics = diagnostics
        self.headers = headers or {}


def fhir_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(json.dumps(body, separators=(",", ":")), status_code=status, headers=headers,
                    media_type=FHIR_JSON)


def outcome(status: int, code: str, diagnostics: str, *, severity: str = "error",
            headers: dict[str, str] | None = None) -> Response:
    body = {"resourceType": "OperationOutcome",
            "issue": [{"severity": severity, "code": code, "diagnostics": diagnostics}]}
    return fhir_response(body, status, headers)


def error_response(exc: FhirError) -> Response:
    return outcome(exc.status, exc.code, exc.diagnostics, headers=exc.headers)


class InjectedFault(ConnectionError):
    """An answer cut short on purpose by a fault switch (``drop_next``, ``truncate_downloads``).

    Raised after the response started, so the server closes the connection; the server logs it as one
    warning line, not as an application error with a traceback (:mod:`.server`).
    """


class DroppedResponse(Response):
    """Starts a response, sends part of the body, then drops the connection."""

    def __init__(self, body: bytes, *, status_code: int = 200, media_type: str = FHIR_JSON) -> None:
        super().__init__(body, status_code=status_code, media_type=media_type)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code,
                    "headers": self.raw_headers})
        await send({"type": "http.response.body", "body": self.body[: max(1, len(self.body) // 2)],
                    "more_body": True})
        raise InjectedFault("sandbox fault: connection dropped mid-body (drop_next)")


async def fault_gate(state: SandboxState, request: Request) -> Response | None:
    """Latency and injected failures for one API call; None lets the call through."""
    faults = state.faults
    if faults.latency_ms:
        await asyncio.sleep(faults.latency_ms / 1000)
    with state.lock:
        if faults.fail_count > 0 and (not faults.fail_path or faults.fail_path in request.url.path):
            faults.fail_count -= 1
            state.stats["injected_failures"] += 1
            status, bodiless = faults.fail_status, faults.fail_bodiless
        else:
            status = 0
            bodiless = False
    if status:
        if bodiless:
            return Response(b"", status_code=status)
        return outcome(status, "transient" if status >= 500 else "throttled",
                       f"sandbox fault: injected HTTP {status}")
    return None


def take_drop(state: SandboxState) -> bool:
    with state.lock:
        if state.faults.drop_next > 0:
            state.faults.drop_next -= 1
            state.stats["dropped"] += 1
            return True
    return False


def _take(state: SandboxState, name: str) -> bool:
    with state.lock:
        left = getattr(state.faults, name)
        if left > 0:
            setattr(state.faults, name, left - 1)
            state.stats[f"injected:{name}"] += 1
            return True
    return False


def finish(state: SandboxState, response: Response) -> Response:
    """Apply the answer-mangling faults (malformed JSON, wrong type, drop mid-body) to an answer."""
    if response.body and response.status_code < 300 and _take(state, "malformed_next"):
        return Response(bytes(response.body)[: len(response.body) // 2] + b"}{not json", status_code=200,
                        media_type=FHIR_JSON)
    if response.body and response.status_code < 300 and _take(state, "wrong_type_next"):
        return fhir_response({"resourceType": "Basic", "id": "not-what-you-asked-for",
                              "code": {"text": "sandbox fault: wrong resourceType"}}, response.status_code)
    if response.body and take_drop(state):
        return DroppedResponse(bytes(response.body), status_code=response.status_code,
                               media_type=response.media_type or FHIR_JSON)
    return response


async def read_json(request: Request) -> Any:
    raw = await request.body()
    if not raw:
        return None
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise FhirError(400, "structure", f"request body is not valid JSON: {exc}") from None
