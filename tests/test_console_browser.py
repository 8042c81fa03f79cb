"""The console in a real headless Chromium (Debian's ``chromium`` and ``chromium-driver``, driven by
Selenium), against the app served on 127.0.0.1 with fakes behind it. Skipped, with the reason, where
no browser can be had (``scripts/setup.sh`` installs one when it runs as root)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from feedback.db import make_session_factory
from feedback.models import Rating
from knowledge.index import KnowledgeBase
from tests.helpers import CHROMIUM, CHROMEDRIVER, FakeEmbedder, Served, console_app, start_browser

PASSWORD = "browser-s3cret"  # each test's app adds its own suffix: a cookie from another test never signs in
FACTS = "## Food\n- I am vegetarian: no meat, no steak.\n\n## Pets\n- My cat is called Knedlík.\n"


def _why_no_browser() -> str | None:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[test]')"
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not Path(path).is_file():
            return f"no {path}: install Debian's {package} (scripts/setup.sh does, as root)"
    return None


pytestmark = pytest.mark.skipif(_why_no_browser() is not None, reason=_why_no_browser() or "")


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    driver = start_browser()
    yield driver
    driver.quit()


@pytest.fixture
def site(tokenizer: Any, engine: Any, tmp_path: Path, browser: Any) -> Iterator[Any]:
    sessions = make_session_factory(engine)
    facts = tmp_path / "facts.md"
    facts.write_text(FACTS, encoding="utf-8")
    kb = KnowledgeBase(facts, tmp_path / "facts.npz", FakeEmbedder())
    password = f"{PASSWORD}-{tmp_path.name}"
    app, deps = console_app(tokenizer, sessions, kb, tmp_path / "data", password=password,
                            replies=["sure, she is called Knedlík"])
    served = Served(app)
    served.deps, served.kb, served.sessions, served.password = deps, kb, sessions, password  # type: ignore[attr-defined]
    browser.get(served.url + "/login")
    browser.delete_all_cookies()  # every test starts signed out
    yield served
    served.close()


def wait_for(browser: Any, css: str, timeout: float = 20.0) -> Any:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(browser, timeout).until(ec.presence_of_element_located((By.CSS_SELECTOR, css)))


def sign_in(browser: Any, site: Any, password: str | None = None) -> None:
    from selenium.webdriver.common.by import By

    browser.get(site.url + "/")
    assert "/login" in browser.current_url
    field = browser.find_element(By.NAME, "password")
    field.clear()
    field.send_keys(password or site.password)
    field.submit()
    # submit() returns before the POST is answered: a navigation started now would cancel it (the
    # cookie never set, the next page redirected to the sign-in form). Wait for the answer's page.
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(browser, 20).until(ec.staleness_of(field))
    wait_for(browser, "#facts-count" if password is None else "input[name=password]")


def test_sign_in_add_a_fact_and_see_it_retrieved(browser: Any, site: Any) -> None:
    from selenium.webdriver.common.by import By

    sign_in(browser, site, "not the password")
    assert "Wrong password" in browser.page_source
    sign_in(browser, site)
    wait_for(browser, "#facts-count")
    assert browser.find_element(By.CSS_SELECTOR, "h1").text == "Status"
    cookie = browser.get_cookie("doppel_console")
    assert cookie["httpOnly"] is True and cookie["sameSite"] == "Lax"

    browser.find_element(By.LINK_TEXT, "Facts").click()
    form = wait_for(browser, "#add-fact")
    form.find_element(By.NAME, "text").send_keys("I play the cello in an orchestra.")
    form.find_element(By.NAME, "topic").send_keys("Music")
    form.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    wait_for(browser, ".flash.ok")
    assert "I play the cello in an orchestra." in site.kb.facts_path.read_text()

    ask = browser.find_element(By.CSS_SELECTOR, "#ask input[name=ask]")
    ask.send_keys("do you play the cello?")
    ask.submit()
    row = wait_for(browser, "#hits tbody tr")
    assert "I play the cello in an orchestra." in row.text and row.get_attribute("class") == "used"
    assert float(row.find_element(By.CSS_SELECTOR, "td.num").text.split()[0]) > 0.25


def test_rate_a_reply_and_see_the_rating_row(browser: Any, site: Any) -> None:
    from selenium.webdriver.common.by import By

    sign_in(browser, site)
    browser.get(site.url + "/playground")
    composer = wait_for(browser, "#composer")
    composer.find_element(By.NAME, "text").send_keys("what's your cat called?")
    composer.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    card = wait_for(browser, "article.reply")
    assert "sure, she is called Knedlík" in card.text and "My cat is called Knedlík." in card.text
    card.find_element(By.CSS_SELECTOR, "button[value='1']").click()  # 👍, sent by fetch with the CSRF header
    row = wait_for(browser, "article.reply .rating-row[data-rater='console:owner']")
    assert row.text.startswith("👍")
    with site.sessions() as s:
        assert [(r.rater_id, r.value) for r in s.query(Rating)] == [("console:owner", 1)]
    browser.get(site.url + "/feedback")
    table = wait_for(browser, "#feedback tbody")
    assert "👍" in table.text and "console:owner" in table.text and "sure, she is called Knedlík" in table.text


def test_a_broken_facts_edit_leaves_the_file_unchanged(browser: Any, site: Any) -> None:
    from selenium.webdriver.common.by import By

    before = site.kb.facts_path.read_bytes()
    sign_in(browser, site)
    browser.get(site.url + "/facts")
    wait_for(browser, "#file summary").click()
    area = browser.find_element(By.CSS_SELECTOR, "#file textarea")
    area.clear()
    broken = "## Food\n- I am vegetarian.\n##Pets\n- My cat is called Knedlík."
    area.send_keys(broken)
    browser.find_element(By.CSS_SELECTOR, "#file button[value=save]").click()
    error = wait_for(browser, "#edit-error")
    assert "line 3" in error.text and "put a space after the '#'" in error.text
    assert site.kb.facts_path.read_bytes() == before
    kept = browser.find_element(By.CSS_SELECTOR, "#file textarea").get_attribute("value")
    assert kept.replace("\r\n", "\n").strip() == broken


def test_requests_without_a_session_or_with_a_wrong_csrf_token_are_refused(browser: Any, site: Any) -> None:
    from selenium.webdriver.common.by import By

    before = site.kb.facts_path.read_bytes()
    browser.get(site.url + "/login")
    status = browser.execute_async_script(
        "const done = arguments[0];"
        "fetch('/facts/add', {method: 'POST', body: new URLSearchParams({text: 'I was added by a stranger.'})})"
        ".then(r => done(r.status));")
    assert status == 401
    sign_in(browser, site)
    browser.get(site.url + "/facts")
    form = wait_for(browser, "#add-fact")
    browser.execute_script("arguments[0].querySelector('input[name=csrf_token]').value = 'forged';", form)
    form.find_element(By.NAME, "text").send_keys("I was added by a forged form.")
    form.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(browser, 20).until(expected_conditions.staleness_of(form))  # the facts page has an h1 too
    wait_for(browser, "main h1")
    assert "CSRF token is missing or wrong" in browser.page_source
    assert site.kb.facts_path.read_bytes() == before


def test_retrain_now_shows_its_progress_and_outcome(browser: Any, site: Any) -> None:
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.common.by import By

    sign_in(browser, site)
    browser.get(site.url + "/learning")
    wait_for(browser, "#retrain-form button").click()  # sent by fetch; the page polls the progress
    deadline, seen = time.monotonic() + 20, ""
    while time.monotonic() < deadline:  # the page reloads itself once the run ends, to list it
        try:
            seen = browser.execute_script("var e = document.getElementById('retrain-text'); return e ? e.textContent : '';")
            if "rejected" in seen and browser.find_elements(By.CSS_SELECTOR, "#runs svg.loss"):
                break
        except WebDriverException:  # caught mid-reload
            pass
        time.sleep(0.2)
    else:
        pytest.fail(f"the run's outcome never showed; the progress said {seen!r}")
    assert "rejected" in browser.find_element(By.CSS_SELECTOR, "#runs tbody").text
