"""A local HTTP server that speaks enough of the Telegram Bot API for the real aiogram client:
getMe, getUpdates (long polling), sendMessage, sendChatAction, answerCallbackQuery, deleteWebhook.
Tests queue updates and read what the bot sent."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from aiohttp import web

BOT_USER = {"id": 4242, "is_bot": True, "first_name": "Doppel", "username": "doppel_bot"}


class FakeBotAPI:
    def __init__(self, token: str = "123:TEST") -> None:
        self.token = token
        self.updates: list[dict[str, Any]] = []
        self.sent: list[dict[str, Any]] = []
        self.actions: list[dict[str, Any]] = []
        self.calls: list[str] = []
        self.flood_once = False  # answer the next sendMessage with 429 retry_after=1
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
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"

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

    async def _handle(self, request: web.Request) -> web.Response:
        if request.match_info["token"] != self.token:
            return web.json_response({"ok": False, "error_code": 401, "description": "Unauthorized"}, status=401)
        method = request.match_info["method"]
        params = await self._params(request)
        self.calls.append(method)
        if method == "getMe":
            return self._ok(BOT_USER)
        if method == "getUpdates":
            offset = int(params.get("offset", 0) or 0)
            timeout = min(float(params.get("timeout", 0) or 0), 0.5)
            pending = [u for u in self.updates if u["update_id"] >= offset]
            if not pending and timeout:
                self._new.clear()
                try:
                    await asyncio.wait_for(self._new.wait(), timeout)
                except asyncio.TimeoutError:
                    pass
                pending = [u for u in self.updates if u["update_id"] >= offset]
            return self._ok(pending)
        if method == "sendMessage":
            if self.flood_once:
                self.flood_once = False
                return web.json_response({"ok": False, "error_code": 429, "description": "Too Many Requests: retry after 1",
                                          "parameters": {"retry_after": 1}}, status=429)
            mid = self._mid()
            chat_id = int(params["chat_id"])
            self.sent.append({"chat_id": chat_id, "text": params["text"], "message_id": mid,
                              "reply_markup": params.get("reply_markup")})
            return self._ok({"message_id": mid, "date": int(time.time()), "text": params["text"],
                             "chat": {"id": chat_id, "type": "private" if chat_id > 0 else "group"}, "from": BOT_USER})
        if method == "sendChatAction":
            self.actions.append(params)
            return self._ok(True)
        if method in ("deleteWebhook", "answerCallbackQuery", "close", "logOut"):
            return self._ok(True)
        return web.json_response({"ok": False, "error_code": 404, "description": "Not Found: method not found"}, status=404)

    @staticmethod
    def _ok(result: Any) -> web.Response:
        return web.json_response({"ok": True, "result": result})
