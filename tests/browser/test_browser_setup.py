"""Without Chromium the browser tests are never skipped silently: under CI they fail."""

import pytest

from tests.browser import conftest


@pytest.fixture
def no_chromium(monkeypatch, tmp_path):
    monkeypatch.setattr(conftest, "CHROMIUM", str(tmp_path / "chromium"))


def test_a_missing_chromium_fails_the_browser_tests_under_ci(no_chromium, monkeypatch):
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="scripts/browser.sh"):
        conftest._chromium_missing()


def test_a_missing_chromium_skips_them_with_the_reason_elsewhere(no_chromium, monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="chromium missing"):
        conftest._chromium_missing()
