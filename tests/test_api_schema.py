"""The HTTP API against its OpenAPI description (schemathesis, in process, on the fakes), and hostile
requests: every error is JSON {"error", "hint"} with a useful hint, never a traceback or a page."""

from __future__ import annotations

import io
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from werkzeug.test import EnvironBuilder, run_wsgi_app
from werkzeug.wrappers import Response

from agent.api import ApiConfig, create_app
from agent.prompt import Persona
from agent.service import Agent, AgentConfig
from feedback.db import make_session_factory
from knowledge.index import KnowledgeBase
from tests.helpers import FakeEmbedder, ScriptedRuntime

AUTH = {"Authorization": "Bearer s3cret"}
MAX_BODY = 16_384


@pytest.fixture
def api(tokenizer: Any, engine: Any, tmp_path: Path) -> tuple[Any, Agent]:
    facts = tmp_path / "facts.md"
    facts.write_text("## Food\n- I am vegetarian.\n## Pets\n- My cat is called Knedlík.\n")
    kb = KnowledgeBase(facts, tmp_path / "facts.npz", FakeEmbedder())
    agent = Agent(ScriptedRuntime(tokenizer), kb, make_session_factory(engine),  # type: ignore[arg-type]
                  AgentConfig(persona=Persona("Alex", "I write short lowercase messages."), max_input_chars=500))
    app = create_app(agent, kb, ApiConfig("s3cret", max_body_bytes=MAX_BODY))
    return app, agent


