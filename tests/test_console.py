"""The owner's web console, through Flask's test client, on fakes (a scripted model, a bag-of-words
embedder, a real database and registry)."""

from __future__ import annotations

import re
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from feedback.db import make_session_factory
from feedback.models import Adapter, Chat, Correction, Rating, Reply, TrainingRun, utcnow
from knowledge.index import KnowledgeBase
from tests.helpers import FakeEmbedder, FakeTraining, console_app

FACTS = "# About me\n\n## Food\n- I am vegetarian: no meat, no steak.\n\n## Pets\n- My cat is called Knedlík.\n"
PASSWORD = "s3cret"


@pytest.fixture
def sessions(engine):  # type: ignore[no-untyped-def]
    return make_session_factory(engine)


@pytest.fixture
def kb(tmp_path: Path) -> KnowledgeBase:
    path = tmp_path / "facts.md"
    path.write_text(FACTS, encoding="utf-8")
    return KnowledgeBase(path, tmp_path / "index" / "facts.npz", FakeEmbedder())


@pytest.fixture
def built(tokenizer: Any, sessions: Any, kb: KnowledgeBase, tmp_path: Path) -> tuple[Any, Any]:
    return console_app(tokenizer, sessions, kb, tmp_path / "data")


@pytest.fixture
def app(built: tuple[Any, Any]) -> Any:
    return built[0]


@pytest.fixture
def deps(built: tuple[Any, Any]) -> Any:
    return built[1]


def csrf(client: Any) -> str:
    """The session's CSRF token (a page visit creates one)."""
    with client.session_transaction() as s:
        if "csrf" not in s:
            s["csrf"] = "t" * 43
        return s["csrf"]


def sign_in(client: Any, password: str = PASSWORD) -> Any:
    client.get("/login")
    return client.post("/login", data={"password": password, "csrf_token": csrf(client), "next": "/"})


@pytest.fixture
def client(app: Any) -> Any:
    c = app.test_client()
    assert sign_in(c).status_code == 302
    return c


def post(client: Any, url: str, **data: Any) -> Any:
    return client.post(url, data={"csrf_token": csrf(client), **data})


def html(response: Any) -> str:
    return response.get_data(as_text=True)


# --- signing in ---------------------------------------------------------------------------------

def test_console_refuses_to_start_without_a_secret(deps: Any) -> None:
    from dataclasses import replace

    from common.errors import ConfigError
    from console import create_console

    with pytest.raises(ConfigError, match="no password") as info:
        create_console(replace(deps, secret=None))
    assert "DOPPEL_CONSOLE_PASSWORD" in (info.value.hint or "")


def test_sign_in_sets_a_safe_cookie_and_sign_out_ends_it(app: Any) -> None:
    c = app.test_client()
    first = c.get("/")
    assert first.status_code == 302 and first.headers["Location"].startswith("/login?next=")
    page = c.get("/login")
    assert page.status_code == 200 and 'name="csrf_token"' in html(page)
    wrong = c.post("/login", data={"password": "nope", "csrf_token": csrf(c)})
    assert wrong.status_code == 401 and "Wrong password" in html(wrong)
    ok = c.post("/login", data={"password": PASSWORD, "csrf_token": csrf(c), "next": "/facts"})
    assert ok.status_code == 302 and ok.headers["Location"] == "/facts"
    cookie = ok.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Lax" in cookie and cookie.startswith("doppel_console=")
    assert c.get("/").status_code == 200
    # an open redirect is not followed
    c2 = app.test_client()
    c2.get("/login")
    away = c2.post("/login", data={"password": PASSWORD, "csrf_token": csrf(c2), "next": "https://evil.example/"})
    assert away.headers["Location"] == "/"
    out = post(c, "/logout")
    assert out.status_code == 302 and c.get("/").status_code == 302


def test_sessions_survive_a_restart_and_a_new_password_ends_them(tokenizer: Any, sessions: Any, kb: Any,
                                                                   tmp_path: Path) -> None:
    app1, _ = console_app(tokenizer, sessions, kb, tmp_path / "d")
    c = app1.test_client()
    sign_in(c)
    cookie = c.get_cookie("doppel_console").value
    app2, _ = console_app(tokenizer, sessions, kb, tmp_path / "d")  # the same password, another process
    c2 = app2.test_client()
    c2.set_cookie("doppel_console", cookie)
    assert c2.get("/").status_code == 200
    app3, _ = console_app(tokenizer, sessions, kb, tmp_path / "d", password="another one")
    c3 = app3.test_client()
    c3.set_cookie("doppel_console", cookie)
    assert c3.get("/").status_code == 302


