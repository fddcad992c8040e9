"""Issue 14, item 0: constraints.txt lets the production parts in. Airflow's Celery and Amazon providers
resolve next to the provider and its dev extra under the project's pins (celery pins python-dateutil, botocore
caps it below 3, kombu[redis] pins packaging), and every distribution of that set is pinned, so a deployment
built from constraints.txt gets the versions this project tested. Needs PyPI (pip resolves, installs nothing)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from typing import Any

import pytest
from packaging.version import Version

from tests.packaging.venvs import ROOT

pytestmark = [pytest.mark.packaging, pytest.mark.timeout(300)]

CONSTRAINTS = ROOT / "constraints.txt"
PRODUCTION_PARTS = ("apache-airflow-providers-celery", "apache-airflow-providers-amazon")
#: what pip is asked for: the parts with the extras `make stack` uses (s3fs: ObjectStoragePath on S3)
REQUESTED = ("apache-airflow-providers-celery", "apache-airflow-providers-amazon[s3fs]",
             "apache-airflow-providers-postgres", "moto[server]")
#: a resolution that backtracks (a pin the providers reject) runs for many minutes: fail instead
RESOLVE_SECONDS = 240


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins() -> dict[str, Version]:
    """constraints.txt as canonical name -> pinned version."""
    found = {}
    for line in CONSTRAINTS.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not a name==version pin"
            found[canonical(name)] = Version(version)
    return found


@pytest.fixture(scope="module")
def resolved() -> dict[str, Version]:
    """What ``pip install -c constraints.txt -e '.[dev]'`` plus the Celery and Amazon providers would install
    into an empty environment (a dry run with pip's JSON report): canonical name -> version."""
    try:
        result = subprocess.run(
            [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
             "--disable-pip-version-check", "--report", "-", "-c", str(CONSTRAINTS), "-e", f"{ROOT}[dev]",
             *REQUESTED],
            cwd=ROOT, capture_output=True, text=True, timeout=RESOLVE_SECONDS)
    except subprocess.TimeoutExpired:
        pytest.fail(f"pip did not resolve {PRODUCTION_PARTS} under constraints.txt within {RESOLVE_SECONDS} s: "
                    "it is backtracking, a pin conflicts with what they need")
    assert result.returncode == 0, f"not installable under constraints.txt:\n{result.stderr[-4000:]}"
    report: dict[str, Any] = json.loads(result.stdout)
    return {canonical(item["metadata"]["name"]): Version(item["metadata"]["version"]) for item in report["install"]}


def test_celery_and_amazon_providers_install_next_to_the_provider(resolved: dict[str, Version]) -> None:
    pinned = pins()
    for part in (*PRODUCTION_PARTS, "celery", "botocore", "airflow-provider-modmed", "apache-airflow",
                 "apache-airflow-providers-postgres", "s3fs", "aiobotocore", "moto"):
        assert part in resolved, f"{part} is not in the resolution"
    for part in (*PRODUCTION_PARTS, "apache-airflow", "celery", "botocore", "python-dateutil"):
        assert resolved[part] == pinned[part], f"{part}: resolved {resolved[part]}, pinned {pinned[part]}"
    assert resolved["python-dateutil"] < Version("3"), "botocore needs python-dateutil<3"
    # celery 5.7 removed celery.backends.database.retry, which the Celery provider imports: workers die
    assert resolved["celery"] < Version("5.7"), "the Celery provider's workers need celery 5.6"


def test_every_resolved_distribution_is_pinned(resolved: dict[str, Version]) -> None:
    """A deployment built with -c constraints.txt gets the tested versions, not whatever PyPI has that day."""
    pinned = pins()
    unpinned = sorted(f"{name}=={version}" for name, version in resolved.items()
                      if name != "airflow-provider-modmed" and name not in pinned)
    assert not unpinned, f"add to constraints.txt: {unpinned}"
