"""The capability matrix: export needs the type readable on the certified track; the required search
parameters are checked in one place; the published variant."""

from __future__ import annotations

import pytest

from airflow_provider_modmed.capabilities import DEFAULT, Capabilities, Interaction, Track, Variant
from airflow_provider_modmed.errors import CapabilityError, ConfigurationError

EXPORT = Interaction.EXPORT


def test_export_needs_the_type_readable_on_the_certified_track() -> None:
    assert DEFAULT.allows(Track.CERTIFIED, "Patient", EXPORT)
    assert DEFAULT.allows(Track.CERTIFIED, "Immunization", EXPORT)
    assert DEFAULT.allows(Track.CERTIFIED, "Group", EXPORT)
    assert not DEFAULT.allows(Track.CERTIFIED, "ChargeItem", EXPORT)  # proprietary-only
    assert not DEFAULT.allows(Track.CERTIFIED, "Nope", EXPORT)
    assert not DEFAULT.allows(Track.PROPRIETARY, "Patient", EXPORT)
    with pytest.raises(CapabilityError, match="ChargeItem is not readable on the certified track"):
        DEFAULT.check(Track.CERTIFIED, "ChargeItem", EXPORT)
    with pytest.raises(CapabilityError, match="track='certified'"):
        DEFAULT.check(Track.PROPRIETARY, "Patient", EXPORT)


def test_required_search_parameters() -> None:
    assert DEFAULT.missing_search_params(Track.PROPRIETARY, "Account", ["_count"]) == ["patient"]
    assert DEFAULT.missing_search_params(Track.PROPRIETARY, "Account", ["patient:exact"]) == []
    assert DEFAULT.missing_search_params(Track.CERTIFIED, "Account", []) == []
    assert DEFAULT.missing_search_params("proprietary", "Patient", []) == []
    with pytest.raises(ConfigurationError, match=r"requires search parameter\(s\) appointment-type on Slot"):
        DEFAULT.require_search_params(Track.PROPRIETARY, "Slot", ["date"])
    DEFAULT.require_search_params(Track.PROPRIETARY, "Slot", ["appointment-type"])


def test_the_published_variant() -> None:
    published = Capabilities(variant=Variant.PUBLISHED)
    assert not published.allows(Track.PROPRIETARY, "Patient", Interaction.DELETE)
    assert published.allows(Track.PROPRIETARY, "Coverage", Interaction.UPDATE)
    assert not DEFAULT.allows(Track.PROPRIETARY, "Coverage", Interaction.UPDATE)
    assert DEFAULT.allows(Track.PROPRIETARY, "Patient", Interaction.DELETE)
    assert published.spec("Condition") is DEFAULT.spec("Condition")
