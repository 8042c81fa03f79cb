"""``create_app(settings)``: the HTTP app for a WSGI server (``waitress-serve --call doppel.app:create_app``
or gunicorn's ``doppel.app:create_app()``). ``doppel serve`` does the same and adds the scheduler."""

from __future__ import annotations

from typing import Any


def create_app(settings: Any = None) -> Any:
    from agent.api import ApiConfig
    from agent.api import create_app as build
    from doppel.context import AppContext

    c = AppContext(settings) if settings is not None else AppContext.load()
    token = c.settings.api_token.get_secret_value() if c.settings.api_token else None
    agent = c.agent()
    return build(agent, c.knowledge, ApiConfig(token, c.settings.api_max_body_bytes))
