"""Everything the sandbox remembers between requests, besides resources: config, tokens, faults, counters."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar, cast, overload

from airflow_provider_modmed.profile import PROPRIETARY_ENVIRONMENTS, PUBLIC_SANDBOX_FIRM, environment_path
from airflow_provider_modmed.sandbox.store import Store

#: the environment base paths the proprietary track answers on (``/ema-dev/firm``, ...), as ModMed's hosts do
ENVIRONMENT_PATHS = tuple(environment_path(name) for name in PROPRIETARY_ENVIRONMENTS)


@dataclass
class SandboxConfig:
    """Start-up settings of one sandbox (the ``modmed-sandbox serve`` flags)."""

    host: str = "127.0.0.1"
    port: int = 8899
    storage_port: int = 0
    data_dir: Path | None = None
    patients: int = 100
    seed: int = 0
    firm: str = PUBLIC_SANDBOX_FIRM
    #: practices (firms) served: practice 1 is ``firm``, practice ``i`` is ``{firm}{i}`` with its own key,
    #: credentials, seeded data (seed ``seed + i - 1``) and rate budget (:func:`.credentials.practice_firms`)
    practices: int = 1
    rate_limit_per_minute: int = 1000
    #: the rate limit's window: 60 s as at ModMed; tests shorten it
    rate_limit_window_seconds: float = 60.0
    token_ttl: float = 3600.0
    certified_token_ttl: float = 1800.0
    keycloak_token_ttl: float = 900.0
    latency_ms: float = 0.0
    presign_ttl: float = 300.0
    #: seconds a bulk export job "runs" before its manifest is ready
    export_seconds: float = 1.0
    #: Retry-After the status endpoint answers while a job runs
    export_retry_after: int = 1
    #: proprietary password-grant answers carry no expires_in (ModMed's quirk)
    omit_expires_in: bool = True
    credential_overrides: dict[str, str] = field(default_factory=dict)
    #: listening beyond loopback is refused unless this is set (``--allow-remote``)
    allow_remote: bool = False
    #: when set, ``/_sandbox/*`` answers only requests carrying it (generated for a remote listener)
    admin_token: str | None = field(default=None, repr=False)


@dataclass
class Token:
    """An issued access token."""

    value: str
    track: str  # proprietary | certified
    subject: str
    expires_at: float
    scopes: tuple[str, ...] = ()
    api_key: str | None = None
    #: the firm (practice) the token was issued for: it opens that practice only
    firm: str = ""


@dataclass
class Faults:
    """Switchable misbehaviour, set through ``POST /_sandbox/faults`` or CLI flags."""

    latency_ms: float = 0.0
    #: answer the next `count` API calls with `status` (OperationOutcome body unless bodiless)
    fail_status: int = 503
    fail_count: int = 0
    fail_bodiless: bool = False
    #: only calls whose path contains this string are failed (empty: any API call)
    fail_path: str = ""
    #: the next N FHIR calls answer 429 regardless of budget
    rate_storm: int = 0
    #: the next N FHIR answers are cut mid-body (connection dropped)
    drop_next: int = 0
    #: the next N storage downloads are truncated mid-body
    truncate_downloads: int = 0
    slow_download_ms: float = 0.0
    #: bulk files stream this many lines per HTTP chunk (chunked encoding, no Content-Length); 0: large
    #: chunks. 1 is a server that sends one chunk per resource
    bulk_chunk_lines: int = 0
    #: bulk files are sent gzip-encoded (``Content-Encoding: gzip``) to clients that accept it
    bulk_gzip: bool = False
    #: >= 0: every manifest ``error`` entry states this ``count`` (servers that copy the count of the output
    #: file that failed); -1: the true line count
    bulk_error_count: int = -1
    #: creates answer 201 with an empty body and only Location
    empty_create_body: bool = False
    #: the server clock runs this many milliseconds off the real clock
    clock_offset_ms: int = 0
    #: the next N successful FHIR answers are replaced by malformed JSON
    malformed_next: int = 0
    #: the next N successful FHIR answers carry a resource of the wrong resourceType
    wrong_type_next: int = 0

    def update(self, values: dict[str, Any]) -> None:
        for key, value in values.items():
            if key == "fail_next":
                self.fail_status = int(value.get("status", 503))
                self.fail_count = int(value.get("count", 1))
                self.fail_bodiless = bool(value.get("bodiless", False))
                self.fail_path = str(value.get("path", ""))
            elif key in ("expire_tokens", "expire_presigned", "revoke_refresh_tokens"):
                continue  # actions, handled by SandboxState.apply_faults
            elif hasattr(self, key):
                setattr(self, key, type(getattr(self, key))(value))
            else:
                raise KeyError(key)


_V = TypeVar("_V")


class _OnRoot(Generic[_V]):
    """An attribute every practice shares: read and written as ``_<name>`` on the root practice."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.attr = f"_{name}"

    @overload
    def __get__(self, obj: None, objtype: type | None = None) -> _OnRoot[_V]: ...
    @overload
    def __get__(self, obj: SandboxState, objtype: type | None = None) -> _V: ...
    def __get__(self, obj: SandboxState | None, objtype: type | None = None) -> _V | _OnRoot[_V]:
        return self if obj is None else cast(_V, getattr(obj.root, self.attr))

    def __set__(self, obj: SandboxState, value: _V) -> None:
        setattr(obj.root, self.attr, value)


