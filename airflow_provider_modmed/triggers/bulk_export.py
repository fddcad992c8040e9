"""ModMedBulkExportTrigger: polls a Bulk Data status URL in the triggerer and yields one small event.

Its serialized state is the status URL, the connection id and the poll policy: a triggerer restart
rebuilds it from ``serialize()`` and continues polling the same export (no new kick-off). ``cleanup``
(every exit, restarts included) only releases local resources; the remote job is cancelled with DELETE
only in ``on_kill``, which Airflow calls when a user kills the deferred task. Triggers of one connection
share one client (connection pool, TLS context) within the triggerer's event loop.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent

from airflow_provider_modmed.client.bulk import AsyncBulkExportClient, ExportGoneError, PollPolicy
from airflow_provider_modmed.errors import ModMedError
from airflow_provider_modmed.hooks.modmed import ModMedHook


class ModMedBulkExportTrigger(BaseTrigger):
    """Poll ``status_url`` with the async client until the export is complete, gone or failed.

    Event payloads (JSON, small, never resources or file URLs)::

        {"status": "complete", "status_url": ..., "transaction_time": ..., "files": 12}
        {"status": "gone", "status_url": ..., "message": ...}     # 404/410: expired or cancelled
        {"status": "error", "status_url": ..., "message": ..., "status_code": 500}

    :param status_url: the ``Content-Location`` of the kick-off
    :param modmed_conn_id: the certified-track connection that kicked off
    :param min_poll_seconds: lower clamp of the server's Retry-After
    :param max_poll_seconds: upper clamp of the server's Retry-After (and of the backoff)
    :param max_poll_errors: consecutive transient failures tolerated
    :param cancel_on_kill: DELETE the job when a user kills the deferred task
    """

    def __init__(self, status_url: str, modmed_conn_id: str, min_poll_seconds: float = 1.0,
                 max_poll_seconds: float = 600.0, max_poll_errors: int = 10, cancel_on_kill: bool = True) -> None:
        super().__init__()
        self.status_url = status_url
        self.modmed_conn_id = modmed_conn_id
        self.min_poll_seconds = float(min_poll_seconds)
        self.max_poll_seconds = float(max_poll_seconds)
        self.max_poll_errors = int(max_poll_errors)
        self.cancel_on_kill = bool(cancel_on_kill)

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (f"{type(self).__module__}.{type(self).__qualname__}", {
            "status_url": self.status_url,
            "modmed_conn_id": self.modmed_conn_id,
            "min_poll_seconds": self.min_poll_seconds,
            "max_poll_seconds": self.max_poll_seconds,
            "max_poll_errors": self.max_poll_errors,
            "cancel_on_kill": self.cancel_on_kill,
        })

    @property
    def policy(self) -> PollPolicy:
        return PollPolicy.between(self.min_poll_seconds, self.max_poll_seconds, self.max_poll_errors)

    async def run(self) -> AsyncIterator[TriggerEvent]:
        base = {"status_url": self.status_url}
        try:
            async with ModMedHook(self.modmed_conn_id).shared_async_client() as client:
                manifest = await AsyncBulkExportClient(client, poll=self.policy).poll(self.status_url, self.log)
        except ExportGoneError as exc:
            yield TriggerEvent({**base, "status": "gone", "message": str(exc)[:500]})
            return
        except ModMedError as exc:
            yield TriggerEvent({**base, "status": "error", "message": str(exc)[:500],
                                "status_code": exc.status_code})
            return
        yield TriggerEvent({**base, "status": "complete", "transaction_time": manifest.transaction_time,
                            "files": len(manifest.items)})

    async def on_kill(self) -> None:
        """The user killed the deferred task: cancel the export on the server (not on a restart)."""
        if not self.cancel_on_kill:
            return
        try:
            async with ModMedHook(self.modmed_conn_id).shared_async_client() as client:
                cancelled = await AsyncBulkExportClient(client).cancel(self.status_url)
        except ModMedError as exc:
            self.log.warning("modmed: cancelling the bulk export failed: %s", exc)
            return
        self.log.info("modmed: bulk export %s", "cancelled" if cancelled else "was already gone")
