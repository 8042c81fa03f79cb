"""The HTTP app of ``doppel serve`` and ``doppel.app:create_app``: the JSON API and, mounted beside
it at ``/``, the owner's console, built from one ``AppContext``."""

from __future__ import annotations

import logging
from datetime import datetime, timezone
from typing import Any

log = logging.getLogger(__name__)


def console_secret(c: Any) -> str | None:
    """The console's password: its own setting, else the API token."""
    s = c.settings
    secret = s.console_password or s.api_token
    return secret.get_secret_value() if secret is not None else None


def build_app(c: Any, agent: Any, scheduler: Any = None) -> Any:
    """The Flask app: the API (bearer token) and the console (signed-in session).

    Raises:
        ConfigError: neither DOPPEL_CONSOLE_PASSWORD nor DOPPEL_API_TOKEN is set.
    """
    from agent.api import ApiConfig, create_app
    from console import ConsoleDeps, Retrainer, create_console
    from doppel.train_cmd import training_lock_path
    from trainer.registry import Registry

    s = c.settings
    token = s.api_token.get_secret_value() if s.api_token else None
    app = create_app(agent, c.knowledge, ApiConfig(token, s.api_max_body_bytes))

    def run_training(kind: str, on_step: Any, on_phase: Any) -> Any:
        from doppel.bot_cmd import owner_notifier
        from doppel.train_cmd import train_config, training_deps
        from trainer.pipeline import run_training as run

        deps = training_deps(c, notify=owner_notifier(c))
        return run(deps, kind, train_config(c), progress=on_step, phase=on_phase)

    deps = ConsoleDeps(secret=console_secret(c), agent=agent, knowledge=c.knowledge, sessions=c.sessions,
                       registry=Registry(s.adapters_dir, c.sessions), system=system_info(c, agent, scheduler),
                       retrainer=Retrainer(run_training, training_lock_path(c)),
                       nightly_min_ratings=s.retrain_min_ratings, secure_cookie=s.console_secure_cookie)
    app.register_blueprint(create_console(deps))
    from doppel.redaction import guard_responses

    guard_responses(app)  # no secret leaves in a response, an error page's included
    return app


def freeze_heap() -> None:
    """Move everything loaded so far (the models, the libraries) out of the garbage collector's
    sight. With torch and the embedding model loaded, a full collection walks ~500,000 objects and
    stalls whichever request triggers it for ~180 ms (measured); frozen, it takes well under 1 ms.
    Called once by each serving process, after it has built everything."""
    import gc

    gc.collect()
    gc.freeze()


def system_info(c: Any, agent: Any, scheduler: Any = None) -> Any:
    """A provider of what the status page shows about this process."""
    from console import SystemInfo
    from feedback.db import redact_url

    s = c.settings
    runtime = type(agent.runtime).__name__
    backend = (f"llama.cpp ({s.llama_cpp_weights.upper()} weights)" if runtime == "LlamaCppRuntime"
               else "transformers" if runtime == "ModelRuntime" else runtime)
    model = s.base_model or "SmolLM2-135M-Instruct (packaged)"
    device = s.device if s.device != "auto" else getattr(agent.runtime, "device", "cpu")
    zone = s.retrain_timezone or _local_zone()
    schedule = f"{s.retrain_hour:02d}:{s.retrain_minute:02d} every day ({zone})"

    def info() -> SystemInfo:
        return SystemInfo(model=model, backend=backend, device=str(device), database=redact_url(s.resolved_database_url),
                          data_dir=str(s.data_dir), next_nightly=_next_nightly(c, scheduler), schedule=schedule,
                          scheduler_here=scheduler is not None)

    return info


def _local_zone() -> str:
    try:
        from tzlocal import get_localzone

        return str(get_localzone())
    except Exception:  # no zone database: the machine's clock it is
        return "local time"


def _next_nightly(c: Any, scheduler: Any) -> datetime | None:
    """When the nightly job fires next: the scheduler's own answer, or the same cron rule computed."""
    from doppel.scheduler import JOB_ID

    if scheduler is not None:
        job = scheduler.get_job(JOB_ID)
        return job.next_run_time if job is not None else None
    try:
        from apscheduler.triggers.cron import CronTrigger

        s = c.settings
        trigger = CronTrigger(hour=s.retrain_hour, minute=s.retrain_minute, timezone=s.retrain_timezone or _local_zone())
        return trigger.get_next_fire_time(None, datetime.now(timezone.utc))
    except Exception as exc:  # a bad zone is reported by the scheduler itself; the page just shows no time
        log.debug("cannot compute the next nightly run: %s", exc)
        return None