def key_label(api_key: str) -> str:
    """The name an API key goes by in the stats (``requests:<label>``): a digest, never the key."""
    return hashlib.sha256(api_key.encode()).hexdigest()[:12]


class SandboxState:
    """One practice's state, shared by the API and the storage listener.

    A sandbox serving several practices holds one ``SandboxState`` per practice (its store, credentials,
    refresh tokens, rate windows and export jobs); the first, the *root*, also owns what the whole sandbox
    shares (faults, counters, tokens, presigned uploads, URLs), which the others reach through ``root``.
    """

    def __init__(self, config: SandboxConfig, store: Store, credentials: Any, *,
                 root: SandboxState | None = None) -> None:
        self.config = config
        self.store = store
        self.credentials = credentials
        self.root: SandboxState = root or self
        self.refresh_tokens: dict[str, str] = {}  # refresh token -> username
        self.refresh_tokens_by_user: dict[str, str] = {}
        self._windows: dict[str, deque[float]] = {}
        self._peaks: dict[str, int] = {}  # API key -> the most calls its window has held
        self.exports: Any = None  # BulkExports, set by build_state
        # sandbox-wide: a further practice shares the root's
        self.practices: list[SandboxState] = root.practices if root else []
        self.practices.append(self)
        self.tokens: dict[str, Token] = root.tokens if root else {}
        self.seen_jti: dict[str, float] = root.seen_jti if root else {}
        self.stats: Counter[str] = root.stats if root else Counter()
        #: the raw paths (and query strings) of the last API requests, for tests of path safety
        self.recent_requests: deque[str] = root.recent_requests if root else deque(maxlen=200)
        self.lock: threading.RLock = root.lock if root else threading.RLock()
        self.signing_key: bytes = root.signing_key if root else secrets.token_bytes(32)
        self.uploads: dict[str, bytes] = root.uploads if root else {}
        # read and written through the properties below, on the root only
        self._faults = Faults(latency_ms=config.latency_ms)
        #: presigned URLs issued before this instant (µs) are expired by the expire_presigned fault
        self._presign_revoked_before = 0
        self._api_url = ""
        self._storage_url = ""

    # -- what the practices share (kept on the root) -------------------------------------------
    @property
    def firm(self) -> str:
        """This practice's firm URL prefix."""
        return str(self.credentials.firm)

    faults: _OnRoot[Faults] = _OnRoot()
    presign_revoked_before: _OnRoot[int] = _OnRoot()
    api_url: _OnRoot[str] = _OnRoot()
    storage_url: _OnRoot[str] = _OnRoot()

    def practice(self, firm: str) -> SandboxState | None:
        """The practice served under ``firm`` (``None``: no such firm URL prefix)."""
        return next((p for p in self.practices if p.firm == firm), None)

    # -- clock -------------------------------------------------------------------------------
    def now(self) -> float:
        return time.time() + self.faults.clock_offset_ms / 1000

    def now_ms(self) -> int:
        return int(self.now() * 1000)

    # -- tokens ------------------------------------------------------------------------------
    def issue(self, track: str, subject: str, ttl: float, scopes: tuple[str, ...] = (),
              api_key: str | None = None) -> Token:
        token = Token(secrets.token_urlsafe(32), track, subject, time.time() + ttl, scopes, api_key, self.firm)
        with self.lock:
            self.tokens[token.value] = token
        return token

    def valid_token(self, value: str, track: str) -> Token | None:
        token = self.tokens.get(value)
        if token is None or token.track != track or token.firm != self.firm or token.expires_at <= time.time():
            return None
        return token

    def expire_tokens(self) -> None:
        with self.lock:
            for token in self.tokens.values():
                token.expires_at = 0.0

    # -- rate limit (per API key, per minute, moving window; each practice keeps its own windows) -----
    def take_budget(self, api_key: str) -> bool:
        limit = self.config.rate_limit_per_minute
        now = time.monotonic()
        with self.lock:
            window = self._windows.setdefault(api_key, deque())
            while window and window[0] <= now - self.config.rate_limit_window_seconds:
                window.popleft()
            if len(window) >= limit:
                return False
            window.append(now)
            self._peaks[api_key] = max(self._peaks.get(api_key, 0), len(window))
            return True

    def peak_calls(self, api_key: str) -> int:
        """The most calls ``api_key`` made in any rate-limit window (60 s) since the sandbox started."""
        with self.lock:
            return self._peaks.get(api_key, 0)

    def budget_figures(self) -> dict[str, dict[str, int]]:
        """Per practice (firm): its API key's FHIR calls, 429s and the most calls in any rate-limit window."""
        figures = {}
        for practice in self.practices:
            key = practice.credentials.api_key
            label = key_label(key)
            figures[practice.firm] = {"calls": self.stats[f"requests:{label}"],
                                      "throttled": self.stats[f"throttled:{label}"],
                                      "peak_window": practice.peak_calls(key)}
        return figures

    # -- presigned URLs ----------------------------------------------------------------------
    def sign(self, path: str, issued: int, expires: int) -> str:
        message = f"{path}\n{issued}\n{expires}".encode()
        return hmac.new(self.signing_key, message, hashlib.sha256).hexdigest()

    def presign(self, path: str, ttl: float | None = None) -> str:
        """A URL on the storage listener, valid for ``ttl`` seconds (default: ``--presign-ttl``)."""
        issued = time.time_ns() // 1000
        expires = int(time.time() + (self.config.presign_ttl if ttl is None else ttl))
        return (f"{self.storage_url}{path}?X-Amz-Date={issued}&X-Amz-Expires={expires}"
                f"&X-Amz-Signature={self.sign(path, issued, expires)}")

    def check_presigned(self, path: str, issued: str, expires: str, signature: str) -> str | None:
        """None when valid, else the reason."""
        try:
            iss, exp = int(issued), int(expires)
        except ValueError:
            return "AuthorizationQueryParametersError"
        if not hmac.compare_digest(self.sign(path, iss, exp), signature or ""):
            return "SignatureDoesNotMatch"
        if exp <= time.time() or iss <= self.presign_revoked_before:
            return "Request has expired"
        return None

    def credentials_document(self) -> dict[str, Any]:
        from airflow_provider_modmed.sandbox.credentials import practices_document

        return practices_document([p.credentials for p in self.practices], api_url=self.api_url,
                                  storage_url=self.storage_url)

    def revoke_refresh_tokens(self) -> None:
        with self.lock:
            for practice in self.practices:
                practice.refresh_tokens.clear()
                practice.refresh_tokens_by_user.clear()

    def apply_faults(self, values: dict[str, Any]) -> None:
        with self.lock:
            self.faults.update(values)
            if values.get("expire_tokens"):
                self.expire_tokens()
            if values.get("revoke_refresh_tokens"):
                self.revoke_refresh_tokens()
            if values.get("expire_presigned"):
                self.presign_revoked_before = time.time_ns() // 1000

    def reset_faults(self) -> None:
        with self.lock:
            self.faults = Faults()
            self.presign_revoked_before = 0
