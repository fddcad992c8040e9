"""The sandbox's fixed codes and formatting helpers: code tables (LOINC, SNOMED, ICD-10, RxNorm, CVX,
CPT), synthetic name and address pools, ModMed id conventions, and the marshalled ("frozen") codings
that :mod:`.seed` thaws into every generated resource. Split from :mod:`.seed` so each stays small."""

from __future__ import annotations

import datetime
import marshal
import time
from typing import Any

from airflow_provider_modmed.client.instants import epoch_ms, format_instant
from airflow_provider_modmed.profile import (
    APPOINTMENT_TYPE_SYSTEM,
    DOCUMENT_CATEGORY_SYSTEM,
)

MRN_SYSTEM = "urn:oid:2.16.840.1.113883.3.modmed.mrn"
#: prefix of the certified API's dotted ids (Immunization, vital-sign Observation)
DOTTED_ID_PREFIX = "1.120182.1."
#: payer Organization ids (composite, ModMed style)
PAYER_IDS = ("pay|7225", "pay|7226")
#: resource types whose ids may carry a pipe (invalid under FHIR's id regex; a ModMed quirk)
COMPOSITE_ID_TYPES = frozenset({"Organization", "ChargeItem"})

_LOINC = "http://loinc.org"
_UCUM = "http://unitsofmeasure.org"
_SNOMED = "http://snomed.info/sct"
_OBS_CAT = "http://terminology.hl7.org/CodeSystem/observation-category"
_NPI = "http://hl7.org/fhir/sid/us-npi"
_ORG_TYPE = "http://terminology.hl7.org/CodeSystem/organization-type"

#: (code, display) of the firm's document categories
DOCUMENT_CATEGORIES: tuple[tuple[str, str], ...] = (
    ("CLINICAL", "Clinical Note"),
    ("LAB", "Lab Result"),
    ("INSURANCE", "Insurance Card"),
    ("REFERRAL", "Referral Letter"),
    ("CONSENT", "Consent Form"),
)
#: (code, display, minutes) of the firm's appointment types
APPOINTMENT_TYPES: tuple[tuple[str, str, int], ...] = (
    ("NEW", "New Patient Visit", 30),
    ("FOLLOWUP", "Follow-up Visit", 15),
    ("PROC", "Procedure", 45),
    ("POSTOP", "Post-operative Visit", 15),
)

_FAMILY = (
    "Testperson", "Synthetic", "Sampleton", "Fakename", "Mockley", "Placeholder", "Dummyworth",
    "Examplar", "Fixture", "Stubbs", "Demoson", "Pseudonym", "Notreal", "Fictitia", "Specimenez",
    "Trialsworth",
)
_GIVEN_F = ("Alpha", "Delta", "Echo", "India", "Juliet", "Lima", "Oscar-Ann", "Sierra", "Tango-Lyn",
            "Whiskey-Mae", "Yankee-Sue", "Zulu-Belle")
_GIVEN_M = ("Bravo", "Charlie", "Foxtrot", "Golf", "Hotel", "Kilo", "Mike", "November", "Papa", "Quebec",
            "Romeo", "Victor", "X-Ray")
_STREETS = ("Example St", "Sample Ave", "Test Blvd", "Fixture Ln", "Mock Rd", "Synthetic Way", "Demo Ct")
_CITIES = (("Testville", "FL", "33"), ("Sampleton", "FL", "34"), ("Mockburg", "GA", "30"),
           ("Fakeport", "AL", "35"))

# LOINC vital signs: (code, display, unit, ucum, low, high, decimals)
_HR = ("8867-4", "Heart rate", "beats/minute", "/min", 52, 104, 0)
_WEIGHT = ("29463-7", "Body weight", "kg", "kg", 45, 120, 1)
_HEIGHT = ("8302-2", "Body height", "cm", "cm", 150, 195, 1)

# lab panels: (LOINC, display, analytes: (LOINC, display, ucum, low, high, decimals))
_LAB_PANELS: tuple[tuple[str, str, tuple[tuple[str, str, str, float, float, int], ...]], ...] = (
    ("58410-2", "CBC panel - Blood by Automated count", (
        ("6690-2", "Leukocytes [#/volume] in Blood by Automated count", "10*3/uL", 3.5, 11.0, 1),
        ("718-7", "Hemoglobin [Mass/volume] in Blood", "g/dL", 11.0, 17.5, 1),
        ("777-3", "Platelets [#/volume] in Blood by Automated count", "10*3/uL", 140, 420, 0),
    )),
    ("51990-0", "Basic metabolic panel - Blood", (
        ("2345-7", "Glucose [Mass/volume] in Serum or Plasma", "mg/dL", 70, 160, 0),
        ("2160-0", "Creatinine [Mass/volume] in Serum or Plasma", "mg/dL", 0.5, 1.4, 2),
        ("2951-2", "Sodium [Moles/volume] in Serum or Plasma", "mmol/L", 134, 146, 0),
        ("2823-3", "Potassium [Moles/volume] in Serum or Plasma", "mmol/L", 3.4, 5.2, 1),
    )),
    ("57698-3", "Lipid panel with direct LDL - Serum or Plasma", (
        ("2093-3", "Cholesterol [Mass/volume] in Serum or Plasma", "mg/dL", 130, 280, 0),
        ("2571-8", "Triglyceride [Mass/volume] in Serum or Plasma", "mg/dL", 50, 300, 0),
        ("2085-9", "Cholesterol in HDL [Mass/volume] in Serum or Plasma", "mg/dL", 30, 90, 0),
    )),
)

