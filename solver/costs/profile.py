"""A cost table measured on real hardware (written by the runtime), interpolated between points.

JSON format (``format: "hetsp-profile-v1"``)::

    {"format": "hetsp-profile-v1", "device": "NVIDIA H100 80GB HBM3", "host": "node-3",
     "measured_at": "2026-11-26T12:00:00Z", "fixed_s": 0.004, "tokens_per_rank": 65536,
     "points": [{"degree": 1, "tokens": 1024, "time_s": 0.011}, ...]}

`time_s` is the forward+backward time of one sequence of `tokens` tokens on a
group of `degree` ranks, beyond the group's own fixed cost. Optional keys:
``group_overhead_s`` (``{"2": 0.05, ...}``: what a non-empty group of that size costs
per micro-batch whatever it holds, its exchanges' latency; paid once per group, not
per sequence), ``step_s`` (what a step costs once, whatever its plan: gradient
reduction, optimizer step), ``max_seq_len`` (the longest length the profiler was asked to cover)
``hardware`` (``{"cpu", "cores", "torch", "device"}``: where it was measured; a run
on other hardware is told so, `hardware_mismatch`) and ``world`` (the ranks it was
measured with), ``trained_steps`` (the training steps the model had taken when it
was measured: `hetsp.profiler` measures it as training runs it).

Ranks that share cores: the profiler measures a group size d with world // d
groups side by side (``d * (world // d)`` busy ranks); on a CPU host with fewer
cores than ranks each busy rank then gets ``cores / busy`` of a core. A plan's
micro-batch keeps a different number of ranks busy (groups of other sizes, groups
that finish early, idle ranks), so when ``world`` and the CPU's ``cores`` are
recorded and the ranks outnumber the cores, `micro_batch_time` shares the cores
among the ranks of the groups still running (each busy rank gets ``min(1, cores /
busy ranks)`` of a core) instead of taking the slowest group's table time: a
micro-batch whose other ranks are idle runs faster than the table says, one with
more busy ranks than the table's measurement slower. The planners' tables keep the
additive times (the slowest group as measured side by side); the predicted step
time (`solver.simulate`) uses the shared cores.

A rank's token budget is ``cluster.tokens_per_rank`` (one truth): the profile's own
``tokens_per_rank`` only says what it was measured with, and is used when no cluster is
given. A profile must cover the lengths the configuration can place
(`ProfileCostModel.coverage_problems`), or be re-measured.

Between measured lengths of a degree, time is
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
        self._step = float(data.get("step_s", 0.0))
        tpr = tokens_per_rank or data.get("tokens_per_rank")
        if not tpr or int(tpr) < 1:
            raise ValueError(f"{where}: the profile needs 'tokens_per_rank' (activation memory of one rank)")
        self.tokens_per_rank = int(tpr)
        self.measured_tokens_per_rank = data.get("tokens_per_rank")
        self.max_seq_len = data.get("max_seq_len")
        overhead = data.get("group_overhead_s") or {}
        try:
            self._overhead = {int(d): max(0.0, float(t)) for d, t in overhead.items()}
        except (TypeError, ValueError, AttributeError):
            raise ValueError(f"{where}: 'group_overhead_s' must map group sizes to seconds, got {overhead!r}") from None
        self.hardware = data.get("hardware") or {}
        world = data.get("world")
        if world is not None and (not isinstance(world, int) or world < 1):
            raise ValueError(f"{where}: 'world' must be a positive integer (the ranks measured with), got {world!r}")
        self.world = world
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

    @property
    def step_s(self) -> float:
        return self._step

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

    def group_overhead_s(self, d: int) -> float:
        """What a non-empty group of `d` ranks costs per micro-batch whatever it holds (0 when not measured);
        a size between measured ones is interpolated in log(d), beyond them the nearest is taken."""
        if not self._overhead:
            return 0.0
        if d in self._overhead:
            return self._overhead[d]
        ms = sorted(self._overhead)
        if d < ms[0] or d > ms[-1]:
            return self._overhead[ms[0] if d < ms[0] else ms[-1]]
        k = bisect.bisect_left(ms, d)
        lo, hi = ms[k - 1], ms[k]
        w = (math.log(d) - math.log(lo)) / (math.log(hi) - math.log(lo))
        return (1 - w) * self._overhead[lo] + w * self._overhead[hi]

    def capacity(self, d: int) -> int:
        return self.tokens_per_rank * d

    @property
    def shared_cores(self) -> int | None:
        """The cores the profile's ranks shared (None: one rank per core or device, or not recorded)."""
        cores = self.hardware.get("cores")
        if not self.world or not isinstance(cores, int) or cores < 1 or self.hardware.get("device", "cpu") != "cpu":
            return None
        return cores if self.world > cores else None

    def core_share(self, d: int) -> float:
        """The share of a core each busy rank had while groups of `d` ranks were measured (1: no sharing)."""
        cores = self.shared_cores
        if cores is None:
            return 1.0
        busy = min(self.world, d * max(1, self.world // d))
        return min(1.0, cores / busy)

    def micro_batch_time(self, groups) -> float:
        """`fixed_s` + the time until the last group finishes when the busy ranks share the cores (module
        docstring); without shared cores, the slowest group's time."""
        cores = self.shared_cores
        if cores is None:
            return super().micro_batch_time(groups)
        # each group's time with a core per rank, and its ranks
        left = [[self.group_time(ls, d) * self.core_share(d), d] for d, ls in groups if ls]
        t = 0.0
        while left:
            rate = min(1.0, cores / sum(d for _, d in left))
            step = min(w for w, _ in left)
            t += step / rate
            left = [[w - step, d] for w, d in left if w - step > 1e-12]
        return self.fixed_s + t

    def longest_measured(self, d: int) -> int | None:
        """The longest length measured on groups of `d` ranks (None: that size was not measured)."""
        pts = self.points.get(d)
        return pts[-1][0] if pts else None

    def coverage_problems(self, degrees, max_seq_len: int) -> list[str]:
        """What a configuration placing sequences up to `max_seq_len` tokens on groups of `degrees` ranks
        (each holding ``capacity(d)`` tokens) needs that this profile did not measure (empty: covered)."""
        problems = []
        for d in degrees:
            need = min(int(max_seq_len), self.capacity(d))
            have = self.longest_measured(d)
            if have is None:
                problems.append(f"group size {d} was not measured (measured: {self.measured_degrees})")
            elif have < need:
                problems.append(f"groups of {d} hold up to {need} tokens but the profile measured up to {have}")
        return problems

    def hardware_mismatch(self, here: dict[str, Any]) -> str | None:
        """A sentence saying how this profile's hardware differs from `here` (None: same, or not recorded)."""
        if not self.hardware:
            return (f"profile {self.where} does not record the hardware it was measured on "
                    f"(device: {self.meta.get('device')!r})")
        diff = [f"{k} {self.hardware.get(k)!r} there, {here.get(k)!r} here"
                for k in ("cpu", "cores", "torch", "device") if k in here and here.get(k) != self.hardware.get(k)]
        if not diff:
            return None
        return f"profile {self.where} was measured on other hardware: " + "; ".join(diff)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "file": self.where, "degrees": self.measured_degrees, **self.meta,
                "hardware": self.hardware, "world": self.world, "tokens_per_rank": self.tokens_per_rank}


def save_profile(
    path: str | Path,
    points: list[dict[str, Any]],
    tokens_per_rank: int,
    fixed_s: float = 0.0,
    device: str = "",
    host: str = "",
    group_overhead_s: dict[int, float] | None = None,
    max_seq_len: int | None = None,
    hardware: dict[str, Any] | None = None,
    step_s: float = 0.0,
    world: int | None = None,
    trained_steps: int | None = None,
) -> dict[str, Any]:
    """Write a profile (for the runtime's measurements): points are ``{"degree", "tokens", "time_s"}``.

    Stamps the time of writing as ``measured_at`` (UTC) and checks the result loads; returns the data.
    `group_overhead_s`: per group size, its fixed cost per micro-batch; `hardware`: where it was measured
    (`hardware_here`); `world`: the ranks it was measured with; `trained_steps`: the training steps the
    model had taken when it was measured.
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
    if group_overhead_s:
        data["group_overhead_s"] = {str(int(d)): float(t) for d, t in sorted(group_overhead_s.items())}
    if max_seq_len:
        data["max_seq_len"] = int(max_seq_len)
    if step_s:
        data["step_s"] = float(step_s)
    if hardware:
        data["hardware"] = dict(hardware)
    if world:
        data["world"] = int(world)
    if trained_steps is not None:
        data["trained_steps"] = int(trained_steps)
    ProfileCostModel(data, str(path))  # refuse to write what could not be read back
    Path(path).write_text(json.dumps(data, indent=1))
    return data


def hardware_here(device: str = "") -> dict[str, Any]:
    """This machine as a profile records it: CPU model, cores, torch version and `device` (a GPU's name, or
    "cpu"). Reads /proc/cpuinfo and package metadata; imports no torch."""
    import os
    from importlib import metadata

    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        torch_version = metadata.version("torch")
    except metadata.PackageNotFoundError:
        torch_version = "none"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": cpu, "cores": int(cores or 0), "torch": torch_version, "device": device or "cpu"}
