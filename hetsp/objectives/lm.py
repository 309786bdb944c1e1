"""Next-token language modelling: the unit is a target token."""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F

from hetsp.objectives.base import IGNORE_INDEX, Objective

__all__ = ["IGNORE_INDEX", "LanguageModeling"]


class LanguageModeling(Objective):
    name = "lm"
    unit = "target token"

    @staticmethod
    def labels(seq: Sequence[int]) -> list[int]:
        """Targets of one whole sequence: token t predicts token t+1; the last token has none.

        Shifting happens on the whole sequence, before any layout cuts it, so a
        shard boundary never loses a target. A sequence with a per-token
        ``trainable`` mask (fine-tuning: prompt tokens False) has a target only
        where the predicted token is trainable.
        """
        trainable = getattr(seq, "trainable", None)
        if trainable is None:
            return list(seq[1:]) + [IGNORE_INDEX]
        return [t if m else IGNORE_INDEX for t, m in zip(seq[1:], trainable[1:])] + [IGNORE_INDEX]

    def token_inputs(self, example: Sequence[int]) -> dict[str, list]:
        return {"labels": self.labels(example)}

    @staticmethod
    def num_units(examples: Sequence[Any]) -> int:
        """Target tokens of a batch, given its sequences or their lengths; a sequence's
        ``trainable`` mask is honoured."""
        total = 0
        for e in examples:
            if isinstance(e, int):
                total += max(0, e - 1)
            elif getattr(e, "trainable", None) is None:
                total += max(0, len(e) - 1)
            else:
                total += int(sum(e.trainable[1:]))
        return total

    @staticmethod
    def loss_sum(logits_TV: torch.Tensor, labels_T: torch.Tensor) -> torch.Tensor:
        """Sum of token cross-entropies over the targets in `labels_T`, in at least fp32."""
        logits_TV = logits_TV.to(torch.promote_types(logits_TV.dtype, torch.float32))
        if logits_TV.shape[0] == 0:
            return logits_TV.sum() * 0.0
        return F.cross_entropy(logits_TV, labels_T, ignore_index=IGNORE_INDEX, reduction="sum")

    def token_loss(self, logits_TV: torch.Tensor, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.loss_sum(logits_TV, inputs["labels"])
