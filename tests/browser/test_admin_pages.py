"""The operators' admin as a person uses it in Chromium: logging in, the image list and its
filters, an image's page, and the re-run and re-send actions."""

import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as EC
from selenium.webdriver.support.ui import Select

from api import storage
from api.models import CallbackAttempt, Face, Image
from tests.browser.conftest import log_in, wait
from tests.conftest import drain, photo

pytestmark = pytest.mark.django_db(transaction=True)

KEYPOINTS = {name: [10, 20] for name in ("left_eye", "right_eye", "nose", "mouth_left", "mouth_right")}


def make_image(client, request_id, status, callback_status="none", faces=0):
    """An image row as the pipeline leaves it; a finished one with its annotated object stored."""
    finished = status in ("done", "failed")
    image = Image.objects.create(
        client=client, request_id=request_id, original_key=f"originals/{request_id}.jpg", sha256="0" * 64,
        size_bytes=10, format="JPEG", width=500, height=614, status=status,
        face_count=faces if status == "done" else None,
        annotated_key=f"annotated/{request_id}.jpg" if status == "done" else "",
        callback_url="http://127.0.0.1:9/hook" if callback_status != "none" else "",
        callback_status=callback_status, callback_event_id="msg_first" if finished else "",
    )
    if status == "done":
        storage.put(image.annotated_key, photo("clm_cage.jpg"))
    for index in range(faces):
        Face.objects.create(image=image, index=index, x=40 + index, y=60, width=120, height=150,
                            confidence=0.987654, keypoints=KEYPOINTS)
    return image


def result_rows(driver):
    """The request_ids the changelist shows, read from its table."""
    rows = driver.find_elements(By.CSS_SELECTOR, "#result_list tbody tr")
    return {row.find_element(By.CSS_SELECTOR, "td.field-request_id").text for row in rows}


def click_filter(driver, title, choice):
    """Click `choice` under the filter `title` ("By <title>") in the changelist's sidebar."""
    section = driver.find_element(By.CSS_SELECTOR, f"#changelist-filter details[data-filter-title='{title}']")
    if section.get_attribute("open") is None:
        section.find_element(By.TAG_NAME, "summary").click()
    link = section.find_element(By.XPATH, f".//a[normalize-space()='{choice}']")
    href = link.get_attribute("href")
    link.click()
    wait(driver).until(lambda d: d.current_url == href)


def test_an_operator_logs_in_with_the_form(browser, live_server, operator):
    log_in(browser, live_server, operator)
    assert browser.find_element(By.ID, "user-tools").text.upper().startswith("WELCOME")
    assert browser.find_element(By.LINK_TEXT, "Images").get_attribute("href").endswith("/admin/api/image/")


def test_a_wrong_password_keeps_the_operator_out(browser, live_server, operator):
    browser.get(f"{live_server.url}/admin/login/?next=/admin/")
    browser.find_element(By.ID, "id_username").send_keys("ops")
    browser.find_element(By.ID, "id_password").send_keys("not the password")
    browser.find_element(By.CSS_SELECTOR, "input[type=submit]").click()
    error = wait(browser).until(EC.presence_of_element_located((By.CSS_SELECTOR, ".errornote")))
    assert "correct username and password" in error.text
    assert not browser.find_elements(By.ID, "user-tools")


def test_the_image_list_narrows_by_status_and_callback_status(browser, live_server, operator, integrator):
    make_image(integrator[0], "done-delivered", "done", "delivered", faces=1)
    make_image(integrator[0], "done-failed-cb", "done", "failed", faces=2)
    make_image(integrator[0], "failed-pending", "failed", "pending")
    make_image(integrator[0], "still-queued", "queued")
    log_in(browser, live_server, operator, next_path="/admin/api/image/")
    assert result_rows(browser) == {"done-delivered", "done-failed-cb", "failed-pending", "still-queued"}

    click_filter(browser, "status", "Done")
    assert result_rows(browser) == {"done-delivered", "done-failed-cb"}
    click_filter(browser, "callback status", "Delivered")
    assert result_rows(browser) == {"done-delivered"}
    assert "status__exact=done" in browser.current_url and "callback_status__exact=delivered" in browser.current_url

    click_filter(browser, "status", "All")
    assert result_rows(browser) == {"done-delivered"}
    click_filter(browser, "callback status", "Pending")
    assert result_rows(browser) == {"failed-pending"}


