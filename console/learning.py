"""Learning: training runs with their outcome, metrics, the gate's reason and a loss curve; the
adapters, with activate and roll back; "retrain now", which respects the single-flight lock and
shows its progress (the page polls ``/learning/progress``)."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, flash, jsonify, redirect, render_template, request, url_for

from common.errors import BusyError, DoppelError, NotFoundError
from console import queries
from console.deps import ConsoleDeps
from console.plot import loss_svg
from console.retrain import KINDS
from console.views import page_arg, wants_json

# the gate's figures, in the order the run page shows them: (key in metrics, label, lower is better)
FIGURES = (("heldout_loss", "held-out loss", True), ("perplexity", "held-out perplexity", True),
           ("rating_margin", "liked-vs-disliked margin", False), ("fact_use", "fact use (questions about facts)", False))


def figure(metrics: dict[str, Any] | None, key: str) -> float | None:
    value = (metrics or {}).get(key)
    if isinstance(value, dict):
        value = value.get("share")
    return value if isinstance(value, (int, float)) else None


def gate_reason(run: Any, adapter: Any) -> str:
    if adapter is not None and adapter.reason:
        return str(adapter.reason)
    if run.error:
        lines = [line for line in run.error.strip().splitlines() if line.strip()]
        return lines[-1] if lines else ""
    return ""


def create(deps: ConsoleDeps) -> Blueprint:
    bp = Blueprint("learning", __name__, url_prefix="/learning")

    @bp.get("")
    def index() -> Any:
        page = page_arg()
        with deps.sessions() as session:
            runs, total = queries.runs(session, page)
            outlook = queries.outlook(session, deps.nightly_min_ratings)
        adapters = list(reversed(deps.registry.list()))
        active = deps.registry.active_version()
        return render_template("console/learning.html", runs=runs, total=total, page=page, per_page=queries.PAGE // 2,
                               adapters=adapters, active=active, serving=getattr(deps.agent.runtime, "adapter_version", None),
                               outlook=outlook, retrain=deps.retrainer.snapshot() if deps.retrainer else None,
                               kinds=KINDS, loss_svg=loss_svg, figure=figure, gate_reason=gate_reason,
                               info=deps.system())

    @bp.get("/runs/<int:run_id>")
    def run(run_id: int) -> Any:
        with deps.sessions() as session:
            found = queries.run(session, run_id)
        if found is None:
            raise NotFoundError(f"No training run {run_id}.", hint="Pick one from the list of runs.")
        row, adapter = found
        metrics = row.metrics or {}
        return render_template("console/run.html", run=row, adapter=adapter, metrics=metrics,
                               plot=loss_svg(metrics.get("loss_curve") or [], width=1000, height=300),
                               figures=FIGURES, figure=figure, gate_reason=gate_reason(row, adapter),
                               config=row.config or {})

    def _done(message: str, category: str = "ok", status: int = 200) -> Any:
        if wants_json():
            return jsonify({"message": message, "ok": category == "ok",
                            "progress": deps.retrainer.snapshot().as_dict() if deps.retrainer else None}), status
        flash(message, category)
        return redirect(url_for(".index") + "#retrain")

    @bp.post("/retrain")
    def retrain() -> Any:
        if deps.retrainer is None:
            raise NotFoundError("This server does not train.", hint="Run `doppel retrain --now` on the machine that trains.")
        kind = request.form.get("kind") or (request.get_json(silent=True) or {}).get("kind") or "retrain"
        try:
            deps.retrainer.start(kind)
        except BusyError as exc:
            return _done(f"{exc.message} {exc.hint or ''}".strip(), "error", 409)
        return _done(f"Started: {KINDS.get(kind, kind)}. Progress shows below.", status=202)

    @bp.get("/progress")
    def progress() -> Any:
        if deps.retrainer is None:
            return jsonify({"state": "unavailable", "running": False})
        return jsonify(deps.retrainer.snapshot().as_dict())

    @bp.post("/adapters/<int:version>/activate")
    def activate(version: int) -> Any:
        try:
            row = deps.registry.activate(version)
        except DoppelError as exc:
            flash(f"{exc.message} {exc.hint or ''}".strip(), "error")
        else:
            flash(f"Adapter v{row.version} is active; running twins switch to it at their next reply.", "ok")
        return redirect(url_for(".index") + "#adapters")

    @bp.post("/adapters/rollback")
    def rollback() -> Any:
        try:
            row = deps.registry.rollback()
        except DoppelError as exc:
            flash(f"{exc.message} {exc.hint or ''}".strip(), "error")
        else:
            flash(f"Rolled back: adapter v{row.version} is active." if row else
                  "Rolled back: no adapter is active, the base model serves.", "ok")
        return redirect(url_for(".index") + "#adapters")

    return bp
