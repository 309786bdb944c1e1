"""Training objectives behind one interface (`hetsp.objectives.base.Objective`).

Each declares its unit (what the step loss is averaged over) and its typed
`[objective]` config section (`hetsp.objectives.config`). Objective modules
import torch, so they are imported on first use.
"""

from __future__ import annotations

from typing import Any

from hetsp.objectives.config import OBJECTIVE_CONFIGS

OBJECTIVES = {"lm": "hetsp.objectives.lm:LanguageModeling", "copg": "hetsp.objectives.copg:CoPG",
              "sequencematch": "hetsp.objectives.sequencematch:SequenceMatch"}


def objective_names() -> list[str]:
    return sorted(OBJECTIVES)


def get_objective(name: str, section: Any = None):
    """The objective `name`, built from its `[objective]` section (a dataclass from
    `OBJECTIVE_CONFIGS[name]`, or None for the defaults)."""
    import importlib

    if name not in OBJECTIVES:
        raise ValueError(f"train.objective: unknown objective {name!r}; known: {objective_names()}")
    module_name, cls_name = OBJECTIVES[name].split(":")
    cls = getattr(importlib.import_module(module_name), cls_name)
    return cls(section if section is not None else OBJECTIVE_CONFIGS[name]())
