"""The retry policy: one tenacity kwargs dict, driving ``Retrying`` (sync) and ``AsyncRetrying`` (async).

What is retried, and when:

* 429 on any method: the server refused the call before acting on it. ModMed sends no ``Retry-After``,
  so the wait is jittered exponential backoff; a ``Retry-After`` (seconds or HTTP-date) is honoured and
  clamped (:func:`retry_after_seconds`).
* 500/502/503/504, timeouts and broken connections: only when resending is safe: an idempotent method,
  a POST the caller marked safe (conditional create with ``If-None-Exist``, a ChargeItem carrying its
  ``transactionId``), or a token request.
* Connect errors and pool timeouts on any method: the request never left.
* :class:`ServerError`/:class:`RateLimitedError` raised by the auth flow: the token endpoint failed, so
  the FHIR request never left.
"""

from __future__ import annotations

import email.utils
import logging
import random
import ssl
import time
from typing import Any, TypeVar

import httpx
from tenacity import RetryCallState, retry_if_exception, retry_if_result, stop_after_attempt

from airflow_provider_modmed.errors import RateLimitedError, ServerError

log = logging.getLogger("airflow_provider_modmed.client")

#: statuses worth another try
RETRYABLE_STATUSES = frozenset({429, 500, 502, 503, 504})
#: methods that may be resent after the server may have acted on them
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})
#: request extension: the flow knows this non-idempotent request is safe to resend
SAFE_TO_RETRY = "modmed.safe_to_retry"
#: request extension: a token or discovery request made by an auth flow
TOKEN_REQUEST = "modmed.token_request"  # noqa: S105
#: request extension: what the call is, for logs and errors ("read Patient"); never ids or values
WHAT = "modmed.what"
#: request extension set by the faces: how many times this request has been sent (1 on the first try)
ATTEMPT = "modmed.attempt"
#: request extension set by the retry policy: how many earlier attempts were refused before the server
#: acted (429) or never left (connect errors, a failed token request); they do not make a resend
REFUSED = "modmed.refused"
#: request extension: send once; never resend automatically (e.g. the bulk kick-off: a 5xx or a timeout
#: may mean the server acted on it)
NO_RESEND = "modmed.no_resend"
#: request extension: the flow decides what a failed answer means and when to ask again (bulk status
#: polls: transient OperationOutcome, ``max_poll_errors``); the face sends it once, outside this policy,
#: and hands back every answer (a request that got none raises :class:`TransportError` into the flow)
FLOW_RETRIES = "modmed.flow_retries"

#: defaults: first backoff, largest backoff (seconds)
BACKOFF_INITIAL = 0.5
BACKOFF_MAX = 30.0
#: the longest ``Retry-After`` honoured on a refusal (429, 503): a throttled call, a bulk kick-off
#: included, waits at most this long per try (5 throttled kick-offs: 10 minutes in all, not 50)
RETRY_AFTER_CAP = 120.0
#: THE cap of every wait the client makes (generic retries, bulk status polls, file downloads): no policy,
#: argument or server header makes one wait longer
MAX_WAIT = 600.0
#: a ``Retry-After`` number above this is not a delay but an instant (seconds since the epoch): some
#: servers send ``time() + delay``
EPOCH_THRESHOLD = 1e9
#: statuses whose ``Retry-After`` means "refused, come back later" (capped at ``RETRY_AFTER_CAP``)
REFUSALS = frozenset({429, 503})


def describe(request: httpx.Request | None) -> str:
    """``"read Patient"``-style label of a request, safe to log."""
    if request is None:
        return "request"
    what = request.extensions.get(WHAT)
    return str(what) if what else request.method


def was_resent(response: httpx.Response) -> bool:
    """Whether ``response`` answers a resend after an attempt that may have landed (its answer lost), so
    a flow may meet its own write (412 on If-Match, 404/410 on delete). Earlier attempts refused with
    429 or that never left (:data:`REFUSED`) do not count."""
    try:
        request = response.request
    except RuntimeError:  # a canned response without a request
        return False
    return int(request.extensions.get(ATTEMPT, 1)) - int(request.extensions.get(REFUSED, 0)) > 1


