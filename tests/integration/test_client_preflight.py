"""The client refuses every cell the capability matrix refuses, before any network call, and names the
track that does support it; every allowed cell gets past the pre-flight to the sandbox."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from airflow_provider_modmed.capabilities import DEFAULT, MATRIX, Interaction, Track
from airflow_provider_modmed.client import ClientConfig, FhirClient
from airflow_provider_modmed.errors import CapabilityError, ModMedError
from airflow_provider_modmed.sandbox.server import SandboxServer

pytestmark = pytest.mark.integration

CELLS = (Interaction.READ, Interaction.SEARCH, Interaction.CREATE, Interaction.UPDATE, Interaction.DELETE)


def client_for(sb: SandboxServer, track: Track) -> FhirClient:
    creds = sb.credentials
    if track is Track.PROPRIETARY:
        p = creds["proprietary"]
        return FhirClient(ClientConfig(track="proprietary", fhir_base=p["fhir_base"], firm="apiportal",
                                       api_key=p["api_key"], username=p["username"], password=p["password"],
                                       max_retries=0))
    c = creds["certified"]
    return FhirClient(ClientConfig(track="certified", fhir_base=c["fhir_base"], firm="apiportal",
                                   auth_method="client_secret", scope="system/*.read", max_retries=0,
                                   **c["client_secret_post"]))


def call(client: FhirClient, rt: str, interaction: Interaction) -> Callable[[], Any]:
    return {
        Interaction.READ: lambda: client.read(rt, "999999"),
        Interaction.SEARCH: lambda: next(iter(client.search(rt, {"patient": "1"})), None),
        Interaction.CREATE: lambda: client.create({"resourceType": rt}),
        Interaction.UPDATE: lambda: client.update({"resourceType": rt, "id": "999999"}, if_match=1),
        Interaction.DELETE: lambda: client.delete(rt, "999999"),
    }[interaction]


@pytest.mark.parametrize("track", list(Track))
def test_every_refused_cell_is_refused_before_any_call(sb: SandboxServer, track: Track) -> None:
    refused = allowed = 0
    with client_for(sb, track) as client:
        for rt in MATRIX:
            for interaction in CELLS:
                before = sb.stats().get("requests", 0)
                if DEFAULT.allows(track, rt, interaction):
                    allowed += 1
                    try:
                        call(client, rt, interaction)()
                    except CapabilityError as exc:  # pragma: no cover - the failure we look for
                        pytest.fail(f"{track.value} {interaction.value} {rt} refused by pre-flight: {exc}")
                    except ModMedError:
                        pass  # 404, 400, 422... from the sandbox: the call went through
                    continue
                refused += 1
                with pytest.raises(CapabilityError) as err:
                    call(client, rt, interaction)()
                assert sb.stats().get("requests", 0) == before, (rt, interaction)
                other = Track.CERTIFIED if track is Track.PROPRIETARY else Track.PROPRIETARY
                if DEFAULT.allows(other, rt, interaction):
                    assert f"track={other.value!r}" in str(err.value)
    assert refused > 50 and allowed > 20
