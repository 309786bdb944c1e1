"""A cost table measured on real hardware (written by the runtime), interpolated between points.

JSON format (``format: "hetsp-profile-v1"``)::

    {"format": "hetsp-profile-v1", "device": "NVIDIA H100 80GB HBM3", "host": "node-3",
     "measured_at": "2026-11-26T12:00:00Z", "fixed_s": 0.004, "tokens_per_rank": 65536,
     "points": [{"degree": 1, "tokens": 1024, "time_s": 0.011}, ...]}

`time_s` is the forward+backward time of one sequence of `tokens` tokens on a
group of `degree` ranks. Between measured lengths of a degree, time is
piecewise linear; below the shortest, proportional to s (the segment from
no tokens, no time). A degree between measured degrees takes the rank-time
(d x t) interpolated linearly in log(d) between its measured neighbours.

The table never extrapolates silently. A length beyond the longest measured
one of a degree, or a degree outside the measured ones, is refused with an
error naming it, unless ``planner.options["extrapolate"]`` is true; then it
is extrapolated (length: t = a s + b s^2 through the last two points of the
degree; degree: the nearest measured degree's rank-time) and logged once per
kind, naming where and how.
"""

from __future__ import annotations

import bisect
import json
import logging
import math
from pathlib import Path
from typing import Any

from .base import CostModel

FORMAT = "hetsp-profile-v1"
log = logging.getLogger("solver")


class ProfileCostModel(CostModel):
    name = "profile"
    additive = True

    def __init__(
        self, data: dict[str, Any], where: str = "<dict>", tokens_per_rank: int | None = None, extrapolate: bool = False
    ) -> None:
        if data.get("format") != FORMAT:
            raise ValueError(f"{where}: not a hetsp profile (expected format {FORMAT!r}, got {data.get('format')!r})")
        pts: dict[int, list[tuple[int, float]]] = {}
        for k, p in enumerate(data.get("points", [])):
            try:
                d, s, t = int(p["degree"]), int(p["tokens"]), float(p["time_s"])
            except (KeyError, TypeError, ValueError):
                raise ValueError(f"{where}: point {k} needs integer 'degree', 'tokens' and a number 'time_s': {p!r}")
            if d < 1 or s < 1 or t <= 0:
                raise ValueError(f"{where}: point {k} has non-positive values: {p!r}")
            pts.setdefault(d, []).append((s, t))
        if not pts:
            raise ValueError(f"{where}: the profile has no points")
        self.points = {d: sorted(v) for d, v in sorted(pts.items())}
        self.measured_degrees = sorted(self.points)
        self._fixed = float(data.get("fixed_s", 0.0))
        tpr = data.get("tokens_per_rank", tokens_per_rank)
        if not tpr or int(tpr) < 1:
            raise ValueError(f"{where}: the profile needs 'tokens_per_rank' (activation memory of one rank)")
        self.tokens_per_rank = int(tpr)
        self.meta = {k: data.get(k) for k in ("device", "host", "measured_at")}
        self.where = where
        self.extrapolate = bool(extrapolate)
        self._said: set[str] = set()

    def _beyond(self, kind: str, what: str, how: str) -> None:
        """Refuse an extrapolation, or (allowed) log the first one of each kind."""
        if not self.extrapolate:
            raise ValueError(
                f"profile {self.where}: {what}; the cost table does not extrapolate. Measure a profile that "
                "covers it (hetsp-launch ... --profile on the target sizes), limit planner.allowed_group_sizes "
                "or data.max_seq_len to what was measured, or set planner.options.extrapolate = true"
            )
        if kind not in self._said:
            self._said.add(kind)
            log.warning("profile %s: %s; extrapolating (%s); further extrapolations are not logged", self.where, what, how)

    @classmethod
    def load(cls, path: str | Path, cluster=None, extrapolate: bool = False) -> "ProfileCostModel":
        p = Path(path)
        if not p.is_file():
            raise ValueError(f"profile {p} does not exist")
        try:
            data = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"profile {p} is not valid JSON: {e}") from None
        return cls(data, str(p), getattr(cluster, "tokens_per_rank", None), extrapolate)

    @property
    def fixed_s(self) -> float:
        return self._fixed

    def _at_degree(self, d: int, s: int) -> float:
        pts = self.points[d]
        xs = [x for x, _ in pts]
        if s <= xs[0]:
            return pts[0][1] * s / xs[0]
        if s == xs[-1]:
            return pts[-1][1]
        if s > xs[-1]:
            if len(pts) == 1:
                self._beyond("length", f"{s} tokens on {d} rank(s) is beyond the longest measured ({xs[-1]})",
                             "time proportional to length from the last point")
                return pts[0][1] * s / xs[0]
            self._beyond("length", f"{s} tokens on {d} rank(s) is beyond the longest measured ({xs[-1]})",
                         "t = a s + b s^2 through the last two measured lengths")
            (s1, t1), (s2, t2) = pts[-2], pts[-1]
            # t = a s + b s^2 through both points
            b = (t2 / s2 - t1 / s1) / (s2 - s1)
            a = t1 / s1 - b * s1
            return max(a * s + b * s * s, t2 * s / s2 if b < 0 else 0.0)
        k = bisect.bisect_left(xs, s)
        (s1, t1), (s2, t2) = pts[k - 1], pts[k]
        return t1 + (t2 - t1) * (s - s1) / (s2 - s1)

    def seq_time(self, s: int, d: int) -> float:
        if d in self.points:
            return self._at_degree(d, s)
        ms = self.measured_degrees
        if d < ms[0] or d > ms[-1]:
            near = ms[0] if d < ms[0] else ms[-1]
            self._beyond("degree", f"group size {d} is outside the measured ones {ms}",
                         f"rank-time of the nearest measured group size, {near}")
            return self._at_degree(near, s) * near / d
        hi = ms[bisect.bisect_left(ms, d)]
        lo = ms[bisect.bisect_left(ms, d) - 1]
        w = (math.log(d) - math.log(lo)) / (math.log(hi) - math.log(lo))
        rank_time = (1 - w) * lo * self._at_degree(lo, s) + w * hi * self._at_degree(hi, s)
        return rank_time / d

    def capacity(self, d: int) -> int:
        return self.tokens_per_rank * d

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "file": self.where, "degrees": self.measured_degrees, **self.meta}


def save_profile(
    path: str | Path,
    points: list[dict[str, Any]],
    tokens_per_rank: int,
    fixed_s: float = 0.0,
    device: str = "",
    host: str = "",
) -> dict[str, Any]:
    """Write a profile (for the runtime's measurements): points are ``{"degree", "tokens", "time_s"}``.

    Stamps the time of writing as ``measured_at`` (UTC) and checks the result loads; returns the data.
    """
    import datetime
    import socket

    data = {
        "format": FORMAT,
        "device": device,
        "host": host or socket.gethostname(),
        "measured_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "fixed_s": float(fixed_s),
        "tokens_per_rank": int(tokens_per_rank),
        "points": [{"degree": int(p["degree"]), "tokens": int(p["tokens"]), "time_s": float(p["time_s"])} for p in points],
    }
    ProfileCostModel(data, str(path))  # refuse to write what could not be read back
    Path(path).write_text(json.dumps(data, indent=1))
    return data