def test_every_generated_request_is_answered_as_the_description_says(api: tuple[Any, Agent]) -> None:
    """Requests generated from /api/openapi.json, valid ones and broken ones (wrong types, missing
    fields, bad ids, no token), each checked by schemathesis: no 5xx, a status code and a body the
    description allows, broken input refused with a 4xx, the token enforced."""
    import schemathesis
    from schemathesis import GenerationMode

    app, agent = api
    client = app.test_client()
    for i in range(3):  # replies 1..3 exist, so ratings and corrections also meet known ids
        client.post(f"/api/chats/seed{i}/messages", json={"text": "hi"}, headers=AUTH)
    schema = schemathesis.openapi.from_wsgi("/api/openapi.json", app)
    statuses: Counter[tuple[str, str, int]] = Counter()
    unbreakable: list[tuple[str, str]] = []
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) == 8  # every route but the description itself, which schemathesis skips
    runs = [(op, mode, {}) for op in operations for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)]
    runs += [(op, GenerationMode.POSITIVE, {"path_parameters": {"reply_id": 2}})  # a reply that exists
             for op in operations if "reply_id" in op.path]
    for operation, mode, fixed in runs:
        @settings(max_examples=25, derandomize=True, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(operation.as_strategy(generation_mode=mode, **fixed))
        def run(case: Any) -> None:
            response = case.call_and_validate(headers=AUTH)
            statuses[(operation.label, mode.value, response.status_code)] += 1

        try:
            run()
        except Unsatisfiable:  # nothing in the request can be wrong
            unbreakable.append((operation.label, mode.value))
    assert unbreakable == [("GET /healthz", "negative")]
    codes = {code for _, _, code in statuses}
    assert not any(code >= 500 for code in codes), statuses
    assert {200, 201, 400, 404} <= codes, statuses  # it reached the routes and their refusals
    assert agent.metrics.errors == 0


# --- hostile requests, one by one ---------------------------------------------------------------
def _error(response: Any, status: int, *words: str) -> dict[str, Any]:
    assert response.status_code == status, (response.status_code, response.get_data(as_text=True)[:300])
    assert response.mimetype == "application/json"
    body = response.get_json()
    assert set(body) == {"error", "hint"} and body["error"].strip() and body["hint"].strip(), body
    text = (body["error"] + " " + body["hint"]).lower()
    assert "traceback" not in text and "<html" not in text
    for word in words:
        assert word.lower() in text, (word, body)
    return body


def test_an_oversized_body_is_413_with_the_limit(api: tuple[Any, Agent]) -> None:
    client = api[0].test_client()
    big = {"text": "x" * (MAX_BODY + 10)}
    _error(client.post("/api/chats/1/messages", json=big, headers=AUTH), 413, str(MAX_BODY))
    _error(client.put("/api/facts", data=b"- x\n" * MAX_BODY, headers={**AUTH, "Content-Type": "text/markdown"}),
           413, str(MAX_BODY))


@pytest.mark.parametrize("size, status", [(MAX_BODY - 1, 200), (MAX_BODY, 200), (MAX_BODY + 1, 413), (10 * MAX_BODY, 413)])
def test_a_chunked_body_past_the_limit_is_413_not_cut_short(api: tuple[Any, Agent], size: int, status: int) -> None:
    """Without a Content-Length (a chunked body as gunicorn passes it on) Werkzeug stops reading at
    the limit and gives what it read as the whole body: the facts file was saved cut short."""
    app, _ = api
    facts = (b"- I live in Brno.\n" * size)[:size]
    environ = EnvironBuilder("/api/facts", method="PUT", headers=AUTH, content_type="text/markdown").get_environ()
    environ.pop("CONTENT_LENGTH", None)
    environ.update({"wsgi.input": io.BytesIO(facts), "wsgi.input_terminated": True, "HTTP_TRANSFER_ENCODING": "chunked"})
    app_iter, code, headers = run_wsgi_app(app, environ, buffered=True)
    response = Response(app_iter, code, headers)
    if status == 413:
        _error(response, 413, str(MAX_BODY))
    else:
        assert response.status_code == 200, response.get_data()


@pytest.mark.parametrize("body, words", [
    (b'{"text": "hi"', ["not valid JSON", "line 1", "example"]),
    (b'{"text": "hi",}', ["not valid JSON"]),
    (b"\xff\xfe{", ["not valid JSON"]),
    (b"[" * 5000 + b"]" * 5000, ["too deeply"]),
    (b'{"text": ' + b"1" * 5000 + b"}", ["not valid JSON"]),
    (b'["hi"]', ["JSON object, not an array"]),
    (b'"hi"', ["JSON object, not a string"]),
    (b"null", ["JSON object, not null"]),
    (b'{"text": 5}', ["'text' must be a string, not a number"]),
    (b'{"sender": "Bo"}', ["'text' (a string) is required"]),
    (b'{"text": "   "}', ["empty"]),
    (b'{"text": "' + b"x" * 501 + b'"}', ["at most 500"]),
    (b'{"text": "a\\u0000b"}', ["U+0000"]),
    (b'{"text": "a\\ud800b"}', ["U+D800", "unpaired surrogates"]),
    (b'{"text": "hi", "sender": ["Bo"]}', ["'sender' must be a string, not an array"]),
    (b'{"text": "hi", "sender": "' + b"B" * 256 + b'"}', ["'sender' is 256 characters", "at most 255"]),
    (b'{"text": "hi", "sender_id": {"id": 1}}', ["'sender_id' must be a string or an integer"]),
    (b'{"text": "hi", "message_id": "' + b"9" * 65 + b'"}', ["at most 64"]),
    (b'{"text": "hi", "message_id": ' + b"9" * 30 + b"}", ["'message_id' must be a string or an integer"]),
    (b'{"text": "hi", "reply": "no"}', ["'reply' must be true or false"]),
    (b'{"text": "hi", "include_prompt": 1}', ["'include_prompt' must be true or false"]),
])
def test_a_malformed_message_is_400_saying_what_is_wrong(api: tuple[Any, Agent], body: bytes, words: list[str]) -> None:
    app, agent = api
    r = app.test_client().post("/api/chats/c1/messages", data=body, headers={**AUTH, "Content-Type": "application/json"})
    _error(r, 400, *words)
    assert agent.metrics.errors == 0


@pytest.mark.parametrize("path, body, words", [
    ("/api/replies/1/rating", b'{"value": true}', ["'value' must be 1"]),
    ("/api/replies/1/rating", b'{"value": 2}', ["'value' must be 1"]),
    ("/api/replies/1/rating", b'{"value": 1, "rater": 7}', ["'rater' must be a string"]),
    ("/api/replies/1/correction", b'{"text": ""}', ["needs the text"]),
    ("/api/replies/1/correction", b'{"text": ["x"]}', ["'text' must be a string"]),
    ("/api/replies/1/correction", b'{"text": "ok", "author": "\\ud800"}', ["U+D800"]),
])
def test_malformed_ratings_and_corrections_are_400(api: tuple[Any, Agent], path: str, body: bytes,
                                                   words: list[str]) -> None:
    client = api[0].test_client()
    assert client.post("/api/chats/c1/messages", json={"text": "hi"}, headers=AUTH).get_json()["reply_id"] == 1
    _error(client.post(path, data=body, headers={**AUTH, "Content-Type": "application/json"}), 400, *words)


@pytest.mark.parametrize("method, path, kwargs", [
    ("post", "/api/chats/c1/messages", {"data": '{"text": "hi"}'}),  # no Content-Type
    ("post", "/api/chats/c1/messages", {"data": "text=hi", "content_type": "application/x-www-form-urlencoded"}),
    ("post", "/api/chats/c1/messages", {"data": "hi", "content_type": "text/plain"}),
    ("post", "/api/replies/1/rating", {"data": "value=1", "content_type": "multipart/form-data; boundary=x"}),
    ("put", "/api/facts", {"data": b"- x", "content_type": "application/octet-stream"}),
])
def test_a_body_that_is_not_json_is_415(api: tuple[Any, Agent], method: str, path: str, kwargs: dict[str, Any]) -> None:
    client = api[0].test_client()
    _error(getattr(client, method)(path, headers=AUTH, **kwargs), 415, "JSON")


def test_unknown_reply_ids_are_404(api: tuple[Any, Agent]) -> None:
    client = api[0].test_client()
    for rid in (999, 2**63 - 1, 2**63, 10**30):  # past the largest row id, the database cannot look it up
        _error(client.post(f"/api/replies/{rid}/rating", json={"value": 1}, headers=AUTH), 404, f"No reply {rid}",
               "a reply the twin sent")
        _error(client.post(f"/api/replies/{rid}/correction", json={"text": "no"}, headers=AUTH), 404, "No reply")
    _error(client.post("/api/replies/-1/rating", json={"value": 1}, headers=AUTH), 404, "openapi.json")
    _error(client.post("/api/replies/abc/rating", json={"value": 1}, headers=AUTH), 404, "openapi.json")


@pytest.mark.parametrize("headers", [
    {}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}, {"Authorization": "Basic czNjcmV0"},
    {"Authorization": "Bearer "}, {"Authorization": "Bearer s3cret\u00e9"}, {"Authorization": "Bearer s3cre"},
])
def test_a_missing_or_wrong_token_is_401_on_every_route(api: tuple[Any, Agent], headers: dict[str, str]) -> None:
    client = api[0].test_client()
    for method, path in (("post", "/api/chats/1/messages"), ("post", "/api/chats/1/reset"), ("get", "/api/facts"),
                         ("put", "/api/facts"), ("post", "/api/replies/1/rating"), ("get", "/metrics"),
                         ("get", "/api/nothing-here"), ("delete", "/api/facts")):
        _error(getattr(client, method)(path, json={"text": "hi"}, headers=headers), 401, "Authorization: Bearer")


