"""Deterministic synthetic practice for the ModMed emulator (the sandbox).

:func:`generate` yields plain, JSON-ready FHIR R4 resource dicts for one synthetic practice: a few
practice-level resources (practitioners, locations, the practice and two payer organizations, insurance
plans, the firm's ``document-category`` and ``appointment-type`` ValueSets), then each patient followed
by that patient's clinical, scheduling and billing resources, then the ``all-patients`` and ``cohort-a``
Groups (bulk-export cohorts).

Determinism: the output depends only on ``(patients, seed, now, years)``. One ``random.Random(seed)``
drives everything (no global ``random``, no ``uuid4``, no clock reads once ``now`` is fixed). Patients
are generated in id order from one random stream, so the first *k* patients (and everything that refers
to them) are the same for every practice size with the same ``seed``, ``now`` and ``years``.

Ids follow ModMed's conventions:

* numeric strings per resource type, each type counting from ``"1"`` (proprietary track);
* payer Organizations ``pay|7225`` and ``pay|7226``; ChargeItems ``CHG|<n>`` (composite ids with a pipe);
* Immunizations and vital-sign Observations ``1.120182.1.<n>`` (dotted ids of the certified API);
  laboratory Observations are numeric;
* these are the ids the proprietary track serves; the certified track serves its own, derived at its
  boundary (``1.120182.2.<n>`` for ``<n>``: :mod:`.certified_ids`);
* ValueSets ``document-category`` and ``appointment-type``; Groups ``all-patients`` and ``cohort-a``.

Every resource validates against ``fhir.resources.R4B`` except for one deliberate ModMed quirk: the
pipe in composite ids (``pay|7225``, ``CHG|1``) is outside FHIR's ``id`` alphabet
(``[A-Za-z0-9\\-.]``), so those ids fail the ``id`` pattern check and nothing else. References to them
(``Organization/pay|7225``) are plain strings and validate. See :data:`COMPOSITE_ID_TYPES`.

``meta.lastUpdated`` is a UTC instant with millisecond precision (``2025-03-04T10:11:12.345Z``) inside
``[now - years, now]``; a patient's resources are never older than the patient itself.

Every yielded resource is an independent tree (no dict or list is shared with another resource or with
module state), so callers may edit resources in place.

Nothing is validated while generating: the generator builds dicts with cheap random calls so that
100,000 patients (about 1.2 million resources, ~12 per patient) take under 10 s on one core.
"""

from __future__ import annotations  # noqa: I001  (seed_codes names listed compactly)

import base64
import datetime
import random
from collections.abc import Iterator, Sequence
from typing import Any, TypeVar

from airflow_provider_modmed.profile import (
    APPOINTMENT_TYPE_SYSTEM,
    DOCUMENT_CATEGORY_SYSTEM,
    PAYER_ID_SYSTEM,
    TRANSACTION_ID_SYSTEM,
    VALUE_SET_BASE,
)
from airflow_provider_modmed.sandbox.seed_codes import (
    _ALLERGY_ACTIVE, _ALLERGY_CODES, _ALLERGY_CONFIRMED, _ANALYTE_CODES, _APPT_MINUTES, _APPT_TYPES,
    _BP_CODE, _CANCEL_PAT, _CAT_DR_LAB, _CAT_LAB, _CAT_NOTE, _CAT_REFERRAL, _CAT_VITALS, _CITIES, _CLASS_AMB,
    _COND_CAT, _COND_CLINICAL, _COND_CODES, _COND_VERIFIED, _CONDITIONS, _COVERAGE_CLASS_PLAN,
    _COVERAGE_TYPE, _CPT_CODES, _DAY, _DIA_CODE, _FAMILY, _GIVEN_F, _GIVEN_M, _HEIGHT, _HOUR, _HR,
    _LAB_CODES, _LAB_PANELS, _MED_CODES, _MIN, _NOTE_TYPE, _NPI, _ORG_TYPE, _PRACTITIONERS, _REACTION_CODES,
    _REFERRAL_CODES, _REL_SELF, _STREETS, _SYS_CODE, _UCUM, _VACCINE_CODES, _VITAL_CODES, _WEIGHT, _YEAR,
    APPOINTMENT_TYPES, COMPOSITE_ID_TYPES, DOCUMENT_CATEGORIES, DOTTED_ID_PREFIX, MRN_SYSTEM, PAYER_IDS, _cc,
    _date, _dt, _instant, _meta, _now_ms, _ref, _thaw,
)

