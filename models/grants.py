"""The worker's database role: least privilege on the main app's tables, owner of its own schema.

    python -m models.grants ROLE | psql "$ADMIN_DATABASE_URL"    # as a superuser or the tables' owner
    python -m models.grants ROLE --apply                         # the same, run here (docker-compose's migrate)

prints the SQL that creates ROLE (LOGIN, no password: set one with ALTER ROLE, or use the
server's own authentication) if it does not exist and grants it exactly what the worker does:

- `marketplace_worker`: owned by ROLE, so `marketplace-worker migrate` (run as ROLE) creates
  and alters its tables; tables an earlier install created as another role are handed over
  (the inbox's partitions among them: pg_tables lists each). The worker itself changes DDL
  there: the `prepare_inbox_partitions` and `purge_inbox` jobs create, attach, detach and drop
  the inbox's monthly partitions, which needs ownership of the inbox, not a grant. Access to a
  partition through the parent `stripe_events` is checked on the parent only;
- SELECT on the app tables it reads, UPDATE on the columns it writes, nothing else:

  | table | reads | writes |
  |---|---|---|
  | `public."Invoice"` | yes | the Stripe mirror: status, amounts paid, paid/voided times, Stripe ids, `updatedAt` |
  | `marketplace.transactions` | yes | INSERT (one per marketplace invoice), UPDATE of amounts, status and its times |
  | `marketplace.providers` | yes | the stats columns and the Connect flags, `updatedAt` |
  | `marketplace.service_listings` | yes (stats, a transaction's description) | no |
  | `marketplace.reviews` | yes (stats) | no |

  and nothing on `"User"`, `"Tenant"`, `"Message"`, `"MessageThread"` (foreign keys are checked
  with their owner's rights, not the worker's). `SELECT ... FOR UPDATE` needs UPDATE on one
  column of the table, which each locked table has.

Run it again after an upgrade of the worker: it is idempotent, and a release that writes a new
column says so in its changelog and here.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

from models.base import WORKER_SCHEMA

# (table, columns the worker UPDATEs); every table here is also SELECTed.
UPDATES: dict[str, tuple[str, ...]] = {
    'public."Invoice"': (
        "status", "amountPaidCents", "paidAt", "voidedAt",
        "stripeInvoiceId", "stripeChargeId", "stripePaymentIntentId", "updatedAt",
    ),
    "marketplace.transactions": (
        "totalCents", "platformFeeCents", "providerPayoutCents", "status", "invoicedAt", "paidAt", "completedAt",
    ),
    "marketplace.providers": (
        "totalListings", "totalTransactions", "totalRevenueCents", "averageRating",
        "stripeConnectOnboardingComplete", "stripeConnectPayoutsEnabled", "updatedAt",
    ),
}
READ_ONLY = ("marketplace.service_listings", "marketplace.reviews")
INSERTS = ("marketplace.transactions",)
APP_SCHEMAS = ("public", "marketplace")


def _ident(name: str) -> str:
    if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", name):
        raise ValueError(f"role name {name!r}: use lower-case letters, digits and underscores")
    return name


def grants_sql(role: str) -> str:
    role = _ident(role)
    lines = [
        "BEGIN;",
        f"DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{role}') THEN "
        f"CREATE ROLE {role} LOGIN; END IF; END $$;",
        f"CREATE SCHEMA IF NOT EXISTS {WORKER_SCHEMA} AUTHORIZATION {role};",
        f"ALTER SCHEMA {WORKER_SCHEMA} OWNER TO {role};",
        # Tables (and with them their identity sequences) made by an earlier install as another role.
        "DO $$ DECLARE t record; BEGIN",
        f"  FOR t IN SELECT tablename FROM pg_tables WHERE schemaname = '{WORKER_SCHEMA}' AND tableowner <> '{role}'",
        f"  LOOP EXECUTE format('ALTER TABLE {WORKER_SCHEMA}.%I OWNER TO {role}', t.tablename); END LOOP;",
        "END $$;",
        f"GRANT USAGE ON SCHEMA {', '.join(APP_SCHEMAS)} TO {role};",
    ]
    for table in (*UPDATES, *READ_ONLY):
        lines.append(f"GRANT SELECT ON {table} TO {role};")
    for table, columns in UPDATES.items():
        quoted = ", ".join(f'"{column}"' for column in columns)
        lines.append(f"GRANT UPDATE ({quoted}) ON {table} TO {role};")
    for table in INSERTS:
        lines.append(f"GRANT INSERT ON {table} TO {role};")
        lines.append(
            f"DO $$ BEGIN EXECUTE format('GRANT USAGE ON SEQUENCE %s TO {role}', "
            f"pg_get_serial_sequence('{table}', 'id')); END $$;"
        )
    lines.append("COMMIT;")
    return "\n".join(lines) + "\n"


def revoke_sql(role: str) -> str:
    """Everything grants_sql gave, taken back, and the role dropped (its schema stays, owned by
    whoever runs this); for tests and for retiring a role."""
    role = _ident(role)
    return (
        f"DO $$ BEGIN IF EXISTS (SELECT FROM pg_roles WHERE rolname = '{role}') THEN "
        f"EXECUTE 'REASSIGN OWNED BY {role} TO ' || quote_ident(current_user); "
        f"EXECUTE 'DROP OWNED BY {role}'; END IF; END $$;\n"
    )


def apply(admin_url: str, role: str, password: str) -> None:
    """Run grants_sql as the admin, and give the role its password."""
    import psycopg
    from psycopg import sql

    with psycopg.connect(admin_url.replace("postgresql+psycopg://", "postgresql://", 1), autocommit=True) as conn:
        conn.execute(grants_sql(role))
        conn.execute(sql.SQL("ALTER ROLE {} PASSWORD {}").format(sql.Identifier(role), sql.Literal(password)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Print (or apply) the SQL that sets up the worker's database role.")
    parser.add_argument("role", help="the role the worker connects as, e.g. marketplace_worker_app")
    parser.add_argument("--apply", action="store_true",
                        help="run it against ADMIN_DATABASE_URL (a superuser, or the owner of the app's tables) "
                             "and set the role's password to WORKER_DB_PASSWORD")
    args = parser.parse_args(argv)
    try:
        text = grants_sql(args.role)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if not args.apply:
        sys.stdout.write(text)
        return 0
    for name in ("ADMIN_DATABASE_URL", "WORKER_DB_PASSWORD"):
        if not os.environ.get(name):
            print(f"configuration error: {name} is not set", file=sys.stderr)
            return 2
    apply(os.environ["ADMIN_DATABASE_URL"], args.role, os.environ["WORKER_DB_PASSWORD"])
    print(f"role {args.role}: grants applied")
    return 0


if __name__ == "__main__":
    sys.exit(main())
