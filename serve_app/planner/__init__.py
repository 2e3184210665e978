"""Capacity planner: the router's own scheduler and policies, replayed in virtual time over a
simulated fleet (``sim.py``). Work in progress: see the README's "Capacity planner" section."""