__all__ = [
    "APPOINTMENT_TYPE_SYSTEM",
    "COMPOSITE_ID_TYPES",
    "DOCUMENT_CATEGORY_SYSTEM",
    "DOTTED_ID_PREFIX",
    "MRN_SYSTEM",
    "PAYER_IDS",
    "TRANSACTION_ID_SYSTEM",
    "generate",
]

_T = TypeVar("_T")

# -- systems and fixed codes -------------------------------------------------------------------------

def _value_set(vs_id: str, name: str, title: str, system: str, concepts: Sequence[tuple[str, str]],
               ms: int) -> dict[str, Any]:
    return {
        "resourceType": "ValueSet",
        "id": vs_id,
        "meta": _meta(ms),
        "url": f"{VALUE_SET_BASE}/{vs_id}",
        "version": "1",
        "name": name,
        "title": title,
        "status": "active",
        "compose": {"include": [{"system": system,
                                 "concept": [{"code": c, "display": d} for c, d in concepts]}]},
        "expansion": {"timestamp": _dt(ms), "total": len(concepts),
                      "contains": [{"system": system, "code": c, "display": d} for c, d in concepts]},
    }


def _group(group_id: str, name: str, member_ids: Sequence[int], last_updated: str) -> dict[str, Any]:
    return {
        "resourceType": "Group",
        "id": group_id,
        "meta": {"versionId": "1", "lastUpdated": last_updated},
        "type": "person",
        "actual": True,
        "name": name,
        "quantity": len(member_ids),
        "member": [{"entity": {"reference": f"Patient/{i}"}} for i in member_ids],
    }


def _practice(rng: random.Random, start: int, span: int) -> list[dict[str, Any]]:
    """The fixed, practice-level resources, last updated in the first tenth of the window."""

    def early() -> int:
        return start + int(rng.random() * span * 0.1)

    city, state, zip2 = _CITIES[0]
    org_address = [{"line": ["100 Example Plaza"], "city": city, "state": state, "postalCode": f"{zip2}001",
                    "country": "US"}]
    out: list[dict[str, Any]] = [{
        "resourceType": "Organization", "id": "1", "meta": _meta(early()), "active": True,
        "identifier": [{"system": _NPI, "value": f"99{rng.randrange(10**8):08d}"}],
        "type": [_cc(_ORG_TYPE, "prov", "Healthcare Provider")],
        "name": "Synthetic Dermatology Associates (TEST DATA)",
        "telecom": [{"system": "phone", "value": "(555) 555-0100", "use": "work"}],
        "address": org_address,
    }]
    payers = ("Example Health Plan (TEST)", "Sample Mutual Insurance (TEST)")
    for pay_id, pay_name in zip(PAYER_IDS, payers, strict=True):
        out.append({
            "resourceType": "Organization", "id": pay_id, "meta": _meta(early()), "active": True,
            "identifier": [{"system": PAYER_ID_SYSTEM, "value": pay_id.split("|")[1]}],
            "type": [_cc(_ORG_TYPE, "pay", "Payer")],
            "name": pay_name,
        })
    for n, (loc_name, line) in enumerate((("Main Clinic", "100 Example Plaza"),
                                          ("Satellite Clinic", "200 Sample Ave")), start=1):
        out.append({
            "resourceType": "Location", "id": str(n), "meta": _meta(early()), "status": "active",
            "name": f"{loc_name} (TEST)", "mode": "instance",
            "telecom": [{"system": "phone", "value": f"(555) 555-01{n:02d}", "use": "work"}],
            "address": {"line": [line], "city": city, "state": state, "postalCode": f"{zip2}00{n}",
                        "country": "US"},
            "managingOrganization": _ref("Organization", "1"),
        })
    for n, (family, given, gender, qual) in enumerate(_PRACTITIONERS, start=1):
        out.append({
            "resourceType": "Practitioner", "id": str(n), "meta": _meta(early()), "active": True,
            "identifier": [{"system": _NPI, "value": f"99{rng.randrange(10**8):08d}"}],
            "name": [{"use": "official", "family": family, "given": [given], "suffix": [qual]}],
            "gender": gender,
            "telecom": [{"system": "phone", "value": f"(555) 555-01{10 + n:02d}", "use": "work"}],
            "qualification": [{"code": {"text": qual}}],
        })
    plans = ("Example PPO Gold", "Sample HMO Basic")
    for n, (pay_id, plan) in enumerate(zip(PAYER_IDS, plans, strict=True), start=1):
        out.append({
            "resourceType": "InsurancePlan", "id": str(n), "meta": _meta(early()), "status": "active",
            "type": [_cc("http://terminology.hl7.org/CodeSystem/insurance-plan-type", "medical", "Medical")],
            "name": f"{plan} (TEST)",
            "ownedBy": _ref("Organization", pay_id),
            "administeredBy": _ref("Organization", pay_id),
        })
    out.append(_value_set("document-category", "DocumentCategory", "Document categories",
                          DOCUMENT_CATEGORY_SYSTEM, DOCUMENT_CATEGORIES, early()))
    out.append(_value_set("appointment-type", "AppointmentType", "Appointment types",
                          APPOINTMENT_TYPE_SYSTEM, [(c, d) for c, d, _ in APPOINTMENT_TYPES], early()))
    return out


