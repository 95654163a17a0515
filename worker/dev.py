"""`marketplace-worker dev`: the whole stack on one machine with no server installed.

Embedded Postgres and Redis keep their data under `--data-dir` (git-ignored),
so a rerun finds yesterday's events. The main app's tables are created from
Prisma's DDL when absent: that is for development only; in production the main
application's migrations own them.
"""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path

from worker.embedded import embedded_postgres, embedded_redis, free_port

DEV_SECRET_FILE = "webhook-secret"


def _dev_webhook_secret(data_dir: Path) -> str:
    """A signing secret kept with the dev data, so test tools can sign events for it."""
    path = data_dir / DEV_SECRET_FILE
    if not path.exists():
        path.write_text("whsec_dev_" + secrets.token_hex(16))
    return path.read_text().strip()


def _children(args: argparse.Namespace, flower_port: int) -> dict[str, list[str]]:
    python = sys.executable
    return {
        "receiver": [python, "-m", "worker.cli", "webhook", "--host", "127.0.0.1", "--port", str(args.port)],
        # One worker consuming every queue, with beat embedded: enough for one laptop.
        "worker": [python, "-m", "celery", "-A", "worker", "worker", "--beat", "-l", "INFO",
                   "-c", "2", "-Q", "webhooks,polling,stats,reconciliation",
                   "--schedule", str(Path(args.data_dir).resolve() / "celerybeat-schedule")],
        "flower": [python, "-m", "celery", "-A", "worker", "flower", f"--port={flower_port}",
                   "--address=127.0.0.1"],
    }


def run_dev_stack(args: argparse.Namespace) -> int:
    data_dir = Path(args.data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    with ExitStack() as stack:
        print(f"starting embedded Postgres and Redis in {data_dir} ...", flush=True)
        pg_url = stack.enter_context(embedded_postgres(data_dir / "postgres", keep=True))
        redis_url = stack.enter_context(embedded_redis(data_dir / "redis", port=free_port()))
        secret = os.environ.get("STRIPE_WEBHOOK_SECRETS") or _dev_webhook_secret(data_dir)
        os.environ.update({
            "DATABASE_URL": pg_url,
            "REDIS_URL": redis_url,
            "STRIPE_WEBHOOK_SECRETS": secret,
            "STRIPE_CONNECT_WEBHOOK_SECRETS": os.environ.get("STRIPE_CONNECT_WEBHOOK_SECRETS") or secret,
            "FLOWER_BASIC_AUTH": os.environ.get("FLOWER_BASIC_AUTH") or "dev:dev",
        })
        os.environ.pop("CELERY_BROKER_URL", None)
        os.environ.pop("CELERY_RESULT_BACKEND", None)

        from config import get_settings
        from models.migrate import create_app_tables_if_absent, upgrade

        get_settings.cache_clear()
        settings = get_settings()
        if create_app_tables_if_absent(settings.database_url):
            print("created the main app's tables from schema.sql (dev only)")
        upgrade(settings.database_url)
        print("migrations applied")

        procs = {
            name: subprocess.Popen(cmd, env=os.environ.copy(), start_new_session=True)
            for name, cmd in _children(args, args.flower_port).items()
        }
        stack.callback(_stop_all, procs)
        print(
            "\nmarketplace worker dev stack is up:\n"
            f"  receiver  http://127.0.0.1:{args.port}/webhooks/stripe  (Connect: /webhooks/stripe/connect)\n"
            f"  health    http://127.0.0.1:{args.port}/healthz\n"
            f"  flower    http://127.0.0.1:{args.flower_port}/  (basic auth {os.environ['FLOWER_BASIC_AUTH'].split(':')[0]}:...)\n"
            f"  database  {pg_url}\n"
            f"  redis     {redis_url}\n"
            f"  webhook signing secret in {data_dir / DEV_SECRET_FILE}\n"
            "Ctrl-C stops everything; the data stays for the next run.\n",
            flush=True,
        )
        return _wait(procs)


def _wait(procs: dict[str, subprocess.Popen]) -> int:
    stop = {"requested": False}

    def request_stop(signum, frame):
        stop["requested"] = True

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    while not stop["requested"]:
        for name, proc in procs.items():
            if proc.poll() is not None:
                print(f"{name} exited with {proc.returncode}; stopping the stack", file=sys.stderr)
                return 1
        time.sleep(0.5)
    print("\nstopping ...", flush=True)
    return 0


def _stop_all(procs: dict[str, subprocess.Popen]) -> None:
    for proc in procs.values():
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + 20
    for proc in procs.values():
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
