"""The production-shaped stack (scripts/stack.py) needs Debian's postgresql and redis-server and the
[stack] extra: a test skips without them on a laptop and fails under CI=true."""

from __future__ import annotations

import pytest

from scripts.stack import missing_parts
from tests.conftest import IN_CI


@pytest.fixture(scope="session")
def stack_parts() -> None:
    missing = missing_parts()
    if missing:
        message = f"the stack needs {', '.join(missing)} (make system-deps; make venv)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
