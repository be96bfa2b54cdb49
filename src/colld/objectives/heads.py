"""Training-only heads that project student states into the teacher's space (never exported).

Shape legend: B batch, T frames, D_s student width, D_t teacher width.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from colld.objectives.layer_map import pair_name

HEAD_INITS = ("random", "select")


def _make_head(student_dim: int, teacher_dim: int, hidden_dim: int | None) -> nn.Module:
    if hidden_dim is None:
        return nn.Linear(student_dim, teacher_dim)
    # DistilHuBERT-style small MLP (its prediction heads are Linear -> GELU -> Linear).
    return nn.Sequential(
        nn.Linear(student_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, teacher_dim)
    )


def _select_init(
    head: nn.Module, student_dim: int, teacher_dim: int, channels: Sequence[int] | None
) -> None:
    if not isinstance(head, nn.Linear) or student_dim > teacher_dim:
        raise ValueError(
            "head init 'select' needs single-Linear heads and a student no wider than the "
            f"teacher; got {type(head).__name__} heads, D_s {student_dim}, D_t {teacher_dim}"
        )
    rows = list(range(student_dim)) if channels is None else [int(c) for c in channels]
    if (
        len(rows) != student_dim
        or len(set(rows)) != student_dim
        or not all(0 <= c < teacher_dim for c in rows)
    ):
        raise ValueError(
            f"head init 'select': channels must be {student_dim} distinct teacher dims in "
            f"0..{teacher_dim - 1}; got {len(rows)} ({len(set(rows))} distinct)"
        )
    with torch.no_grad():
        head.weight.zero_()
        head.weight[rows, torch.arange(student_dim)] = 1.0
        head.bias.zero_()


class PredictionHeads(nn.Module):
    """One head per (student_layer, teacher_layer) pair: W_i: D_s -> D_t.

    pairs: the resolved layer map (``resolve_layer_map``); heads are stored in pair order
        (``heads[k]`` serves ``pairs[k]``), so two pairs that share a student layer (prediction-
        heads mode) still get separate heads.
    hidden_dim: None = a single Linear (default); an int = Linear -> GELU -> Linear with that
        hidden width.
    init: "random" (nn.Linear's init) or "select": W = [I; 0], b = 0, i.e. the student's D_s
        dimensions land on the teacher's first D_s (single Linear heads, D_s <= D_t).
    channels: for "select", the teacher dims the student's dims land on instead of the first
        D_s (a pruned student's kept residual channels, ``PrunePlan.residual``).
    """

    def __init__(
        self,
        pairs: Sequence[tuple[int, int]],
        student_dim: int,
        teacher_dim: int,
        hidden_dim: int | None = None,
        *,
        init: str = "random",
        channels: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        if not pairs:
            raise ValueError("PredictionHeads needs at least one (student, teacher) layer pair")
        if init not in HEAD_INITS:
            raise ValueError(f"head init {init!r}; expected one of {HEAD_INITS}")
        self.pairs = [(int(i), int(j)) for i, j in pairs]
        self.heads = nn.ModuleList(
            _make_head(student_dim, teacher_dim, hidden_dim) for _ in self.pairs
        )
        if init == "select":
            for head in self.heads:
                _select_init(head, student_dim, teacher_dim, channels)

    @property
    def names(self) -> list[str]:
        """Pair names in head order, e.g. ``["s1->t2", "s2->t3"]``."""
        return [pair_name(pair) for pair in self.pairs]

    def forward(self, student_states: dict[int, Tensor]) -> list[Tensor]:
        """Project each pair's student state.

        student_states: student layer -> hidden state. Shape: (B, T, D_s) each.
        Returns one prediction per pair, in pair order. Shape: (B, T, D_t) each.
        """
        missing = sorted({i for i, _ in self.pairs} - set(student_states))
        if missing:
            raise KeyError(
                f"student_states lacks layer(s) {missing}; got {sorted(student_states)}, "
                f"the heads need {sorted({i for i, _ in self.pairs})}"
            )
        return [
            head(student_states[i]) for head, (i, _) in zip(self.heads, self.pairs, strict=True)
        ]
