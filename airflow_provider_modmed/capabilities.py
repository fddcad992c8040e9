"""THE capability matrix: which interaction ModMed allows on which resource, per API track.

One table, read everywhere: the client's pre-flight, the operators' argument checks, the sandbox's
routes and CapabilityStatements, and the docs' table are all derived from :data:`MATRIX`.

Sources: the integration profile (the product requirement) and ModMed's published OpenAPI files.
Where they disagree the profile is the default: Patients have full CRUD (delete included) on the
proprietary track, and Coverage is create-only. The published variant (no Patient delete, Coverage
update allowed) is :data:`Variant.PUBLISHED`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum

from airflow_provider_modmed.errors import CapabilityError, ConfigurationError


class Track(str, Enum):
    """ModMed's two API tracks."""

    PROPRIETARY = "proprietary"
    CERTIFIED = "certified"

    def __str__(self) -> str:
        return self.value


class Interaction(str, Enum):
    """FHIR interactions the provider performs."""

    READ = "read"
    SEARCH = "search-type"
    CREATE = "create"
    UPDATE = "update"
    DELETE = "delete"
    EXPORT = "export"

    def __str__(self) -> str:
        return self.value


class Variant(str, Enum):
    """Which source wins where the profile and ModMed's published API disagree."""

    PROFILE = "profile"
    PUBLISHED = "published"


R, S, C, U, D = (Interaction.READ, Interaction.SEARCH, Interaction.CREATE, Interaction.UPDATE,
                 Interaction.DELETE)
RS = frozenset({R, S})
RSC = frozenset({R, S, C})
RSCU = frozenset({R, S, C, U})

#: ``_count`` maximum on the proprietary track when a resource does not say otherwise.
DEFAULT_MAX_COUNT = 50
#: ``_count`` maximum on the certified track (it pages with standard ``next`` links).
CERTIFIED_MAX_COUNT = 100
#: Largest number of resources in one bulk output file.
BULK_FILE_MAX_RESOURCES = 1000


@dataclass(frozen=True)
class ResourceSpec:
    """What ModMed allows for one FHIR resource type on each track."""

    resource_type: str
    proprietary: frozenset[Interaction] = frozenset()
    certified: frozenset[Interaction] = frozenset()
    #: what the integration profile calls it (a row of the profile's table), for docs and errors
    label: str = ""
    #: ``_count`` maximum on the proprietary track
    max_count: int = DEFAULT_MAX_COUNT
    #: whether the proprietary track documents ``_lastUpdated`` for this resource
    last_updated: bool = False
    #: search parameters the proprietary track requires
    required_search_params: tuple[str, ...] = ()
    note: str = ""

    def interactions(self, track: Track) -> frozenset[Interaction]:
        return self.proprietary if track is Track.PROPRIETARY else self.certified


_US_CORE_READ_ONLY = (
    "CarePlan", "CareTeam", "Device", "Goal", "Medication", "MedicationRequest", "PractitionerRole",
    "Procedure", "Provenance", "Specimen", "QuestionnaireResponse",
)

