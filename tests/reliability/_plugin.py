"""Fixtures and hooks shared by ``tests/reliability`` and ``tests/security`` (imported by their conftests)."""

from __future__ import annotations

from typing import Any

import pytest

from tests.reliability._figures import Figures, save

_KEY = pytest.StashKey[Figures]()
_OUTCOME = pytest.StashKey[str]()


@pytest.fixture
def figures(request: pytest.FixtureRequest) -> Figures:
    """This test's figures; saved to ``out/reliability-figures.json`` after the test."""
    fig = Figures(request.node.nodeid)
    request.node.stash[_KEY] = fig
    return fig


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[Any]) -> Any:
    report = yield
    if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
        outcome = "xfailed" if hasattr(report, "wasxfail") and report.skipped else report.outcome
        item.stash[_OUTCOME] = outcome
    if report.when == "teardown":
        save(item.nodeid, item.stash.get(_KEY, None), item.stash.get(_OUTCOME, report.outcome))
    return report
