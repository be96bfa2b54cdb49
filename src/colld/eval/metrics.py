"""Error rates from edit distance over token sequences (PER over phonemes, CER over characters).

Corpus level, as in ASR scoring: the edits (substitutions + deletions + insertions) of every
utterance are summed and divided by the total number of reference tokens, so long utterances
weigh more than short ones and a rate can exceed 1 (many insertions).

The edit distance is jiwer's (``jiwer.process_words``, Levenshtein on rapidfuzz's C++ core)
with identity transforms, so the tokens given (IPA phonemes, characters including the space)
are compared as they are; nothing is split, stripped or lowercased here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import jiwer
from jiwer import transforms

_AS_GIVEN = transforms.Compose([])  # tokens are already lists of strings


@dataclass(frozen=True)
class EditCounts:
    """Edit operations summed over utterances. ``edits`` is the Levenshtein distance total;
    the split into substitutions, deletions and insertions is one optimal alignment's."""

    substitutions: int
    deletions: int
    insertions: int
    reference_tokens: int

    @property
    def edits(self) -> int:
        return self.substitutions + self.deletions + self.insertions

    @property
    def rate(self) -> float:
        """edits / reference tokens; ValueError when there is no reference token."""
        if self.reference_tokens == 0:
            raise ValueError("error rate undefined: the references hold no token")
        return self.edits / self.reference_tokens


def edit_counts(
    references: Sequence[Sequence[str]], hypotheses: Sequence[Sequence[str]]
) -> EditCounts:
    """Edit operations turning each reference into its hypothesis, summed over utterances.

    references, hypotheses: one token list per utterance (same number of utterances).
    """
    if len(references) != len(hypotheses):
        raise ValueError(
            f"{len(references)} references but {len(hypotheses)} hypotheses; expected one each"
        )
    if not references:
        return EditCounts(0, 0, 0, 0)
    out = jiwer.process_words(
        [list(r) for r in references],
        [list(h) for h in hypotheses],
        reference_transform=_AS_GIVEN,
        hypothesis_transform=_AS_GIVEN,
    )
    return EditCounts(
        substitutions=out.substitutions,
        deletions=out.deletions,
        insertions=out.insertions,
        reference_tokens=sum(len(r) for r in references),
    )


def error_rate(references: Sequence[Sequence[str]], hypotheses: Sequence[Sequence[str]]) -> float:
    """Corpus-level token error rate: total edits / total reference tokens."""
    return edit_counts(references, hypotheses).rate


def phoneme_error_rate(
    references: Sequence[Sequence[str]], hypotheses: Sequence[Sequence[str]]
) -> float:
    """PER over phoneme token lists (e.g. ``"t s a".split()``)."""
    return error_rate(references, hypotheses)


def character_error_rate(references: Sequence[str], hypotheses: Sequence[str]) -> float:
    """CER over strings, every character (space included) one token."""
    return error_rate([list(r) for r in references], [list(h) for h in hypotheses])
