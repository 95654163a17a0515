"""Stripe Connect (SPEC §5): connected accounts' status (accounts.py), the mirror of the
platform's transfers and their payouts (mirror.py), reading Stripe (reader.py), classifying
transactions and transfers into outcomes and discrepancies (classify.py), and reconciliation
runs over the accounts (run.py). Imports point one way: run uses classify, reader and mirror;
classify and reader use mirror; accounts.py uses none of them."""
