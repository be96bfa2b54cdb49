"""The four SUPERB-style probe tasks, their labels (from manifest fields) and their scores.

| task | label field | kind                                  | metric                            |
|------|-------------|---------------------------------------|-----------------------------------|
| lid  | language    | utterance classification              | accuracy                          |
| sid  | voice       | utterance classification, closed set  | accuracy                          |
| pr   | phonemes    | CTC over space-separated IPA tokens   | PER                               |
| char | text        | CTC over characters (``char_tokens``) | CER (alphabetic languages), + per |
|      |             |                                       | language                          |

Vocabularies (classes, tokens) come from probe-train only. Sequence tasks: a dev / test token
never seen in probe-train stays itself in the reference (the probe can only output ``<unk>``
there, which counts as an error) and maps to ``<unk>`` in the target ids. Utterance tasks are
closed set: dev / test rows whose class does not occur in probe-train are left out of the
score (counted in ``SplitLabels.num_unseen``), since no probe could predict them. Rows without
the label field are left out too (``num_unlabelled``). A task whose labels are missing from a
split, or that has fewer than two classes in probe-train, is skipped with a reason string.
"""

from __future__ import annotations

import logging
import unicodedata
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from colld.data.manifest import Utterance
from colld.data.text import LANGUAGES
from colld.eval.metrics import edit_counts

logger = logging.getLogger(__name__)

TaskKind = Literal["utterance", "sequence"]

BLANK = "<blank>"
UNK = "<unk>"

# Scripts whose CER enters the ``char`` aggregate: true alphabets, where vowels and consonants
# are both written, one code point per sound (roughly), so a character error is a perception
# error and comparable across languages. Left out (still reported per language):
# - Arabic script (Arabic, Persian; an abjad): short vowels are not written, so part of what is
#   heard has no character and the CER mixes perception with spelling knowledge;
# - Bengali (an abugida): the inherent vowel is not written and conjuncts hide the virama;
# - Han (Mandarin; logographic) and Kana (Japanese; a syllabary): one character per syllable
#   or morpheme, hundreds of classes seen a few times in probe-train, so the CER stays near
#   1 for every model and would only add noise.
ALPHABETIC_SCRIPTS = frozenset({"Latin", "Cyrillic", "Greek", "Armenian"})


@dataclass(frozen=True, kw_only=True)
class Task:
    """One probe task.

    name: short name (``lid``, ``sid``, ``pr``, ``char``).
    kind: ``utterance`` (one class per utterance) or ``sequence`` (CTC over tokens).
    field: the manifest field the labels come from.
    metric: ``accuracy``, ``per`` or ``cer``.
    higher_is_better: True for accuracy, False for error rates.
    """

    name: str
    kind: TaskKind
    field: str
    metric: str
    higher_is_better: bool
    description: str


TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        Task(name="lid", kind="utterance", field="language", metric="accuracy",
             higher_is_better=True, description="language identification"),
        Task(name="sid", kind="utterance", field="voice", metric="accuracy",
             higher_is_better=True, description="closed-set voice identification"),
        Task(name="pr", kind="sequence", field="phonemes", metric="per",
             higher_is_better=False, description="phoneme recognition (CTC)"),
        Task(name="char", kind="sequence", field="text", metric="cer",
             higher_is_better=False, description="character recognition (CTC)"),
    )
}  # fmt: skip


def get_task(name: str) -> Task:
    """The task ``name``; the error lists the known ones."""
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(
            f"unknown probe task {name!r}; expected one of {', '.join(TASKS)}"
        ) from None


def is_alphabetic(language: str) -> bool:
    """Whether ``language``'s script is in ``ALPHABETIC_SCRIPTS`` (unknown codes: False)."""
    entry = LANGUAGES.get(language)
    return entry is not None and entry.script in ALPHABETIC_SCRIPTS


# ---------------------------------------------------------------- labels
def char_tokens(text: str) -> list[str]:
    """Characters of ``text`` as CTC tokens: NFC, lowercased, letters / combining marks / digits
    kept, any run of whitespace one ``" "`` token, everything else (punctuation, symbols,
    zero-width joiners) dropped, since it is not heard."""
    tokens: list[str] = []
    for char in unicodedata.normalize("NFC", text).lower():
        if char.isspace():
            if tokens and tokens[-1] != " ":
                tokens.append(" ")
        elif unicodedata.category(char)[0] in "LMN":
            tokens.append(char)
    while tokens and tokens[-1] == " ":
        tokens.pop()
    return tokens


def utterance_label(task: Task, utt: Utterance) -> list[str] | None:
    """The label of ``utt`` for ``task`` as tokens ([class] for utterance tasks); None when the
    field is missing or empty."""
    value = getattr(utt, task.field)
    if not value or not value.strip():
        return None
    if task.kind == "utterance":
        return [value]
    tokens = char_tokens(value) if task.name == "char" else value.split()
    return tokens or None


