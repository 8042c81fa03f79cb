"""A local HTTP server that speaks enough of the Telegram Bot API for the real aiogram client:
getMe, getUpdates (long polling), sendMessage, sendChatAction, answerCallbackQuery, deleteWebhook.
Tests queue updates and read what the bot sent.

It answers like Telegram where the bot can get it wrong: ``getUpdates`` delivers only the update
types ``allowed_updates`` asked for (remembered between calls; by default every type but
chat_member, message_reaction and message_reaction_count, as Telegram does), and refusals come as
``{"ok": false, "error_code", "description"}``: 403 for a chat whose person blocked the bot, 400 for
an unknown chat, an empty text or one over 4096 characters, 429 with ``retry_after``. The network
can fail too: connections reset for the next calls, or the server gone for a while."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from aiohttp import web

BOT_USER = {"id": 4242, "is_bot": True, "first_name": "Doppel", "username": "doppel_bot"}
MAX_TEXT = 4096  # characters of a message's text, after entity parsing
# what getUpdates delivers when allowed_updates was never given (or given empty)
NOT_BY_DEFAULT = {"chat_member", "message_reaction", "message_reaction_count"}
BLOCKED = (403, "Forbidden: bot was blocked by the user")
CHAT_NOT_FOUND = (400, "Bad Request: chat not found")


class FakeBotAPI:
    def __init__(self, token: str = "123:TEST") -> None:
        self.token = token
        self.updates: list[dict[str, Any]] = []
        self.sent: list[dict[str, Any]] = []
        self.actions: list[dict[str, Any]] = []
        self.answers: list[dict[str, Any]] = []  # answerCallbackQuery calls
        self.calls: list[str] = []
        self.flood_once = False  # answer the next sendMessage with 429 retry_after=1
        self.blocked: set[int] = set()  # chats whose person blocked the bot: 403
        self.unknown_chats: set[int] = set()  # chats the bot cannot see: 400
        self.reset_calls = 0  # the next this many calls get their connection reset
        self.allowed_updates: list[str] | None = None  # as Telegram remembers it from getUpdates
        self.refused: list[tuple[str, int, str]] = []  # (method, error_code, description) answered
        self.dropped: list[str] = []  # update types never delivered (not in allowed_updates)
        self._next_update = 1
        self._next_message = 5000
        self._new = asyncio.Event()
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/bot{token}/{method}", self._handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        self.site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await self.site.start()
        self.port = self.site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{self.port}"

    async def offline(self, seconds: float) -> None:
        """The network is gone for ``seconds``: connections are refused, then the server is back."""
        assert self.runner is not None
        await self.site.stop()
        await asyncio.sleep(seconds)
        self.site = web.TCPSite(self.runner, "127.0.0.1", self.port, reuse_address=True)
        await self.site.start()

    async def stop(self) -> None:
        if self.runner:
            await self.runner.cleanup()

    # what tests do ----------------------------------------------------------------------------

    def push(self, **update: Any) -> None:
        update["update_id"] = self._next_update
        self._next_update += 1
        self.updates.append(update)
        self._new.set()

    def message(self, chat_id: int, user_id: int, text: str, *, chat_type: str = "private", message_id: int | None = None,
                reply_to: dict[str, Any] | None = None, name: str = "Bob") -> int:
        mid = message_id or self._mid()
        msg: dict[str, Any] = {"message_id": mid, "date": int(time.time()), "text": text,
                               "chat": {"id": chat_id, "type": chat_type, **({"title": "Group"} if chat_type != "private" else {"first_name": name})},
                               "from": {"id": user_id, "is_bot": False, "first_name": name}}
        if reply_to:
            msg["reply_to_message"] = reply_to
        self.push(message=msg)
        return mid

    def reaction(self, chat_id: int, message_id: int, user_id: int, new: list[str], old: list[str] = (),  # type: ignore[assignment]
                 date: int | None = None) -> None:
        self.push(message_reaction={
            "chat": {"id": chat_id, "type": "private", "first_name": "Bob"}, "message_id": message_id,
            "user": {"id": user_id, "is_bot": False, "first_name": "Bob"}, "date": date or int(time.time()),
            "old_reaction": [{"type": "emoji", "emoji": e} for e in old],
            "new_reaction": [{"type": "emoji", "emoji": e} for e in new]})

    async def wait_sent(self, n: int, timeout: float = 20.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while len(self.sent) < n:
            if time.monotonic() > deadline:
                raise AssertionError(f"expected {n} sendMessage calls, got {len(self.sent)}: {self.sent}")
            await asyncio.sleep(0.02)
        return self.sent

    # the API ----------------------------------------------------------------------------------

    def _mid(self) -> int:
        self._next_message += 1
        return self._next_message

    async def _params(self, request: web.Request) -> dict[str, Any]:
        if request.content_type == "application/json":
            return await request.json()
        data = dict(await request.post())
        out: dict[str, Any] = {}
        for k, v in data.items():
            try:
                out[k] = json.loads(v) if isinstance(v, str) and v[:1] in "[{" else v
            except json.JSONDecodeError:
                out[k] = v
        return out

    def _allowed(self, update: dict[str, Any]) -> bool:
        kind = next(k for k in update if k != "update_id")
        if self.allowed_updates:
            return kind in self.allowed_updates
        return kind not in NOT_BY_DEFAULT

    def _pending(self, offset: int) -> list[dict[str, Any]]:
        for u in [u for u in self.updates if u["update_id"] >= offset and not self._allowed(u)]:
            self.updates.remove(u)  # Telegram never keeps what the bot did not ask for
            self.dropped.append(next(k for k in u if k != "update_id"))
        return [u for u in self.updates if u["update_id"] >= offset]

    def _refuse(self, method: str, code: int, description: str, **parameters: Any) -> web.Response:
        self.refused.append((method, code, description))
        body: dict[str, Any] = {"ok": False, "error_code": code, "description": description}
        if parameters:
            body["parameters"] = parameters
        return web.json_response(body, status=code)

    def _chat_problem(self, params: dict[str, Any]) -> tuple[int, str] | None:
        chat_id = int(params["chat_id"])
        if chat_id in self.blocked:
            return BLOCKED
        if chat_id in self.unknown_chats:
            return CHAT_NOT_FOUND
        return None

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if self.reset_calls > 0:  # the network drops the connection: no answer at all
            self.reset_calls -= 1
            assert request.transport is not None
            request.transport.abort()
            raise asyncio.CancelledError
        if request.match_info["token"] != self.token:
            return web.json_response({"ok": False, "error_code": 401, "description": "Unauthorized"}, status=401)
        method = request.match_info["method"]
        params = await self._params(request)
        self.calls.append(method)
        if method == "getMe":
            return self._ok(BOT_USER)
        if method == "getUpdates":
            if "allowed_updates" in params:  # remembered until the next call that gives it
                allowed = params["allowed_updates"]
                self.allowed_updates = list(json.loads(allowed) if isinstance(allowed, str) else allowed)
            offset = int(params.get("offset", 0) or 0)
            timeout = min(float(params.get("timeout", 0) or 0), 0.5)
            pending = self._pending(offset)
            if not pending and timeout:
                self._new.clear()
                try:
                    await asyncio.wait_for(self._new.wait(), timeout)
                except asyncio.TimeoutError:
                    pass
                pending = self._pending(offset)
            return self._ok(pending)
        if method == "sendMessage":
            if self.flood_once:
                self.flood_once = False
                return self._refuse(method, 429, "Too Many Requests: retry after 1", retry_after=1)
            problem = self._chat_problem(params)
            if problem:
                return self._refuse(method, *problem)
            text = str(params.get("text", ""))
            if not text.strip():
                return self._refuse(method, 400, "Bad Request: message text is empty")
            if len(text) > MAX_TEXT:
                return self._refuse(method, 400, "Bad Request: message is too long")
            mid = self._mid()
            chat_id = int(params["chat_id"])
            self.sent.append({"chat_id": chat_id, "text": params["text"], "message_id": mid,
                              "reply_markup": params.get("reply_markup")})
            return self._ok({"message_id": mid, "date": int(time.time()), "text": params["text"],
                             "chat": {"id": chat_id, "type": "private" if chat_id > 0 else "group"}, "from": BOT_USER})
        if method == "sendChatAction":
            problem = self._chat_problem(params)
            if problem:
                return self._refuse(method, *problem)
            self.actions.append(params)
            return self._ok(True)
        if method == "answerCallbackQuery":
            self.answers.append(params)
            return self._ok(True)
        if method in ("deleteWebhook", "close", "logOut"):
            return self._ok(True)
        return web.json_response({"ok": False, "error_code": 404, "description": "Not Found: method not found"}, status=404)

    @staticmethod
    def _ok(result: Any) -> web.Response:
        return web.json_response({"ok": True, "result": result})
