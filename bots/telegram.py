"""The Telegram face (aiogram 3): messages become ``BotCore`` calls, reactions become ratings.

The model runs in a worker thread (``asyncio.to_thread``), so while it writes, the event loop
keeps the chat's "typing…" going and serves other chats' commands and reactions.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager, suppress
from typing import Any, TypeVar

from aiogram import Bot, Dispatcher, F, Router
from aiogram.client.session.aiohttp import AiohttpSession
from aiogram.client.telegram import TelegramAPIServer
from aiogram.exceptions import (
    TelegramAPIError,
    TelegramBadRequest,
    TelegramForbiddenError,
    TelegramNetworkError,
    TelegramRetryAfter,
)
from aiogram.types import (
    CallbackQuery,
    InlineKeyboardButton,
    InlineKeyboardMarkup,
    Message,
    MessageReactionUpdated,
    ReactionTypeEmoji,
)

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


@asynccontextmanager
async def typing(bot: Bot, chat_id: int, interval: float = 4.0) -> AsyncIterator[None]:
    """"typing…" in the chat while the body runs. Best effort: an error only stops it (aiogram's
    ChatActionSender lets a refused action kill its task unseen)."""

    async def keep_typing() -> None:
        while True:
            try:
                await bot.send_chat_action(chat_id, "typing")
            except TelegramForbiddenError:
                return  # they blocked the bot; the reply will say so in the log
            except TelegramAPIError as exc:  # a network error or a refusal: the reply matters, not this
                log.debug("chat %s: typing action failed: %s", chat_id, exc)
            await asyncio.sleep(interval)

    task = asyncio.create_task(keep_typing())
    try:
        yield
    finally:
        task.cancel()
        with suppress(asyncio.CancelledError):
            await task


async def send_texts(bot: Bot, chat_id: int, texts: Sequence[str], last_markup: Any = None) -> list[str]:
    """Send ``texts`` in order; returns the ids of the messages that went out. What Telegram refuses
    is logged and never retried: a chat that blocked the bot or removed it (403) gets nothing more,
    a message it rejects (400) is skipped. Flood control and brief network errors are waited out
    (``with_retries``); a network that stays down loses the rest, logged."""
    sent: list[str] = []
    for i, text in enumerate(texts):
        markup = last_markup if i == len(texts) - 1 else None
        try:
            msg = await with_retries(lambda: bot.send_message(chat_id, text, reply_markup=markup))
        except TelegramForbiddenError as exc:
            log.warning("chat %s blocked the bot or removed it (%s); the reply is not sent", chat_id, exc.message)
            break
        except TelegramBadRequest as exc:
            log.warning("chat %s: Telegram refused a message of %d characters (%s); skipped",
                        chat_id, len(text), exc.message)
            continue
        except TelegramNetworkError as exc:
            log.warning("chat %s: the network stayed down (%s); %d message(s) not sent",
                        chat_id, exc.message, len(texts) - i)
            break
        except TelegramAPIError as exc:
            log.warning("chat %s: Telegram refused a message (%s); the reply is not sent", chat_id, exc.message)
            break
        sent.append(str(msg.message_id))
    return sent


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
                async with typing(bot, message.chat.id):
                    out = await asyncio.to_thread(core.handle, incoming)
            else:
                out = await asyncio.to_thread(core.handle, incoming)
        except Exception as exc:
            log.exception("generating a reply failed")
            if incoming.addressed:
                await send_texts(bot, message.chat.id, [safe_error_text(exc)])
            return
        markup = keyboard(out.reply_id) if buttons and out.reply_id is not None else None
        # every answer, a command's too, in messages Telegram takes (no empty text, none over the limit)
        sent_ids = await send_texts(bot, message.chat.id, core.split(out.texts), markup)
        if out.reply_id is not None:
            await asyncio.to_thread(core.sent, out.reply_id, sent_ids)

    @router.message_reaction()
    async def on_reaction(event: MessageReactionUpdated) -> None:
        user = event.user
        if user is None:  # anonymous group admins react as the chat; no one to attribute it to
            return
        # reaction updates are not ordered like a chat's messages: the event's date decides
        args = ("telegram", str(event.chat.id), str(event.message_id), str(user.id), _emojis(event.new_reaction), event.date)
        value = await asyncio.to_thread(core.reaction, *args)
        lock = chat_locks.get(event.chat.id)
        if value is None and lock is not None and lock.locked():
            # the reply it rates may be sent but not yet stored (its ids are stored after the send,
            # and updates are handled concurrently): once this chat's answer is done, try again
            async with lock:
                pass
            value = await asyncio.to_thread(core.reaction, *args)
        if value is not None:
            log.info("rating %s on message %s", value, event.message_id)

    @router.callback_query(F.data.startswith("rate:"))
    async def on_button(query: CallbackQuery) -> None:
        try:
            _, reply_id, value = (query.data or "").split(":")
            if query.message is None:  # the message is gone (or an inline one): no chat to check against
                answer = "Sorry, I can't take a rating there."
            else:
                answer = await asyncio.to_thread(core.rate_button, "telegram", str(query.message.chat.id),
                                                 str(query.from_user.id), int(reply_id), int(value))
        except Exception as exc:
            log.warning("rating button failed: %s", exc)
            answer = "Sorry, that didn't work."
        try:
            await query.answer(answer)
        except TelegramAPIError as exc:  # e.g. the query is too old: the rating (if any) still counts
            log.warning("could not answer a rating button: %s", exc.message)

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