def test_every_page_needs_a_session(app: Any, kb: KnowledgeBase) -> None:
    c = app.test_client()
    for path in ("/", "/facts", "/chats", "/chats/1", "/replies/1", "/feedback", "/learning", "/learning/runs/1",
                 "/playground"):
        r = c.get(path)
        assert r.status_code == 302 and "/login" in r.headers["Location"], path
    before = kb.facts_path.read_bytes()
    c.get("/login")  # a CSRF token, but no sign-in
    for path in ("/facts/add", "/replies/1/rating", "/learning/retrain", "/playground/send", "/playground/reset",
                 "/learning/adapters/rollback", "/facts/file"):
        r = c.post(path, data={"csrf_token": csrf(c), "text": "I hack.", "value": "1"})
        assert r.status_code == 401 and "not signed in" in html(r), path
    progress = c.get("/learning/progress", headers={"Accept": "application/json"})
    assert progress.status_code == 401 and "not signed in" in progress.get_json()["error"]
    assert kb.facts_path.read_bytes() == before
    assert c.get("/assets/console.css").status_code == 200  # the sign-in page's own files are open


def test_a_wrong_or_missing_csrf_token_is_refused(client: Any, kb: KnowledgeBase) -> None:
    before = kb.facts_path.read_bytes()
    for data in ({"text": "I hack."}, {"text": "I hack.", "csrf_token": "wrong"}):
        r = client.post("/facts/add", data=data)
        assert r.status_code == 403 and "CSRF" in html(r) and "Reload the page" in html(r)
    r = client.post("/facts/add", data={"text": "I hack."}, headers={"X-CSRF-Token": "wrong", "Accept": "application/json"})
    assert r.status_code == 403 and "CSRF" in r.get_json()["error"]
    assert kb.facts_path.read_bytes() == before
    logged_out = client.application.test_client()
    logged_out.get("/login")
    assert logged_out.post("/login", data={"password": PASSWORD}).status_code == 403  # sign-in form too


def test_api_keeps_its_bearer_token_beside_the_console(client: Any) -> None:
    assert client.get("/api/facts").status_code == 401  # a console session is not an API token
    assert client.get("/metrics").status_code == 401
    assert client.get("/api/facts", headers={"Authorization": f"Bearer {PASSWORD}"}).status_code == 200
    assert client.get("/healthz").status_code == 200
    anon = client.application.test_client()
    assert anon.get("/facts").status_code == 302  # a bearer token is not a console session
    assert anon.get("/facts", headers={"Authorization": f"Bearer {PASSWORD}"}).status_code == 302


def test_pages_send_security_headers(client: Any) -> None:
    r = client.get("/")
    assert "default-src 'self'" in r.headers["Content-Security-Policy"]
    assert r.headers["X-Frame-Options"] == "DENY" and r.headers["Cache-Control"] == "no-store"
    page = re.sub(r'csrf(-token)?="[^"]*"', "", html(r))  # a random token may spell "cdn"
    assert "cdn" not in page.lower() and "http://" not in page.replace("http://localhost", "")


# --- facts --------------------------------------------------------------------------------------

def _sha(client: Any) -> str:
    return re.search(r'name="sha" value="([0-9a-f]{64})"', html(client.get("/facts"))).group(1)  # type: ignore[union-attr]


def _fid(kb: KnowledgeBase, text: str) -> str:
    return next(f.id for f in kb.facts() if f.text == text)


def test_facts_page_shows_topics_and_facts(client: Any) -> None:
    page = html(client.get("/facts"))
    assert "Food" in page and "Pets" in page and "My cat is called Knedlík." in page and "2 facts" in page


