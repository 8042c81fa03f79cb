"""The status page: model, backend, active adapter, facts and index age, the next nightly run, the
database; the first page after signing in."""

from __future__ import annotations

import os
from datetime import datetime, timezone
from typing import Any

from flask import Blueprint, render_template

from common.errors import DoppelError
from console import queries
from console.deps import ConsoleDeps


def facts_status(kb: Any) -> dict[str, Any]:
    """How many facts are served, how old the index is, and whether the file has a problem."""
    if kb is None:
        return {"served": False}
    out: dict[str, Any] = {"served": True, "path": str(kb.facts_path), "error": None, "count": None, "index_at": None}
    try:
        out["count"] = len(kb.current().facts)
    except DoppelError as exc:
        out["error"] = exc.message
    if kb.last_error and not out["error"]:
        out["error"] = f"{kb.last_error} (the previous version of the facts keeps serving)"
    try:
        out["index_at"] = datetime.fromtimestamp(os.stat(kb.index_path).st_mtime, timezone.utc)
    except OSError:
        pass
    return out


def create(deps: ConsoleDeps) -> Blueprint:
    bp = Blueprint("status", __name__)

    @bp.get("/")
    def index() -> Any:
        info = deps.system()
        with deps.sessions() as session:
            totals = queries.totals(session)
            outlook = queries.outlook(session, deps.nightly_min_ratings)
            latest = queries.runs(session, 1)[0][:1]
        registry_active = deps.registry.active_version()
        serving = getattr(deps.agent.runtime, "adapter_version", None)
        retrain = deps.retrainer.snapshot() if deps.retrainer else None
        return render_template("console/status.html", info=info, totals=totals, outlook=outlook,
                               latest=latest[0] if latest else None, registry_active=registry_active,
                               serving=serving, facts=facts_status(deps.knowledge), retrain=retrain)

    return bp
