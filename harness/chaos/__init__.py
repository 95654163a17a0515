"""The chaos run: real processes, real faults, and a reference to compare with.

Shared by `python -m benchmarks.chaos` (the full run) and tests/test_chaos.py (a short one);
benchmarks/soak.py uses its servers and its event generator. The pieces:

- `scenario`: the rows seeded and the Stripe histories generated about them;
- `deliveries`: the requests sent (genuine, duplicated, hostile) and the client sending them;
- `servers`: the run's own Postgres and broker, restartable;
- `faults`: the fault injector and the supervisor restarting workers that exited;
- `reference`: the reference database and the row-by-row comparison with it;
- `audit`: what the run's database must show from the deliveries and histories alone;
- `run`: the run itself (`run_chaos`, `ChaosConfig`) and its report (`report.ChaosReport`).

What a run does, and why it proves what SPEC §2 promises:

1. Starts servers of its own: an embedded Postgres (restarted with its own pg_ctl) and an
   embedded Redis (restarted as a new, empty server on the same port: Redis keeps nothing
   on disk here, so every queued message is lost). Faults hit nothing but this run. With
   `broker="amqp"` the broker is the machine's RabbitMQ instead, on a vhost of the run's own
   (quorum queues keep their messages across its restart, which cuts every connection);
   Redis then only holds the Stripe rate limit.
2. Creates two databases on that server, the system under test and the reference, and
   seeds both identically: tenants, users, providers of the three payment modes, listings,
   marketplace invoices (some already linked to their Stripe invoice, the others only
   through `metadata.invoiceId`), a few non-marketplace and soft-deleted invoices, the app's
   own transaction rows for some invoices, and reviews.
3. Generates realistic Stripe histories for them (harness/stripe_events.py): invoice
   lifecycles of every outcome in both invoice shapes (some paid as they are finalized, all
   their events within one second), Connect onboarding, transfers (some reversed), payouts of
   every outcome and deauthorizations.
4. Delivers them to a real receiver process (`marketplace-worker webhook`) as Stripe would,
   only worse: every event, 30 % of them twice, all in random order, mixed with 5 % hostile
   requests (forged, wrongly signed, stale, unsigned, malformed, not an event, oversize),
   from a concurrent client that retries a 503 as Stripe does. Two real worker processes
   (`celery -A worker worker`) consume, and a real `celery -A worker beat` runs the inbox
   sweeper every few seconds (and the incremental stats pass).
5. Meanwhile injects faults: SIGKILL of a whole worker process tree (then a restart), a
   broker restart (Redis or RabbitMQ) with messages queued (the workers are paused until
   some are), a Postgres restart (every connection cut, 503s while it is down).
6. Waits until nothing is `received` or `retrying` (the drain), then builds the reference:
   the ACCEPTED distinct events processed once each, in Stripe's order (created, then id),
   sequentially in this process with `domain.dispatch.process_event` on the reference
   database. The run's receiver, workers and beat connect as the worker's least-privilege
   role (models/grants.py), which also migrated the worker's schema: a missing grant fails
   the run. The same provider-stats full pass then runs on both databases, and they are
   compared row by row: every transaction (by invoice), every "Invoice" mirror field, every
   provider (stats and Connect flags), and every worker table (charges, refunds, disputes,
   refunded cents per transaction, transfers, payouts, object versions, the inbox statuses),
   ignoring only bookkeeping that legitimately differs (processing timestamps, attempts,
   job runs, touched providers, surrogate ids).

The reference runs the same domain code, once, in order, without faults: equality proves
that the result does not depend on delivery order, duplication, crashes or outages. An
independent oracle, computed from the generated histories alone (what each invoice's
outcome must leave), checks the domain code itself on top of that.
"""