def test_add_edit_move_and_delete_a_fact(client: Any, kb: KnowledgeBase) -> None:
    r = post(client, "/facts/add", text="I live in   Prague.", topic="Home", sha=_sha(client))
    assert r.status_code == 302
    assert "## Home\n- I live in Prague.\n" in kb.facts_path.read_text()
    assert "I live in Prague." in [f.text for f in kb.facts()]  # indexed, served at once
    again = post(client, "/facts/add", text="i live in prague.", topic="Other")
    assert again.status_code == 422 and "already in the file" in html(again)

    cat = _fid(kb, "My cat is called Knedlík.")
    r = post(client, f"/facts/{cat}/edit", text="My cat is called Knedlík; she is 4.", topic="Pets", sha=_sha(client))
    assert r.status_code == 302
    text = kb.facts_path.read_text()
    assert "- My cat is called Knedlík; she is 4.\n" in text and "called Knedlík.\n" not in text

    veg = _fid(kb, "I am vegetarian: no meat, no steak.")
    r = post(client, f"/facts/{veg}/edit", text="I am vegetarian: no meat, no steak.", topic="Home")
    assert r.status_code == 302
    moved = next(f for f in kb.facts() if f.text.startswith("I am vegetarian"))
    assert moved.topic == "Home"
    assert kb.facts_path.read_text().index("I am vegetarian") > kb.facts_path.read_text().index("## Home")

    r = post(client, f"/facts/{moved.id}/delete", sha=_sha(client))
    assert r.status_code == 302 and "vegetarian" not in kb.facts_path.read_text()
    assert "Deleted the fact." in html(client.get("/facts"))
    assert post(client, f"/facts/{moved.id}/delete").status_code == 404  # gone already


def test_a_broken_whole_file_edit_leaves_the_file_unchanged_and_keeps_the_text(client: Any, kb: KnowledgeBase) -> None:
    before = kb.facts_path.read_bytes()
    broken = "## Food\n- I am vegetarian.\n##Pets\n- My cat is called Knedlík.\n"
    r = post(client, "/facts/file", text=broken, action="save", sha=_sha(client))
    page = html(r)
    assert r.status_code == 422
    assert kb.facts_path.read_bytes() == before
    assert "line 3" in page and "put a space after the &#39;#&#39;" in page and "The facts file is unchanged" in page
    assert "##Pets\n- My cat is called Knedlík.\n</textarea>" in page  # the edit stays in the form
    fence = post(client, "/facts/file", text="## Food\n```\n- hidden\n", action="save")
    assert fence.status_code == 422 and "line 2" in html(fence) and "never closed" in html(fence)
    assert kb.facts_path.read_bytes() == before
    # a textarea sends CRLF; the file keeps its own line endings
    good = post(client, "/facts/file", text="## Food\r\n- I eat everything.\r\n", action="save", sha=_sha(client))
    assert good.status_code == 302 and kb.facts_path.read_bytes() == b"## Food\n- I eat everything.\n"
    assert [f.text for f in kb.facts()] == ["I eat everything."]


def test_an_edit_over_a_changed_file_is_refused(client: Any, kb: KnowledgeBase) -> None:
    sha = _sha(client)
    kb.facts_path.write_text(FACTS + "- Someone else added this.\n", encoding="utf-8")
    changed = kb.facts_path.read_bytes()
    r = post(client, "/facts/file", text="## Mine\n- only mine\n", action="save", sha=sha)
    assert r.status_code == 409 and "changed since this page was loaded" in html(r)
    assert kb.facts_path.read_bytes() == changed and "only mine" in html(r)


def test_who_would_ask_what_marks_as_used_the_facts_the_agent_would_use(tokenizer: Any, sessions: Any,
                                                                        tmp_path: Path) -> None:
    """Both facts score above min_score for this question, 0.03 apart: with three facts allowed and a
    margin of 0.02 the agent puts only the best into the prompt, and the page marks only that one as
    used (both are listed)."""
    from knowledge.index import RetrievalConfig

    path = tmp_path / "facts.md"
    path.write_text(FACTS, encoding="utf-8")
    kb = KnowledgeBase(path, tmp_path / "index" / "facts.npz", FakeEmbedder(), RetrievalConfig(top_k=3, margin=0.02))
    query = "no meat for the cat?"
    every = kb.search(query, margin=1.0)
    assert len(every) == 2 and 0.02 < every[0].score - every[1].score < 0.1 and every[1].score >= kb.config.min_score
    agent = [h.fact.id for h in kb.search(query)]
    assert agent == [every[0].fact.id]
    app, _ = console_app(tokenizer, sessions, kb, tmp_path / "data")
    c = app.test_client()
    assert sign_in(c).status_code == 302
    page = html(c.get("/facts", query_string={"ask": query}))
    used = re.findall(r'<tr class="used" data-fact="([0-9a-f]+)">', page)
    listed = re.findall(r'<tr[^>]* data-fact="([0-9a-f]+)">', page)
    assert used == agent and set(listed) >= {h.fact.id for h in every}


