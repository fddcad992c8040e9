"""Typed errors raised by the ModMed client, hook and operators.

Every error carries what the server said as structured data (status code, the OperationOutcome's
issues) and never the request body: request bodies hold patient data. Its text (``str(exc)``, which
reaches task logs and trigger events) holds the operation, the HTTP status and each issue's severity and
code only. The server's free text (``diagnostics``, ``details.text``, an OAuth ``error_description``) may
echo what it was sent (a name, a birth date): it stays on the issues and is returned only by
:meth:`ModMedError.diagnostics`, for code that asks for it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

#: what an issue's severity or code must look like to be shown in an error's text (FHIR codes and OAuth
#: error codes do); anything else is server text and is shown as ``?``
_CODE_RE = re.compile(r"[A-Za-z0-9_.:\-]{1,64}")
#: issues shown in an error's text; the rest are counted
_SHOWN_ISSUES = 10


def _code(text: str) -> str:
    return text if _CODE_RE.fullmatch(text) else "?"


@dataclass(frozen=True)
class Issue:
    """One ``OperationOutcome.issue``: severity, code, diagnostics and location.

    ``diagnostics`` (the issue's ``diagnostics`` or ``details.text``) and ``expression`` are server text
    that may quote patient data: they are left out of ``repr`` and of every error message.
    """

    severity: str
    code: str
    diagnostics: str = field(default="", repr=False)
    expression: tuple[str, ...] = field(default=(), repr=False)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> Issue:
        loc = raw.get("expression") or raw.get("location") or ()
        return cls(
            severity=str(raw.get("severity", "error")),
            code=str(raw.get("code", "unknown")),
            diagnostics=str(raw.get("diagnostics") or (raw.get("details") or {}).get("text") or ""),
            expression=tuple(str(x) for x in loc),
        )

    @property
    def label(self) -> str:
        """``"severity/code"``, safe to log: a value that does not look like a code is shown as ``?``."""
        return f"{_code(self.severity)}/{_code(self.code)}"


def issues_from_body(body: Any) -> tuple[Issue, ...]:
    """The issues of an OperationOutcome body; ``()`` when the body is not one."""
    if isinstance(body, Mapping) and body.get("resourceType") == "OperationOutcome":
        return tuple(Issue.from_dict(i) for i in body.get("issue") or () if isinstance(i, Mapping))
    return ()


def oauth_issues(body: Any) -> tuple[Issue, ...]:
    """An OAuth error answer (RFC 6749 section 5.2) as one issue: ``error`` is its code, the
    ``error_description`` (server text) its diagnostics; ``()`` when the body is not one."""
    if isinstance(body, Mapping) and isinstance(body.get("error"), str) and body["error"]:
        return (Issue("error", body["error"], str(body.get("error_description") or "")),)
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
        """The operation, the HTTP status and each issue's severity and code; never the server's
        diagnostics (see :meth:`diagnostics`)."""
        parts = [self.message]
        if self.status_code is not None:
            parts.append(f"(HTTP {self.status_code})")
        parts.extend(f"[{i.label}]" for i in self.issues[:_SHOWN_ISSUES])
        if len(self.issues) > _SHOWN_ISSUES:
            parts.append(f"(+{len(self.issues) - _SHOWN_ISSUES} more issues)")
        return " ".join(parts)

    @property
    def codes(self) -> tuple[str, ...]:
        return tuple(i.code for i in self.issues)

    def diagnostics(self) -> tuple[str, ...]:
        """The server's text for each issue that has one (OperationOutcome ``diagnostics`` or
        ``details.text``, an OAuth ``error_description``), in order.

        Servers echo what they were sent, so this may hold patient data (a name, a birth date): it is
        never part of ``str(exc)``; do not log it, push it to XCom or put it in a trigger event.
        """
        return tuple(i.diagnostics for i in self.issues if i.diagnostics)


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
    ``detail`` is appended to it. ``auth``: a token or discovery answer, whose OAuth error body
    (:func:`oauth_issues`) becomes the issue."""
    issues = issues_from_body(body) or (oauth_issues(body) if auth else ())
    return error_class(status_code, auth=auth)(f"{what} failed{detail}", status_code=status_code, issues=issues)


def json_body(response: Any) -> Any:
    """The JSON body of an ``httpx.Response``, ``None`` when empty or not JSON (error bodies need not be
    JSON)."""
    if not response.content:
        return None
    try:
        return response.json()
    except ValueError:
        return None
