"""``create_app(settings)``: the HTTP app for a WSGI server (``waitress-serve --call doppel.app:create_app``
or gunicorn's ``doppel.app:create_app()``): the JSON API and the owner's console at ``/``. ``doppel
serve`` builds the same app and adds the scheduler."""

from __future__ import annotations

from typing import Any


def create_app(settings: Any = None) -> Any:
    from doppel.context import AppContext
    from doppel.web import build_app, freeze_heap

    c = AppContext(settings) if settings is not None else AppContext.load()
    app = build_app(c, c.agent())
    freeze_heap()
    return app