def test_a_bad_single_fact_is_refused_with_the_form_kept(client: Any, kb: KnowledgeBase) -> None:
    before = kb.facts_path.read_bytes()
    cat = _fid(kb, "My cat is called Knedlík.")
    r = post(client, f"/facts/{cat}/edit", text="## not a fact", topic="Pets")
    assert r.status_code == 422 and "would not be read as a fact" in html(r)
    assert 'value="## not a fact"' in html(r) and kb.facts_path.read_bytes() == before
    assert post(client, "/facts/add", text="   ").status_code == 422


def test_who_would_ask_what_before_and_after_an_edit(client: Any, kb: KnowledgeBase) -> None:
    page = html(client.get("/facts", query_string={"ask": "what is your cat called?"}))
    assert 'id="hits"' in page and "My cat is called Knedlík." in page
    assert re.search(r"<tr class=\"used\" data-fact=\"[0-9a-f]+\">\s*<td class=\"num\"><meter[^>]*></meter> 0\.\d{3}", page)
    r = post(client, "/facts/add", text="I cycle to work every day.", topic="Sport", ask="how do you get to work?",
             sha=_sha(client))
    assert r.status_code == 302 and "ask=how" in r.headers["Location"]
    after = html(client.get(r.headers["Location"].split("#")[0]))
    before_table = after[after.index('id="hits-before"'): after.index('id="hits-after"')]
    after_table = after[after.index('id="hits-after"'):]
    assert "I cycle to work" not in before_table and "I cycle to work" in after_table
    # shown once: the next visit shows only the current facts
    assert 'id="hits-before"' not in html(client.get("/facts", query_string={"ask": "how do you get to work?"}))


def test_a_draft_can_be_tried_without_saving_it(client: Any, kb: KnowledgeBase) -> None:
    before = kb.facts_path.read_bytes()
    draft = FACTS + "\n## Work\n- I work as a baker in Brno.\n"
    r = post(client, "/facts/file", text=draft, action="preview", ask="where do you work?")
    page = html(r)
    assert r.status_code == 200 and kb.facts_path.read_bytes() == before
    assert "with your draft (not saved)" in page
    assert "I work as a baker" in page[page.index('id="hits-after"'):]
    assert "I work as a baker" not in page[page.index('id="hits-before"'): page.index('id="hits-after"')]
    assert "I work as a baker in Brno.\n</textarea>" in page


# --- conversations and ratings ------------------------------------------------------------------

def test_rating_and_correcting_from_the_page_writes_the_same_rows_as_the_api(client: Any, deps: Any, sessions: Any) -> None:
    auth = {"Authorization": f"Bearer {PASSWORD}"}
    deps.agent.runtime.replies.append("sure, her name is Knedlík")
    api = client.post("/api/chats/tg-1/messages", json={"text": "is your cat called Knedlík?", "sender": "Bob"},
                      headers=auth).get_json()
    rid = api["reply_id"]
    client.post(f"/api/replies/{rid}/rating", json={"value": 1, "rater": "telegram:42"}, headers=auth)
    r = post(client, f"/replies/{rid}/rating", value="-1", next="/chats/1")
    assert r.status_code == 302 and r.headers["Location"] == f"/chats/1#reply-{rid}"
    assert post(client, f"/replies/{rid}/correction", text="yes, Knedlík!").status_code == 302
    with sessions() as s:
        rows = {(x.rater_id, x.value) for x in s.query(Rating).filter_by(reply_id=rid)}
        assert rows == {("telegram:42", 1), ("console:owner", -1)}
        (corr,) = s.query(Correction).filter_by(reply_id=rid).all()
        assert corr.author_id == "console:owner" and corr.text == "yes, Knedlík!"
        chat_id = s.get(Reply, rid).chat_id
    page = html(client.get(f"/chats/{chat_id}"))
    assert 'class="rating-row" data-rater="console:owner"' in page and 'data-rater="telegram:42"' in page
    assert "yes, Knedlík!" in page and "My cat is called Knedlík." in page  # the fact it used
    assert "adapter <b>v7</b>" in page and " ms" in page
    assert page.count(api["text"]) == 1  # the twin's copy of its reply is not shown twice
    # the fetch path: the token in a header, JSON back
    js = client.post(f"/replies/{rid}/rating", data={"value": "0"},
                     headers={"X-CSRF-Token": csrf(client), "Accept": "application/json"})
    assert js.status_code == 200
    assert {"rater": "console:owner", "value": 0} in [{k: x[k] for k in ("rater", "value")} for x in js.get_json()["ratings"]]
    missing = post(client, "/replies/999/rating", value="1")
    assert missing.status_code == 404 and "No reply 999" in html(missing)


