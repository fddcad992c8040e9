"""ModMed's documented facts, once: hosts and URL layouts per track and environment, identifier and
extension systems.

Read by the client, the operators, the connection form and the sandbox; nothing here is copied
elsewhere. (The sandbox's own tests state the documented values literally, from
``reference/modmed-api.md``, so a wrong fact here still shows.) Per-resource facts (interactions,
``_count`` maxima, ``_lastUpdated`` support) live in :mod:`airflow_provider_modmed.capabilities`.
"""

from __future__ import annotations

from urllib.parse import urlsplit

# -- hosts and URL layouts ------------------------------------------------------------------------

#: proprietary (partner) API: the environment base URL of each named environment; a practice's FHIR
#: base is ``{environment base}/{firm_url_prefix}/ema/fhir/v2``
PROPRIETARY_ENVIRONMENTS: dict[str, str] = {
    "sandbox": "https://stage.ema-api.com/ema-dev/firm",
    "training": "https://stage.ema-api.com/ema-training/firm",
    "production": "https://mmapi.ema-api.com/ema-prod/firm",
}
#: the firm URL prefix of ModMed's public sandbox practice
PUBLIC_SANDBOX_FIRM = "apiportal"
#: proprietary track: FHIR base below ``{environment base}/{firm}``
PROPRIETARY_FHIR_SUFFIX = "/ema/fhir/v2"
#: proprietary track: the OAuth2 password grant endpoint below ``{environment base}/{firm}``
PROPRIETARY_GRANT_SUFFIX = "/ema/ws/oauth2/grant"
#: proprietary track, auth B: the Keycloak realm's token endpoint path (client_credentials)
KEYCLOAK_TOKEN_PATH = "/auth/realms/ema-fhir/protocol/openid-connect/token"  # noqa: S105
#: certified (ONC) API: one host per practice, the firm prefix as subdomain
CERTIFIED_BASE_TEMPLATE = "https://{firm}.mmi.prod.fhir.ema-api.com/fhir/r4"
#: certified track: the documented FHIR base template of each environment. ModMed documents only the
#: production host; a certified sandbox or training practice has no published host (its base URL comes
#: from ModMed or the practice), so those environments are absent here, never mapped to production
CERTIFIED_ENVIRONMENTS: dict[str, str] = {"production": CERTIFIED_BASE_TEMPLATE}
#: certified track: the FHIR base's path below the practice's root (``.../{firm}/fhir/r4``)
CERTIFIED_FHIR_SUFFIX = "/fhir/r4"


def proprietary_fhir_base(env_base: str, firm: str) -> str:
    """``{env_base}/{firm}/ema/fhir/v2``, e.g. for ``https://stage.ema-api.com/ema-dev/firm``."""
    return f"{env_base.rstrip('/')}/{firm}{PROPRIETARY_FHIR_SUFFIX}"


def proprietary_grant_url(env_base: str, firm: str) -> str:
    """``{env_base}/{firm}/ema/ws/oauth2/grant``: the password grant of one practice."""
    return f"{env_base.rstrip('/')}/{firm}{PROPRIETARY_GRANT_SUFFIX}"


def grant_url_of(fhir_base: str) -> str | None:
    """The password grant beside a proprietary FHIR base (``.../ema/fhir/v2``); None for another layout."""
    base = fhir_base.rstrip("/")
    if not base.endswith(PROPRIETARY_FHIR_SUFFIX):
        return None
    return base[: -len(PROPRIETARY_FHIR_SUFFIX)] + PROPRIETARY_GRANT_SUFFIX


def environment_path(environment: str) -> str:
    """The path of a named environment's base below its host, e.g. ``/ema-dev/firm`` for ``sandbox``."""
    return urlsplit(PROPRIETARY_ENVIRONMENTS[environment]).path


def certified_fhir_base(firm: str) -> str:
    """The certified (ONC) API's FHIR base of one practice."""
    return CERTIFIED_BASE_TEMPLATE.format(firm=firm)


# -- identifier, extension and code systems -------------------------------------------------------

#: a ChargeItem's ``transactionId`` (ModMed refuses a duplicate with 409)
TRANSACTION_ID_SYSTEM = "https://www.modmed.com/fhir/transaction-id"
#: the extension of a Binary that carries the presigned upload URL (document upload, step 2)
PRESIGNED_URL_EXTENSION = "https://www.modmed.com/fhir/StructureDefinition/presigned-url"
#: the extension of a created Coverage that carries its reconciliation id
RECONCILIATION_EXTENSION = "https://www.modmed.com/fhir/StructureDefinition/reconciliation-id"
#: DocumentReference categories (the ``document-category`` ValueSet)
DOCUMENT_CATEGORY_SYSTEM = "https://www.modmed.com/fhir/document-category"
#: Appointment types
APPOINTMENT_TYPE_SYSTEM = "https://www.modmed.com/fhir/appointment-type"
#: payer ids on Organizations (insurers)
PAYER_ID_SYSTEM = "https://www.modmed.com/fhir/payer-id"
#: ModMed's ValueSets: ``{VALUE_SET_BASE}/{id}``
VALUE_SET_BASE = "https://www.modmed.com/fhir/ValueSet"

# -- code conventions -----------------------------------------------------------------------------

#: Condition create: ModMed takes the clinical status codes of FHIR's ``condition-clinical`` system
#: upper-case (``ACTIVE``, not ``active``) and refuses other spellings with 400
CONDITION_CLINICAL_STATUS_CODES = ("ACTIVE", "RECURRENCE", "RELAPSE", "INACTIVE", "REMISSION", "RESOLVED")
