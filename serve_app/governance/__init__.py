"""Governance: what a request may use and what it costs (cost model; keys, limits, budgets, audit follow)."""
