"""The ModMed connection form in Airflow's real UI, driven in headless Chromium.

Every declared field is shown with its label and help text, secrets are masked inputs, a connection to
the sandbox saves and tests green from the list, and a wrong API key tests red with a clear message.
"""

from __future__ import annotations

from typing import Any

import pytest

from airflow_provider_modmed.connection_form import CONN_FIELDS, UI_FIELD_BEHAVIOUR
from airflow_provider_modmed.sandbox.server import SandboxServer
from tests.ui.conftest import OUT

pytestmark = [pytest.mark.ui, pytest.mark.integration]


def open_section(dialog: Any, name: str) -> None:
    section = dialog.get_by_role("button", name=name, exact=True)
    if section.get_attribute("aria-expanded") != "true":
        section.click()


def choose(page: Any, dialog: Any, label: str, option: str) -> None:
    dialog.get_by_role("combobox", name=label).click()
    page.get_by_role("option", name=option, exact=True).click()


def add_connection(page: Any, base: str, conn_id: str, sb: SandboxServer, api_key: str,
                   screenshot: str | None = None) -> Any:
    prop = sb.credentials["proprietary"]
    port = int(sb.api_url.rsplit(":", 1)[1])
    page.goto(f"{base}/connections")
    page.get_by_role("button", name="Add Connection").click()
    dialog = page.get_by_role("dialog")
    dialog.get_by_role("textbox", name="Connection ID").fill(conn_id)
    combo = dialog.get_by_role("combobox", name="Connection Type")
    combo.click()
    combo.fill("ModMed")
    page.get_by_role("option", name="ModMed", exact=True).click()
    open_section(dialog, "Standard Fields")
    relabel = UI_FIELD_BEHAVIOUR["relabeling"]
    dialog.get_by_role("textbox", name=relabel["host"]).fill(prop["env_base"])
    # Airflow 3.3.2 tests a saved connection from its list row with the port it shows: give it one
    dialog.get_by_role("spinbutton", name=relabel["port"]).fill(str(port))
    dialog.get_by_role("textbox", name=relabel["login"]).fill(prop["username"])
    dialog.get_by_label(relabel["password"], exact=True).fill(prop["password"])
    open_section(dialog, "Extra Fields")
    choose(page, dialog, CONN_FIELDS["environment"]["label"], "custom")
    dialog.locator("#element_firm_url_prefix").fill("apiportal")
    dialog.locator("#element_api_key").fill(api_key)
    if screenshot:
        page.screenshot(path=str(OUT / screenshot), full_page=True)
    dialog.get_by_role("button", name="Save").click()
    dialog.wait_for(state="hidden")
    return dialog


def test_the_form_shows_every_field_masks_secrets_and_tests_against_the_sandbox(
        sb: SandboxServer, airflow_ui: str, page: Any) -> None:
    page.set_viewport_size({"width": 1400, "height": 2000})  # the whole dialog, for the screenshots
    page.goto(f"{airflow_ui}/connections")
    page.get_by_role("button", name="Add Connection").click()
    dialog = page.get_by_role("dialog")
    combo = dialog.get_by_role("combobox", name="Connection Type")
    combo.click()
    combo.fill("ModMed")
    page.get_by_role("option", name="ModMed", exact=True).click()
    open_section(dialog, "Standard Fields")
    relabel = UI_FIELD_BEHAVIOUR["relabeling"]
    for role, label in (("textbox", relabel["host"]), ("spinbutton", relabel["port"]),
                        ("textbox", relabel["login"])):
        assert dialog.get_by_role(role, name=label).is_visible(), label
    assert dialog.get_by_label(relabel["password"], exact=True).get_attribute("type") == "password"
    page.screenshot(path=str(OUT / "connection-form-standard.png"), full_page=True)
    open_section(dialog, "Extra Fields")
    for name, spec in CONN_FIELDS.items():
        assert dialog.get_by_text(spec["label"], exact=True).is_visible(), name
        assert dialog.get_by_text(spec["description"], exact=True).is_visible(), name
        element = dialog.locator(f"#element_{name}")
        if spec["schema"].get("format") == "password":
            assert element.get_attribute("type") == "password", name
    page.screenshot(path=str(OUT / "connection-form-extra.png"), full_page=True)
    page.keyboard.press("Escape")

    page.set_viewport_size({"width": 1400, "height": 900})  # toasts sit at the viewport's foot
    api_key = sb.credentials["proprietary"]["api_key"]
    add_connection(page, airflow_ui, "modmed_ui_good", sb, api_key, screenshot="connection-form-filled.png")
    row = page.get_by_role("row").filter(has_text="modmed_ui_good")
    row.get_by_role("button", name="Test Connection").click()
    ok = page.get_by_role("status").filter(has_text="Test Connection Successful")
    ok.wait_for()
    assert "authenticated" in ok.inner_text()
    page.wait_for_timeout(800)  # let the toast finish sliding in
    page.screenshot(path=str(OUT / "connection-test-success.png"))

    add_connection(page, airflow_ui, "modmed_ui_bad_key", sb, "sbx-apikey-this-one-is-wrong")
    row = page.get_by_role("row").filter(has_text="modmed_ui_bad_key")
    row.get_by_role("button", name="Test Connection").click()
    failed = page.get_by_role("status").filter(has_text="Test Connection Failed")
    failed.wait_for()
    text = failed.inner_text()
    assert "API key" in text and "403" in text
    assert "sbx-apikey-this-one-is-wrong" not in text
    page.wait_for_timeout(800)
    page.screenshot(path=str(OUT / "connection-test-failure.png"))
