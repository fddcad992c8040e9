"""`make demo`: start the ModMed sandbox and take a short scripted tour of both API tracks.

Prints what happened, never a secret or a patient's data beyond ids and counts.
"""

from __future__ import annotations

import sys
import time

import httpx

from airflow_provider_modmed.sandbox.server import SandboxServer


def main() -> int:
    started = time.monotonic()
    with SandboxServer(patients=100, seed=1) as sb:
        creds = sb.credentials
        prop, cert = creds["proprietary"], creds["certified"]
        print(f"sandbox up in {time.monotonic() - started:.1f}s: API {sb.api_url}, object storage {sb.storage_url}")

        # proprietary track: password grant + x-api-key
        grant = httpx.post(prop["token_url"], headers={"x-api-key": prop["api_key"]}, data={
            "grant_type": "password", "username": prop["username"], "password": prop["password"]})
        grant.raise_for_status()
        print(f"1. proprietary token: HTTP {grant.status_code}, fields {sorted(grant.json())} (no expires_in)")
        api = httpx.Client(base_url=prop["fhir_base"] + "/", headers={
            "x-api-key": prop["api_key"], "Authorization": f"Bearer {grant.json()['access_token']}"})

        page = api.get("Patient", params={"_count": 50}).json()
        nxt = [link["relation"] for link in page["link"]]
        print(f"2. search Patient: {len(page['entry'])} on page 1, Bundle.total={page['total']} (per page), "
              f"links {nxt}")

        created = api.post("Patient", json={
            "resourceType": "Patient", "name": [{"family": "Demo", "given": ["Tour"]}],
            "identifier": [{"system": "urn:demo", "value": "tour-1"}]},
            headers={"If-None-Exist": "identifier=urn:demo|tour-1"})
        pid = created.json()["id"]
        print(f"3. conditional create Patient: HTTP {created.status_code}, id {pid}, "
              f"Location {created.headers['location'].removeprefix(sb.api_url)}")

        read = api.get(f"Patient/{pid}")
        print(f"4. read Patient/{pid}: HTTP {read.status_code}, version {read.json()['meta']['versionId']}")

        refused = api.get("Immunization")
        print(f"5. Immunization on the proprietary track: HTTP {refused.status_code} "
              f"({refused.json()['issue'][0]['diagnostics']})")

        # certified track: SMART backend services (client_secret_post here)
        token = httpx.post(cert["token_url"], data={"grant_type": "client_credentials", "scope": "system/*.read",
                                                    **cert["client_secret_post"]}).json()
        fhir = httpx.Client(base_url=cert["fhir_base"] + "/",
                            headers={"Authorization": f"Bearer {token['access_token']}"})
        imm = fhir.get("Immunization", params={"_count": 10}).json()
        print(f"6. certified token (expires_in {token['expires_in']}), Immunization search: total {imm['total']}")

        kick = fhir.get("$export", params={"_type": "Patient,Immunization"},
                        headers={"Accept": "application/fhir+json", "Prefer": "respond-async"})
        status_url = kick.headers["content-location"]
        polls = 0
        while (status := fhir.get(status_url)).status_code == 202:
            polls += 1
            time.sleep(float(status.headers.get("retry-after", "1")))
        manifest = status.json()
        counts = {o["type"]: 0 for o in manifest["output"]}
        for item in manifest["output"]:
            counts[item["type"]] += sum(1 for line in httpx.get(item["url"]).iter_lines() if line)
        print(f"7. bulk $export: HTTP {kick.status_code}, {polls} polls, downloaded {counts} "
              f"(requiresAccessToken={manifest['requiresAccessToken']})")
        print(f"demo finished in {time.monotonic() - started:.1f}s; sandbox calls: {sb.stats()['requests']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
