"""The OpenAPI 3.1 description of the HTTP API (``agent/api.py``), served at ``/api/openapi.json``.

It is served without the token: it describes routes and shapes, holds no data, and tools (a client
generator, schemathesis) read it before they have a token. Every route it names needs the bearer
token except ``/healthz`` and the description itself. ``tests/test_api_schema.py`` sends requests
generated from it to the app and checks each answer against it, so the two cannot drift apart.
"""

from __future__ import annotations

from typing import Any

MAX_NAME_CHARS = 255  # chat ids, senders, raters and authors: the width of their columns
MAX_MESSAGE_ID_CHARS = 64  # messages.platform_message_id
MAX_ROW_ID = 2**63 - 1  # the largest id a database row can have
# Text the databases can store: no NUL. (Unpaired surrogates, "\ud800" in JSON, are refused too, but
# a pattern cannot say so: they are no Unicode, and a validator in Rust, say, cannot even compile one.)
STORABLE = "^[^\\u0000]*$"
# what Python's str.strip() removes, written out: "\s" differs between regex engines (\x1c-\x1f)
_SPACE = "\\t-\\r\\u001c-\\u0020\\u0085\\u00a0\\u1680\\u2000-\\u200a\\u2028\\u2029\\u202f\\u205f\\u3000"
NOT_BLANK = f"^[^\\u0000]*[^\\u0000{_SPACE}][^\\u0000]*$"


def _error_response(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}


def _json_body(schema: dict[str, Any]) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": schema}}}


