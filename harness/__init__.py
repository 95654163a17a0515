"""The harness the test suite and the benchmarks share: the fake Stripe API, Stripe-shaped
events, worker launchers, broker helpers and the chaos run."""