def test_conversations_list_by_platform_and_page(client: Any, deps: Any, sessions: Any) -> None:
    for platform, chat in (("telegram", "t1"), ("discord", "d1"), ("http", "h1"), ("cli", "terminal")):
        deps.agent.reply(chat, "Bob", f"hello from {platform}", platform=platform)
    page = html(client.get("/chats"))
    for platform in ("telegram", "discord", "http", "cli"):
        assert f">{platform}</a>" in page and f"<td>{platform}</td>" in page
    only = html(client.get("/chats", query_string={"platform": "discord"}))
    assert "<td>discord</td>" in only and "<td>telegram</td>" not in only
    with sessions.begin() as s:  # a long ingested chat pages by 100
        from feedback.models import Message

        chat = Chat(platform="telegram", external_id="long", title="Long chat")
        s.add(chat)
        s.flush()
        t0 = utcnow() - timedelta(days=3)
        s.add_all([Message(chat_id=chat.id, dedup_key=f"k{i}", sender_name="Eve", text=f"message number {i}",
                           sent_at=t0 + timedelta(minutes=i)) for i in range(250)])
        long_id = chat.id
    newest = html(client.get(f"/chats/{long_id}"))
    assert "message number 249" in newest and "message number 150" in newest and "message number 149" not in newest
    older = re.search(r'href="(/chats/\d+\?before=\d+)"', newest).group(1)  # type: ignore[union-attr]
    older_page = html(client.get(older))
    assert "message number 149" in older_page and "message number 249" not in older_page
    assert client.get("/chats/9999").status_code == 404


def test_feedback_filters_and_the_nightly_count(client: Any, deps: Any, sessions: Any) -> None:
    agent = deps.agent
    ids = {}
    for platform in ("telegram", "discord"):
        for n in range(3):
            ids[(platform, n)] = agent.reply(f"{platform}-{n}", "Bob", f"question {n}", platform=platform).id
    with sessions.begin() as s:  # an older reply written by another adapter
        s.get(Reply, ids[("discord", 2)]).adapter_version = "v3"
    agent.rate(ids[("telegram", 0)], "telegram:1", 1)
    agent.rate(ids[("telegram", 1)], "telegram:1", -1)
    agent.rate(ids[("discord", 0)], "discord:2", 1)
    agent.rate(ids[("discord", 2)], "discord:2", -1)
    agent.rate(ids[("telegram", 2)], "telegram:1", 1)
    agent.rate(ids[("telegram", 2)], "telegram:1", 0)  # withdrawn
    agent.correct(ids[("discord", 2)], "discord:2", "a better answer")
    with sessions.begin() as s:  # a retraining ran after the first two ratings
        old = s.query(Rating).filter(Rating.reply_id.in_([ids[("telegram", 0)], ids[("telegram", 1)]])).all()
        for row in old:
            row.updated_at = utcnow() - timedelta(days=2)
        s.add(TrainingRun(kind="retrain", status="succeeded", started_at=utcnow() - timedelta(days=1),
                          finished_at=utcnow() - timedelta(days=1)))

    def total(**args: str) -> int:
        page = html(client.get("/feedback", query_string=args))
        return int(re.search(r'id="feedback-total">(\d+)<', page).group(1))  # type: ignore[union-attr]

    assert total() == 5
    assert total(value="up") == 2 and total(value="down") == 2 and total(value="withdrawn") == 1
    assert total(platform="discord") == 2 and total(platform="telegram", value="down") == 1
    assert total(adapter="v3") == 1 and total(adapter="v7") == 4
    assert total(since="last") == 3
    assert total(tab="corrections") == 1 and total(tab="corrections", platform="telegram") == 0
    page = html(client.get("/feedback"))
    # 2 ratings (not withdrawn) since the retraining; the nightly job waits for 3
    assert re.search(r'id="nightly-fresh">2<', page) and "tonight it will be skipped" in page
    agent.rate(ids[("discord", 1)], "discord:2", 1)
    assert "tonight it will run" in html(client.get("/feedback"))
    assert "a better answer" in html(client.get("/feedback", query_string={"tab": "corrections"}))


