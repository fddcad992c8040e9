"""Apache Airflow provider for the ModMed EHR (FHIR R4, proprietary and ONC-certified tracks)."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = ["__version__", "get_provider_info"]


def get_provider_info() -> dict[str, Any]:
    """Provider metadata read by Airflow's providers manager (entry point ``apache_airflow_provider``).

    Importing this must stay cheap: no Airflow import, no network.
    """
    from airflow_provider_modmed.connection_form import CONNECTION_TYPE

    return {
        "package-name": "airflow-provider-modmed",
        "name": "ModMed",
        "description": "ModMed EHR: FHIR R4 over the proprietary partner API and the ONC-certified API "
        "(SMART backend services, Bulk Data export).",
        "versions": [__version__],
        "integrations": [
            {
                "integration-name": "ModMed",
                "external-doc-url": "https://portal.api.modmed.com/",
                "tags": ["service"],
            }
        ],
        "hooks": [
            {"integration-name": "ModMed", "python-modules": ["airflow_provider_modmed.hooks.modmed"]}
        ],
        "operators": [
            {
                "integration-name": "ModMed",
                "python-modules": [
                    "airflow_provider_modmed.operators.resources",
                    "airflow_provider_modmed.operators.search",
                    "airflow_provider_modmed.operators.documents",
                    "airflow_provider_modmed.operators.bulk_export",
                ],
            }
        ],
        "sensors": [
            {"integration-name": "ModMed", "python-modules": ["airflow_provider_modmed.sensors.changes"]}
        ],
        "triggers": [
            {
                "integration-name": "ModMed",
                "python-modules": [
                    "airflow_provider_modmed.triggers.changes",
                    "airflow_provider_modmed.triggers.bulk_export",
                ],
            }
        ],
        "connection-types": [CONNECTION_TYPE],
        "config": {
            "modmed": {
                "description": "ModMed provider settings.",
                "options": {
                    "output_base": {
                        "description": "Base URL of search output when an operator's output_path is not given "
                        "(use object storage, e.g. s3://bucket/modmed, on multi-worker deployments).",
                        "version_added": "0.1.0",
                        "type": "string",
                        "example": "s3://bucket/modmed",
                        "default": "file:///tmp/modmed",
                    }
                },
            }
        },
    }
