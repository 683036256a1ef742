"""Oracles and test helpers: dense references of SPEC.md and tiny random models.

Nothing in the serving path imports this package; tests, benchmarks and the
GPU scripts do.
"""
