"""CTC labels for fine-tuning: the probes' tokenisation (``colld.eval.tasks``), a vocabulary
from the training split (or a given ``vocab.json``), and the rows each split keeps.

Policy for symbols outside the vocabulary (in dev / test, in training data with a given
vocabulary, or in a user's manifest): the utterance is kept, each such symbol is trained as
``<unk>`` (id 1) and stays itself in the reference, so it counts as an error in CER / PER
(as in the probes). Every split's out-of-vocabulary symbols are counted, with the ids of the
utterances that hold them, logged, and written to the run's report.

Rows left out: without the label field (``text`` for chars, ``phonemes`` for phonemes), longer
than ``data.max_duration`` (never cropped: a crop would cut audio from its transcript) and,
in the training split only, with fewer encoder frames (estimated from the duration) than CTC
needs for their label (its length plus one blank between repeated symbols).
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from colld.data.manifest import Utterance
from colld.eval.tasks import BLANK, UNK, Task, Vocabulary, get_task, utterance_label

logger = logging.getLogger(__name__)

WORD_DELIMITER = "|"
"""How the space token of chars is written in ``vocab.json`` (Wav2Vec2CTCTokenizer's habit)."""
MAX_LOGGED_IDS = 10
MAX_REPORTED_IDS = 200


def task_for_units(units: str) -> Task:
    """The probe task whose tokenisation ``units`` uses: chars -> ``char``, phonemes -> ``pr``."""
    names = {"chars": "char", "phonemes": "pr"}
    if units not in names:
        raise ValueError(f"units must be one of {sorted(names)}, found {units!r}")
    return get_task(names[units])


def build_vocabulary(labels: Iterable[Sequence[str]]) -> Vocabulary:
    """id 0 the CTC blank, id 1 ``<unk>``, then every symbol of ``labels`` in sorted order
    (as the probes build theirs)."""
    seen = sorted({token for label in labels for token in label} - {BLANK, UNK})
    return Vocabulary([BLANK, UNK, *seen])


def vocabulary_json(vocabulary: Vocabulary, units: str) -> dict[str, int]:
    """{token: id} as written to ``vocab.json``; chars' space token as ``WORD_DELIMITER``."""
    space = WORD_DELIMITER if units == "chars" else " "
    return {space if t == " " else t: i for i, t in enumerate(vocabulary.tokens)}


def load_vocabulary(path: str | Path, units: str) -> Vocabulary:
    """The vocabulary of a ``vocab.json`` ({token: id}); ValueError naming the file when the
    ids are not 0..V-1, id 0 is not the blank or there is no ``<unk>``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"vocabulary file {path} does not exist")
    try:
        data: Any = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err.msg} at line {err.lineno})") from err
    if not isinstance(data, dict) or not all(isinstance(v, int) for v in data.values()):
        raise ValueError(f"{path}: expected a JSON object {{token: id}} with integer ids")
    by_id = sorted(data.items(), key=lambda item: item[1])
    if [i for _, i in by_id] != list(range(len(by_id))):
        raise ValueError(f"{path}: ids must be 0..{len(by_id) - 1} without gaps or repeats")
    tokens = [" " if units == "chars" and t == WORD_DELIMITER else t for t, _ in by_id]
    if not tokens or tokens[0] != BLANK or UNK not in tokens:
        raise ValueError(
            f"{path}: expected id 0 = {BLANK!r} (the CTC blank) and an {UNK!r} token, found "
            f"id 0 = {tokens[0] if tokens else None!r}"
        )
    return Vocabulary(tokens)


@dataclass
class LabelledSplit:
    """The rows of one split that take part, with their labels.

    name: the split's name for messages (``probe-train`` or the file).
    utterances: rows kept, in input order.
    targets: id -> token ids (out-of-vocabulary symbols as ``<unk>``).
    references: id -> tokens as written (out-of-vocabulary symbols kept).
    languages: id -> manifest language ("" when missing).
    unlabelled, too_long, too_short: ids of rows left out, by reason (see module docstring).
    oov: out-of-vocabulary symbol -> occurrences; oov_ids: utterances holding one.
    """

    name: str
    utterances: list[Utterance] = field(default_factory=list)
    targets: dict[str, list[int]] = field(default_factory=dict)
    references: dict[str, list[str]] = field(default_factory=dict)
    languages: dict[str, str] = field(default_factory=dict)
    unlabelled: list[str] = field(default_factory=list)
    too_long: list[str] = field(default_factory=list)
    too_short: list[str] = field(default_factory=list)
    oov: Counter[str] = field(default_factory=Counter)
    oov_ids: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """Counts (and the first ``MAX_REPORTED_IDS`` ids) for the report."""

        def ids(values: list[str]) -> dict[str, Any]:
            return {"count": len(values), "ids": values[:MAX_REPORTED_IDS]}

        return {
            "name": self.name,
            "utterances": len(self.utterances),
            "hours": sum(u.duration for u in self.utterances) / 3600,
            "left_out": {
                "unlabelled": ids(self.unlabelled),
                "too_long": ids(self.too_long),
                "too_short": ids(self.too_short),
            },
            "oov_symbols": dict(self.oov.most_common()),
            "oov_utterances": ids(self.oov_ids),
        }


def ctc_frames_needed(label: Sequence[int]) -> int:
    """Fewest frames CTC can align ``label`` to: its length plus a blank between repeats."""
    return len(label) + sum(a == b for a, b in zip(label, label[1:], strict=False))


def label_split(
    name: str,
    utterances: Sequence[Utterance],
    task: Task,
    vocabulary: Vocabulary,
    *,
    max_duration: float,
    frame_rate: float | None = None,
) -> LabelledSplit:
    """Label ``utterances`` for ``task`` and keep the usable rows (see the module docstring).

    frame_rate: encoder frames per second; given (training split), rows whose estimated frames
        cannot hold their label are left out.
    """
    out = LabelledSplit(name=name)
    known = set(vocabulary.tokens)
    for utt in utterances:
        label = utterance_label(task, utt)
        if label is None:
            out.unlabelled.append(utt.id)
            continue
        if utt.duration > max_duration:
            out.too_long.append(utt.id)
            continue
        ids = vocabulary.encode(label)
        if frame_rate is not None and math.floor(utt.duration * frame_rate) < ctc_frames_needed(
            ids
        ):
            out.too_short.append(utt.id)
            continue
        unknown = [t for t in label if t not in known]
        if unknown:
            out.oov.update(unknown)
            out.oov_ids.append(utt.id)
        out.utterances.append(utt)
        out.targets[utt.id] = ids
        out.references[utt.id] = label
        out.languages[utt.id] = utt.language or ""
    _log_split(out, task, max_duration)
    return out


def _log_split(split: LabelledSplit, task: Task, max_duration: float) -> None:
    def first(ids: list[str]) -> str:
        more = f" and {len(ids) - MAX_LOGGED_IDS} more" if len(ids) > MAX_LOGGED_IDS else ""
        return ", ".join(ids[:MAX_LOGGED_IDS]) + more

    reasons = (
        (split.unlabelled, f"no '{task.field}' label"),
        (split.too_long, f"longer than data.max_duration={max_duration:g} s"),
        (split.too_short, "fewer encoder frames than their label needs"),
    )
    for ids, reason in reasons:
        if ids:
            logger.warning(
                "%s: %d rows left out (%s): %s", split.name, len(ids), reason, first(ids)
            )
    if split.oov:
        symbols = ", ".join(f"{s!r} x{n}" for s, n in split.oov.most_common(20))
        logger.warning(
            "%s: %d out-of-vocabulary symbols in %d utterances, mapped to %s in the targets "
            "(kept in the references, so they count as errors): %s; utterances: %s",
            split.name,
            sum(split.oov.values()),
            len(split.oov_ids),
            UNK,
            symbols,
            first(split.oov_ids),
        )
    logger.info(
        "%s: %d utterances (%.2f h) with %s labels",
        split.name,
        len(split.utterances),
        sum(u.duration for u in split.utterances) / 3600,
        task.field,
    )
