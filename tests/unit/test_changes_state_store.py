"""ModMedChangesEventTrigger keeps its cursor through Airflow's public asset-state-store API only: the store
itself for one watched asset, ``store[Asset.ref(name=...)]`` for the one named by ``state_asset``."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from airflow_provider_modmed.client.changes import Cursor
from airflow_provider_modmed.triggers.changes import ModMedChangesEventTrigger


class Accessor:
    """One asset's state (``aget``/``aset`` of JSON values), as Airflow's accessor offers it."""

    def __init__(self) -> None:
        self.values: dict[str, Any] = {}

    async def aget(self, key: str, default: Any = None) -> Any:
        return self.values.get(key, default)

    async def aset(self, key: str, value: Any) -> None:
        self.values[key] = value


class Accessors:
    """The public face of Airflow's ``AssetStateStoreAccessors``: subscript by asset; the direct methods
    work only for a single asset (ValueError otherwise). Nothing private is offered."""

    def __init__(self, *names: str) -> None:
        self.by_name = {name: Accessor() for name in names}

    def __getitem__(self, ref: Any) -> Accessor:
        return self.by_name[ref.name]

    def _single(self) -> Accessor:
        if len(self.by_name) != 1:
            raise ValueError(f"Task has {len(self.by_name)} concrete inlets and outlets")
        return next(iter(self.by_name.values()))

    async def aget(self, key: str, default: Any = None) -> Any:
        return await self._single().aget(key, default)

    async def aset(self, key: str, value: Any) -> None:
        await self._single().aset(key, value)


def watcher(store: Accessors, **kwargs: Any) -> ModMedChangesEventTrigger:
    trigger = ModMedChangesEventTrigger(resource_type="Patient", **kwargs)
    trigger.asset_state_store = store  # type: ignore[assignment]
    return trigger


def round_trip(trigger: ModMedChangesEventTrigger, cursor: Cursor) -> Cursor | None:
    async def run() -> Cursor | None:
        await trigger._save_cursor(cursor)
        return await trigger._load_cursor()

    return asyncio.run(run())


def test_one_watched_asset_keeps_the_cursor_in_its_store() -> None:
    store = Accessors("patients")
    cursor = Cursor(1_767_225_600_000)
    loaded = round_trip(watcher(store), cursor)
    assert loaded is not None and loaded.to_json() == cursor.to_json()
    (key, saved), = store.by_name["patients"].values.items()
    assert key.startswith("modmed_changes.modmed_default.Patient.") and saved == cursor.to_json()


def test_several_assets_keep_the_cursor_in_the_named_one() -> None:
    store = Accessors("patients", "patients-copy")
    trigger = watcher(store, state_asset="patients-copy")
    assert trigger.serialize()[1]["state_asset"] == "patients-copy"
    cursor = Cursor(1_767_225_600_000)
    loaded = round_trip(trigger, cursor)
    assert loaded is not None and loaded.to_json() == cursor.to_json()
    assert store.by_name["patients"].values == {} and len(store.by_name["patients-copy"].values) == 1


def test_several_assets_without_a_name_keep_the_cursor_in_memory(capsys: pytest.CaptureFixture[str]) -> None:
    store = Accessors("patients", "patients-copy")
    trigger = watcher(store, since="2026-01-01T00:00:00Z")
    loaded = round_trip(trigger, Cursor(1_767_225_600_000))
    assert loaded is not None and loaded.low_ms == Cursor.since("2026-01-01T00:00:00Z").low_ms  # nothing saved
    assert all(a.values == {} for a in store.by_name.values())
    assert "state_asset=" in capsys.readouterr().out and trigger.asset_state_store is None