def _ok(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _name(description: str) -> dict[str, Any]:
    return {"type": "string", "maxLength": MAX_NAME_CHARS, "pattern": STORABLE, "description": description}


def _id(description: str, max_chars: int) -> dict[str, Any]:
    return {"description": description, "oneOf": [
        {"type": "string", "maxLength": max_chars, "pattern": STORABLE},
        {"type": "integer", "minimum": -MAX_ROW_ID - 1, "maximum": MAX_ROW_ID},
    ]}


def openapi_document(max_body_bytes: int, max_input_chars: int) -> dict[str, Any]:
    """The description, with this app's limits written into it."""
    errors = {
        "400": _error_response("The body or a parameter is malformed; `error` says which and `hint` what to send."),
        "401": _error_response("The bearer token is missing or wrong."),
        "413": _error_response(f"The body is larger than {max_body_bytes} bytes."),
        "503": _error_response("No token is configured on the server, or the model is busy (retry later)."),
    }
    with_body = {**errors, "415": _error_response("The body is not `application/json`.")}
    chat_id = {"name": "chat_id", "in": "path", "required": True, "description": "Your id for the conversation.",
               "schema": {"type": "string", "minLength": 1, "maxLength": MAX_NAME_CHARS,
                          "pattern": "^[^/\\u0000]+$"}}
    reply_id = {"name": "reply_id", "in": "path", "required": True,
                "description": "The `reply_id` of a reply the twin sent.",
                "schema": {"type": "integer", "minimum": 0, "maximum": MAX_ROW_ID}}
    unknown_reply = _error_response("No reply has this id.")
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Doppel HTTP API",
            "version": "1",
            "description": "Talk to the twin, rate and correct its replies, read and replace its facts. Every "
                           "route under /api/ and /metrics needs `Authorization: Bearer <DOPPEL_API_TOKEN>`, "
                           "except this description. Every error is JSON: `{\"error\": what happened, "
                           "\"hint\": what to do}`.",
        },
        "security": [{"bearer": []}],
        "paths": {
            "/healthz": {"get": {
                "summary": "Is the server up, and which adapter serves",
                "security": [],
                "responses": {"200": _ok("Up.", {
                    "type": "object", "required": ["status", "adapter_version"],
                    "properties": {"status": {"const": "ok"}, "adapter_version": {"type": ["string", "null"]}}})},
            }},
            "/api/openapi.json": {"get": {
                "summary": "This description (no token needed)",
                "security": [],
                "responses": {"200": _ok("The OpenAPI document.", {"type": "object"})},
            }},
            "/api/chats/{chat_id}/messages": {"post": {
                "summary": "Send a message to the twin; get its reply",
                "parameters": [chat_id],
                "requestBody": _json_body({"$ref": "#/components/schemas/IncomingMessage"}),
                "responses": {
                    "201": _ok("The reply, stored with its prompt (see `reply_id`).", {"$ref": "#/components/schemas/Reply"}),
                    "202": _ok("Stored as context without a reply (`reply: false`).", {
                        "type": "object", "required": ["stored"], "properties": {"stored": {"const": True}}}),
                    **with_body,
                },
            }},
            "/api/chats/{chat_id}/reset": {"post": {
                "summary": "Start a fresh context window in this chat",
                "parameters": [chat_id],
                "responses": {"200": _ok("Reset.", {
                    "type": "object", "required": ["chat_id", "reset"],
                    "properties": {"chat_id": {"type": "string"}, "reset": {"const": True}}}), **errors},
            }},
            "/api/replies/{reply_id}/rating": {"post": {
                "summary": "Rate a reply 👍 (1), 👎 (-1), or withdraw a rating (0)",
                "parameters": [reply_id],
                "requestBody": _json_body({
                    "type": "object", "required": ["value"],
                    "properties": {
                        "value": {"oneOf": [{"type": "integer", "enum": [-1, 0, 1]},
                                            {"type": "string", "enum": ["up", "+", "👍", "down", "-", "👎", "none"]}]},
                        "rater": _name("Who rates (one rating per rater and reply); default `http`."),
                    }}),
                "responses": {"200": _ok("Recorded; `changed` is false when the rater had given the same.", {
                    "type": "object", "required": ["reply_id", "rater", "value", "changed"],
                    "properties": {"reply_id": {"type": "integer"}, "rater": {"type": "string"},
                                   "value": {"type": "integer", "enum": [-1, 0, 1]}, "changed": {"type": "boolean"}}}),
                    "404": unknown_reply, **with_body},
            }},
            "/api/replies/{reply_id}/correction": {"post": {
                "summary": "Say what the reply should have been",
                "parameters": [reply_id],
                "requestBody": _json_body({
                    "type": "object", "required": ["text"],
                    "properties": {"text": {"type": "string", "pattern": NOT_BLANK, "description": "The better reply."},
                                   "author": _name("Who corrects; default `http`.")}}),
                "responses": {"201": _ok("Recorded.", {
                    "type": "object", "required": ["reply_id", "recorded"],
                    "properties": {"reply_id": {"type": "integer"}, "recorded": {"const": True}}}),
                    "404": unknown_reply, **with_body},
            }},
            "/api/facts": {
                "get": {
                    "summary": "The facts the twin knows, parsed, and the facts file as written",
                    "responses": {"200": _ok("The facts.", {
                        "type": "object", "required": ["facts", "text"],
                        "properties": {"facts": {"type": "array", "items": {"$ref": "#/components/schemas/Fact"}},
                                       "text": {"type": "string"}}}),
                        "403": _error_response("This server serves no facts."), **errors},
                },
                "put": {
                    "summary": "Replace the facts file (Markdown: headings are topics, bullets are facts)",
                    "requestBody": {"required": True, "content": {
                        "application/json": {"schema": {"type": "object", "required": ["text"],
                                                        "properties": {"text": {"type": "string", "pattern": STORABLE}}}},
                        # any bytes of a text body are "a string": no schema could reject one
                        "text/markdown": {"schema": {"description": "The facts file, UTF-8 Markdown."}},
                        "text/plain": {"schema": {"description": "The facts file, UTF-8 Markdown."}},
                    }},
                    "responses": {"200": _ok("Saved and indexed.", {
                        "type": "object", "required": ["facts", "warnings", "embedded"],
                        "properties": {"facts": {"type": "integer", "minimum": 0},
                                       "warnings": {"type": "array", "items": {"type": "string"}},
                                       "embedded": {"type": "integer", "minimum": 0}}}),
                        "403": _error_response("This server serves no facts."),
                        **with_body, "415": _error_response("The body is neither JSON nor text.")},
                },
            },
            "/metrics": {"get": {
                "summary": "Counters and the reply latency histogram, in the Prometheus text format",
                "responses": {"200": {"description": "The metrics.", "content": {"text/plain": {"schema": {"type": "string"}}}},
                              **errors},
            }},
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                           "description": "The server's DOPPEL_API_TOKEN."}},
            "schemas": {
                "Error": {
                    "type": "object", "required": ["error", "hint"], "additionalProperties": False,
                    "properties": {"error": {"type": "string", "minLength": 1, "description": "What happened."},
                                   "hint": {"type": "string", "minLength": 1, "description": "What to do about it."}},
                },
                "IncomingMessage": {
                    "type": "object", "required": ["text"],
                    "properties": {
                        "text": {"type": "string", "minLength": 1, "maxLength": max_input_chars, "pattern": NOT_BLANK,
                                 "description": "What was said to the twin."},
                        "sender": _name("The name of who writes; default `someone`."),
                        "sender_id": _id("A stable id of who writes; default: the name.", MAX_NAME_CHARS),
                        "message_id": _id("The platform's id of this message.", MAX_MESSAGE_ID_CHARS),
                        "reply": {"type": "boolean", "default": True,
                                  "description": "False: store the message as context, do not reply."},
                        "include_prompt": {"type": "boolean", "default": False,
                                           "description": "Also return the exact prompt the model saw."},
                    },
                },
                "Reply": {
                    "type": "object",
                    "required": ["reply_id", "chat_id", "text", "messages", "facts", "adapter_version", "latency_ms",
                                 "prompt_tokens", "new_tokens", "context_messages"],
                    "properties": {
                        "reply_id": {"type": "integer", "description": "Rate or correct the reply with this id."},
                        "chat_id": {"type": "string"},
                        "text": {"type": "string"},
                        "messages": {"type": "array", "items": {"type": "string"},
                                     "description": "The reply as the separate messages to send, in order."},
                        "facts": {"type": "array", "items": {"$ref": "#/components/schemas/FactHit"}},
                        "adapter_version": {"type": ["string", "null"]},
                        "latency_ms": {"type": "number", "minimum": 0},
                        "prompt_tokens": {"type": "integer", "minimum": 0},
                        "new_tokens": {"type": "integer", "minimum": 0},
                        "context_messages": {"type": "integer", "minimum": 0},
                        "prompt": {"type": "string", "description": "Only with `include_prompt`."},
                    },
                },
                "Fact": {"type": "object", "required": ["id", "topic", "text"],
                         "properties": {"id": {"type": "string"}, "topic": {"type": "string"}, "text": {"type": "string"}}},
                "FactHit": {"type": "object", "required": ["id", "topic", "text", "score"],
                            "properties": {"id": {"type": "string"}, "topic": {"type": "string"},
                                           "text": {"type": "string"}, "score": {"type": "number"},
                                           "dense": {"type": "number"}, "lexical": {"type": "number"}}},
            },
        },
    }
