"""Benchmarks of disburser: gas, throughput, a mainnet-like run, scaling, start-up.

Run them with ``./scripts/bench`` (full, writes BENCHMARKS.md) or ``./scripts/bench --quick``
(small sizes, seconds). Each measurement is a module with a ``run(ctx) -> dict`` function;
``benchmarks.main`` runs them in order and renders the table.
"""
