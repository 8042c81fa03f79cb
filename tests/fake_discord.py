"""Discord as discord.py meets it, for the tests of the real client (``tests/test_discord_real.py``).

``FakeDiscord`` is a local HTTP server speaking the REST calls the bot makes (login, sending a
message, typing, syncing slash commands, answering an interaction); point ``discord.http.Route.BASE``
at ``api``, and the real ``HTTPClient`` builds and sends every request, so what the test reads is
what would reach Discord. The gateway side is fed the way discord.py's websocket feeds it: each
event's JSON goes to ``client._connection.parsers[EVENT]``, which builds the real model objects
(``Message``, ``Member`` with roles, ``RawReactionActionEvent`` with a ``PartialEmoji``,
``Interaction``) and dispatches the real events. The payloads follow Discord's API reference.
"""

from __future__ import annotations

import asyncio
import json
import time
from itertools import count
from typing import Any

from aiohttp import web

BOT = {"id": "4242", "username": "doppel", "discriminator": "0", "global_name": "Doppel", "avatar": None, "bot": True}
APP_ID = "4242"
GUILD = "1000"
ISO = "2026-11-01T12:00:00.000000+00:00"
_ids = count(900_000_000_000_000_001)


def snowflake() -> str:
    return str(next(_ids))


def user(uid: int | str, name: str = "bob") -> dict[str, Any]:
    return {"id": str(uid), "username": name, "discriminator": "0", "global_name": name.title(), "avatar": None}


def member(roles: list[str] = ()) -> dict[str, Any]:  # type: ignore[assignment]
    """A guild member as events carry it (without "user", which rides alongside)."""
    return {"roles": list(roles), "joined_at": ISO, "deaf": False, "mute": False, "nick": None, "flags": 0,
            "avatar": None, "pending": False, "premium_since": None, "communication_disabled_until": None}


def role(rid: str, name: str, position: int = 1) -> dict[str, Any]:
    return {"id": rid, "name": name, "permissions": "0", "position": position, "color": 0, "hoist": False,
            "managed": False, "mentionable": False, "flags": 0, "icon": None, "unicode_emoji": None}


def guild(roles: list[dict[str, Any]], channels: dict[str, str]) -> dict[str, Any]:
    """A GUILD_CREATE: the guild with its roles (the @everyone role has the guild's id) and text channels."""
    return {"id": GUILD, "name": "Friends", "icon": None, "owner_id": "1", "afk_channel_id": None, "afk_timeout": 300,
            "verification_level": 0, "default_message_notifications": 0, "explicit_content_filter": 0,
            "roles": [role(GUILD, "@everyone", 0), *roles], "emojis": [], "stickers": [], "features": [],
            "mfa_level": 0, "system_channel_id": None, "system_channel_flags": 0, "rules_channel_id": None,
            "vanity_url_code": None, "description": None, "banner": None, "premium_tier": 0,
            "preferred_locale": "en-US", "public_updates_channel_id": None, "nsfw_level": 0,
            "premium_progress_bar_enabled": False, "joined_at": ISO, "large": False, "unavailable": False,
            "member_count": 3, "voice_states": [], "members": [], "presences": [], "threads": [],
            "stage_instances": [], "guild_scheduled_events": [], "soundboard_sounds": [],
            "channels": [{"id": cid, "type": 0, "name": name, "position": i, "permission_overwrites": [],
                          "nsfw": False, "parent_id": None, "topic": None, "last_message_id": None,
                          "rate_limit_per_user": 0, "guild_id": GUILD}
                         for i, (cid, name) in enumerate(channels.items())]}


def ready() -> dict[str, Any]:
    return {"v": 10, "user": {**BOT, "verified": True, "mfa_enabled": False, "flags": 0}, "guilds": [
        {"id": GUILD, "unavailable": True}], "session_id": "s", "resume_gateway_url": "wss://gateway.invalid",
        "shard": [0, 1], "application": {"id": APP_ID, "flags": 0}}


def message(channel: str, author: dict[str, Any], content: str, *, in_guild: bool = True, roles: list[str] = (),  # type: ignore[assignment]
            mentions: list[dict[str, Any]] = (), reply_to: dict[str, Any] | None | bool = False,  # type: ignore[assignment]
            mid: str | None = None) -> dict[str, Any]:
    """A MESSAGE_CREATE. ``reply_to``: the message replied to (``None``: a reply to a deleted one)."""
    data: dict[str, Any] = {
        "id": mid or snowflake(), "channel_id": channel, "author": author, "content": content, "timestamp": ISO,
        "edited_timestamp": None, "tts": False, "mention_everyone": False, "mentions": list(mentions),
        "mention_roles": [], "attachments": [], "embeds": [], "pinned": False, "type": 0, "flags": 0,
        "components": []}
    if in_guild:
        data["guild_id"] = GUILD
        data["member"] = member(roles)
    if reply_to is not False:
        data["type"] = 19
        ref_id = reply_to["id"] if reply_to else snowflake()
        data["message_reference"] = {"type": 0, "message_id": ref_id, "channel_id": channel,
                                     **({"guild_id": GUILD} if in_guild else {})}
        data["referenced_message"] = reply_to
    return data


