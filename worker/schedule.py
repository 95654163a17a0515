"""The beat schedule: one table, every cadence a setting, every time UTC.

Each job fires at the instants of a fixed UTC grid (config/cadence.py): "every 5 min" means
at :00, :05, ... whenever beat was started, and "daily at 02:00" at 02:00 UTC. Beat stamps
each message with that instant, the job's slot, and the job's task (tasks/base.py, `@job`)
runs one copy per (job, slot) and never two runs of a job at a time. A job is named after its
task's function, and its cadence is the setting `schedule_<job>`. Tasks are referenced by
name, so beat needs none of their code; tests/test_jobs.py checks the table against the tasks.

High availability: no Redis-backed scheduler (RedBeat or similar). Two ordinary beat
processes on two hosts are already safe, because Postgres, not beat, decides what runs:
both fire the same slot, one copy runs and the other is recorded as skipped. A leader-lock
scheduler would add a dependency, a lock with a TTL to tune and a failover gap, to save one
skipped row per slot. Run a second `celery -A worker beat` where the first one is not.
Each beat keeps its last-run times in its own `--schedule` file; a beat that was down fires
each missed job once when it comes back, never once per missed slot.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from celery.schedules import BaseSchedule, schedstate
from celery.signals import before_task_publish

from config import Settings, get_settings
from config.cadence import Cadence
from tasks.base import SLOT_HEADER

# The header naming the job a beat message is for (static, in the entry); beat adds the slot
# (SLOT_HEADER) when it publishes the message.
JOB_HEADER = "mw_job"


@dataclass(frozen=True)
class Job:
    task: str

    @property
    def name(self) -> str:
        """The job's name in job_runs.job: its task's function."""
        return self.task.rpartition(".")[2]

    @property
    def setting(self) -> str:
        return f"schedule_{self.name}"

    def cadence(self, settings: Settings) -> Cadence:
        return getattr(settings, self.setting)


JOBS = (
    #   task                                      default cadence (UTC)
    Job("tasks.events.sweep_inbox"),              # every 1 min
    Job("tasks.events.catch_up_events"),          # every 10 min
    Job("tasks.stats.incremental_stats"),         # every 1 min
    Job("tasks.polling.poll_invoices"),           # every 5 min
    Job("tasks.polling.complete_transactions"),   # every 1 h
    Job("tasks.stats.full_stats"),                # daily at 02:00
    Job("tasks.reconciliation.reconcile_dirty"),  # every 10 min
    Job("tasks.reconciliation.reconcile_all"),    # daily at 03:00
    Job("tasks.maintenance.purge_inbox"),         # daily at 04:00
    Job("tasks.maintenance.prepare_inbox_partitions"),  # daily at 03:30
    Job("tasks.fanout.sweep_fanout"),             # every 1 min
)
JOBS_BY_NAME = {job.name: job for job in JOBS}


class on_grid(BaseSchedule):
    """Due once at each instant of the cadence's grid, whenever beat was started."""

    def __init__(self, cadence: Cadence, nowfun=None, app=None) -> None:
        self.cadence = cadence
        super().__init__(nowfun=nowfun, app=app)

    def remaining_estimate(self, last_run_at: datetime):
        return self.cadence.next_slot(self.maybe_make_aware(last_run_at)) - self.now()

    def is_due(self, last_run_at: datetime) -> schedstate:
        now = self.now()
        due = self.cadence.slot(now) > self.cadence.slot(self.maybe_make_aware(last_run_at))
        return schedstate(due, (self.cadence.next_slot(now) - now).total_seconds())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, on_grid) and other.cadence == self.cadence

    def __hash__(self) -> int:
        return hash(self.cadence)

    def __reduce__(self):
        return self.__class__, (self.cadence, self.nowfun)

    def __repr__(self) -> str:
        return f"<on_grid: {self.cadence.describe()} UTC>"


def beat_schedule(settings: Settings) -> dict[str, dict]:
    entries = {}
    for job in JOBS:
        cadence = job.cadence(settings)
        entries[job.name] = {
            "task": job.task,
            "schedule": on_grid(cadence),
            "options": {
                # A message nobody picked up before the next slot is stale: that slot's own
                # message supersedes it, so an outage leaves no backlog of runs to skip.
                "expires": cadence.period,
                "headers": {JOB_HEADER: job.name},
            },
        }
    return entries


@before_task_publish.connect
def _stamp_slot(headers: dict | None = None, **_: object) -> None:
    """Give a beat message the slot it was fired for: beat publishes at the grid instant, so
    two beat processes (whose clocks agree within a period) stamp the same slot."""
    job = JOBS_BY_NAME.get((headers or {}).get(JOB_HEADER))
    if job is not None and SLOT_HEADER not in headers:
        headers[SLOT_HEADER] = job.cadence(get_settings()).slot(datetime.now(UTC)).isoformat()
