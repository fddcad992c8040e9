"""What the operator unit tests share: the hook as operators use it, without a network."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from airflow_provider_modmed.capabilities import DEFAULT, Capabilities, Track


@dataclass
class FakeConfig:
    track: Track
    fhir_base: str = "https://stage.ema-api.com/ema-dev/firm/apiportal/ema/fhir/v2"
    firm: str = "apiportal"
    capabilities: Capabilities = DEFAULT

    @property
    def resolved_track(self) -> Track:
        return self.track


class FakeHook:
    """The hook as operators use it: a config of ``track`` and ``client``; counts ``close()``."""

    def __init__(self, track: Track, client: Any) -> None:
        self.track = track
        self.config = FakeConfig(track)
        self.client = client
        self.closed = 0

    def get_conn(self) -> Any:
        return self.client

    def close(self) -> None:
        self.closed += 1