_CONDITIONS = (
    ("L70.0", "Acne vulgaris"), ("L40.0", "Psoriasis vulgaris"),
    ("L20.9", "Atopic dermatitis, unspecified"), ("L57.0", "Actinic keratosis"),
    ("L82.1", "Other seborrheic keratosis"), ("I10", "Essential hypertension"),
    ("E11.9", "Type 2 diabetes mellitus without complications"), ("J30.9", "Allergic rhinitis, unspecified"),
    ("L71.9", "Rosacea, unspecified"), ("E78.5", "Hyperlipidemia, unspecified"),
)
_MEDICATIONS = (
    ("314076", "lisinopril 10 MG Oral Tablet"), ("197361", "amlodipine 5 MG Oral Tablet"),
    ("860975", "24 HR metformin hydrochloride 500 MG Extended Release Oral Tablet"),
    ("617314", "atorvastatin 10 MG Oral Tablet"), ("310965", "ibuprofen 200 MG Oral Tablet"),
    ("308182", "amoxicillin 250 MG Oral Capsule"), ("106258", "hydrocortisone 10 MG/ML Topical Cream"),
)
# (system, code, display, category)
_ALLERGENS = (
    ("http://www.nlm.nih.gov/research/umls/rxnorm", "70618", "Penicillin", "medication"),
    ("http://www.nlm.nih.gov/research/umls/rxnorm", "1191", "Aspirin", "medication"),
    ("http://www.nlm.nih.gov/research/umls/rxnorm", "2670", "Codeine", "medication"),
    (_SNOMED, "111088007", "Latex (substance)", "environment"),
    (_SNOMED, "256349002", "Peanut - dietary (substance)", "food"),
    (_SNOMED, "227493005", "Cashew nuts (substance)", "food"),
)
_REACTIONS = (("271807003", "Eruption of skin"), ("247472004", "Wheal"), ("39579001", "Anaphylaxis"),
              ("418290006", "Itching"))
_VACCINES = (
    ("140", "Influenza, seasonal, injectable, preservative free"),
    ("208", "COVID-19, mRNA, LNP-S, PF, 30 mcg/0.3 mL dose"),
    ("115", "Tdap"), ("33", "pneumococcal polysaccharide vaccine, 23 valent"),
    ("187", "zoster vaccine recombinant"), ("43", "Hep B, adult"), ("03", "MMR"),
)
# CPT (code, display, price); the order matters: see the visit's charge below
_CPT = (
    ("99213", "Office/outpatient visit est, low MDM", 110.0),
    ("99214", "Office/outpatient visit est, mod MDM", 165.0),
    ("99203", "Office/outpatient visit new, low MDM", 150.0),
    ("17000", "Destruction premalignant lesion", 120.0),
    ("11102", "Tangential biopsy of skin, single lesion", 140.0),
)
_REFERRALS = (
    ("183521007", "Referral to dermatology service"), ("183519002", "Referral to cardiology service"),
    ("306253008", "Referral to allergy service"), ("183545006", "Referral to orthopedic service"),
)
_PRACTITIONERS = (
    ("Exampleman", "Ada", "female", "MD"), ("Fakerson", "Basil", "male", "MD"),
    ("Samplesmith", "Cora", "female", "DO"), ("Mockingham", "Dov", "male", "PA-C"),
    ("Testwell", "Eun", "female", "NP"),
)

_MIN = 60_000
_HOUR = 3_600_000
_DAY = 86_400_000
_YEAR = 31_557_600_000  # 365.25 days

# -- cheap formatting ---------------------------------------------------------------------------------

_gmtime = time.gmtime


_instant = format_instant  # UTC instant with milliseconds: ``2025-03-04T10:11:12.345Z``


