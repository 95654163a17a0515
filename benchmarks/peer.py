"""The peer the receiver is measured against: @supabase/stripe-sync-engine behind one Fastify route.

    python -m benchmarks.peer --check

`start_peer(database_url, webhook_secret, port)` installs the pinned Node packages of
benchmarks/peer/ once (`npm ci`, kept in benchmarks/peer/node_modules, outside git), runs the
engine's migrations into the `stripe` schema of `database_url` (a scratch database the caller
made), starts `node server.mjs` (one process, a pool of 10 connections) and yields the URL to
POST signed webhooks to; the process and its children are stopped on exit. The engine stores
invoice events from their payload and never calls Stripe (server.mjs says which options
ensure it). Needs Node 20+ and npm, and the npm registry on first use; no test uses it.

`--check` starts the peer on a scratch database (on the server DATABASE_URL names, else an
embedded one), POSTs one signed `invoice.finalized` and one with a bad signature, expects
200 then 400 and only the first invoice in `stripe.invoices`, and prints the start-up timings.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx

from harness.services import libpq_url

PEER_DIR = Path(__file__).resolve().parent / "peer"
# Written into node_modules after `npm ci`: the lock file it installed, so a changed lock reinstalls.
_INSTALLED_STAMP = PEER_DIR / "node_modules" / ".installed-lock-sha256"
_START_TIMEOUT_S = 30


def _lock_digest() -> str:
    return hashlib.sha256((PEER_DIR / "package-lock.json").read_bytes()).hexdigest()


def _require(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        raise RuntimeError(f"the peer needs `{tool}` (Node 20+ and npm) on PATH")
    return path


def _run(args: list[str], env: dict[str, str] | None = None) -> None:
    done = subprocess.run(args, cwd=PEER_DIR, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({done.returncode}):\n{done.stdout}{done.stderr}")


def install() -> bool:
    """`npm ci` unless node_modules already holds this package-lock.json; True if it ran."""
    digest = _lock_digest()
    if _INSTALLED_STAMP.exists() and _INSTALLED_STAMP.read_text() == digest:
        return False
    _run([_require("npm"), "ci", "--no-audit", "--no-fund"])
    _INSTALLED_STAMP.write_text(digest)
    return True


def migrate(database_url: str) -> None:
    """The engine's migrations into the `stripe` schema; fails unless its tables exist after."""
    _run([_require("node"), "migrate.cjs"], env={**os.environ, "DATABASE_URL": libpq_url(database_url)})


def _stop(proc: subprocess.Popen, timeout: float = 10) -> None:
    # The server is its own process group's leader: the group takes any child with it.
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout)
            break
        except subprocess.TimeoutExpired:
            continue
    proc.wait()


@contextmanager
def start_peer(
    database_url: str, webhook_secret: str, port: int, *, timings: dict[str, float] | None = None
) -> Iterator[str]:
    """The peer on 127.0.0.1:`port`, migrated into `database_url`; yields its webhook URL.

    `timings`, if given, receives the seconds spent on `npm ci` (0 when cached), the
    migrations, and from starting node until /healthz answers."""
    timings = {} if timings is None else timings
    started = time.monotonic()
    installed = install()
    timings["npm_ci_s"] = time.monotonic() - started if installed else 0.0

    started = time.monotonic()
    migrate(database_url)
    timings["migrations_s"] = time.monotonic() - started

    base = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "DATABASE_URL": libpq_url(database_url),
        "STRIPE_WEBHOOK_SECRET": webhook_secret,
        "PORT": str(port),
        "HOST": "127.0.0.1",
    }
    with tempfile.NamedTemporaryFile(prefix="stripe-sync-peer-", suffix=".log") as log:
        started = time.monotonic()
        proc = subprocess.Popen(
            [_require("node"), "server.mjs"], cwd=PEER_DIR, env=env,
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        try:
            _wait_healthy(proc, base, Path(log.name))
            timings["server_up_s"] = time.monotonic() - started
            yield f"{base}/webhooks/stripe"
        finally:
            _stop(proc)


def _wait_healthy(proc: subprocess.Popen, base: str, log_path: Path) -> None:
    deadline = time.monotonic() + _START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the peer exited ({proc.returncode}):\n{log_path.read_text(errors='replace')}")
        try:
            if httpx.get(f"{base}/healthz", timeout=0.5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"the peer did not answer within {_START_TIMEOUT_S} s:\n{log_path.read_text(errors='replace')}")


def check() -> None:
    import psycopg

    from harness import stripe_events as se
    from harness.services import scratch_database
    from worker.embedded import embedded_postgres, free_port

    secret = "whsec_peer_check_0123456789"
    with ExitStack() as stack:
        server = os.environ.get("DATABASE_URL") or stack.enter_context(
            embedded_postgres(Path(stack.enter_context(tempfile.TemporaryDirectory())) / "postgres", keep=False)
        )
        database_url = stack.enter_context(scratch_database(server, prefix="peer_check"))
        timings: dict[str, float] = {}
        with start_peer(database_url, secret, free_port(), timings=timings) as url:
            good = se.invoice(status="open", app_invoice_id="peer-check")
            bad = se.invoice(status="open")
            answers = []
            for invoice, key in ((good, secret), (bad, "whsec_not_the_peers_secret")):
                body = se.encode(se.event("invoice.finalized", invoice))
                headers = {"Content-Type": "application/json; charset=utf-8", "Stripe-Signature": se.sign(body, key)}
                answers.append(httpx.post(url, content=body, headers=headers, timeout=10).status_code)
            with psycopg.connect(libpq_url(database_url)) as conn:
                stored = dict(conn.execute("SELECT id, status::text FROM stripe.invoices").fetchall())
        print(f"peer: {url}")
        print(
            f"start-up: npm ci {timings['npm_ci_s']:.2f} s{' (cached)' if not timings['npm_ci_s'] else ''}, "
            f"migrations {timings['migrations_s']:.2f} s, server up {timings['server_up_s']:.2f} s"
        )
        print(f"signed invoice.finalized -> {answers[0]}, bad signature -> {answers[1]}")
        print(f"stripe.invoices: {stored}")
        if answers != [200, 400] or stored != {good["id"]: "open"}:
            raise SystemExit(f"peer check failed: expected [200, 400] and only {good['id']} stored")
        print("peer check passed")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="start the peer, send one good and one badly signed event")
    args = parser.parse_args(argv)
    if not args.check:
        parser.error("nothing to do: pass --check (benchmarks use start_peer)")
    check()


if __name__ == "__main__":
    sys.exit(main())