# --- learning -----------------------------------------------------------------------------------

def _adapter(deps: Any, tmp_path: Path, status: str, reason: str) -> int:
    src = tmp_path / f"staging-{status}-{reason[:5]}"
    src.mkdir()
    (src / "adapter_config.json").write_text("{}")
    return deps.registry.register(src, status=status, reason=reason, metrics={"candidate": {"heldout_loss": 1.5}},
                                  fingerprint=None, config={}).version


def test_runs_page_draws_the_loss_curve_and_shows_the_gate(client: Any, deps: Any, sessions: Any, tmp_path: Path) -> None:
    version = _adapter(deps, tmp_path, "rejected", "held-out loss rose from 2.0000 to 2.2000")
    curve = [[i, 3.0 - i * 0.05] for i in range(1, 41)]
    with sessions.begin() as s:
        adapter = s.query(Adapter).filter_by(version=version).one()
        s.add(TrainingRun(kind="retrain", status="rejected", finished_at=utcnow(), adapter_id=adapter.id,
                          metrics={"loss_curve": curve,
                                   "current": {"heldout_loss": 2.0, "fact_use": {"share": 0.5, "answers": [
                                       {"question": "where do you live?", "fact": "I live in Prague", "answer": "in Brno", "stated": False, "in_prompt": True}]}},
                                   "candidate": {"heldout_loss": 2.2, "fact_use": {"share": 0.75, "answers": [
                                       {"question": "where do you live?", "fact": "I live in Prague", "answer": "Prague <b>obv</b>", "stated": True, "in_prompt": True}]}},
                                   "steps": 40}))
        s.add(TrainingRun(kind="train", status="failed", finished_at=utcnow(), error="Traceback...\nOSError: disk full"))
    page = html(client.get("/learning"))
    assert re.search(r'<svg class="loss compact"[^>]*>.*<path class="loss-line" d="M[\d.]+,[\d.]+ L', page, re.S)
    assert "held-out loss rose from 2.0000 to 2.2000" in page and "OSError: disk full" in page
    assert "2.000 → 2.200" in page and "50% → 75%" in page
    run_id = re.search(r'href="/learning/runs/(\d+)">\d+</a></td>\s*<td>retrain', page).group(1)  # type: ignore[union-attr]
    detail = html(client.get(f"/learning/runs/{run_id}"))
    path = re.search(r'<path class="loss-line" d="(M[^"]+)"', detail).group(1)  # type: ignore[union-attr]
    assert path.count("L") == 39 and 'class="axis-label"' in detail and "<title>training loss" in detail
    assert "held-out loss rose" in detail
    answers = detail[detail.index('id="fact-answers"'):]
    assert "1 of 1 stated the fact" in answers and "where do you live?" in answers
    assert '<td class="worse">in Brno</td>' in answers and '<td class="better">Prague &lt;b&gt;obv&lt;/b&gt;</td>' in answers
    assert client.get("/learning/runs/999").status_code == 404


def test_activate_and_roll_back_adapters(client: Any, deps: Any, tmp_path: Path) -> None:
    v1 = _adapter(deps, tmp_path, "retired", "first")
    v2 = _adapter(deps, tmp_path, "candidate", "second")
    assert post(client, f"/learning/adapters/{v1}/activate").status_code == 302
    assert deps.registry.active_version() == v1
    assert post(client, f"/learning/adapters/{v2}/activate").status_code == 302
    assert deps.registry.active_version() == v2
    assert f"Adapter v{v2} is active" in html(client.get("/learning"))
    assert post(client, "/learning/adapters/rollback").status_code == 302
    assert deps.registry.active_version() == v1
    post(client, "/learning/adapters/rollback")
    assert deps.registry.active_version() is None
    assert "the base model serves" in html(client.get("/learning"))
    post(client, "/learning/adapters/rollback")
    assert "nothing to roll back" in html(client.get("/learning"))
    post(client, "/learning/adapters/99/activate")
    assert "No adapter v99" in html(client.get("/learning"))


