"""The step kinds flows yield, and the one pair of drivers that runs them: one loop per face.

A flow is a generator that yields steps and returns a result; it holds no client and never sleeps:

* ``httpx.Request``: the face sends it (built through its ``httpx`` client, rate budget, auth, retries)
  and answers the ``Response``;
* :class:`Sleep`: the face sleeps (``time.sleep`` or ``anyio.sleep``) and answers ``None``;
* :class:`Fetch`: the face streams a file's (decoded) body into a :class:`Sink` and answers a
  :class:`Fetched`;
* :class:`Parallel`: the face runs several flows, ``limit`` at a time, and answers their exceptions;
* :class:`Emit`: :func:`iterate`/:func:`aiterate` hand the value to the caller (one resource at a time).

A :class:`~airflow_provider_modmed.errors.ModMedError` raised while a step runs is thrown into the flow,
which may handle it (a flow that does not simply raises it on). The sync loop is :func:`iterate` (a
generator that yields the emitted values and returns the result); the async loop is :func:`_aiterate`
(an async generator that stores the result). :func:`drive`, :func:`adrive` and :func:`aiterate` are thin
wrappers over them, so a new step kind touches :func:`_action` and the two faces, nothing else.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Generator, Iterable
from dataclasses import dataclass
from functools import partial
from types import TracebackType
from typing import Any, Protocol, TypeVar

import httpx

from airflow_provider_modmed.client.retry import retry_after_seconds
from airflow_provider_modmed.errors import ModMedError

T = TypeVar("T")


# -- step kinds ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Sleep:
    """A flow step: wait ``seconds`` before going on."""

    seconds: float


@dataclass(frozen=True)
class Emit:
    """A flow step: hand ``value`` to the caller of :func:`iterate`/:func:`aiterate`."""

    value: Any


class Sink(Protocol):
    """Where a :class:`Fetch` streams a body: ``open``, ``write`` each decoded chunk, ``close`` (which may
    raise :class:`ModMedError` when the content is not what was promised), or ``abort``."""

    def open(self) -> None: ...

    def write(self, chunk: bytes) -> None: ...

    def close(self) -> None: ...

    def abort(self) -> None: ...


@dataclass(frozen=True)
class Fetch:
    """A flow step: GET ``request`` (redirects followed, credentials per the auth's origin rule) and
    stream the decoded body into ``sink``. The face answers a :class:`Fetched`."""

    request: httpx.Request
    sink: Sink


@dataclass(frozen=True)
class Fetched:
    """What happened to a :class:`Fetch`: the status (None: no answer), the error kind, Retry-After."""

    status_code: int | None
    error: str | None = None
    verification: bool = False
    retry_after: float | None = None

    @property
    def ok(self) -> bool:
        return self.status_code == 200 and self.error is None

    def describe(self) -> str:
        if self.error:
            return self.error if self.verification else f"{self.error} (transfer broken)"
        return f"HTTP {self.status_code}"

    @classmethod
    def failure(cls, exc: BaseException) -> Fetched:
        """A refused body (the sink raised :class:`ModMedError`) or a broken transfer."""
        if isinstance(exc, ModMedError):
            return cls(200, str(exc), verification=True)
        return cls(None, type(exc).__name__)


@dataclass(frozen=True)
class Parallel:
    """A flow step: run ``flows`` (consumed lazily: one at a time as a slot frees), ``limit`` at a time;
    the face answers the list of exceptions the flows raised (empty: all succeeded). Results are not
    kept: flows record what they did (checkpoints), so memory does not grow with the number of flows."""

    flows: Iterable[Flow[Any]]
    limit: int = 4


Step = httpx.Request | Sleep | Emit | Fetch | Parallel
Flow = Generator[Step, Any, T]


# -- the faces -----------------------------------------------------------------------------------

class Face(Protocol):
    """What the sync driver needs of a face (:class:`~airflow_provider_modmed.client.fhir.FhirClient`)."""

    def send(self, request: httpx.Request) -> httpx.Response: ...

    def sleep(self, seconds: float) -> Any: ...

    def fetch(self, step: Fetch) -> Fetched: ...

    def parallel(self, step: Parallel) -> list[Exception]: ...


class AsyncFace(Protocol):
    """What the async driver needs of a face (:class:`~airflow_provider_modmed.client.fhir.AsyncFhirClient`)."""

    async def send(self, request: httpx.Request) -> httpx.Response: ...

    async def sleep(self, seconds: float) -> Any: ...

    async def fetch(self, step: Fetch) -> Fetched: ...

    async def parallel(self, step: Parallel) -> list[Exception]: ...


def _action(face: Any, step: Step) -> Callable[[], Any]:
    """The face's call for ``step`` (the sync driver calls it, the async driver awaits it)."""
    if isinstance(step, httpx.Request):
        return partial(face.send, step)
    if isinstance(step, Sleep):
        return partial(face.sleep, step.seconds)
    if isinstance(step, Fetch):
        return partial(face.fetch, step)
    if isinstance(step, Parallel):
        return partial(face.parallel, step)
    raise TypeError(f"unknown flow step {type(step).__name__}")


class _Run:
    """What both loops share: advance the flow with the last answer (or throw the last error into it),
    remember the result, close the flow on the way out."""

    def __init__(self, flow: Flow[Any]) -> None:
        self.flow = flow
        self.out: Any = None
        self.error: ModMedError | None = None
        self.result: Any = None

    def __enter__(self) -> _Run:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.flow.close()

    def next(self) -> Step | None:
        """The flow's next step, or None when it returned (its value is in :attr:`result`)."""
        try:
            step = self.flow.throw(self.error) if self.error is not None else self.flow.send(self.out)
        except StopIteration as done:
            self.result = done.value
            return None
        self.out = self.error = None
        return step

    def settle(self, call: Callable[[], Any]) -> None:
        try:
            self.out = call()
        except ModMedError as exc:
            self.error = exc

    async def asettle(self, call: Callable[[], Awaitable[Any]]) -> None:
        try:
            self.out = await call()
        except ModMedError as exc:
            self.error = exc


# -- the sync face -------------------------------------------------------------------------------

def iterate(flow: Flow[T], face: Face) -> Generator[Any, None, T]:
    """THE sync loop: run ``flow`` on ``face``, yielding each :class:`Emit` value; returns its result."""
    with _Run(flow) as run:
        while (step := run.next()) is not None:
            if isinstance(step, Emit):
                yield step.value
            else:
                run.settle(_action(face, step))
    result: T = run.result
    return result


def drive(flow: Flow[T], face: Face) -> T:
    """Run ``flow`` to its result on the sync face (it must not emit values)."""
    steps = iterate(flow, face)
    try:
        next(steps)
    except StopIteration as done:
        result: T = done.value
        return result
    steps.close()
    raise TypeError("drive() got an Emit step; use iterate() for flows that yield values")


# -- the async face ------------------------------------------------------------------------------

async def _aiterate(flow: Flow[Any], face: AsyncFace, box: list[Any]) -> AsyncGenerator[Any, None]:
    """THE async loop: :func:`iterate` awaited; the result goes into ``box``."""
    with _Run(flow) as run:
        while (step := run.next()) is not None:
            if isinstance(step, Emit):
                yield step.value
            else:
                await run.asettle(_action(face, step))
    box.append(run.result)


def aiterate(flow: Flow[Any], face: AsyncFace) -> AsyncIterator[Any]:
    """Run ``flow`` on the async face, yielding each :class:`Emit` value as it comes."""
    return _aiterate(flow, face, [])


async def adrive(flow: Flow[T], face: AsyncFace) -> T:
    """Run ``flow`` to its result on the async face (it must not emit values)."""
    box: list[T] = []
    steps = _aiterate(flow, face, box)
    async for _ in steps:
        await steps.aclose()
        raise TypeError("adrive() got an Emit step; use aiterate() for flows that yield values")
    return box[0]


# -- what both faces do with a Fetch -------------------------------------------------------------

class Download(contextlib.AbstractContextManager["Download"]):
    """The face-independent half of a :class:`Fetch`: the face sends the request inside ``with``, calls
    :meth:`accept` with the answer and, if it is accepted, :meth:`write` with each decoded chunk. On the
    way out the sink is closed (verified) or aborted, and :attr:`fetched` holds the outcome: transport
    errors and refused bodies become a failed :class:`Fetched`; anything else (a cancellation) propagates
    after the partial file is dropped."""

    def __init__(self, step: Fetch) -> None:
        self.sink = step.sink
        self.fetched = Fetched(None, "no answer")
        self._open = False

    def accept(self, response: httpx.Response) -> bool:
        if response.status_code != 200:
            self.fetched = Fetched(response.status_code, retry_after=retry_after_seconds(response))
            return False
        self.sink.open()
        self._open = True
        return True

    def write(self, chunk: bytes) -> None:
        self.sink.write(chunk)

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> bool:
        if exc is None and self._open:
            try:
                self.sink.close()
                self.fetched = Fetched(200)
            except ModMedError as refused:
                exc = refused
        if exc is None:
            return False
        if self._open:
            self.sink.abort()
        if isinstance(exc, (httpx.HTTPError, ModMedError)):
            self.fetched = Fetched.failure(exc)
            return True
        return False
