"""The ModMed connection form in Airflow's real UI, driven in headless Chromium.

Every declared field is shown with its label and help text, secrets are masked inputs, a connection to
the sandbox saves and tests green from the list, and a wrong API key tests red with a clear message.
The connections `make airflow` saves are listed in Admin -> Connections, open in the form and test green.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from concurrent.futures import Future
from typing import Any

import httpx
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


def screenshot_dialog(page: Any, dialog: Any, name: str) -> None:
    """Screenshot the whole dialog: the viewport grows to fit it (a taller dialog scrolls inside and
    screenshots blank below the fold), then returns to its size."""
    size = page.viewport_size
    tall = int(dialog.evaluate("d => d.scrollHeight")) + 160
    page.set_viewport_size({"width": size["width"], "height": max(size["height"], tall)})
    dialog.screenshot(path=str(OUT / name))
    page.set_viewport_size(size)


def form_labels(dialog: Any) -> list[str]:
    """The dialog's field labels in the order it shows them, without the required marker (*)."""
    return [text.removesuffix("*").strip() for text in dialog.locator("label[data-part='label']").all_inner_texts()]


def delete_connections(base: str, conn_ids: Iterable[str]) -> None:
    for conn_id in conn_ids:
        httpx.delete(f"{base}/api/v2/connections/{conn_id}", timeout=30)


def row_of(page: Any, conn_id: str) -> Any:
    """The list row of one connection (``modmed_certified`` must not match ``modmed_certified_es384``)."""
    return page.get_by_role("row").filter(has=page.get_by_role("cell", name=conn_id, exact=True))


def row_test(page: Any, conn_id: str) -> str:
    """Click a row's Test button on a freshly loaded list and return the toast's text (green or red)."""
    row_of(page, conn_id).get_by_role("button", name="Test Connection").click()
    toast = page.get_by_role("status").filter(has_text=re.compile(r"Test Connection (Successful|Failed)"))
    toast.first.wait_for()
    return str(toast.first.inner_text())


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
        screenshot_dialog(page, dialog, screenshot)
    dialog.get_by_role("button", name="Save").click()
    dialog.wait_for(state="hidden")
    return dialog


def test_the_form_shows_every_field_masks_secrets_and_tests_against_the_sandbox(
        sb: SandboxServer, airflow_ui: str, page: Any) -> None:
    page.set_viewport_size({"width": 1400, "height": 900})  # toasts sit at the viewport's foot
    page.goto(f"{airflow_ui}/connections")
    page.get_by_role("button", name="Add Connection").click()
    dialog = page.get_by_role("dialog")
    combo = dialog.get_by_role("combobox", name="Connection Type")
    combo.click()
    combo.fill("ModMed")
    page.get_by_role("option", name="ModMed", exact=True).click()
    open_section(dialog, "Standard Fields")
    relabel, placeholders = UI_FIELD_BEHAVIOUR["relabeling"], UI_FIELD_BEHAVIOUR["placeholders"]
    for role, field in (("textbox", "host"), ("spinbutton", "port"), ("textbox", "login")):
        element = dialog.get_by_role(role, name=relabel[field])
        assert element.is_visible(), field
        assert element.get_attribute("placeholder") == placeholders[field], field
    password = dialog.get_by_label(relabel["password"], exact=True)
    assert password.get_attribute("type") == "password"
    assert password.get_attribute("placeholder") == placeholders["password"]
    screenshot_dialog(page, dialog, "connection-form-standard.png")
    open_section(dialog, "Extra Fields")
    # the fields of one track stand together: the dialog shows them in the declared order
    declared = [spec["label"] for spec in CONN_FIELDS.values()]
    assert [label for label in form_labels(dialog) if label in declared] == declared
    for name, spec in CONN_FIELDS.items():
        schema = spec["schema"]
        assert dialog.get_by_text(spec["description"], exact=True).is_visible(), name
        element = dialog.locator(f"#element_{name}")
        if schema.get("format") == "password":
            assert element.get_attribute("type") == "password", name
        if "null" not in schema["type"]:  # required: marked with * and by the input
            assert element.get_attribute("required") is not None, name
            assert dialog.locator("label").filter(has_text=spec["label"]).first.inner_text().endswith("*"), name
        if "examples" in schema:  # offered as suggestions under the input
            options = dialog.locator(f"#list_{name} option").evaluate_all("os => os.map(o => o.value)")
            assert options == schema["examples"], name
    assert dialog.locator("#element_firm_url_prefix").get_attribute("required") is not None
    screenshot_dialog(page, dialog, "connection-form-extra.png")
    page.keyboard.press("Escape")

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
    delete_connections(airflow_ui, ["modmed_ui_good", "modmed_ui_bad_key"])  # the list screenshot shows the rest


def test_make_airflow_connections_are_listed_open_in_the_form_and_test_green(
        sb: SandboxServer, airflow_ui: str, saved_by_make_airflow: Future[list[str]], page: Any) -> None:
    conns = sb.credentials["airflow_connections"]
    try:
        # saved over a stale modmed_default while the api-server booted (conftest): updated, not refused
        assert saved_by_make_airflow.result(timeout=300) == sorted(conns)

        page.set_viewport_size({"width": 1400, "height": 900})
        page.goto(f"{airflow_ui}/connections")
        for conn_id, conn in conns.items():
            row = row_of(page, conn_id)
            row.wait_for()
            assert conn["host"] in row.inner_text(), conn_id
        page.screenshot(path=str(OUT / "connections-list.png"))

        row_of(page, "modmed_default").get_by_role("button", name="Edit Connection").click()
        dialog = page.get_by_role("dialog")
        relabel = UI_FIELD_BEHAVIOUR["relabeling"]
        assert dialog.get_by_role("textbox", name=relabel["host"]).input_value() == conns["modmed_default"]["host"]
        open_section(dialog, "Extra Fields")
        assert dialog.locator("#element_api_key").get_attribute("type") == "password"
        assert dialog.locator("#element_firm_url_prefix").input_value() == conns["modmed_default"]["extra"][
            "firm_url_prefix"]
        page.keyboard.press("Escape")
        dialog.wait_for(state="hidden")

        for conn_id in ("modmed_default", "modmed_certified"):
            page.goto(f"{airflow_ui}/connections")  # a fresh page: no toast left from the last test
            text = row_test(page, conn_id)
            assert "Test Connection Successful" in text, (conn_id, text)
    finally:
        delete_connections(airflow_ui, conns)
