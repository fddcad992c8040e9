"""CapabilityStatements of both sandbox tracks, generated from the one capability matrix."""

from __future__ import annotations

from typing import Any

from airflow_provider_modmed import __version__
from airflow_provider_modmed.capabilities import DEFAULT, Interaction, Track
from airflow_provider_modmed.sandbox.fhir_api import SEARCH_PARAMS

_TYPES = {"eq": "token", "prefix": "string", "date": "date"}


def capability_statement(track: Track, fhir_base: str, now: str) -> dict[str, Any]:
    """The CapabilityStatement a track serves at ``/metadata``."""
    resources = []
    for rt in DEFAULT.resource_types(track):
        spec = DEFAULT.spec(rt)
        assert spec is not None
        interactions = [{"code": i.value} for i in (Interaction.READ, Interaction.SEARCH, Interaction.CREATE,
                                                     Interaction.UPDATE, Interaction.DELETE)
                        if DEFAULT.allows(track, rt, i)]
        params = [{"name": n, "type": _TYPES[k]} for n, k in SEARCH_PARAMS.items()]
        if DEFAULT.supports_last_updated(track, rt):
            params.append({"name": "_lastUpdated", "type": "date",
                           "documentation": "gt, eq, le with yyyy-mm-dd only (day granularity)"
                           if track is Track.PROPRIETARY else "any prefix, full precision"})
        entry: dict[str, Any] = {"type": rt, "interaction": interactions}
        if DEFAULT.allows(track, rt, Interaction.SEARCH):
            entry["searchParam"] = params
        if spec.note:
            entry["documentation"] = spec.note
        resources.append(entry)
    rest: dict[str, Any] = {"mode": "server", "resource": resources}
    if track is Track.CERTIFIED:
        rest["security"] = {"service": [{"coding": [{
            "system": "http://terminology.hl7.org/CodeSystem/restful-security-service", "code": "SMART-on-FHIR"}]}]}
        rest["operation"] = [{"name": "export", "definition":
                              "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/export"}]
        for entry in resources:
            if entry["type"] in ("Patient", "Group"):
                entry["operation"] = [{"name": "export", "definition":
                                       f"http://hl7.org/fhir/uv/bulkdata/OperationDefinition/{entry['type'].lower()}-export"}]
    name = "ModMedProprietaryAPI" if track is Track.PROPRIETARY else "ModMedCertifiedAPI"
    return {
        "resourceType": "CapabilityStatement", "status": "active", "date": now, "kind": "instance",
        "name": name, "fhirVersion": "4.0.1", "format": ["application/fhir+json"],
        "software": {"name": "modmed-sandbox", "version": __version__},
        "implementation": {"description": f"ModMed {track.value} API emulator", "url": fhir_base},
        "rest": [rest],
    }
