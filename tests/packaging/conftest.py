"""The wheel, built once for every packaging test."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.packaging.venvs import build_wheel


@pytest.fixture(scope="session")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The provider's wheel built from the source tree."""
    return build_wheel(tmp_path_factory.mktemp("dist"))
