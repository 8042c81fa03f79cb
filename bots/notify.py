"""Telling the owner something (a retraining's outcome) through the Telegram Bot API, from any
process: it needs only the token and the owners' ids, not a running bot."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence

log = logging.getLogger(__name__)


def telegram_notifier(token: str, api_url: str, owner_ids: Sequence[str]) -> Callable[[str], None]:
    def notify(text: str) -> None:
        log.info("%s", text)

        async def send() -> None:
            from bots.telegram import make_bot, with_retries

            bot = make_bot(token, api_url)
            try:
                for owner in owner_ids:
                    if owner.lstrip("-").isdigit():  # Telegram ids are numbers; Discord's go elsewhere
                        await with_retries(lambda: bot.send_message(int(owner), text), attempts=3)
            finally:
                await bot.session.close()

        try:
            asyncio.run(send())
        except Exception as exc:  # telling the owner must never break the run it reports on
            log.warning("could not notify the owner on Telegram: %s", exc)

    return notify
