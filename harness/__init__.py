"""The harness the test suite and the benchmarks share: the fake Stripe API, Stripe-shaped
events, the Celery process launchers (harness/workers.py), the brokers and the chaos run."""