def test_retrain_now_shows_progress_and_respects_the_single_flight_lock(client: Any, deps: Any, tmp_path: Path) -> None:
    from trainer.pipeline import single_flight

    training: FakeTraining = deps.retrainer._run
    training.gate.clear()  # hold the run half-way
    r = client.post("/learning/retrain", data={"kind": "retrain"},
                    headers={"X-CSRF-Token": csrf(client), "Accept": "application/json"})
    assert r.status_code == 202 and r.get_json()["progress"]["running"] is True
    page = html(client.get("/learning"))
    assert 'data-running="yes"' in page
    for _ in range(100):
        p = client.get("/learning/progress").get_json()
        if p["step"] == 2:
            break
        time.sleep(0.02)
    assert p["running"] and p["step"] == 2 and p["total"] == 5 and p["loss"] is not None
    again = post(client, "/learning/retrain", kind="train")
    assert again.status_code == 302 and "still going" in html(client.get("/learning"))
    training.gate.set()
    done = deps.retrainer.wait(10)
    assert done.state == "rejected" and "rejected" in done.message and training.calls == ["retrain"]
    assert client.get("/learning/progress").get_json()["state"] == "rejected"
    with single_flight(deps.retrainer.lock_path):  # another process trains: say so, start nothing
        busy = client.post("/learning/retrain", data={"kind": "train"},
                           headers={"X-CSRF-Token": csrf(client), "Accept": "application/json"})
        assert busy.status_code == 409 and "already going" in busy.get_json()["message"]
    assert training.calls == ["retrain"]
    bad = post(client, "/learning/retrain", kind="everything")
    assert bad.status_code == 400 and "Unknown kind" in html(bad)


def test_a_failed_run_says_why(tokenizer: Any, sessions: Any, kb: Any, tmp_path: Path) -> None:
    from common.errors import DoppelError

    def no_ratings(kind: str, on_step: Any, on_phase: Any) -> Any:
        raise DoppelError("There are no ratings or corrections to learn from yet.", hint="Rate some replies (👍/👎) first.")

    app, deps = console_app(tokenizer, sessions, kb, tmp_path / "d", training=no_ratings)
    c = app.test_client()
    sign_in(c)
    post(c, "/learning/retrain", kind="retrain")
    state = deps.retrainer.wait(10)
    assert state.state == "failed" and "Rate some replies" in state.message
    assert "There are no ratings" in html(c.get("/learning"))


# --- playground and status ----------------------------------------------------------------------

def test_playground_reply_rate_and_reset(client: Any, deps: Any, sessions: Any) -> None:
    deps.agent.runtime.replies.extend(["yes, she is called Knedlík", "no idea"])
    r = post(client, "/playground/send", text="what's your cat called?", sender="Sam")
    assert r.status_code == 302 and "#reply-" in r.headers["Location"]
    rid = int(r.headers["Location"].rsplit("-", 1)[1])
    page = html(client.get("/playground?as=Sam"))
    assert "what&#39;s your cat called?" in page and "yes, she is called Knedlík" in page and "My cat is called Knedlík." in page
    assert 'value="Sam"' in page
    post(client, f"/replies/{rid}/rating", value="1", next="/playground")
    with sessions() as s:
        assert [(x.rater_id, x.value) for x in s.query(Rating).filter_by(reply_id=rid)] == [("console:owner", 1)]
        chat = s.query(Chat).filter_by(platform="console", external_id="playground").one()
        assert chat.title == "playground"
    assert 'data-rater="console:owner"' in html(client.get("/playground"))
    assert post(client, "/playground/reset").status_code == 302
    after = html(client.get("/playground"))
    assert "yes, she is called Knedlík" not in after and "Nothing said yet since the reset" in after
    post(client, "/playground/send", text="and now?", sender="Sam")
    prompt = deps.agent.runtime.prompts[-1]
    assert "and now?" in prompt and "what's your cat called?" not in prompt
    empty = post(client, "/playground/send", text="   ", sender="Sam")
    assert empty.status_code == 422 and "The message is empty" in html(empty)
    from common.errors import BusyError

    deps.agent.runtime.fail = BusyError("The twin is busy.", hint="Try again in a moment.")
    busy = post(client, "/playground/send", text="hello?", sender="Sam")
    assert busy.status_code == 503 and "The twin is busy." in html(busy) and 'value="hello?"' in html(busy)