_SPECS: tuple[ResourceSpec, ...] = (
    ResourceSpec("Patient", RSCU | {D}, RS, "Patients", last_updated=True,
                 note="Full CRUD on the proprietary track after partner onboarding."),
    ResourceSpec("Appointment", RSCU, frozenset(), "Appointments", last_updated=True),
    ResourceSpec("Encounter", RS, RS, "Encounters", last_updated=True),
    ResourceSpec("DocumentReference", RSC, RS, "Clinical Notes / Document Upload", max_count=10,
                 note="Clinical notes read as DocumentReference/note|{visitId}; uploads are three steps."),
    ResourceSpec("Binary", frozenset({C}), frozenset(), "Document Upload",
                 note="Step 1 of the document upload: answers a presigned object-storage URL."),
    ResourceSpec("DiagnosticReport", RS, RS, "Lab Results", last_updated=True),
    ResourceSpec("MedicationStatement", RSCU, frozenset(), "Medications"),
    ResourceSpec("AllergyIntolerance", RSCU, RS, "Allergies"),
    ResourceSpec("Condition", RSCU, RS, "Conditions",
                 note="ModMed expects its own code conventions (e.g. upper-case clinical status)."),
    ResourceSpec("Immunization", frozenset(), RS, "Immunizations",
                 note="Certified track only (separate vendor registration and practice consent)."),
    ResourceSpec("Observation", frozenset(), RS, "Vitals",
                 note="Vital signs: certified track only (separate vendor registration and practice consent)."),
    ResourceSpec("ChargeItem", RSC, frozenset(), "Billing / Claims",
                 note="Create only, no update; transactionId detects duplicates."),
    ResourceSpec("Coverage", RSC, RS, "Coverage / Insurance", max_count=100, last_updated=True,
                 note="Create only, no update; create answers a reconciliation id."),
    ResourceSpec("ServiceRequest", RS, RS, "Referrals", last_updated=True),
    ResourceSpec("Organization", RSC, RS, max_count=100, last_updated=True,
                 note="Create: referring organizations only."),
    ResourceSpec("Practitioner", RSC, RS, max_count=100, last_updated=True,
                 note="Create: referring providers only."),
    ResourceSpec("Location", RS, RS, max_count=100, last_updated=True),
    ResourceSpec("InsurancePlan", RS, frozenset(), max_count=100, last_updated=True),
    ResourceSpec("Task", RS, frozenset(), last_updated=True),
    ResourceSpec("FamilyMemberHistory", RS, frozenset()),
    ResourceSpec("Account", frozenset({S}), frozenset(), required_search_params=("patient",)),
    ResourceSpec("Slot", frozenset({S}), frozenset(), required_search_params=("appointment-type",)),
    ResourceSpec("RelatedPerson", frozenset({R}), RS),
    ResourceSpec("Composition", frozenset({C}), frozenset(), note="Inbound transcription."),
    ResourceSpec("ValueSet", frozenset({R}), frozenset(),
                 note="Firm-specific codes: document-category, appointment-type."),
    ResourceSpec("Group", frozenset(), frozenset({R}), note="Bulk export cohorts."),
    *(ResourceSpec(t, frozenset(), RS) for t in _US_CORE_READ_ONLY),
)

#: resource type -> spec, for the default (profile) variant
MATRIX: Mapping[str, ResourceSpec] = {s.resource_type: s for s in _SPECS}

#: bulk export levels, certified track only
EXPORT_LEVELS = ("system", "Patient", "Group")


