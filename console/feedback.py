"""Feedback: ratings and corrections with filters (value, platform, adapter version, since the last
retraining), and the count that decides whether tonight's run happens."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, render_template, request

from console import queries
from console.deps import ConsoleDeps
from console.views import page_arg


def create(deps: ConsoleDeps) -> Blueprint:
    bp = Blueprint("feedback", __name__, url_prefix="/feedback")

    @bp.get("")
    def index() -> Any:
        args = request.args
        tab = "corrections" if args.get("tab") == "corrections" else "ratings"
        value = args.get("value", "all")
        value = value if value in queries.VALUES or value == "all" else "all"
        since_last = args.get("since") == "last"
        page = page_arg()
        with deps.sessions() as session:
            outlook = queries.outlook(session, deps.nightly_min_ratings)
            f = queries.FeedbackFilter(value=value, platform=args.get("platform", "").strip(),
                                       adapter=args.get("adapter", "").strip(),
                                       since=outlook.since if since_last else None)
            if tab == "ratings":
                rows, total = queries.feedback_ratings(session, f, page)
            else:
                rows, total = queries.feedback_corrections(session, f, page)
            platforms = queries.platforms(session)
            versions = queries.rated_adapter_versions(session)
        filters = {"tab": tab, "value": value, "platform": f.platform, "adapter": f.adapter,
                   "since": "last" if since_last else ""}
        return render_template("console/feedback.html", rows=rows, total=total, page=page, per_page=queries.PAGE,
                               tab=tab, filters=filters, outlook=outlook, platforms=platforms, versions=versions,
                               since_last=since_last, schedule=deps.system().schedule)

    return bp