def test_no_token_configured_refuses_the_api_with_503(tokenizer: Any, engine: Any) -> None:
    agent = Agent(ScriptedRuntime(tokenizer), None, make_session_factory(engine))  # type: ignore[arg-type]
    client = create_app(agent, None, ApiConfig(None)).test_client()
    _error(client.post("/api/chats/1/messages", json={"text": "hi"}, headers=AUTH), 503, "DOPPEL_API_TOKEN")
    assert client.get("/api/openapi.json").status_code == 200 and client.get("/healthz").status_code == 200


def test_wrong_methods_are_405_with_allow_and_unknown_routes_404(api: tuple[Any, Agent]) -> None:
    client = api[0].test_client()
    r = client.get("/api/chats/c1/messages", headers=AUTH)
    _error(r, 405, "takes POST")
    assert "POST" in r.headers["Allow"]
    r = client.delete("/api/facts", headers=AUTH)
    _error(r, 405, "GET or PUT")
    assert set(r.headers["Allow"].split(", ")) >= {"GET", "PUT"}
    _error(client.post("/healthz"), 405, "takes GET")
    _error(client.get("/api/nothing-here", headers=AUTH), 404, "openapi.json")
    _error(client.get("/api/chats/a/b/messages", headers=AUTH), 404)
    _error(client.get("/nothing-here"), 404, "Nothing is served")


