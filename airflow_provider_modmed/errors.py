"""Typed errors raised by the ModMed client, hook and operators.

Every error carries what the server said (status code, the OperationOutcome's issue codes and
diagnostics) and never the request body: request bodies hold patient data.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Issue:
    """One ``OperationOutcome.issue``: severity, code, diagnostics and location."""

    severity: str
    code: str
    diagnostics: str = ""
    expression: tuple[str, ...] = ()

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> Issue:
        loc = raw.get("expression") or raw.get("location") or ()
        return cls(
            severity=str(raw.get("severity", "error")),
            code=str(raw.get("code", "unknown")),
            diagnostics=str(raw.get("diagnostics") or (raw.get("details") or {}).get("text") or ""),
            expression=tuple(str(x) for x in loc),
        )


def issues_from_body(body: Any) -> tuple[Issue, ...]:
    """The issues of an OperationOutcome body; ``()`` when the body is not one."""
    if isinstance(body, Mapping) and body.get("resourceType") == "OperationOutcome":
        return tuple(Issue.from_dict(i) for i in body.get("issue") or () if isinstance(i, Mapping))
    return ()


@dataclass
class ModMedError(Exception):
    """Base of every error this package raises on purpose."""

    message: str
    status_code: int | None = None
    issues: Sequence[Issue] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        super().__init__(self.message)

    def __str__(self) -> str:
        parts = [self.message]
        if self.status_code is not None:
            parts.append(f"(HTTP {self.status_code})")
        for issue in self.issues:
            text = f"[{issue.severity}/{issue.code}]"
            if issue.diagnostics:
                text += f" {issue.diagnostics}"
            parts.append(text)
        return " ".join(parts)

    @property
    def codes(self) -> tuple[str, ...]:
        return tuple(i.code for i in self.issues)


class ConfigurationError(ModMedError):
    """A connection or argument is missing or contradictory; the message names the field and the fix."""


class CapabilityError(ModMedError):
    """ModMed would refuse this call on this track; raised before any network call."""


class ValidationError(ModMedError):
    """A resource failed FHIR R4 validation before it was sent (or the server answered 400/422)."""


class AuthError(ModMedError):
    """Authentication failed: bad credentials, expired or rejected token, wrong scope (401)."""


class ForbiddenError(AuthError):
    """The server refused the caller (403): unknown API key, missing scope, practice consent."""


class NotFoundError(ModMedError):
    """The resource, or the export job, does not exist (404/410)."""


class ConflictError(ModMedError):
    """A version conflict or failed precondition (409/412): someone else changed the resource."""


class RateLimitedError(ModMedError):
    """The server answered 429 and retries were exhausted."""


class ServerError(ModMedError):
    """ModMed answered 5xx and retries were exhausted."""


class TransportError(ModMedError):
    """The request did not get an answer: DNS, TLS, connection refused, timeout."""


_BY_STATUS: dict[int, type[ModMedError]] = {
    400: ValidationError,
    401: AuthError,
    403: ForbiddenError,
    404: NotFoundError,
    409: ConflictError,
    410: NotFoundError,
    412: ConflictError,
    422: ValidationError,
    429: RateLimitedError,
}


def error_class(status_code: int, *, auth: bool = False) -> type[ModMedError]:
    """The typed error class for an HTTP status, the one mapping every layer uses.

    ``auth``: the answer of a token or discovery endpoint, where every refusal but 403 (forbidden),
    429 (throttled) and 5xx means the credentials were refused (:class:`AuthError`).
    """
    cls = _BY_STATUS.get(status_code) or (ServerError if status_code >= 500 else ModMedError)
    if auth and cls not in (ForbiddenError, RateLimitedError, ServerError):
        return AuthError
    return cls


def error_for_status(status_code: int, body: Any, what: str, *, auth: bool = False,
                     detail: str = "") -> ModMedError:
    """Build the typed error for an HTTP answer; ``what`` says which call failed (no data, no secrets),
    ``detail`` is appended to it (e.g. an OAuth error code)."""
    return error_class(status_code, auth=auth)(f"{what} failed{detail}", status_code=status_code,
                                               issues=issues_from_body(body))


def json_body(response: Any) -> Any:
    """The JSON body of an ``httpx.Response``, ``None`` when empty or not JSON (error bodies need not be
    JSON)."""
    if not response.content:
        return None
    try:
        return response.json()
    except ValueError:
        return None