@dataclass
class Vocabulary:
    """Token <-> id. Sequence tasks: id 0 is the CTC blank, id 1 ``<unk>``."""

    tokens: list[str]

    def __post_init__(self) -> None:
        self._index = {token: i for i, token in enumerate(self.tokens)}
        if len(self._index) != len(self.tokens):
            raise ValueError("vocabulary tokens must be unique")

    def __len__(self) -> int:
        return len(self.tokens)

    def encode(self, tokens: Sequence[str]) -> list[int]:
        """Ids of ``tokens``; an unknown token maps to ``<unk>`` (KeyError without one)."""
        unk = self._index.get(UNK)
        return [self._index[t] if unk is None else self._index.get(t, unk) for t in tokens]

    def decode(self, ids: Sequence[int]) -> list[str]:
        return [self.tokens[i] for i in ids]


@dataclass
class SplitLabels:
    """The labelled rows of one split for one task.

    indices: rows of the split (FeatureSet order) that take part, in order.
    targets: per row, the label ids (utterance tasks: [class id]; sequence: token ids).
    references: per row, the label as strings (unseen tokens kept as they are).
    languages: per row, the manifest language ("" when missing).
    num_unlabelled: rows left out because the field is missing or empty.
    num_unseen: rows left out because their class is not in probe-train (utterance tasks).
    """

    indices: list[int]
    targets: list[list[int]]
    references: list[list[str]]
    languages: list[str]
    num_unlabelled: int = 0
    num_unseen: int = 0


@dataclass
class TaskData:
    """Labels of one task on the three probe splits, with the probe-train vocabulary."""

    task: Task
    vocabulary: Vocabulary
    train: SplitLabels
    dev: SplitLabels
    test: SplitLabels


def prepare_task(
    task: Task,
    train: Sequence[Utterance],
    dev: Sequence[Utterance],
    test: Sequence[Utterance],
) -> TaskData | str:
    """Labels and vocabulary of ``task`` on the splits, or a reason string when it cannot run."""
    rows_of = {"probe-train": train, "probe-dev": dev, "probe-test": test}
    labels = {split: [utterance_label(task, u) for u in rows] for split, rows in rows_of.items()}
    for split, split_labels in labels.items():
        if not any(label is not None for label in split_labels):
            return f"no '{task.field}' labels in {split}"
    seen = sorted({token for label in labels["probe-train"] if label for token in label})
    if task.kind == "utterance":
        if len(seen) < 2:
            return f"{task.name} needs at least two classes in probe-train, found {seen}"
        vocabulary = Vocabulary(seen)
    else:
        vocabulary = Vocabulary([BLANK, UNK, *seen])
    splits = {
        split: _split_labels(task, vocabulary, rows, labels[split])
        for split, rows in rows_of.items()
    }
    for split, split_labels in splits.items():
        if not split_labels.indices:
            return f"no {split} row of {task.name} has a class seen in probe-train"
        if split_labels.num_unseen:
            logger.warning(
                "%s: %d %s rows have a class not in probe-train; left out of the score",
                task.name, split_labels.num_unseen, split,
            )  # fmt: skip
    return TaskData(
        task=task,
        vocabulary=vocabulary,
        train=splits["probe-train"],
        dev=splits["probe-dev"],
        test=splits["probe-test"],
    )


def _split_labels(
    task: Task,
    vocabulary: Vocabulary,
    rows: Sequence[Utterance],
    labels: Sequence[list[str] | None],
) -> SplitLabels:
    known = set(vocabulary.tokens)
    out = SplitLabels(indices=[], targets=[], references=[], languages=[])
    for index, (utt, label) in enumerate(zip(rows, labels, strict=True)):
        if label is None:
            out.num_unlabelled += 1
            continue
        if task.kind == "utterance" and label[0] not in known:
            out.num_unseen += 1
            continue
        out.indices.append(index)
        out.targets.append(vocabulary.encode(label))
        out.references.append(label)
        out.languages.append(utt.language or "")
    return out


# ---------------------------------------------------------------- scores
@dataclass
class Score:
    """value: the task's metric on the split; per_language: the same metric per language."""

    value: float
    per_language: dict[str, float]


def score(task: Task, split: SplitLabels, predictions: Sequence[Sequence[str]]) -> Score:
    """Score ``predictions`` (per row of ``split``: [class] or tokens) against its references.

    lid / sid: accuracy. pr: corpus-level PER. char: corpus-level CER over the rows whose
    language is alphabetic (``is_alphabetic``; over all rows when none is), per language CER
    for every language.
    """
    if len(predictions) != len(split.references):
        raise ValueError(
            f"{len(predictions)} predictions for {len(split.references)} {task.name} references"
        )
    by_language: dict[str, list[int]] = defaultdict(list)
    for n, language in enumerate(split.languages):
        by_language[language].append(n)
    rows = list(range(len(predictions)))
    if task.name == "char":
        alphabetic = [n for n in rows if is_alphabetic(split.languages[n])]
        rows = alphabetic or rows
    per_language = {
        language: _metric(task, split.references, predictions, members)
        for language, members in sorted(by_language.items())
    }
    return Score(
        value=_metric(task, split.references, predictions, rows), per_language=per_language
    )


def _metric(
    task: Task,
    references: Sequence[Sequence[str]],
    predictions: Sequence[Sequence[str]],
    rows: Sequence[int],
) -> float:
    """Accuracy or corpus-level error rate over ``rows``."""
    if task.kind == "utterance":
        return sum(list(predictions[n]) == list(references[n]) for n in rows) / len(rows)
    return edit_counts([references[n] for n in rows], [predictions[n] for n in rows]).rate