def test_a_chat_id_the_database_cannot_hold_is_400(api: tuple[Any, Agent]) -> None:
    client = api[0].test_client()
    _error(client.post("/api/chats/" + "c" * 256 + "/messages", json={"text": "hi"}, headers=AUTH), 400, "at most 255")
    _error(client.post("/api/chats/a%00b/messages", json={"text": "hi"}, headers=AUTH), 400, "U+0000")
    _error(client.post("/api/chats/a%00b/reset", headers=AUTH), 400, "U+0000")
    ok = client.post("/api/chats/%ff%20caf%C3%A9/messages", json={"text": "hi"}, headers=AUTH)
    assert ok.status_code == 201 and ok.get_json()["chat_id"] == "\ufffd café"


def test_a_bug_is_500_json_without_a_traceback(api: tuple[Any, Agent]) -> None:
    app, agent = api
    agent.runtime.fail = RuntimeError("secret internals at 0xdeadbeef")  # type: ignore[attr-defined]
    body = _error(app.test_client().post("/api/chats/1/messages", json={"text": "hi"}, headers=AUTH), 500, "log")
    assert "0xdeadbeef" not in str(body) and agent.metrics.errors == 1


def test_facts_cannot_be_replaced_with_text_the_database_cannot_hold(api: tuple[Any, Agent]) -> None:
    client = api[0].test_client()
    json_body = {**AUTH, "Content-Type": "application/json"}
    _error(client.put("/api/facts", data=b'{"text": "- a\\ud800"}', headers=json_body), 400, "U+D800")
    _error(client.put("/api/facts", json={"txt": "- a"}, headers=AUTH), 400, "'text'")
    assert client.put("/api/facts", data="- I live in Brno.", headers={**AUTH, "Content-Type": "text/plain"}).status_code == 200


def test_the_description_is_served_without_a_token_and_names_every_route(api: tuple[Any, Agent]) -> None:
    app = api[0]
    spec = app.test_client().get("/api/openapi.json").get_json()
    routes = {(m.upper(), p) for p, ops in spec["paths"].items() for m in ops}
    served = {(m, str(r.rule).replace("<int:reply_id>", "{reply_id}").replace("<chat_id>", "{chat_id}"))
              for r in app.url_map.iter_rules() for m in r.methods - {"HEAD", "OPTIONS"} if r.endpoint != "static"}
    assert routes == served
    assert spec["components"]["schemas"]["IncomingMessage"]["properties"]["text"]["maxLength"] == 500