def reaction(event: str, channel: str, message_id: str, user_id: int | str, emoji: str, *, in_guild: bool = True,
             roles: list[str] = (), name: str = "bob") -> dict[str, Any]:  # type: ignore[assignment]
    """A MESSAGE_REACTION_ADD or _REMOVE. Only an add in a guild carries the member (with roles)."""
    data: dict[str, Any] = {"user_id": str(user_id), "channel_id": channel, "message_id": message_id,
                            "emoji": {"id": None, "name": emoji}, "burst": False, "type": 0}
    if in_guild:
        data["guild_id"] = GUILD
    if event == "add":
        data["message_author_id"] = BOT["id"]
        data["burst_colors"] = []
        if in_guild:
            data["member"] = {**member(roles), "user": user(user_id, name)}
    return data


def slash(name: str, channel: str, who: dict[str, Any], roles: list[str] = (), in_guild: bool = True,  # type: ignore[assignment]
          text: str | None = None) -> dict[str, Any]:
    """An INTERACTION_CREATE of type 2 (application command)."""
    data: dict[str, Any] = {
        "id": snowflake(), "application_id": APP_ID, "type": 2, "token": f"tok-{snowflake()}", "version": 1,
        "channel_id": channel, "channel": {"id": channel, "type": 0 if in_guild else 1, "name": "general"},
        "data": {"id": snowflake(), "name": name, "type": 1,
                 **({"options": [{"name": "text", "type": 3, "value": text}]} if text is not None else {})},
        "app_permissions": "0", "locale": "en-US", "entitlements": [], "authorizing_integration_owners": {},
        "context": 0 if in_guild else 1, "attachment_size_limit": 10_000_000}
    if in_guild:
        data["guild_id"] = GUILD
        data["guild_locale"] = "en-US"
        data["member"] = {**member(roles), "user": who, "permissions": "0"}
    else:
        data["user"] = who
    return data


def _json(data: Any, status: int = 200) -> web.Response:
    # Discord says exactly "application/json" (discord.py decodes nothing else)
    return web.Response(body=json.dumps(data).encode(), status=status, headers={"Content-Type": "application/json"})


class FakeDiscord:
    """Discord's REST API, as much of it as the bot uses. Records what the bot sent."""

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []  # {"channel_id", "content", "id", ...} per message created
        self.typing: list[str] = []
        self.commands: list[dict[str, Any]] = []  # the slash commands last synced
        self.responses: list[dict[str, Any]] = []  # interaction callbacks
        self.requests: list[str] = []
        self.forbidden: set[str] = set()  # channels the bot may not post in: 403 50013
        self.runner: web.AppRunner | None = None
        self.api = ""

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/api/v10/{path:.*}", self._handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.api = f"http://127.0.0.1:{port}/api/v10"

    async def stop(self) -> None:
        if self.runner:
            await self.runner.cleanup()

    async def wait_sent(self, n: int, timeout: float = 20.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while len(self.sent) < n:
            if time.monotonic() > deadline:
                raise AssertionError(f"expected {n} messages, got {len(self.sent)}: {self.sent}")
            await asyncio.sleep(0.02)
        return self.sent

    async def _handle(self, request: web.Request) -> web.Response:
        path, method = request.match_info["path"], request.method
        self.requests.append(f"{method} /{path}")
        # interaction callbacks are authorised by the interaction's token in the path, not the bot's
        if request.headers.get("Authorization") != "Bot T0KEN" and not path.startswith("interactions/"):
            return _json({"message": "401: Unauthorized", "code": 0}, status=401)
        body = await request.json() if request.can_read_body else None
        parts = path.split("/")
        if (method, path) == ("GET", "users/@me"):
            return _json({**BOT, "verified": True, "mfa_enabled": False, "flags": 0})
        if (method, path) == ("GET", "oauth2/applications/@me"):
            return _json({"id": APP_ID, "name": "Doppel", "icon": None, "description": "", "bot_public": True,
                                      "bot_require_code_grant": False, "owner": {**BOT, "id": "1", "bot": False},
                                      "verify_key": "k", "flags": 0, "team": None, "summary": ""})
        if method == "PUT" and parts[:1] == ["applications"] and parts[-1] == "commands":
            self.commands = [{**c, "id": snowflake(), "application_id": APP_ID, "version": "1"} for c in body]
            return _json(self.commands)
        if method == "POST" and parts[0] == "channels" and parts[-1] == "typing":
            self.typing.append(parts[1])
            return web.Response(status=204)
        if method == "POST" and parts[0] == "channels" and parts[-1] == "messages":
            if parts[1] in self.forbidden:
                return _json({"message": "Missing Permissions", "code": 50013}, status=403)
            content = body.get("content") or ""
            if len(content) > 2000:
                return _json({"message": "Invalid Form Body", "code": 50035, "errors": {"content": {
                    "_errors": [{"code": "BASE_TYPE_MAX_LENGTH", "message": "Must be 2000 or fewer in length."}]}}},
                    status=400)
            sent = {"id": snowflake(), "channel_id": parts[1], "content": content, "author": BOT, "timestamp": ISO,
                    "edited_timestamp": None, "tts": False, "mention_everyone": False, "mentions": [],
                    "mention_roles": [], "attachments": [], "embeds": [], "pinned": False, "type": 0, "flags": 0,
                    "components": []}
            self.sent.append(sent)
            return _json(sent)
        if method == "POST" and parts[0] == "interactions" and parts[-1] == "callback":
            self.responses.append({"interaction_id": parts[1], **body})
            return _json({"interaction": {"id": parts[1], "type": 2,
                                                      "response_message_ephemeral": bool(body["data"].get("flags", 0) & 64)}})
        return _json({"message": "404: Not Found", "code": 0}, status=404)
