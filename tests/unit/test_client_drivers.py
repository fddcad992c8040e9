"""The one pair of drivers (:mod:`airflow_provider_modmed.client.drivers`): the same flows run on the sync
loop and on the async loop against canned faces; every step kind, errors thrown into flows, Emit."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from airflow_provider_modmed.capabilities import Track
from airflow_provider_modmed.client import _flows as flows
from airflow_provider_modmed.client import drivers
from airflow_provider_modmed.client._flows import FhirContext
from airflow_provider_modmed.client.drivers import Emit, Fetch, Fetched, Parallel, Sleep
from airflow_provider_modmed.errors import ModMedError, NotFoundError, ServerError

BASE = "https://stage.ema-api.com/ema-dev/firm/apiportal/ema/fhir/v2"
PROP = FhirContext(Track.PROPRIETARY, BASE)


class Canned:
    """A sync face fed canned answers: records what it was asked to do."""

    def __init__(self, answers: Iterator[Any] | None = None) -> None:
        self.answers = answers if answers is not None else iter(())
        self.slept: list[float] = []
        self.fetched: list[Fetch] = []
        self.parallels: list[Parallel] = []

    def send(self, request: httpx.Request) -> httpx.Response:
        answer = next(self.answers)
        if isinstance(answer, Exception):
            raise answer
        return answer  # type: ignore[no-any-return]

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)

    def fetch(self, step: Fetch) -> Fetched:
        self.fetched.append(step)
        return Fetched(200)

    def parallel(self, step: Parallel) -> list[Exception]:
        self.parallels.append(step)
        return [exc for flow in step.flows for exc in _failure_of(flow, self)]


def _failure_of(flow: Any, face: Any) -> list[Exception]:
    try:
        drivers.drive(flow, face)
    except Exception as exc:
        return [exc]
    return []


class ACanned:
    """:class:`Canned`, awaited."""

    def __init__(self, answers: Iterator[Any] | None = None) -> None:
        self.sync = Canned(answers)

    async def send(self, request: httpx.Request) -> httpx.Response:
        return self.sync.send(request)

    async def sleep(self, seconds: float) -> None:
        self.sync.sleep(seconds)

    async def fetch(self, step: Fetch) -> Fetched:
        return self.sync.fetch(step)

    async def parallel(self, step: Parallel) -> list[Exception]:
        return self.sync.parallel(step)


def _sleepy_flow() -> drivers.Flow[str]:
    first = yield httpx.Request("GET", f"{BASE}/metadata")
    assert (yield Sleep(1.5)) is None
    second = yield httpx.Request("GET", f"{BASE}/metadata")
    return f"{first.status_code}+{second.status_code}"


def test_sync_driver() -> None:
    face = Canned(iter([httpx.Response(202), httpx.Response(200)]))
    assert drivers.drive(_sleepy_flow(), face) == "202+200"
    assert face.slept == [1.5]


async def test_async_driver_same_flow() -> None:
    face = ACanned(iter([httpx.Response(202), httpx.Response(200)]))
    assert await drivers.adrive(_sleepy_flow(), face) == "202+200"
    assert face.sync.slept == [1.5]


def _pager() -> Iterator[httpx.Response]:
    yield httpx.Response(200, json=_bundle(["1", "2"], f"{BASE}/Patient?page=2"))
    yield httpx.Response(200, json=_bundle(["3"], f"{BASE}/Patient?page=3"))
    yield httpx.Response(200, json=_bundle([]))


def _bundle(ids: list[str], next_url: str | None = None) -> dict[str, Any]:
    links = [{"relation": "next", "url": next_url}] if next_url else []
    return {"resourceType": "Bundle", "type": "searchset", "link": links,
            "entry": [{"resource": {"resourceType": "Patient", "id": i}} for i in ids]}


def test_iterate_yields_the_emitted_values_and_returns_the_result() -> None:
    steps = drivers.iterate(flows.search(PROP, "Patient"), Canned(_pager()))
    ids = [next(steps)["id"] for _ in range(3)]
    with pytest.raises(StopIteration) as done:
        next(steps)
    assert ids == ["1", "2", "3"] and done.value.value == 3  # search returns how many it emitted


async def test_aiterate_yields_the_same() -> None:
    ids = [r["id"] async for r in drivers.aiterate(flows.search(PROP, "Patient"), ACanned(_pager()))]
    assert ids == ["1", "2", "3"]


def test_drive_refuses_emitting_flows_and_closes_them() -> None:
    closed: list[bool] = []

    def emitting() -> drivers.Flow[None]:
        try:
            yield Emit(1)
        finally:
            closed.append(True)

    with pytest.raises(TypeError, match="use iterate"):
        drivers.drive(emitting(), Canned())
    assert closed == [True]


async def test_adrive_refuses_emitting_flows() -> None:
    with pytest.raises(TypeError, match="use aiterate"):
        await drivers.adrive(flows.search(PROP, "Patient"), ACanned(_pager()))


def _recovering() -> drivers.Flow[str]:
    """A flow that handles the error of its first request and tries something else."""
    try:
        yield httpx.Request("GET", f"{BASE}/a")
    except ServerError as exc:
        response = yield httpx.Request("GET", f"{BASE}/b")
        return f"recovered from {exc.status_code} with {response.status_code}"
    return "no error"


@pytest.mark.parametrize("face", ["sync", "async"])
async def test_errors_of_a_step_are_thrown_into_the_flow(face: str) -> None:
    answers = iter([ServerError("boom", status_code=503), httpx.Response(200)])
    if face == "sync":
        result = drivers.drive(_recovering(), Canned(answers))
    else:
        result = await drivers.adrive(_recovering(), ACanned(answers))
    assert result == "recovered from 503 with 200"


@pytest.mark.parametrize("face", ["sync", "async"])
async def test_a_flow_that_does_not_catch_raises_the_error(face: str) -> None:
    answers = iter([NotFoundError("gone", status_code=404)])
    run = (drivers.adrive(_sleepy_flow(), ACanned(answers)) if face == "async"
           else _done(drivers.drive, _sleepy_flow(), Canned(answers)))
    with pytest.raises(NotFoundError, match="gone"):
        await run


async def _done(call: Any, *args: Any) -> Any:
    return call(*args)


def test_non_modmed_errors_are_not_thrown_into_the_flow() -> None:
    seen: list[BaseException] = []

    def flow() -> drivers.Flow[None]:
        try:
            yield httpx.Request("GET", f"{BASE}/a")
        except BaseException as exc:  # GeneratorExit from close(), never the KeyError itself
            seen.append(exc)
            raise

    with pytest.raises(KeyError):
        drivers.drive(flow(), Canned(iter([KeyError("x")])))
    assert [type(e) for e in seen] == [GeneratorExit]


def test_unknown_steps_are_refused() -> None:
    def flow() -> Any:
        yield "GET /"

    with pytest.raises(TypeError, match="unknown flow step str"):
        drivers.drive(flow(), Canned())


class _NullSink:
    def open(self) -> None: ...

    def write(self, chunk: bytes) -> None: ...

    def close(self) -> None: ...

    def abort(self) -> None: ...


def _bulk_like() -> drivers.Flow[tuple[bool, list[Exception]]]:
    fetched = yield Fetch(httpx.Request("GET", "https://storage.example/f"), _NullSink())
    failures = yield Parallel((_failing(i) for i in range(3)), limit=2)
    return fetched.ok, failures


def _failing(i: int) -> drivers.Flow[int]:
    yield Sleep(0.1 * i)
    if i == 1:
        raise ModMedError(f"flow {i} failed")
    return i


@pytest.mark.parametrize("face", ["sync", "async"])
async def test_fetch_and_parallel_steps_go_to_the_face(face: str) -> None:
    sync = Canned()
    if face == "sync":
        ok, failures = drivers.drive(_bulk_like(), sync)
    else:
        asynchronous = ACanned()
        sync = asynchronous.sync
        ok, failures = await drivers.adrive(_bulk_like(), asynchronous)
    assert ok and [str(f) for f in failures] == ["flow 1 failed"]
    assert [str(f.request.url) for f in sync.fetched] == ["https://storage.example/f"]
    assert [p.limit for p in sync.parallels] == [2]


class _Sink:
    """A sink that refuses a body containing ``b"bad"`` when closed."""

    def __init__(self, tmp: Path) -> None:
        self.events: list[str] = []
        self.body = b""

    def open(self) -> None:
        self.events.append("open")

    def write(self, chunk: bytes) -> None:
        self.body += chunk

    def close(self) -> None:
        self.events.append("close")
        if b"bad" in self.body:
            raise ModMedError("refused")

    def abort(self) -> None:
        self.events.append("abort")


@pytest.mark.parametrize(("status", "body", "expected", "events"), [
    (200, b"good", Fetched(200), ["open", "close"]),
    (200, b"bad", Fetched(200, "refused", verification=True), ["open", "close", "abort"]),
    (503, b"", Fetched(503, retry_after=2.0), []),
])
def test_download_keeps_the_outcome(tmp_path: Path, status: int, body: bytes, expected: Fetched,
                                    events: list[str]) -> None:
    sink = _Sink(tmp_path)
    step = Fetch(httpx.Request("GET", "https://storage.example/f"), sink)
    with drivers.Download(step) as download:
        response = httpx.Response(status, content=body, headers={"Retry-After": "2"})
        if download.accept(response):
            download.write(response.content)
    assert download.fetched == expected and sink.events == events


def test_download_turns_a_broken_transfer_into_a_failure_and_lets_cancellation_through(tmp_path: Path) -> None:
    sink = _Sink(tmp_path)
    with drivers.Download(Fetch(httpx.Request("GET", "https://s.example/f"), sink)) as download:
        download.accept(httpx.Response(200))
        raise httpx.RemoteProtocolError("peer closed")
    assert download.fetched == Fetched(None, "RemoteProtocolError") and sink.events == ["open", "abort"]
    sink = _Sink(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        _interrupted(sink)
    assert sink.events == ["open", "abort"]


def _interrupted(sink: _Sink) -> None:
    with drivers.Download(Fetch(httpx.Request("GET", "https://s.example/f"), sink)) as download:
        download.accept(httpx.Response(200))
        raise KeyboardInterrupt