def is_safe_to_resend(request: httpx.Request) -> bool:
    """Whether resending ``request`` cannot create a duplicate."""
    ext = request.extensions
    return (
        request.method in IDEMPOTENT_METHODS
        or bool(ext.get(SAFE_TO_RETRY))
        or bool(ext.get(TOKEN_REQUEST))
        or "If-None-Exist" in request.headers
    )


def should_retry_response(response: httpx.Response) -> bool:
    """Retry decision for an answer (the request reached the server)."""
    status = response.status_code
    if status == 429:
        return True
    return status in RETRYABLE_STATUSES and is_safe_to_resend(response.request)


def _request_of(exc: BaseException) -> httpx.Request | None:
    try:
        return exc.request if isinstance(exc, httpx.RequestError) else None
    except RuntimeError:  # httpx raises when no request was attached
        return None


E = TypeVar("E", bound=BaseException)


def cause_of(exc: BaseException | None, kind: type[E]) -> E | None:
    """The first exception of ``kind`` in ``exc``'s chain of causes (httpx -> httpcore -> ssl/OSError)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, kind):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def tls_verify_failure(exc: BaseException | None) -> ssl.SSLCertVerificationError | None:
    """The certificate verification error behind ``exc`` (httpx -> httpcore -> ssl), if that is what it is."""
    return cause_of(exc, ssl.SSLCertVerificationError)


def should_retry_exception(exc: BaseException) -> bool:
    """Retry decision for a call that got no usable answer."""
    if tls_verify_failure(exc) is not None:
        return False  # an untrusted certificate stays untrusted: no retry
    if isinstance(exc, (ServerError, RateLimitedError)):
        return True  # raised by the auth flow's token request: the FHIR request never left
    if isinstance(exc, httpx.ProxyError):  # the tunnel did not open: nothing reached the server
        return bool(getattr(exc, "transient", False))  # egress.ProxyRefused: 502/503/504, not 407/403
    if isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)):
        return True  # never left
    if isinstance(exc, (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError)):
        request = _request_of(exc)
        return request is not None and is_safe_to_resend(request)
    return False


def retry_after_seconds(response: httpx.Response, cap: float = MAX_WAIT,
                        now: float | None = None) -> float | None:
    """The wait the answer's ``Retry-After`` asks for, in seconds; None when it asks for no usable wait.

    * a delay in seconds (``"7"``, ``"1.5"``); a number above ``EPOCH_THRESHOLD`` (10^9) is an instant
      in seconds since the epoch, waited until;
    * an HTTP-date, waited until;
    * absent, unparsable, zero, negative or in the past: None, so the caller uses its normal backoff
      (never a retry with no wait at all).

    The wait is clamped to ``cap`` and :data:`MAX_WAIT`, and on a refusal (429, 503) to
    :data:`RETRY_AFTER_CAP`.
    """
    raw = response.headers.get("Retry-After")
    if raw is None:
        return None
    raw = raw.strip()
    current = time.time() if now is None else now
    seconds: float
    try:
        seconds = float(raw)
    except ValueError:
        try:
            seconds = email.utils.parsedate_to_datetime(raw).timestamp() - current
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
    else:
        if seconds > EPOCH_THRESHOLD:
            seconds -= current
    if not seconds > 0:  # zero, negative, in the past, NaN
        return None
    limit = min(cap, MAX_WAIT, RETRY_AFTER_CAP if response.status_code in REFUSALS else MAX_WAIT)
    return min(seconds, limit)


def backoff(attempt: int, initial: float, maximum: float, *, factor: float = 2.0, floor: float = 0.0,
            retry_after: float | None = None, retry_after_cap: float | None = None) -> float:
    """The one backoff formula: the wait after failure number ``attempt`` (1 for the first).

    The server's ``retry_after`` when it gave one (clamped to ``retry_after_cap``, default ``maximum``),
    else ``initial * factor ** (attempt - 1)`` clamped to ``maximum``; never below ``floor``, and never
    above :data:`MAX_WAIT` whatever the arguments.
    """
    maximum, floor = min(maximum, MAX_WAIT), min(floor, MAX_WAIT)
    if retry_after is not None and retry_after > 0:
        cap = maximum if retry_after_cap is None else min(retry_after_cap, MAX_WAIT)
        return max(floor, min(retry_after, cap))
    try:
        seconds = initial * factor ** max(0, attempt - 1)
    except OverflowError:
        seconds = maximum
    return max(floor, min(maximum, seconds))


class RetryAfterOrBackoff:
    """tenacity wait: the answer's ``Retry-After`` when present, else :func:`backoff` plus up to
    ``initial`` seconds of jitter."""

    def __init__(self, initial: float = BACKOFF_INITIAL, maximum: float = BACKOFF_MAX,
                 retry_after_cap: float = RETRY_AFTER_CAP) -> None:
        self.initial = initial
        self.maximum = maximum
        self.retry_after_cap = retry_after_cap

    def __call__(self, retry_state: RetryCallState) -> float:
        outcome = retry_state.outcome
        if outcome is not None and not outcome.failed:
            result = outcome.result()
            if isinstance(result, httpx.Response):
                seconds = retry_after_seconds(result, self.retry_after_cap)
                if seconds is not None:
                    return backoff(retry_state.attempt_number, self.initial, self.maximum, retry_after=seconds,
                                   retry_after_cap=self.retry_after_cap)
        jittered = backoff(retry_state.attempt_number, self.initial, self.maximum) + random.uniform(0, self.initial)
        return min(self.maximum, MAX_WAIT, jittered)


def _give_up(retry_state: RetryCallState) -> Any:
    """Out of attempts: hand back the last answer (the caller maps it to a typed error) or re-raise."""
    assert retry_state.outcome is not None
    return retry_state.outcome.result()


def _never_acted(retry_state: RetryCallState) -> bool:
    """Whether the attempt that just failed cannot have been acted on: a 429, or no request left."""
    outcome = retry_state.outcome
    if outcome is None:
        return False
    if not outcome.failed:
        result = outcome.result()
        return isinstance(result, httpx.Response) and result.status_code == 429
    exc = outcome.exception()
    return isinstance(exc, (ServerError, RateLimitedError, httpx.ConnectError, httpx.ConnectTimeout,
                            httpx.PoolTimeout))


def _before_sleep(retry_state: RetryCallState) -> None:
    """Count an attempt the server never acted on (for :func:`was_resent`), then log the retry."""
    request = retry_state.args[0] if retry_state.args else None
    if isinstance(request, httpx.Request) and _never_acted(retry_state):
        request.extensions[REFUSED] = int(request.extensions.get(REFUSED, 0)) + 1
    _log_retry(retry_state)


def _log_retry(retry_state: RetryCallState) -> None:
    outcome = retry_state.outcome
    wait = retry_state.next_action.sleep if retry_state.next_action else 0.0
    if outcome is None:
        return
    if outcome.failed:
        exc = outcome.exception()
        why, what = type(exc).__name__, describe(_request_of(exc) if exc else None)
    else:
        result = outcome.result()
        why, what = f"HTTP {result.status_code}", describe(result.request)
    log.warning("modmed: %s got %s; retry %d in %.2fs", what, why, retry_state.attempt_number, wait)


def retry_kwargs(max_retries: int = 5, *, initial: float = BACKOFF_INITIAL, maximum: float = BACKOFF_MAX,
                 retry_after_cap: float = RETRY_AFTER_CAP) -> dict[str, Any]:
    """The one policy: ``Retrying(**retry_kwargs())`` and ``AsyncRetrying(**retry_kwargs())``.

    The retried call is ``send_once(request)`` and returns an ``httpx.Response``; when attempts run out
    the last response is returned (the flow turns it into a typed error) and the last exception is
    re-raised. Waits: :class:`RetryAfterOrBackoff`, each at most :data:`MAX_WAIT`. Before each retry an
    attempt the server never acted on is counted on the request (:data:`REFUSED`, read by
    :func:`was_resent`).
    """
    return {
        "stop": stop_after_attempt(max_retries + 1),
        "wait": RetryAfterOrBackoff(initial, maximum, retry_after_cap),
        "retry": retry_if_exception(should_retry_exception) | retry_if_result(should_retry_response),
        "retry_error_callback": _give_up,
        "before_sleep": _before_sleep,
        "reraise": True,
    }
