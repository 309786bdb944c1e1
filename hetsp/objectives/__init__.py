"""Training objectives. Each declares its unit (what the step loss is averaged over)."""

from hetsp.objectives.lm import LanguageModeling

OBJECTIVES = {"lm": LanguageModeling}


def get_objective(name: str):
    if name not in OBJECTIVES:
        raise ValueError(f"train.objective: unknown objective {name!r}; known: {sorted(OBJECTIVES)}")
    return OBJECTIVES[name]()