def test_status_page(client: Any, deps: Any, tmp_path: Path) -> None:
    deps.agent.reply("c", "Bob", "hi", platform="telegram")
    page = html(client.get("/"))
    assert "SmolLM2-135M-Instruct" in page and "llama.cpp" in page and "sqlite:///" in page
    assert re.search(r'id="facts-count">2<', page) and "none (the base model serves)" in page
    assert "03:00 every day" in page and re.search(r'id="nightly-count"><b>0</b> of 3', page)
    assert "2 messages in 1 chat ·" in page
    v = _adapter(deps, tmp_path, "retired", "ok")
    deps.registry.activate(v)
    assert f"v{v}" in html(client.get("/"))


def test_errors_are_pages_not_tracebacks(client: Any, deps: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*a: Any, **k: Any) -> Any:
        raise RuntimeError("secret internals")

    monkeypatch.setattr(deps.registry, "list", boom)
    r = client.get("/learning")
    assert r.status_code == 500 and "it was logged" in html(r) and "secret internals" not in html(r)
    assert "Traceback" not in html(r)


# --- the loss plot ------------------------------------------------------------------------------

def test_loss_plot_downsamples_and_skips_bad_points() -> None:
    from console.plot import downsample, loss_svg, nice_ticks

    points = [(float(i), 1.0 + (i % 7) / 10) for i in range(5000)]
    small = downsample(points, 400)
    assert len(small) <= 400 and min(p[1] for p in small) == 1.0 and max(p[1] for p in small) == 1.6
    svg = loss_svg([[1, float("nan")], [2, 1.0], [3, "x"], [4, 0.5]])
    assert svg.count(" L") == 1
    assert "no loss logged" in loss_svg([])
    assert nice_ticks(0.93, 2.07) == [1.0, 1.5, 2.0]


# --- the composition root ---------------------------------------------------------------------

def test_doppel_serve_mounts_the_console_beside_the_api(tokenizer: Any, engine: Any, kb: KnowledgeBase,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """``doppel.web.build_app``, as ``doppel serve`` and ``doppel.app:create_app`` call it (the model faked)."""
    from agent.service import Agent
    from common.errors import ConfigError
    from doppel.context import AppContext
    from doppel.web import build_app
    from tests.helpers import ScriptedRuntime

    monkeypatch.setenv("DOPPEL_DATABASE_URL", str(engine.url))
    monkeypatch.setenv("DOPPEL_API_TOKEN", "the-token")
    monkeypatch.setenv("DOPPEL_CONSOLE_PASSWORD", "the-password")
    c = AppContext.load()
    c.__dict__["knowledge"] = kb  # not the real embedding model
    agent = Agent(ScriptedRuntime(tokenizer), kb, c.sessions, c.agent_config())  # type: ignore[arg-type]
    client = build_app(c, agent).test_client()
    assert sign_in(client, "the-token").status_code == 401  # the console has its own password now
    assert sign_in(client, "the-password").status_code == 302
    page = html(client.get("/"))
    assert "00 every day" in page and "sqlite:///" in page and "SmolLM2-135M-Instruct (packaged)" in page
    assert client.get("/api/facts", headers={"Authorization": "Bearer the-token"}).status_code == 200
    assert client.get("/learning/progress").get_json()["state"] == "idle"
    assert "Secure" not in client.post("/logout", data={"csrf_token": csrf(client)}).headers["Set-Cookie"]
    monkeypatch.delenv("DOPPEL_CONSOLE_PASSWORD")
    monkeypatch.setenv("DOPPEL_CONSOLE_SECURE_COOKIE", "true")
    c2 = AppContext.load()
    c2.__dict__["knowledge"] = kb
    other = build_app(c2, agent).test_client()
    signed = sign_in(other, "the-token")
    assert signed.status_code == 302  # no console password: the API token signs in
    assert "; Secure" in signed.headers["Set-Cookie"]
    monkeypatch.delenv("DOPPEL_API_TOKEN")
    c3 = AppContext.load()
    c3.__dict__["knowledge"] = kb
    with pytest.raises(ConfigError, match="no password"):
        build_app(c3, agent)