# -- the generator -----------------------------------------------------------------------------------


def generate(patients: int = 100, seed: int = 0, *, now: datetime.datetime | None = None,
             years: float = 2.0) -> Iterator[dict[str, Any]]:
    """Yield FHIR R4 resource dicts (JSON-ready) for one synthetic practice.

    :param patients: number of patients (ids ``"1"`` .. ``str(patients)``).
    :param seed: seed of the one ``random.Random`` that drives everything.
    :param now: end of the ``meta.lastUpdated`` window; timezone-aware. Defaults to the current UTC time
        truncated to the minute (pass it explicitly for reproducible output).
    :param years: length of the ``meta.lastUpdated`` window before ``now``.

    Order: practice-level resources, then each patient followed by its own resources, then the Groups.
    Composite ids (``pay|7225``, ``CHG|<n>``) are ModMed's and fail FHIR's ``id`` pattern by design.
    """
    if patients < 0:
        raise ValueError("patients must be >= 0")
    if not years > 0:
        raise ValueError("years must be > 0")
    end = _now_ms(now)
    span = int(years * _YEAR)
    start = end - span
    rng = random.Random(seed)
    return _generate(rng, patients, start, end, span)


def _generate(rng: random.Random, patients: int, start: int, end: int, span: int) -> Iterator[dict[str, Any]]:
    rnd = rng.random

    def pick(seq: Sequence[_T]) -> _T:
        return seq[int(rnd() * len(seq))]

    def uni() -> int:
        return start + int(rnd() * span)

    def soon(ms: int, within: int) -> int:
        """A moment in ``[ms, ms + within]``, never after ``end``."""
        t = ms + int(rnd() * within)
        return t if t < end else end

    practice = _practice(rng, start, span)
    latest = max(r["meta"]["lastUpdated"] for r in practice)  # same format: string order is time order
    yield from practice
    lus: list[int] = []

    def m(ms: int) -> dict[str, str]:
        lus.append(ms)
        return {"versionId": "1", "lastUpdated": _instant(ms)}

    practitioners = [str(n) for n in range(1, len(_PRACTITIONERS) + 1)]
    # MRNs: an affine permutation of the index, so they look random but never collide
    mrn_width = max(6, len(str(patients)))
    mrn_mod = 10**mrn_width
    mrn_off = rng.randrange(mrn_mod)
    mrn_mul = 104_729  # prime, coprime to any power of ten

    n_appt = n_enc = n_doc = n_dr = n_lab = n_med = n_alg = n_cond = n_imm = n_vit = 0
    n_chg = n_cov = n_sr = 0
    zip_base = rng.randrange(100, 999)

    for pnum in range(1, patients + 1):
        pid = str(pnum)
        pref = f"Patient/{pid}"
        female = rnd() < 0.52
        given = pick(_GIVEN_F if female else _GIVEN_M)
        family = pick(_FAMILY)
        age_ms = int((1 + rnd() * 89) * _YEAR)
        birth = end - age_ms
        if birth < 0:
            birth = 0
        doctor = pick(practitioners)
        loc = "1" if rnd() < 0.7 else "2"
        children: list[dict[str, Any]] = []
        add = children.append
        lus.clear()

        # visits: Appointment (fulfilled) + Encounter + clinical note + ChargeItem + vital signs
        k = int(rnd() * 100)
        visits = 0 if k < 30 else 1 if k < 75 else 2 if k < 92 else 3  # avg ~1.0
        for v in range(visits):
            lu = uni()
            t = lu - 2 * _HOUR - int(rnd() * 3 * _DAY)
            vstart = t // _DAY * _DAY + (13 + int(rnd() * 9)) * _HOUR + int(rnd() * 4) * 15 * _MIN
            if vstart > t:
                vstart -= _DAY
            atype = 0 if v == 0 else (1 if rnd() < 0.7 else 2 if rnd() < 0.6 else 3)
            minutes = _APPT_MINUTES[atype]
            vend = vstart + minutes * _MIN
            s_start, s_end = _dt(vstart), _dt(vend)
            n_appt += 1
            appt_id = str(n_appt)
            add({
                "resourceType": "Appointment", "id": appt_id, "meta": m(soon(lu, _HOUR)),
                "status": "fulfilled", "appointmentType": _thaw(_APPT_TYPES[atype]),
                "start": s_start, "end": s_end, "minutesDuration": minutes,
                "created": _dt(vstart - int(rnd() * 30 * _DAY) - _DAY),
                "participant": [
                    {"actor": {"reference": pref}, "status": "accepted"},
                    {"actor": {"reference": f"Practitioner/{doctor}"}, "status": "accepted"},
                    {"actor": {"reference": f"Location/{loc}"}, "status": "accepted"},
                ],
            })
            n_enc += 1
            enc_id = str(n_enc)
            eref = f"Encounter/{enc_id}"
            add({
                "resourceType": "Encounter", "id": enc_id, "meta": m(soon(lu, 2 * _HOUR)),
                "status": "finished", "class": _thaw(_CLASS_AMB), "type": [_thaw(_APPT_TYPES[atype])],
                "subject": {"reference": pref},
                "participant": [{"individual": {"reference": f"Practitioner/{doctor}"}}],
                "appointment": [{"reference": f"Appointment/{appt_id}"}],
                "period": {"start": s_start, "end": s_end},
                "location": [{"location": {"reference": f"Location/{loc}"}}],
                "serviceProvider": {"reference": "Organization/1"},
            })
            doc_lu = soon(lu, 6 * _HOUR)
            note = (f"SYNTHETIC CLINICAL NOTE - TEST DATA ONLY\nPatient: {given} {family}\n"
                    f"Visit: {s_start} ({APPOINTMENT_TYPES[atype][1]})\nAssessment: {pick(_CONDITIONS)[1]}\n"
                    f"Plan: follow up in {int(rnd() * 12) + 1} weeks.\n").encode()
            n_doc += 1
            add({
                "resourceType": "DocumentReference", "id": str(n_doc), "meta": m(doc_lu),
                "status": "current", "docStatus": "final", "type": _thaw(_NOTE_TYPE),
                "category": _thaw(_CAT_NOTE),
                "subject": {"reference": pref}, "date": _instant(doc_lu),
                "author": [{"reference": f"Practitioner/{doctor}"}],
                "description": "Clinical note",
                "content": [{"attachment": {"contentType": "text/plain",
                                            "data": base64.b64encode(note).decode(),
                                            "size": len(note), "title": f"note-{enc_id}.txt",
                                            "creation": s_end}}],
                "context": {"encounter": [{"reference": eref}], "period": {"start": s_start, "end": s_end}},
            })
            code, price = _CPT_CODES[2 if atype == 0 else 3 if atype == 2 else 0 if rnd() < 0.6 else 1]
            n_chg += 1
            chg_lu = soon(lu, _DAY)
            add({
                "resourceType": "ChargeItem", "id": f"CHG|{n_chg}", "meta": m(chg_lu),
                "identifier": [{"system": TRANSACTION_ID_SYSTEM,
                                "value": f"TX-{n_chg:08d}-{rng.getrandbits(16):04X}"}],
                "status": "billable", "code": _thaw(code), "subject": {"reference": pref},
                "context": {"reference": eref},
                "occurrenceDateTime": s_start,
                "performer": [{"actor": {"reference": f"Practitioner/{doctor}"}}],
                "performingOrganization": {"reference": "Organization/1"},
                "quantity": {"value": 1},
                "priceOverride": {"value": price, "currency": "USD"},
                "enterer": {"reference": f"Practitioner/{doctor}"},
                "enteredDate": _dt(chg_lu),
            })
            # vital signs (certified track, dotted ids): a BP panel every visit, sometimes more
            v_eff = _dt(vstart + 5 * _MIN)
            v_lu = soon(lu, _HOUR)
            n_vit += 1
            sys_bp = 100 + int(rnd() * 50)
            dia_bp = sys_bp - 35 - int(rnd() * 15)
            add({
                "resourceType": "Observation", "id": f"{DOTTED_ID_PREFIX}{n_vit}", "meta": m(v_lu),
                "status": "final", "category": _thaw(_CAT_VITALS), "code": _thaw(_BP_CODE),
                "subject": {"reference": pref},
                "encounter": {"reference": eref}, "effectiveDateTime": v_eff,
                "component": [
                    {"code": _thaw(_SYS_CODE),
                     "valueQuantity": {"value": sys_bp, "unit": "mmHg", "system": _UCUM, "code": "mm[Hg]"}},
                    {"code": _thaw(_DIA_CODE),
                     "valueQuantity": {"value": dia_bp, "unit": "mmHg", "system": _UCUM, "code": "mm[Hg]"}},
                ],
            })
            for vital, prob in ((_HR, 0.35), (_WEIGHT, 0.2), (_HEIGHT, 0.15 if v == 0 else 0.0)):
                if rnd() >= prob:
                    continue
                vcode, _, unit, ucum, low, high, dec = vital
                value: float = round(low + rnd() * (high - low), dec)
                if not dec:
                    value = int(value)
                n_vit += 1
                add({
                    "resourceType": "Observation", "id": f"{DOTTED_ID_PREFIX}{n_vit}", "meta": m(v_lu),
                    "status": "final", "category": _thaw(_CAT_VITALS), "code": _thaw(_VITAL_CODES[vcode]),
                    "subject": {"reference": pref},
                    "encounter": {"reference": eref}, "effectiveDateTime": v_eff,
                    "valueQuantity": {"value": value, "unit": unit, "system": _UCUM, "code": ucum},
                })

        # one upcoming (booked) or cancelled appointment for about 40% of the patients
        if rnd() < 0.4:
            lu = uni()
            booked = rnd() < 0.6
            if booked:
                vstart = end // _DAY * _DAY + (1 + int(rnd() * 60)) * _DAY
            else:
                vstart = lu // _DAY * _DAY + (1 + int(rnd() * 30)) * _DAY
            vstart += (13 + int(rnd() * 9)) * _HOUR + int(rnd() * 4) * 15 * _MIN
            atype = 0 if not visits else 1 if rnd() < 0.7 else 2
            minutes = _APPT_MINUTES[atype]
            n_appt += 1
            appt: dict[str, Any] = {
                "resourceType": "Appointment", "id": str(n_appt), "meta": m(lu),
                "status": "booked" if booked else "cancelled", "appointmentType": _thaw(_APPT_TYPES[atype]),
                "start": _dt(vstart), "end": _dt(vstart + minutes * _MIN), "minutesDuration": minutes,
                "created": _dt(lu - int(rnd() * _DAY)),
                "participant": [
                    {"actor": {"reference": pref}, "status": "accepted"},
                    {"actor": {"reference": f"Practitioner/{doctor}"}, "status": "accepted"},
                    {"actor": {"reference": f"Location/{loc}"}, "status": "accepted"},
                ],
            }
            if not booked:
                appt["cancelationReason"] = _thaw(_CANCEL_PAT)
            add(appt)

        # conditions (0-3, avg ~1)
        k = int(rnd() * 10)
        for _ in range(0 if k < 3 else 1 if k < 8 else 2 if k < 9 else 3):
            lu = uni()
            onset = lu - int(rnd() * 5 * _YEAR)
            n_cond += 1
            add({
                "resourceType": "Condition", "id": str(n_cond), "meta": m(lu),
                "clinicalStatus": _thaw(_COND_CLINICAL["active" if rnd() < 0.75 else "resolved"]),
                "verificationStatus": _thaw(_COND_VERIFIED), "category": _thaw(_COND_CAT),
                "code": _thaw(pick(_COND_CODES)),
                "subject": {"reference": pref}, "onsetDateTime": _date(onset if onset > birth else birth),
                "recordedDate": _dt(lu - int(rnd() * _HOUR)),
                "recorder": {"reference": f"Practitioner/{doctor}"},
            })

        # medications (0-2, avg ~0.8)
        k = int(rnd() * 10)
        for _ in range(0 if k < 4 else 1 if k < 8 else 2):
            lu = uni()
            active = rnd() < 0.7
            med_start = lu - int(rnd() * _YEAR)
            period: dict[str, str] = {"start": _date(med_start if med_start > birth else birth)}
            if not active:
                period["end"] = _date(lu)
            n_med += 1
            add({
                "resourceType": "MedicationStatement", "id": str(n_med), "meta": m(lu),
                "status": "active" if active else "completed",
                "medicationCodeableConcept": _thaw(pick(_MED_CODES)), "subject": {"reference": pref},
                "effectivePeriod": period, "dateAsserted": _dt(lu),
                "informationSource": {"reference": f"Practitioner/{doctor}"},
                "dosage": [{"text": "Use as directed (synthetic)"}],
            })

        # allergies (0-2, avg ~0.4)
        k = int(rnd() * 10)
        for _ in range(0 if k < 7 else 1 if k < 9 else 2):
            lu = uni()
            code, category = pick(_ALLERGY_CODES)
            n_alg += 1
            add({
                "resourceType": "AllergyIntolerance", "id": str(n_alg), "meta": m(lu),
                "clinicalStatus": _thaw(_ALLERGY_ACTIVE), "verificationStatus": _thaw(_ALLERGY_CONFIRMED),
                "type": "allergy", "category": [category],
                "criticality": "high" if rnd() < 0.15 else "low",
                "code": _thaw(code), "patient": {"reference": pref}, "recordedDate": _dt(lu),
                "recorder": {"reference": f"Practitioner/{doctor}"},
                "reaction": [{"manifestation": [_thaw(pick(_REACTION_CODES))]}],
            })

        # immunizations (certified track, dotted ids; 0-3, avg ~0.7)
        k = int(rnd() * 20)
        for _ in range(0 if k < 10 else 1 if k < 17 else 2 if k < 19 else 3):
            lu = uni()
            n_imm += 1
            add({
                "resourceType": "Immunization", "id": f"{DOTTED_ID_PREFIX}{n_imm}", "meta": m(lu),
                "status": "completed", "vaccineCode": _thaw(pick(_VACCINE_CODES)),
                "patient": {"reference": pref},
                "occurrenceDateTime": _dt(lu - int(rnd() * 2 * _DAY)), "recorded": _dt(lu),
                "primarySource": True, "lotNumber": f"LOT{rng.randrange(10**6):06d}",
                "performer": [{"actor": {"reference": f"Practitioner/{doctor}"}}],
            })

        # lab: a DiagnosticReport with its panel's Observations for about a fifth of the patients
        if rnd() < 0.2:
            lu = uni()
            eff = _dt(lu - _DAY - int(rnd() * 2 * _DAY))
            panel_code, _, analytes = pick(_LAB_PANELS)
            result = []
            for acode, _name, ucum, lo, hi, digits in analytes:
                n_lab += 1
                lab_id = str(n_lab)
                result.append({"reference": f"Observation/{lab_id}"})
                lab_value: float = round(lo + rnd() * (hi - lo) * 1.1, digits)
                if not digits:
                    lab_value = int(lab_value)
                add({
                    "resourceType": "Observation", "id": lab_id, "meta": m(lu),
                    "status": "final", "category": _thaw(_CAT_LAB), "code": _thaw(_ANALYTE_CODES[acode]),
                    "subject": {"reference": pref},
                    "effectiveDateTime": eff, "issued": _instant(lu),
                    "valueQuantity": {"value": lab_value, "unit": ucum, "system": _UCUM, "code": ucum},
                    "referenceRange": [{"low": {"value": lo, "unit": ucum, "system": _UCUM, "code": ucum},
                                        "high": {"value": hi, "unit": ucum, "system": _UCUM, "code": ucum}}],
                })
            n_dr += 1
            add({
                "resourceType": "DiagnosticReport", "id": str(n_dr), "meta": m(lu),
                "status": "final", "category": _thaw(_CAT_DR_LAB), "code": _thaw(_LAB_CODES[panel_code]),
                "subject": {"reference": pref},
                "effectiveDateTime": eff, "issued": _instant(lu),
                "performer": [{"reference": "Organization/1"}],
                "resultsInterpreter": [{"reference": f"Practitioner/{doctor}"}],
                "result": result,
            })

        # coverage for ~90% of patients
        if rnd() < 0.9:
            lu = uni()
            payer = PAYER_IDS[0] if rnd() < 0.7 else PAYER_IDS[1]
            cov_start = lu - int(rnd() * 3 * _YEAR)
            n_cov += 1
            add({
                "resourceType": "Coverage", "id": str(n_cov), "meta": m(lu), "status": "active",
                "type": _thaw(_COVERAGE_TYPE), "subscriber": {"reference": pref},
                "subscriberId": f"MEM{rng.randrange(10**9):09d}",
                "beneficiary": {"reference": pref}, "relationship": _thaw(_REL_SELF),
                "period": {"start": _date(cov_start if cov_start > birth else birth)},
                "payor": [{"reference": f"Organization/{payer}"}],
                "class": [{"type": _thaw(_COVERAGE_CLASS_PLAN),
                           "value": "PLAN-1" if payer == PAYER_IDS[0] else "PLAN-2"}],
            })

        # referral for ~20% of patients
        if rnd() < 0.2:
            lu = uni()
            n_sr += 1
            add({
                "resourceType": "ServiceRequest", "id": str(n_sr), "meta": m(lu),
                "status": "active", "intent": "order", "category": _thaw(_CAT_REFERRAL),
                "code": _thaw(pick(_REFERRAL_CODES)), "subject": {"reference": pref},
                "authoredOn": _dt(lu - int(rnd() * _HOUR)),
                "requester": {"reference": f"Practitioner/{doctor}"},
                "reasonCode": [_thaw(pick(_COND_CODES))],
            })

        # the patient: last updated before (or with) the oldest of its resources
        if lus:
            p_lu = min(lus) - int(rnd() * 30 * _DAY)
            if p_lu < start:
                p_lu = start
            last = _instant(max(lus))
            if last > latest:
                latest = last
        else:
            p_lu = uni()
            last = _instant(p_lu)
            if last > latest:
                latest = last
        city, state, zip2 = pick(_CITIES)
        yield {
            "resourceType": "Patient", "id": pid, "meta": _meta(p_lu), "active": True,
            "identifier": [{"system": MRN_SYSTEM,
                            "value": f"MRN{(pnum * mrn_mul + mrn_off) % mrn_mod:0{mrn_width}d}"}],
            "name": [{"use": "official", "family": family, "given": [given]}],
            "gender": "female" if female else "male",
            "birthDate": _date(birth),
            "telecom": [{"system": "phone", "value": f"(555) 555-01{int(rnd() * 100):02d}", "use": "home"},
                        {"system": "email", "value": f"patient{pid}@example.org"}],
            "address": [{"use": "home", "line": [f"{100 + int(rnd() * 9900)} {pick(_STREETS)}"],
                         "city": city, "state": state,
                         "postalCode": f"{zip2}{(zip_base + pnum) % 1000:03d}", "country": "US"}],
            "generalPractitioner": [{"reference": f"Practitioner/{doctor}"}],
            "managingOrganization": {"reference": "Organization/1"},
        }
        yield from children

    all_ids = range(1, patients + 1)
    yield _group("all-patients", "All patients (synthetic practice)", all_ids, latest)
    yield _group("cohort-a", "Cohort A (every third patient)", range(1, patients + 1, 3), latest)

