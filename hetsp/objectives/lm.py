"""Next-token language modelling: the unit is a target token."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


class LanguageModeling:
    name = "lm"

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

    @staticmethod
    def num_units(lengths: Sequence[int], sequences: Sequence[Sequence[int]] | None = None) -> int:
        """Target tokens of a batch; with `sequences`, their ``trainable`` masks are honoured."""
        if sequences is None:
            return sum(max(0, n - 1) for n in lengths)
        return sum(max(0, len(s) - 1) if getattr(s, "trainable", None) is None else int(sum(s.trainable[1:]))
                   for s in sequences)

    @staticmethod
    def loss_sum(logits_TV: torch.Tensor, labels_T: torch.Tensor) -> torch.Tensor:
        """Sum of token cross-entropies over the targets in `labels_T`, in at least fp32."""
        logits_TV = logits_TV.to(torch.promote_types(logits_TV.dtype, torch.float32))
        if logits_TV.shape[0] == 0:
            return logits_TV.sum() * 0.0
        return F.cross_entropy(logits_TV, labels_T, ignore_index=IGNORE_INDEX, reduction="sum")
