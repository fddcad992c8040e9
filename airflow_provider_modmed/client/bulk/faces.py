"""The bulk export on the two faces of the FHIR client: :class:`BulkExportClient` (sync: downloads in a
thread pool) and :class:`AsyncBulkExportClient` (async: downloads as anyio tasks). Each method builds a
flow (:mod:`.flows`) and hands it to the FHIR client, which runs every step kind itself."""

from __future__ import annotations

from typing import Any, Generic, TypeVar

from airflow_provider_modmed.client._flows import FhirContext
from airflow_provider_modmed.client.bulk.flows import (
    DownloadPolicy,
    PollPolicy,
    cancel,
    export,
    finish,
    kick_off,
    poll_status,
    start,
)
from airflow_provider_modmed.client.bulk.manifest import Manifest
from airflow_provider_modmed.client.bulk.request import ExportRequest
from airflow_provider_modmed.client.bulk.run import ExportRun
from airflow_provider_modmed.client.drivers import Flow
from airflow_provider_modmed.client.fhir import AsyncFhirClient, FhirClient

T = TypeVar("T")
C = TypeVar("C", FhirClient, AsyncFhirClient)


class _BulkFace(Generic[C]):
    """What both faces share: the FHIR client, its context and the policies."""

    def __init__(self, client: C, *, poll: PollPolicy | None = None, download: DownloadPolicy | None = None,
                 max_restarts: int = 2) -> None:
        self.client: C = client
        self.context: FhirContext = client.context
        self.poll_policy = poll or PollPolicy()
        self.download_policy = download or DownloadPolicy()
        self.max_restarts = max_restarts

    def run_for(self, folder: Any, request: ExportRequest) -> ExportRun:
        """The :class:`ExportRun` of ``request`` in ``folder`` (pre-flight first: no storage touched if the
        connection cannot export)."""
        request.preflight(self.context)
        return ExportRun(folder, request)

    def _export(self, request: ExportRequest, folder: Any, logger: Any) -> Flow[dict[str, Any]]:
        return export(self.context, self.run_for(folder, request), self.poll_policy, self.download_policy,
                      self.max_restarts, logger)


class BulkExportClient(_BulkFace[FhirClient]):
    """Bulk export on the sync face of a :class:`~airflow_provider_modmed.client.fhir.FhirClient`.

    Downloads run in a pool of ``download.concurrency`` threads sharing the client's connection pool::

        with FhirClient(config) as fhir:
            result = BulkExportClient(fhir).export(ExportRequest(types=("Patient",)), Path("/data/run1"))
    """

    def run(self, flow: Flow[T]) -> T:
        """Drive any bulk flow to its result."""
        return self.client.run(flow)

    def kick_off(self, request: ExportRequest) -> str:
        """Kick off; answers the status URL (save it before anything else)."""
        return self.run(kick_off(self.context, request, policy=self.poll_policy))

    def poll(self, status_url: str, logger: Any = None) -> Manifest:
        """Poll until the manifest."""
        return self.run(poll_status(status_url, self.poll_policy, logger))

    def cancel(self, status_url: str) -> bool:
        """DELETE the job; False when it was already gone."""
        return self.run(cancel(status_url))

    def start(self, run: ExportRun) -> str:
        """Resume the run's saved job or kick off (and save) a new one; answers the status URL."""
        return self.run(start(self.context, run, self.poll_policy))

    def finish(self, run: ExportRun, status_url: str, logger: Any = None) -> dict[str, Any]:
        """Manifest, downloads, summary, release on the server."""
        return self.run(finish(run, status_url, self.poll_policy, self.download_policy, logger))

    def export(self, request: ExportRequest, folder: Any, logger: Any = None) -> dict[str, Any]:
        """The whole export into ``folder`` (resumable: run it again after a crash)."""
        return self.run(self._export(request, folder, logger))


class AsyncBulkExportClient(_BulkFace[AsyncFhirClient]):
    """Bulk export on the async face of an :class:`~airflow_provider_modmed.client.fhir.AsyncFhirClient`
    (triggers poll with it). Same flows; downloads run as anyio tasks, ``download.concurrency`` at a time.
    Storage writes are blocking calls (fine on a worker; the triggerer only polls)."""

    async def run(self, flow: Flow[T]) -> T:
        """Drive any bulk flow to its result."""
        return await self.client.run(flow)

    async def kick_off(self, request: ExportRequest) -> str:
        return await self.run(kick_off(self.context, request, policy=self.poll_policy))

    async def poll(self, status_url: str, logger: Any = None) -> Manifest:
        return await self.run(poll_status(status_url, self.poll_policy, logger))

    async def cancel(self, status_url: str) -> bool:
        return await self.run(cancel(status_url))

    async def start(self, run: ExportRun) -> str:
        return await self.run(start(self.context, run, self.poll_policy))

    async def finish(self, run: ExportRun, status_url: str, logger: Any = None) -> dict[str, Any]:
        return await self.run(finish(run, status_url, self.poll_policy, self.download_policy, logger))

    async def export(self, request: ExportRequest, folder: Any, logger: Any = None) -> dict[str, Any]:
        return await self.run(self._export(request, folder, logger))
