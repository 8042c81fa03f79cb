"""The Telegram face (aiogram 3): messages become ``BotCore`` calls, reactions become ratings.

The model runs in a worker thread (``asyncio.to_thread``), so while it writes, the event loop
keeps the chat's "typing…" going and serves other chats' commands and reactions.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from aiogram import Bot, Dispatcher, F, Router
from aiogram.client.session.aiohttp import AiohttpSession
from aiogram.client.telegram import TelegramAPIServer
from aiogram.exceptions import TelegramNetworkError, TelegramRetryAfter
from aiogram.types import (
    CallbackQuery,
    InlineKeyboardButton,
    InlineKeyboardMarkup,
    Message,
    MessageReactionUpdated,
    ReactionTypeEmoji,
)
from aiogram.utils.chat_action import ChatActionSender

from bots.core import BotCore, Incoming, safe_error_text

log = logging.getLogger(__name__)

TELEGRAM_LIMIT = 4096
ALLOWED_UPDATES = ["message", "message_reaction", "callback_query"]
T = TypeVar("T")


def make_bot(token: str, api_url: str = "https://api.telegram.org") -> Bot:
    session = AiohttpSession(api=TelegramAPIServer.from_base(api_url))
    return Bot(token=token, session=session)


async def with_retries(call: Callable[[], Awaitable[T]], attempts: int = 5) -> T:
    """Wait out flood control (``retry_after``) and brief network errors instead of failing."""
    for attempt in range(attempts):
        try:
            return await call()
        except TelegramRetryAfter as exc:
            log.warning("Telegram flood control: waiting %s s", exc.retry_after)
            await asyncio.sleep(exc.retry_after)
        except TelegramNetworkError as exc:
            if attempt == attempts - 1:
                raise
            delay = min(2 ** attempt, 30)
            log.warning("Telegram network error (%s); retrying in %s s", exc, delay)
            await asyncio.sleep(delay)
    return await call()


def _emojis(reactions: list[Any]) -> list[str]:
    return [r.emoji for r in reactions if isinstance(r, ReactionTypeEmoji)]


def build_router(core: BotCore, bot_user: Any, buttons: bool = False) -> Router:
    """The handlers. ``bot_user`` is the bot's own User (from getMe), to spot mentions and replies."""
    router = Router(name="doppel")
    username = (bot_user.username or "").lower()
    # aiogram handles updates concurrently; one chat's messages are handled in order, so its
    # context is stored in the order it was written, while other chats and reactions go on
    chat_locks: dict[int, asyncio.Lock] = {}

    def addressed(message: Message) -> bool:
        if message.chat.type == "private":
            return True
        text = (message.text or "").lower()
        if username and f"@{username}" in text:
            return True
        replied = message.reply_to_message
        return bool(replied and replied.from_user and replied.from_user.id == bot_user.id)

    def keyboard(reply_id: int) -> InlineKeyboardMarkup:
        return InlineKeyboardMarkup(inline_keyboard=[[
            InlineKeyboardButton(text="👍", callback_data=f"rate:{reply_id}:1"),
            InlineKeyboardButton(text="👎", callback_data=f"rate:{reply_id}:-1"),
        ]])

    @router.message(F.text)
    async def on_text(message: Message, bot: Bot) -> None:
        user = message.from_user
        if user is None or user.is_bot:
            return
        text = message.text or ""
        if username:
            text = text.replace(f"@{bot_user.username}", "").strip() or text
        incoming = Incoming(
            platform="telegram", chat_id=str(message.chat.id),
            chat_kind="private" if message.chat.type == "private" else "group",
            user_id=str(user.id), user_name=user.full_name or user.username or str(user.id), text=text,
            message_id=str(message.message_id), addressed=addressed(message),
            reply_to_message_id=str(message.reply_to_message.message_id) if message.reply_to_message else None,
            chat_title=message.chat.title or message.chat.full_name,
        )
        wants_reply = incoming.addressed and not text.startswith(("/", "!"))
        async with chat_locks.setdefault(message.chat.id, asyncio.Lock()):
            await _answer(message, bot, incoming, wants_reply)

    async def _answer(message: Message, bot: Bot, incoming: Incoming, wants_reply: bool) -> None:
        try:
            if wants_reply:
                async with ChatActionSender.typing(bot=bot, chat_id=message.chat.id, interval=4.0):
                    out = await asyncio.to_thread(core.handle, incoming)
            else:
                out = await asyncio.to_thread(core.handle, incoming)
        except Exception as exc:
            log.exception("generating a reply failed")
            if incoming.addressed:
                apology = safe_error_text(exc)
                await with_retries(lambda: bot.send_message(message.chat.id, apology))
            return
        sent_ids: list[str] = []
        for i, part in enumerate(out.texts):
            last = i == len(out.texts) - 1
            markup = keyboard(out.reply_id) if buttons and out.reply_id is not None and last else None
            sent = await with_retries(lambda: bot.send_message(message.chat.id, part, reply_markup=markup))
            sent_ids.append(str(sent.message_id))
        if out.reply_id is not None:
            await asyncio.to_thread(core.sent, out.reply_id, sent_ids)

    @router.message_reaction()
    async def on_reaction(event: MessageReactionUpdated) -> None:
        user = event.user
        if user is None:  # anonymous group admins react as the chat; no one to attribute it to
            return
        value = await asyncio.to_thread(core.reaction, "telegram", str(event.chat.id), str(event.message_id),
                                        str(user.id), _emojis(event.new_reaction))
        if value is not None:
            log.info("rating %s on message %s", value, event.message_id)

    @router.callback_query(F.data.startswith("rate:"))
    async def on_button(query: CallbackQuery) -> None:
        try:
            _, reply_id, value = (query.data or "").split(":")
            rated = await asyncio.to_thread(core.agent.rate, int(reply_id), f"telegram:{query.from_user.id}", int(value))
            await query.answer("Thanks!" if rated else "Already counted.")
        except Exception as exc:
            log.warning("rating button failed: %s", exc)
            await query.answer("Sorry, that didn't work.")

    return router


