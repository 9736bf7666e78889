"""A real browser for the operators' pages: Debian's headless Chromium driven by Selenium through
the system's chromedriver (Selenium Manager never downloads anything), against pytest-django's
live server. `scripts/browser.sh` (run by `make test`) installs both when missing; without them
these tests fail under CI=true and are skipped, with the reason, elsewhere. Each test leaves a
screenshot in test-output/browser/."""

import os
import re
import shutil
import tempfile

import pytest

from tests.conftest import ROOT

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
SCREENSHOTS = ROOT / "test-output" / "browser"
# Every wait on the browser is bounded by this.
WAIT_SECONDS = 30
PASSWORD = "pw-for-browser-tests-only"


def _chromium_missing():
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not os.access(path, os.X_OK)]
    if missing:
        message = f"{', '.join(missing)} missing: run scripts/browser.sh (apt-get install chromium chromium-driver)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(scope="session")
def chromium():
    """One headless Chromium for the session, with a profile of its own."""
    _chromium_missing()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="face-detect-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1400,1100", f"--user-data-dir={profile}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(WAIT_SECONDS)
    driver.set_script_timeout(WAIT_SECONDS)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture
def browser(chromium, live_server, request):
    """The session's Chromium with no cookies left from another test; a screenshot of the last page
    goes to test-output/browser/<test name>.png, whatever the outcome."""
    chromium.get(live_server.url + "/admin/login/")
    chromium.delete_all_cookies()
    yield chromium
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    chromium.save_screenshot(str(SCREENSHOTS / (re.sub(r"[^\w.-]+", "_", request.node.name) + ".png")))


def wait(driver):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, WAIT_SECONDS)


@pytest.fixture
def operator(db):
    from django.contrib.auth.models import User

    return User.objects.create_superuser("ops", "ops@example.com", PASSWORD)


def log_in(driver, live_server, user, password=PASSWORD, next_path="/admin/"):
    """Fill in and send the admin's login form, as a person would."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC

    driver.get(f"{live_server.url}/admin/login/?next={next_path}")
    wait(driver).until(EC.presence_of_element_located((By.ID, "id_username"))).send_keys(user.username)
    driver.find_element(By.ID, "id_password").send_keys(password)
    driver.find_element(By.CSS_SELECTOR, "input[type=submit]").click()
    wait(driver).until(EC.presence_of_element_located((By.ID, "user-tools")))
