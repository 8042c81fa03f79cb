"""The nightly retraining job (APScheduler, job store in the project's database).

The job is stored by reference (``doppel.scheduler:nightly_job``) with no arguments: it reads the
settings afresh when it fires, so a changed setting applies from the next night on.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)

JOB_ID = "nightly-retrain"

# the owner is told the outcome through this; the bots replace it when they run in-process
_notifier: Any = None


def set_notifier(notify: Any) -> None:
    global _notifier
    _notifier = notify


def nightly_job() -> None:
    from doppel.context import AppContext
    from doppel.train_cmd import train_config, training_deps
    from trainer.pipeline import nightly

    c = AppContext.load()
    try:
        from doppel.bot_cmd import owner_notifier

        deps = training_deps(c, notify=_notifier or owner_notifier(c))
        result = nightly(deps, train_config(c), c.settings.retrain_min_ratings)
        log.info("nightly retraining: %s", result.message)
    except Exception:
        log.exception("nightly retraining failed; the active adapter is unchanged")


def start_scheduler(c: Any, *, background: bool = True) -> Any:
    from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore
    from apscheduler.schedulers.background import BackgroundScheduler
    from apscheduler.triggers.cron import CronTrigger
    from tzlocal import get_localzone

    s = c.settings
    tz = s.retrain_timezone or get_localzone()
    scheduler = BackgroundScheduler(jobstores={"default": SQLAlchemyJobStore(engine=c.engine)}, timezone=tz)
    scheduler.start()
    scheduler.add_job(nightly_job, CronTrigger(hour=s.retrain_hour, minute=s.retrain_minute, timezone=tz),
                      id=JOB_ID, replace_existing=True, coalesce=True, max_instances=1, misfire_grace_time=3600)
    return scheduler
