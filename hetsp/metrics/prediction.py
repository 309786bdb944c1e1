"""The planner's predicted step time (``est_time_s``) against the measured one (``step_time_s``).

A step's relative error is |predicted - measured| / measured (a measured step time is
never zero). The first step of a run pays for warm-up (first kernel calls, allocator
growth), which no cost model predicts, so it is left out of the median and worst figures.
"""

from __future__ import annotations

import statistics
from typing import Any, Iterable


def prediction_pairs(records: Iterable[dict[str, Any]]) -> list[tuple[int, float, float]]:
    """``(step, predicted, measured)`` of the training steps that record both, in order."""
    return [
        (int(r["step"]), float(r["est_time_s"]), float(r["step_time_s"]))
        for r in records
        if r.get("kind", "train") == "train" and r.get("est_time_s") is not None and r.get("step_time_s")
    ]


def prediction_errors(records: Iterable[dict[str, Any]]) -> dict[str, Any] | None:
    """Median and worst relative error of the predicted step time over the steps after a run's first
    (None when no step records a prediction). Also the medians of both times, and their ratio."""
    pairs = prediction_pairs(records)
    if len(pairs) > 1:
        pairs = pairs[1:]
    if not pairs:
        return None
    errors = [abs(p - m) / m for _, p, m in pairs]
    worst = max(range(len(errors)), key=errors.__getitem__)
    return {
        "steps": len(pairs),
        "median_rel_error": statistics.median(errors),
        "worst_rel_error": errors[worst],
        "worst_step": pairs[worst][0],
        "median_predicted_s": statistics.median(p for _, p, _ in pairs),
        "median_measured_s": statistics.median(m for _, _, m in pairs),
    }


def format_prediction(errors: dict[str, Any] | None) -> str:
    """One line for people: how well the planner predicted the step times."""
    if errors is None:
        return "predicted step time: not recorded (the planner gave no estimate)"
    return (f"predicted step time: median {errors['median_predicted_s']:.2f} s against measured "
            f"{errors['median_measured_s']:.2f} s; relative error median {100 * errors['median_rel_error']:.0f}%, "
            f"worst {100 * errors['worst_rel_error']:.0f}% (step {errors['worst_step']}), over {errors['steps']} steps "
            "(the first step, warm-up, left out)")
