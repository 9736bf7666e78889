"""Swagger UI (/api/docs/) in Chromium: it renders every operation of the served schema, and
"Try it out" on the health operation sends a real request and shows its 200."""

import pytest
import requests
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as EC

from tests.browser.conftest import wait

pytestmark = pytest.mark.django_db(transaction=True)

METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}


def rendered_operations(driver):
    """(METHOD, path) of every operation block Swagger UI drew."""
    blocks = driver.find_elements(By.CSS_SELECTOR, "#swagger-ui .opblock")
    found = set()
    for block in blocks:
        paths = block.find_elements(By.CSS_SELECTOR, ".opblock-summary-path")
        if paths:
            method = block.find_element(By.CSS_SELECTOR, ".opblock-summary-method").text
            found.add((method.upper(), paths[0].get_attribute("data-path")))
    return found


def test_swagger_ui_renders_every_operation_of_the_schema(browser, live_server):
    schema = requests.get(f"{live_server.url}/api/schema/?format=json", timeout=30).json()
    expected = {(method.upper(), path) for path, item in schema["paths"].items() for method in item if method in METHODS}
    assert len(expected) >= 10
    # OpenAPI 3.1's webhooks (the callback events) are drawn as operations named for the event.
    expected |= {(method.upper(), name) for name, item in schema["webhooks"].items() for method in item}

    browser.get(f"{live_server.url}/api/docs/")
    wait(browser).until(lambda d: rendered_operations(d) >= expected)
    assert rendered_operations(browser) == expected
    assert schema["info"]["title"] in browser.find_element(By.ID, "swagger-ui").text


def test_try_it_out_on_health_shows_a_200(browser, live_server):
    browser.get(f"{live_server.url}/api/docs/")
    summary = wait(browser).until(EC.element_to_be_clickable(
        (By.CSS_SELECTOR, ".opblock-get .opblock-summary-path[data-path='/api/v1/health/']")))
    summary.click()
    block = summary.find_element(By.XPATH, "ancestor::div[contains(concat(' ', @class, ' '), ' opblock ')][1]")
    wait(browser).until(lambda d: block.find_element(By.CSS_SELECTOR, "button.try-out__btn")).click()
    wait(browser).until(lambda d: block.find_element(By.CSS_SELECTOR, "button.execute")).click()

    status = wait(browser).until(lambda d: block.find_element(
        By.CSS_SELECTOR, ".live-responses-table .response .response-col_status"))
    assert status.text.strip() == "200"
    body = block.find_element(By.CSS_SELECTOR, ".live-responses-table .response-col_description .microlight").text
    assert '"status": "ok"' in body
    browser.execute_script("arguments[0].scrollIntoView()", status)
