"""The facts page: the facts file as topics and facts (add, edit, delete, move), the whole Markdown
in an editor, and "who would ask what": the facts the twin would put into a prompt for a message,
with their scores, before and after an edit.

Every change goes through ``knowledge.facts``: the new text is computed from the file as it is,
checked (``check_facts``), and only then written, atomically; a refused edit leaves the file byte
for byte as it was and shows the form again with the owner's text, the line and the reason."""

from __future__ import annotations

import hashlib
import math
import threading
from collections.abc import Callable
from typing import Any

from flask import Blueprint, flash, redirect, render_template, request, session, url_for

from common.errors import DoppelError, InputError, NotFoundError
from console.deps import ConsoleDeps
from knowledge.facts import (Problem, check_facts, clean_fact_text, fact_source, fact_sources, insert_fact, move_fact,
                             parse_facts, remove_fact, replace_fact, write_atomic)
from knowledge.index import NEAR_MISSES, used_in_prompt

BEFORE_KEY = "facts_ask_before"


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def create(deps: ConsoleDeps) -> Blueprint:
    bp = Blueprint("facts", __name__, url_prefix="/facts")
    kb = deps.knowledge
    write_lock = threading.Lock()  # one read-change-write at a time in this process (the hash covers others)

    def read() -> bytes:
        return kb.facts_path.read_bytes() if kb.facts_path.exists() else b""

    def ask(query: str) -> list[dict[str, Any]]:
        cfg = kb.config
        hits = kb.search(query, top_k=cfg.top_k + NEAR_MISSES, min_score=-1.0, margin=math.inf)
        return _rows(hits, cfg)

    def _rows(hits: list[Any], cfg: Any) -> list[dict[str, Any]]:
        return [{"id": h.fact.id, "text": h.fact.text, "topic": h.fact.topic, "score": round(h.score, 3),
                 "dense": round(h.dense, 3), "lexical": round(h.lexical, 3), "used": used}
                for h, used in zip(hits, used_in_prompt(hits, cfg))]

    def page(status: int = 200, *, form: dict[str, Any] | None = None, error: str | None = None,
             problems: list[Problem] | None = None, compare: dict[str, Any] | None = None) -> Any:
        if kb is None:
            return render_template("console/facts.html", served=False), status
        data = read()
        decode_error = None
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            text = data.decode("utf-8", "replace")
            line = data[: exc.start].count(b"\n") + 1
            decode_error = (f"The facts file is not UTF-8 text (a bad byte on line {line}); the twin keeps the last "
                            "good version. Save it as UTF-8, or replace it in the Markdown editor below.")
        parsed = parse_facts(text)
        sources = fact_sources(text, parsed.facts)
        topics: dict[str, list[tuple[Any, str]]] = {}
        for f in parsed.facts:
            topics.setdefault(f.topic, []).append((f, sources[f.id]))
        query = request.values.get("ask", "").strip()
        hits: list[dict[str, Any]] = []
        ask_error = None
        if query and compare is None:
            try:
                hits = ask(query)
            except DoppelError as exc:
                ask_error = exc.message
            before = session.get(BEFORE_KEY)
            if before and before.get("q") == query:
                session.pop(BEFORE_KEY, None)
                compare = {"left": before["hits"], "left_title": "before your edit", "right": hits, "right_title": "now"}
        draft = form["text"] if form and form.get("kind") == "file" else text
        return render_template(
            "console/facts.html", served=True, path=str(kb.facts_path), sha=_sha(data), topics=topics,
            count=len(parsed.facts), warnings=parsed.warnings, file_problems=check_facts(text, kb.config.max_bytes),
            decode_error=decode_error, query=query, hits=hits, ask_error=ask_error, compare=compare, form=form or {},
            error=error, problems=problems or [], draft=draft, draft_lines=draft.splitlines(),
            top_k=kb.config.top_k, min_score=kb.config.min_score, last_error=kb.last_error), status

    def apply(change: Callable[[str], str], form: dict[str, Any], done: str) -> Any:
        """Compute the new file from the current one, check it, write it, re-index; or show why not."""
        if kb is None:
            raise NotFoundError("Facts are not served by this instance.")
        query = request.form.get("ask", "").strip()
        with write_lock:
            data = read()
            sent = request.form.get("sha", "")
            if sent and sent != _sha(data):
                return page(409, form=form, error="The facts file changed since this page was loaded (an edit from "
                            "elsewhere); nothing was saved. Your text is still in the form: reload the page to see "
                            "the file as it is now, then make your edit again.")
            try:
                old = data.decode("utf-8")
            except UnicodeDecodeError:
                if form.get("kind") != "file":
                    return page(422, form=form, error="The facts file is not UTF-8 text; fix it in the Markdown "
                                "editor below (save the whole file) before editing single facts.")
                old = ""
            try:
                new = change(old)
            except DoppelError as exc:
                return page(exc.http_status if exc.http_status != 400 else 422, form=form,
                            error=f"{exc.message} {exc.hint or ''}".strip())
            if new == old and data == new.encode("utf-8"):
                flash("Nothing changed.", "info")
                return redirect(url_for(".index", ask=query or None))
            problems = check_facts(new, kb.config.max_bytes)
            if problems:
                return page(422, form=form, problems=problems,
                            error="The edit was not saved: the file would not read as you meant. The facts file "
                                  "is unchanged; your text is still in the form.")
            before = None
            if query:
                try:
                    before = ask(query)
                except DoppelError:
                    before = None
            write_atomic(kb.facts_path, new.encode("utf-8"))
        try:
            kb.refresh()
        except DoppelError as exc:
            flash(f"Saved, but the index could not follow: {exc.message}", "error")
        for warning in parse_facts(new).warnings:
            flash(warning, "warning")
        flash(done, "ok")
        if query and before is not None:
            session[BEFORE_KEY] = {"q": query, "hits": [{**h, "text": h["text"][:160]} for h in before]}
        return redirect(url_for(".index", ask=query or None) + ("#ask" if query else ""))

    @bp.get("")
    def index() -> Any:
        return page()

    @bp.post("/add")
    def add() -> Any:
        text, topic = request.form.get("text", ""), request.form.get("topic", "").strip()
        form = {"kind": "add", "text": text, "topic": topic}

        def change(old: str) -> str:
            clean = clean_fact_text(text)
            alone = parse_facts(f"- {clean}\n").facts  # the fact as the file will read it (inline Markdown stripped)
            same = parse_facts(old).by_id().get(alone[0].id) if alone else None
            if same is not None:
                raise InputError(f"That fact is already in the file (line {same.line}, topic {same.topic or '-'}); "
                                 "nothing was added.")
            return insert_fact(old, clean, topic)

        return apply(change, form, f"Added a fact under {topic or 'Other'}.")

    @bp.post("/<fid>/edit")
    def edit(fid: str) -> Any:
        text, topic = request.form.get("text", ""), request.form.get("topic", "").strip()
        form = {"kind": "edit", "fid": fid, "text": text, "topic": topic}

        def change(old: str) -> str:
            fact = parse_facts(old).by_id().get(fid)
            if fact is None:
                raise NotFoundError("That fact is not in the facts file any more; nothing was saved.",
                                    hint="Reload the page: the file changed since it was shown.")
            new = old
            if " ".join(text.split()) != fact_source(old, fact):
                new = replace_fact(old, fid, text)
            if topic and topic != fact.topic:
                moved = next((f for f in parse_facts(new).facts if f.line == fact.line), None)
                if moved is None:
                    raise InputError("The edited fact could not be found to move it; nothing was saved.",
                                     hint="Save the new text first, then move it.")
                new = move_fact(new, moved.id, topic)
            return new

        return apply(change, form, "Saved the fact.")

    @bp.post("/<fid>/delete")
    def delete(fid: str) -> Any:
        return apply(lambda old: remove_fact(old, fid), {"kind": "delete", "fid": fid}, "Deleted the fact.")

    @bp.post("/file")
    def file() -> Any:
        if kb is None:
            raise NotFoundError("Facts are not served by this instance.")
        draft = request.form.get("text", "").replace("\r\n", "\n")
        if b"\r\n" in read():
            draft = draft.replace("\n", "\r\n")  # the file keeps its line endings (a textarea sends CRLF)
        form = {"kind": "file", "text": draft}
        if request.form.get("action") == "preview":
            query = request.form.get("ask", "").strip()
            if not query:
                return page(422, form=form, error="Type a message in \u201cwho would ask what\u201d first; the preview "
                                                  "shows the facts it would get now and with your draft.")
            cfg = kb.config
            try:
                now = ask(query)
                with_draft = _rows(kb.preview(draft, query, top_k=cfg.top_k + NEAR_MISSES, min_score=-1.0, margin=math.inf), cfg)
            except DoppelError as exc:
                return page(422, form=form, error=exc.message)
            problems = check_facts(draft, cfg.max_bytes)
            return page(200, form=form, problems=problems,
                        compare={"left": now, "left_title": "now", "right": with_draft,
                                 "right_title": "with your draft (not saved)"})
        return apply(lambda old: draft, form, "Saved the facts file.")

    return bp