def _dt(ms: int) -> str:
    """UTC dateTime with seconds: ``2025-03-04T10:11:12Z``."""
    t = _gmtime(ms // 1000)
    return f"{t[0]:04d}-{t[1]:02d}-{t[2]:02d}T{t[3]:02d}:{t[4]:02d}:{t[5]:02d}Z"


def _date(ms: int) -> str:
    t = _gmtime(ms // 1000)
    return f"{t[0]:04d}-{t[1]:02d}-{t[2]:02d}"


def _meta(ms: int) -> dict[str, str]:
    return {"versionId": "1", "lastUpdated": _instant(ms)}


def _cc(system: str, code: str, display: str) -> dict[str, Any]:
    return {"coding": [{"system": system, "code": code, "display": display}], "text": display}


def _freeze(obj: Any) -> bytes:
    return marshal.dumps(obj, 2)  # version 2: no back-references, so every thaw is a fresh tree


_thaw = marshal.loads


def _ref(rt: str, rid: str) -> dict[str, str]:
    return {"reference": f"{rt}/{rid}"}


def _now_ms(now: datetime.datetime | None) -> int:
    if now is None:
        now = datetime.datetime.now(datetime.timezone.utc).replace(second=0, microsecond=0)
    elif now.tzinfo is None or now.utcoffset() is None:
        raise ValueError("now must be timezone-aware (UTC)")
    return epoch_ms(now)


# -- fixed, per-practice codes -----------------------------------------------------------------------

# Shared codes are kept as marshalled bytes and thawed (``_thaw``: marshal.loads, C speed) at every use,
# so no two yielded resources share a mutable sub-object and callers may edit resources in place.
_CAT_VITALS = _freeze([{"coding": [{"system": _OBS_CAT, "code": "vital-signs", "display": "Vital Signs"}]}])
_CAT_LAB = _freeze([{"coding": [{"system": _OBS_CAT, "code": "laboratory", "display": "Laboratory"}]}])
_CAT_DR_LAB = _freeze([{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0074", "code": "LAB",
                                    "display": "Laboratory"}]}])
_CAT_REFERRAL = _freeze([_cc(_SNOMED, "3457005", "Patient referral")])
_CAT_NOTE = _freeze([{"coding": [{"system": DOCUMENT_CATEGORY_SYSTEM, "code": "CLINICAL",
                                  "display": "Clinical Note"}]}])
_NOTE_TYPE = _freeze(_cc(_LOINC, "11506-3", "Progress note"))
_CLASS_AMB = _freeze({"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB",
                      "display": "ambulatory"})
_COND_CAT = _freeze([{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-category",
                                  "code": "problem-list-item", "display": "Problem List Item"}]}])
_COND_CLINICAL = {
    s: _freeze({"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical", "code": s,
                            "display": s.capitalize()}]})
    for s in ("active", "resolved", "inactive")
}
_COND_VERIFIED = _freeze({"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-ver-status",
                                      "code": "confirmed", "display": "Confirmed"}]})
_ALLERGY_ACTIVE = _freeze({"coding": [{
    "system": "http://terminology.hl7.org/CodeSystem/allergyintolerance-clinical",
    "code": "active", "display": "Active"}]})
_ALLERGY_CONFIRMED = _freeze({"coding": [{
    "system": "http://terminology.hl7.org/CodeSystem/allergyintolerance-verification",
    "code": "confirmed", "display": "Confirmed"}]})
_COVERAGE_TYPE = _freeze(_cc("http://terminology.hl7.org/CodeSystem/v3-ActCode", "EHCPOL",
                             "extended healthcare"))
_COVERAGE_CLASS_PLAN = _freeze(_cc("http://terminology.hl7.org/CodeSystem/coverage-class", "plan", "Plan"))
_REL_SELF = _freeze({"coding": [{"system": "http://terminology.hl7.org/CodeSystem/subscriber-relationship",
                                 "code": "self", "display": "Self"}]})
_CANCEL_PAT = _freeze(_cc("http://terminology.hl7.org/CodeSystem/appointment-cancellation-reason", "pat",
                          "Patient"))
_APPT_TYPES = [_freeze(_cc(APPOINTMENT_TYPE_SYSTEM, code, display)) for code, display, _ in APPOINTMENT_TYPES]
_APPT_MINUTES = [m for _, _, m in APPOINTMENT_TYPES]
_BP_CODE = _freeze(_cc(_LOINC, "85354-9", "Blood pressure panel with all children optional"))
_SYS_CODE = _freeze(_cc(_LOINC, "8480-6", "Systolic blood pressure"))
_DIA_CODE = _freeze(_cc(_LOINC, "8462-4", "Diastolic blood pressure"))
_VITAL_CODES = {v[0]: _freeze(_cc(_LOINC, v[0], v[1])) for v in (_HR, _WEIGHT, _HEIGHT)}
_LAB_CODES = {p[0]: _freeze(_cc(_LOINC, p[0], p[1])) for p in _LAB_PANELS}
_ANALYTE_CODES = {a[0]: _freeze(_cc(_LOINC, a[0], a[1])) for p in _LAB_PANELS for a in p[2]}
_COND_CODES = [_freeze(_cc("http://hl7.org/fhir/sid/icd-10-cm", c, d)) for c, d in _CONDITIONS]
_MED_CODES = [_freeze(_cc("http://www.nlm.nih.gov/research/umls/rxnorm", c, d)) for c, d in _MEDICATIONS]
_ALLERGY_CODES = [(_freeze(_cc(s, c, d)), cat) for s, c, d, cat in _ALLERGENS]
_REACTION_CODES = [_freeze(_cc(_SNOMED, c, d)) for c, d in _REACTIONS]
_VACCINE_CODES = [_freeze(_cc("http://hl7.org/fhir/sid/cvx", c, d)) for c, d in _VACCINES]
_CPT_CODES = [(_freeze(_cc("http://www.ama-assn.org/go/cpt", c, d)), price) for c, d, price in _CPT]
_REFERRAL_CODES = [_freeze(_cc(_SNOMED, c, d)) for c, d in _REFERRALS]