def build_dispatcher(core: BotCore, bot_user: Any, buttons: bool = False) -> Dispatcher:
    dp = Dispatcher()
    dp.include_router(build_router(core, bot_user, buttons))
    return dp


async def run_telegram(core: BotCore, token: str, api_url: str, buttons: bool = False) -> None:
    """Poll until stopped (SIGINT/SIGTERM stop it gracefully; the reply in progress is finished).
    Network errors while polling are retried by aiogram with a growing back-off."""
    bot = make_bot(token, api_url)
    me = await with_retries(bot.get_me)
    dp = build_dispatcher(core, me, buttons)
    log.info("Telegram bot @%s is running", me.username)
    await dp.start_polling(bot, allowed_updates=ALLOWED_UPDATES)


async def check_token(token: str, api_url: str) -> Any:
    """The bot's own User (getMe), or a ``ConfigError`` that says which setting to fix. The errors
    say nothing of the server's answer: it can quote the request's URL, which carries the token.

    Raises:
        ConfigError: the token is refused, or the URL does not answer as the Bot API does.
    """
    from aiogram.exceptions import ClientDecodeError, TelegramAPIError, TelegramNotFound, TelegramUnauthorizedError

    from common.errors import ConfigError

    bot = make_bot(token, api_url)
    try:
        return await bot.get_me()
    except TelegramUnauthorizedError:
        raise ConfigError("Telegram refused the bot token (401 Unauthorized).",
                          hint="Check DOPPEL_TELEGRAM_TOKEN: it is the token @BotFather gave you (123456789:AA…).") from None
    except TelegramNotFound:
        raise ConfigError(f"The Bot API at {api_url} does not know this bot token (404 Not Found).",
                          hint="Check DOPPEL_TELEGRAM_TOKEN, and DOPPEL_TELEGRAM_API_URL (default https://api.telegram.org).") from None
    except ClientDecodeError:
        raise ConfigError(f"{api_url} did not answer the way the Telegram Bot API does.",
                          hint="Check DOPPEL_TELEGRAM_API_URL (default https://api.telegram.org), or a proxy in between.") from None
    except TelegramNetworkError as exc:
        raise ConfigError(f"Cannot reach the Telegram Bot API at {api_url} ({type(exc.__cause__ or exc).__name__}).",
                          hint="Check the network and DOPPEL_TELEGRAM_API_URL, then start the bot again.") from None
    except TelegramAPIError as exc:
        raise ConfigError(f"Telegram refused getMe: {type(exc).__name__}.",
                          hint="Check DOPPEL_TELEGRAM_TOKEN and DOPPEL_TELEGRAM_API_URL.") from None
    finally:
        await bot.session.close()