@dataclass(frozen=True)
class Capabilities:
    """The matrix as one track sees it, with the chosen :class:`Variant` applied."""

    variant: Variant = Variant.PROFILE
    overrides: Mapping[str, ResourceSpec] = field(default_factory=dict)

    def spec(self, resource_type: str) -> ResourceSpec | None:
        base = self.overrides.get(resource_type) or MATRIX.get(resource_type)
        if base is None or self.variant is Variant.PROFILE:
            return base
        if resource_type in ("Patient", "Coverage"):  # published: no Patient delete, Coverage update
            return ResourceSpec(**{**base.__dict__, "proprietary": RSCU})
        return base

    def allows(self, track: Track, resource_type: str, interaction: Interaction) -> bool:
        """Whether ``track`` allows ``interaction`` on ``resource_type``. Bulk export is certified-only
        and needs the type to be readable there."""
        spec = self.spec(resource_type)
        if spec is None:
            return False
        if interaction is Interaction.EXPORT:
            return track is Track.CERTIFIED and Interaction.READ in spec.certified
        return interaction in spec.interactions(track)

    def missing_search_params(self, track: Track | str, resource_type: str, names: Iterable[str]) -> list[str]:
        """The search parameters ``track`` requires on ``resource_type`` that ``names`` lacks (a name may
        carry a modifier: ``patient:exact`` counts as ``patient``)."""
        spec = self.spec(resource_type)
        if Track(track) is not Track.PROPRIETARY or spec is None:
            return []
        given = {str(name).split(":", 1)[0] for name in names}
        return [p for p in spec.required_search_params if p not in given]

    def require_search_params(self, track: Track | str, resource_type: str, names: Iterable[str]) -> None:
        """Raise :class:`ConfigurationError` when a search lacks a parameter ModMed requires."""
        missing = self.missing_search_params(track, resource_type, names)
        if missing:
            raise ConfigurationError(f"ModMed requires search parameter(s) {', '.join(missing)} on "
                                     f"{resource_type}")

    def resource_types(self, track: Track) -> list[str]:
        return sorted(t for t in MATRIX if self.allows(track, t, Interaction.READ)
                      or self.allows(track, t, Interaction.SEARCH) or self.allows(track, t, Interaction.CREATE))

    def check(self, track: Track | str, resource_type: str, interaction: Interaction) -> ResourceSpec:
        """Return the spec, or raise :class:`CapabilityError` naming the track that does allow it."""
        track = Track(track)
        spec = self.spec(resource_type)
        if spec is None:
            known = ", ".join(sorted(MATRIX))
            raise CapabilityError(
                f"resource_type {resource_type!r} is not served by ModMed; known types: {known}"
            )
        if self.allows(track, resource_type, interaction):
            return spec
        other = Track.CERTIFIED if track is Track.PROPRIETARY else Track.PROPRIETARY
        what = f"{interaction.value} on {resource_type}" if interaction is not Interaction.EXPORT \
            else f"Bulk Data $export of {resource_type}"
        if interaction is Interaction.EXPORT and track is Track.CERTIFIED:
            hint = f"{resource_type} is not readable on the certified track, so it cannot be exported"
        elif self.allows(other, resource_type, interaction):
            hint = f"use a connection with track={other.value!r}"
            if other is Track.CERTIFIED:
                hint += " (ONC-certified API: separate vendor registration and practice consent)"
            else:
                hint += " (proprietary partner API)"
        elif interaction is Interaction.UPDATE and Interaction.CREATE in spec.proprietary:
            hint = f"ModMed allows only create on {resource_type}; no track supports update"
        else:
            offered = sorted(i.value for i in spec.interactions(track) | spec.interactions(other))
            hint = f"no ModMed track supports it; {resource_type} allows: {', '.join(offered) or 'nothing'}"
        refusal = f"ModMed refuses {what} on the {track.value} track: {hint}."
        if spec.note and interaction is not Interaction.EXPORT:
            refusal += f" Note: {spec.note}"
        raise CapabilityError(refusal)

    def max_count(self, track: Track | str, resource_type: str) -> int:
        if Track(track) is Track.CERTIFIED:
            return CERTIFIED_MAX_COUNT
        spec = self.spec(resource_type)
        return spec.max_count if spec else DEFAULT_MAX_COUNT

    def supports_last_updated(self, track: Track | str, resource_type: str) -> bool:
        if Track(track) is Track.CERTIFIED:
            return True
        spec = self.spec(resource_type)
        return bool(spec and spec.last_updated)

    def rows(self) -> Iterable[tuple[str, str, str, str]]:
        """(resource, label, proprietary, certified) rows for docs; interactions as letters."""
        letters = {R: "R", S: "S", C: "C", U: "U", D: "D"}
        for t in sorted(MATRIX):
            spec = self.spec(t)
            assert spec is not None
            prop = "".join(letters[i] for i in (R, S, C, U, D) if i in spec.proprietary)
            cert = "".join(letters[i] for i in (R, S, C, U, D) if i in spec.certified)
            yield t, spec.label, prop or "-", cert or "-"


#: the default view, used wherever no variant is configured
DEFAULT = Capabilities()


def check(track: Track | str, resource_type: str, interaction: Interaction) -> ResourceSpec:
    """Pre-flight with the default variant; see :meth:`Capabilities.check`."""
    return DEFAULT.check(track, resource_type, interaction)
