"""The Airflow-free ModMed client: config, auth flows, rate budget, retries, FHIR flows, two faces.

Usable from any Python program::

    from airflow_provider_modmed.client import ClientConfig, FhirClient

    config = ClientConfig(track="proprietary", fhir_base=".../apiportal/ema/fhir/v2", firm="apiportal",
                          api_key=..., username=..., password=...)
    with FhirClient(config) as client:
        for patient in client.search("Patient", {"family": "Smith"}):
            ...
"""

from __future__ import annotations

from airflow_provider_modmed.client._flows import (
    FhirContext,
    Included,
    InvalidIdError,
    encode_id,
    next_page_request,
    validate_id,
)
from airflow_provider_modmed.client.auth import (
    NO_CREDENTIALS,
    ClientCredentialsAuth,
    ModMedAuth,
    PasswordGrantAuth,
    SmartBackendAuth,
    TokenCache,
    auth_from_config,
    token_cache,
)
from airflow_provider_modmed.client.config import AuthMethod, ClientConfig
from airflow_provider_modmed.client.drivers import Emit, Sleep, adrive, aiterate, drive, iterate
from airflow_provider_modmed.client.fhir import AsyncFhirClient, FhirClient
from airflow_provider_modmed.client.limiter import RateBudget
from airflow_provider_modmed.client.retry import retry_after_seconds, retry_kwargs
from airflow_provider_modmed.client.writes import PatchResult, json_merge_patch
from airflow_provider_modmed.profile import certified_fhir_base, proprietary_fhir_base

__all__ = [
    "NO_CREDENTIALS",
    "AsyncFhirClient",
    "AuthMethod",
    "ClientConfig",
    "ClientCredentialsAuth",
    "Emit",
    "FhirClient",
    "FhirContext",
    "Included",
    "InvalidIdError",
    "ModMedAuth",
    "PasswordGrantAuth",
    "PatchResult",
    "RateBudget",
    "Sleep",
    "SmartBackendAuth",
    "TokenCache",
    "adrive",
    "aiterate",
    "auth_from_config",
    "certified_fhir_base",
    "drive",
    "encode_id",
    "iterate",
    "json_merge_patch",
    "next_page_request",
    "proprietary_fhir_base",
    "retry_after_seconds",
    "retry_kwargs",
    "token_cache",
    "validate_id",
]