def test_an_image_page_shows_its_faces_callback_attempts_and_annotated_preview(browser, live_server, operator,
                                                                               integrator):
    image = make_image(integrator[0], "with-faces", "done", "delivered", faces=2)
    CallbackAttempt.objects.create(image=image, event_id="msg_first", number=1, status_code=500, latency_ms=12,
                                   error="HTTP 500")
    CallbackAttempt.objects.create(image=image, event_id="msg_first", number=2, status_code=200, latency_ms=9)
    log_in(browser, live_server, operator, next_path=f"/admin/api/image/{image.pk}/change/")

    face_rows = browser.find_elements(By.CSS_SELECTOR, "#faces-group tbody tr.has_original, #faces-group tbody tr.form-row")
    assert len(face_rows) == 2
    assert "0.987654" in browser.find_element(By.ID, "faces-group").text
    attempts = browser.find_element(By.ID, "callback_attempts_log-group").text
    assert "msg_first" in attempts and "500" in attempts and "200" in attempts and "HTTP 500" in attempts

    preview = browser.find_element(By.CSS_SELECTOR, ".field-preview img")
    assert preview.get_attribute("src").endswith(f"/admin/api/image/{image.pk}/annotated/800/")
    browser.execute_script("arguments[0].scrollIntoView()", preview)
    # The browser fetched and decoded the picture (a broken image has no natural size).
    width = wait(browser).until(lambda d: d.execute_script(
        "const i = arguments[0]; return i.complete && i.naturalWidth", preview))
    assert width == 500


def run_action(driver, label, image):
    """Tick one image in the list, pick the action, press Go; returns the success message."""
    checkbox = driver.find_element(By.CSS_SELECTOR, f"input.action-select[value='{image.pk}']")
    checkbox.click()
    Select(driver.find_element(By.NAME, "action")).select_by_visible_text(label)
    driver.find_element(By.CSS_SELECTOR, "button[name=index]").click()
    return wait(driver).until(EC.presence_of_element_located((By.CSS_SELECTOR, "ul.messagelist li.success"))).text


def test_the_rerun_action_queues_a_finished_image_again(browser, live_server, operator, integrator):
    image = make_image(integrator[0], "to-rerun", "done", "delivered", faces=1)
    other = make_image(integrator[0], "left-alone", "done", "delivered", faces=1)
    drain("detect")
    log_in(browser, live_server, operator, next_path="/admin/api/image/")

    assert "1 image(s) queued again" in run_action(browser, "Re-run the pipeline", image)
    image.refresh_from_db()
    assert (image.status, image.face_count, image.faces.count()) == ("queued", None, 0)
    assert Image.objects.get(pk=other.pk).status == "done"
    queued = [payload for _, payload in drain("detect")]
    assert len(queued) == 1 and str(image.pk) in str(queued[0])


def test_the_resend_action_queues_a_new_callback_event(browser, live_server, operator, integrator):
    image = make_image(integrator[0], "to-resend", "done", "failed", faces=1)
    drain("callbacks")
    log_in(browser, live_server, operator, next_path="/admin/api/image/")

    assert "1 callback(s) queued" in run_action(browser, "Re-send the callback", image)
    image.refresh_from_db()
    assert image.callback_status == "pending" and image.callback_attempts == 0
    assert image.callback_event_id not in ("", "msg_first")
    sent = drain("callbacks")
    assert [headers["task"] for headers, _ in sent] == ["workers.tasks.send_callback"]
    assert sent[0][1][0] == [str(image.pk)]
