"""Length distributions for load tests, written as short strings in environment variables:

    64                 always 64
    uniform:16-128     uniform integer in [16, 128]
    normal:64,16       normal with mean 64 and standard deviation 16 (clipped to >= 1)
    lognormal:64,0.5   log-normal with median 64 and sigma 0.5 (long tail, like real prompts)
    choice:16,64,256   one of the listed values, equally likely
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Distribution:
    kind: str
    params: tuple[float, ...]

    @classmethod
    def parse(cls, spec: str) -> "Distribution":
        text = spec.strip()
        kind, _, rest = text.partition(":") if ":" in text else ("fixed", "", text)
        try:
            if kind == "fixed":
                params = (float(rest),)
            elif kind == "uniform":
                low, high = rest.split("-")
                params = (float(low), float(high))
                if params[0] > params[1]:
                    raise ValueError("low > high")
            elif kind in ("normal", "lognormal"):
                mean, spread = rest.split(",")
                params = (float(mean), float(spread))
            elif kind == "choice":
                params = tuple(float(v) for v in rest.split(","))
            else:
                raise ValueError(f"unknown kind {kind!r}")
        except ValueError as exc:
            raise ValueError(f"bad length distribution {spec!r} ({exc}); see loadtests/distributions.py") from None
        if not params or min(params) < 0 or (kind != "normal" and kind != "lognormal" and min(params) < 1):
            raise ValueError(f"bad length distribution {spec!r}: lengths must be >= 1")
        return cls(kind, params)

    def sample(self, rng: random.Random | None = None) -> int:
        rng = rng or random
        if self.kind == "fixed":
            value = self.params[0]
        elif self.kind == "uniform":
            value = rng.randint(int(self.params[0]), int(self.params[1]))
        elif self.kind == "normal":
            value = rng.gauss(self.params[0], self.params[1])
        elif self.kind == "lognormal":
            value = math.exp(rng.gauss(math.log(self.params[0]), self.params[1]))
        else:
            value = rng.choice(self.params)
        return max(1, int(round(value)))
