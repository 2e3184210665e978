"""A load shape that ramps above on-prem capacity and back: base load, a burst, base again.

Use it next to the users (Locust uses any shape class in the files it loads):

    locust -f loadtests/locustfile.py,loadtests/burst_shape.py --headless --host http://127.0.0.1:8000

Settings: ``SPILLWAY_BASE_USERS`` (default 4), ``SPILLWAY_BURST_USERS`` (default 48; pick more
than the on-prem slots), ``SPILLWAY_STAGE_S`` (default 30 s per stage), ``SPILLWAY_SPAWN_RATE``
(default 8 users/s).
"""

from __future__ import annotations

import os

from locust import LoadTestShape


class BurstShape(LoadTestShape):
    """base (1 stage) -> burst (1 stage) -> base (1 stage) -> stop."""

    def __init__(self):
        super().__init__()
        self.base_users = int(os.environ.get("SPILLWAY_BASE_USERS", "4"))
        self.burst_users = int(os.environ.get("SPILLWAY_BURST_USERS", "48"))
        self.stage_s = float(os.environ.get("SPILLWAY_STAGE_S", "30"))
        self.spawn_rate = float(os.environ.get("SPILLWAY_SPAWN_RATE", "8"))

    def users_at(self, run_time_s: float) -> int | None:
        stage = int(run_time_s // self.stage_s)
        if stage >= 3:
            return None
        return self.burst_users if stage == 1 else self.base_users

    def tick(self):
        users = self.users_at(self.get_run_time())
        return None if users is None else (users, self.spawn_rate)