def test_through_waitress_errors_are_json_too(api: tuple[Any, Agent]) -> None:
    """The real server (waitress, as ``doppel serve`` runs it) on loopback: a chunked body past the
    limit, a wrong token and a bad body are answered by the app's JSON errors, a good message by a reply."""
    import http.client
    import threading

    from waitress.server import create_server

    app, _ = api
    server = create_server(app, host="127.0.0.1", port=0, threads=2)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        def send(method: str, path: str, body: Any, headers: dict[str, str], chunked: bool = False) -> Any:
            conn = http.client.HTTPConnection("127.0.0.1", server.effective_port, timeout=10)  # type: ignore[union-attr]
            try:
                conn.request(method, path, body=body, headers=headers, encode_chunked=chunked)
                r = conn.getresponse()
                data = r.read()
                return Response(data, r.status, {"Content-Type": r.getheader("Content-Type", "")})
            finally:
                conn.close()

        facts = {**AUTH, "Content-Type": "text/markdown"}
        _error(send("PUT", "/api/facts", iter([b"- x\n"] * MAX_BODY), facts, chunked=True), 413, str(MAX_BODY))
        _error(send("POST", "/api/chats/1/messages", b'{"text": "hi"}', {"Authorization": "Bearer no",
                                                                           "Content-Type": "application/json"}), 401)
        _error(send("POST", "/api/chats/1/messages", b'{"text": ', {**AUTH, "Content-Type": "application/json"}),
               400, "not valid JSON")
        ok = send("POST", "/api/chats/1/messages", b'{"text": "hi"}', {**AUTH, "Content-Type": "application/json"})
        assert ok.status_code == 201 and ok.get_json()["chat_id"] == "1"
    finally:
        server.close()
        thread.join(5)


def test_a_token_with_non_ascii_characters_works_through_a_real_server(tokenizer: Any, engine: Any) -> None:
    import http.client
    import threading

    from waitress.server import create_server

    agent = Agent(ScriptedRuntime(tokenizer), None, make_session_factory(engine))  # type: ignore[arg-type]
    server = create_server(create_app(agent, None, ApiConfig("pässwörd")), host="127.0.0.1", port=0, threads=1)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        for token, status in (("pässwörd".encode(), 200), ("pässwörd".encode("latin-1"), 401), (b"passwoerd", 401)):
            conn = http.client.HTTPConnection("127.0.0.1", server.effective_port, timeout=10)  # type: ignore[union-attr]
            conn.putrequest("GET", "/metrics")
            conn.putheader("Authorization", b"Bearer " + token)
            conn.endheaders()
            assert conn.getresponse().status == status, token
            conn.close()
    finally:
        server.close()
        thread.join(5)


def test_waitress_refuses_a_huge_declared_body_before_buffering_it(api: tuple[Any, Agent]) -> None:
    """``doppel serve``'s waitress settings: a body declared far past the app's limit is refused by
    the server at once (it never buffers it to disk, as waitress's 1 GB default would), while one
    just past the limit still gets the app's JSON 413."""
    import socket
    import threading
    import time

    from waitress.server import create_server

    from agent.api import server_options

    app, _ = api
    options = server_options(ApiConfig("s3cret", MAX_BODY), threads=2)
    server = create_server(app, host="127.0.0.1", port=0, **options)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        port = server.effective_port  # type: ignore[union-attr]
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            t0 = time.perf_counter()
            sock.sendall(b"PUT /api/facts HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer s3cret"
                         + b"\r\nContent-Type: text/markdown\r\nContent-Length: 1000000000\r\n\r\n- x\n")
            head = sock.recv(4096).decode("latin-1")
            assert head.startswith("HTTP/1.1 413"), head
            assert time.perf_counter() - t0 < 5
        import http.client

        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("PUT", "/api/facts", body=b"- x\n" * (MAX_BODY // 4 + 10),
                     headers={**AUTH, "Content-Type": "text/markdown"})
        r = conn.getresponse()
        body = r.read()
        conn.close()
        _error(Response(body, r.status, {"Content-Type": r.getheader("Content-Type", "")}), 413, str(MAX_BODY))
    finally:
        server.close()
        thread.join(5)
