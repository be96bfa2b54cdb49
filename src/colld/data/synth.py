"""colld's embedded multilingual speech corpus, synthesised offline with espeak-ng.

Layout of ``out_dir``::

    audio/<split>/<id>.flac              16 kHz mono 16-bit FLAC
    manifests/<split>.jsonl              one ``Utterance`` row per file (colld.data.manifest)
    lhotse/<split>_cuts.jsonl.gz         the same as a lhotse CutSet (see ``load_lhotse_cuts``)
    corpus.json                          ``CorpusInfo``: written last, marks a finished corpus
    .synth-recipe.json                   what the audio was made from (guards resuming)

Paths inside manifests and CutSets are relative to the file that lists them
(``../audio/<split>/<id>.flac``), as ``colld.data.manifest`` specifies, so the folder can move.

Two parts with disjoint voices (disjoint espeak-ng variants, even) and disjoint sentences:
- distillation: splits ``train`` and ``dev`` (dev: same voices, other sentences);
- evaluation: splits ``probe-train`` / ``probe-dev`` / ``probe-test``, split by utterance, with
  every evaluation voice in all three (closed-set voice identification) and sentences disjoint
  between them. It holds the parallel sentences (``text_en``, ``sentence_id``): each shipped
  sentence is spoken once in every language and all its renderings go to one probe split, so
  X->En translation trained on probe-train is scored on sentences it never saw.
Every sentence (language, text) occurs once in the whole corpus.

Sizing: ``hours`` of audio in all, ``eval_fraction`` of it in the evaluation part; utterances
are planned from an estimate of their duration (``colld.data.text.estimate_duration``), so the
real total differs by some percent (corpus.json has both). The parallel subset
(``num_parallel_sentences`` x languages utterances, ~3 s each) and at least
``min_eval_utts_per_voice`` generated utterances per evaluation voice and probe split are always
made, even where that exceeds the evaluation budget.

Resuming: a rerun with the same recipe keeps every FLAC that decodes completely at 16 kHz mono
(the decoded length must equal the header's), redoes missing, truncated or unreadable ones, and
removes stale ``.<id>.partial.*`` files (a FLAC is written to such a name, then renamed).
Manifests, CutSets and corpus.json are rewritten atomically at the end of every run. A failed
synthesis (espeak-ng error, empty audio or no phonemes) is retried once, then left out of the
manifests with a warning and counted in corpus.json.
"""

from __future__ import annotations

import json
import logging
import math
import multiprocessing
import os
import random
import statistics
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import soundfile as sf
import soxr
from tqdm.auto import tqdm

from colld.data.manifest import Utterance, read_manifest, write_manifest
from colld.data.text import (
    LANGUAGES,
    Language,
    ParallelSentence,
    SentenceGenerator,
    estimate_duration,
    get_language,
    load_parallel_sentences,
    stable_seed,
)
from colld.data.voices import (
    VARIANTS,
    EspeakError,
    Voice,
    espeak_version,
    find_espeak,
    installed_languages,
    installed_variants,
    make_voices,
    phonemize,
    synthesize,
    tokenize_ipa,
)
from colld.fsutil import write_json_atomic

if TYPE_CHECKING:
    from lhotse import CutSet

logger = logging.getLogger(__name__)

RECIPE_VERSION = 1
SAMPLE_RATE = 16000
DISTILL_SPLITS = ("train", "dev")
PROBE_SPLITS = ("probe-train", "probe-dev", "probe-test")
SPLITS = DISTILL_SPLITS + PROBE_SPLITS
CORPUS_INFO_FILE = "corpus.json"
RECIPE_FILE = ".synth-recipe.json"
_PARTIAL = ".partial"
_SILENT_PEAK = 1e-4  # peak amplitude below which espeak-ng's output counts as empty


@dataclass(kw_only=True)
class SynthConfig:
    """How to build the corpus. Everything but out_dir, num_workers and show_progress is the
    recipe: rerunning into the same out_dir with another recipe is refused."""

    out_dir: Path
    """Corpus folder (created)."""
    hours: float = 1.0
    """Audio hours in all (an estimate is planned; see the module docstring)."""
    seed: int = 0
    """Seed of every random choice (voices, languages, words, splits)."""
    languages: Sequence[str] | None = None
    """Language codes (colld.data.text.LANGUAGES); None = all."""
    num_distill_voices: int = 48
    """Voices of the distillation part."""
    num_eval_voices: int = 16
    """Voices of the evaluation part (variants disjoint from the distillation voices')."""
    eval_fraction: float = 0.25
    """Share of ``hours`` in the evaluation part."""
    dev_fraction: float = 0.05
    """Share of the distillation part in ``dev``."""
    probe_fractions: tuple[float, float, float] = (0.6, 0.2, 0.2)
    """Shares of the evaluation part (and of the parallel sentences) in probe-train/-dev/-test."""
    num_parallel_sentences: int | None = None
    """Parallel sentences to use (the first in a seeded shuffle); None = all shipped for
    ``hours`` >= 1, proportionally fewer below (at least 5), so small corpora stay small."""
    min_eval_utts_per_voice: int = 2
    """Generated utterances per evaluation voice and probe split, at least."""
    min_words: int = 3
    """Fewest words in a generated sentence."""
    max_words: int = 24
    """Most words in a generated sentence (uniform in between)."""
    pitch_range: tuple[int, int] = (5, 95)
    """espeak-ng pitch (-p, 0-99) of a voice: uniform in this range."""
    rate_range: tuple[int, int] = (110, 270)
    """espeak-ng rate (-s, words per minute) of a voice: log-uniform in this range."""
    num_workers: int | None = None
    """Parallel synthesis processes; None = os.cpu_count()."""
    show_progress: bool = True
    """Show a tqdm progress bar."""

    def __post_init__(self) -> None:
        self.out_dir = Path(self.out_dir)
        if self.languages is not None:
            self.languages = tuple(self.languages)
        self.probe_fractions = tuple(self.probe_fractions)  # type: ignore[assignment]
        self.pitch_range = tuple(self.pitch_range)  # type: ignore[assignment]
        self.rate_range = tuple(self.rate_range)  # type: ignore[assignment]

    def resolved_languages(self) -> list[Language]:
        codes = list(LANGUAGES) if self.languages is None else list(self.languages)
        return [get_language(code) for code in codes]

    def validate(self) -> None:
        """Check every field once, before any work; errors name the field and value."""
        if not (isinstance(self.hours, int | float) and self.hours > 0):
            raise ValueError(f"SynthConfig.hours must be > 0, got {self.hours!r}")
        languages = self.resolved_languages()
        if not languages or len({lang.code for lang in languages}) != len(languages):
            raise ValueError(f"SynthConfig.languages must be distinct codes, got {self.languages}")
        for name in ("num_distill_voices", "num_eval_voices", "min_eval_utts_per_voice"):
            if getattr(self, name) < 1:
                raise ValueError(f"SynthConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("eval_fraction", "dev_fraction"):
            if not 0 < getattr(self, name) < 1:
                raise ValueError(f"SynthConfig.{name} must be in (0, 1), got {getattr(self, name)}")
        fractions = self.probe_fractions
        if len(fractions) != 3 or min(fractions) <= 0 or not math.isclose(sum(fractions), 1):
            raise ValueError(
                f"SynthConfig.probe_fractions must be 3 positive shares summing to 1, got {fractions}"
            )
        if self.num_parallel_sentences is not None and self.num_parallel_sentences < 0:
            raise ValueError(
                f"SynthConfig.num_parallel_sentences must be >= 0, got {self.num_parallel_sentences}"
            )
        if not 1 <= self.min_words <= self.max_words:
            raise ValueError(
                f"SynthConfig needs 1 <= min_words <= max_words, got {self.min_words}, {self.max_words}"
            )
        _check_range("pitch_range", self.pitch_range, 0, 99)
        _check_range("rate_range", self.rate_range, 80, 450)
        if self.num_workers is not None and self.num_workers < 1:
            raise ValueError(f"SynthConfig.num_workers must be >= 1, got {self.num_workers}")

    def recipe(self) -> dict[str, Any]:
        """The fields that decide the corpus' content, JSON-ready."""
        recipe = asdict(self)
        for key in ("out_dir", "num_workers", "show_progress"):
            recipe.pop(key)
        recipe["languages"] = [lang.code for lang in self.resolved_languages()]
        return json.loads(json.dumps(recipe))


def _check_range(name: str, value: tuple[int, int], low: int, high: int) -> None:
    if len(value) != 2 or not low <= value[0] <= value[1] <= high:
        raise ValueError(
            f"SynthConfig.{name} must be (lo, hi) with {low} <= lo <= hi <= {high}, got {value}"
        )


# ----------------------------------------------------------------------------------- plan


@dataclass(frozen=True, kw_only=True)
class UtteranceSpec:
    """One utterance to synthesise (what the plan decides before any audio exists)."""

    id: str
    split: str
    language: str
    espeak_voice: str
    voice: Voice
    text: str
    text_en: str | None
    sentence_id: str | None
    est_duration: float

    @property
    def audio_path(self) -> str:
        """Audio file relative to the corpus folder."""
        return f"audio/{self.split}/{self.id}.flac"


@dataclass(kw_only=True)
class CorpusPlan:
    """Every utterance of the corpus with its voice, text and split."""

    utterances: list[UtteranceSpec]
    distill_voices: list[Voice]
    eval_voices: list[Voice]
    parallel_splits: dict[str, list[str]]
    """probe split -> its parallel sentence ids."""


class _RoundRobin:
    """Items in rounds, each round a fresh shuffle: every item once per round."""

    def __init__(self, items: Sequence[Any], rng: random.Random) -> None:
        self._items, self._rng, self._queue = list(items), rng, []  # type: ignore[var-annotated]

    def __next__(self) -> Any:
        if not self._queue:
            self._queue = list(self._items)
            self._rng.shuffle(self._queue)
        return self._queue.pop()


def split_counts(total: int, fractions: Sequence[float]) -> list[int]:
    """``total`` items shared by ``fractions`` (largest remainders); no share is left empty
    when ``total >= len(fractions)``."""
    raw = [total * f for f in fractions]
    counts = [math.floor(x) for x in raw]
    by_remainder = sorted(range(len(raw)), key=lambda i: counts[i] - raw[i])
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    for i in range(len(counts)):
        if counts[i] == 0 and total >= len(counts):
            counts[counts.index(max(counts))] -= 1
            counts[i] = 1
    return counts


def plan_corpus(cfg: SynthConfig, variants: Sequence[str]) -> CorpusPlan:
    """Decide every utterance of the corpus (deterministic for ``cfg``'s recipe and variants)."""
    planner = _Planner(cfg)
    distill_voices, eval_voices = _make_voice_sets(cfg, list(variants), planner.rng)
    parallel_splits = _split_parallel(cfg, planner.parallel, planner.rng)
    eval_seconds = cfg.hours * 3600 * cfg.eval_fraction
    distill_seconds = cfg.hours * 3600 - eval_seconds
    utterances: list[UtteranceSpec] = []
    for split, fraction in zip(PROBE_SPLITS, cfg.probe_fractions, strict=True):
        specs = planner.parallel_utterances(split, parallel_splits[split], eval_voices)
        budget = eval_seconds * fraction - sum(s.est_duration for s in specs)
        min_count = cfg.min_eval_utts_per_voice * len(eval_voices)
        specs += planner.generated_utterances(split, budget, min_count, len(specs), eval_voices)
        utterances += specs
    for split, fraction in (("train", 1 - cfg.dev_fraction), ("dev", cfg.dev_fraction)):
        budget = distill_seconds * fraction
        min_count = len(planner.languages)
        utterances += planner.generated_utterances(split, budget, min_count, 0, distill_voices)
    return CorpusPlan(
        utterances=utterances,
        distill_voices=distill_voices,
        eval_voices=eval_voices,
        parallel_splits={k: [s.sentence_id for s in v] for k, v in parallel_splits.items()},
    )


def _split_parallel(
    cfg: SynthConfig, parallel: list[ParallelSentence], rng: random.Random
) -> dict[str, list[ParallelSentence]]:
    """The chosen parallel sentences shared by the probe splits (by sentence)."""
    wanted = cfg.num_parallel_sentences
    if wanted is None:
        wanted = len(parallel) if cfg.hours >= 1 else max(5, round(len(parallel) * cfg.hours))
    if wanted > len(parallel):
        raise ValueError(
            f"SynthConfig.num_parallel_sentences is {wanted} but only {len(parallel)} parallel "
            "sentences are shipped"
        )
    chosen = list(parallel)
    rng.shuffle(chosen)
    chosen = chosen[:wanted]
    counts = split_counts(len(chosen), cfg.probe_fractions)
    starts = [sum(counts[:i]) for i in range(len(counts))]
    return {
        split: chosen[start : start + n]
        for split, start, n in zip(PROBE_SPLITS, starts, counts, strict=True)
    }


def _make_voice_sets(
    cfg: SynthConfig, variants: list[str], rng: random.Random
) -> tuple[list[Voice], list[Voice]]:
    """Distillation and evaluation voices built on disjoint sets of variants."""
    if len(variants) < 2:
        raise EspeakError(f"need at least 2 espeak-ng variants, found {len(variants)}: {variants}")
    rng.shuffle(variants)
    wanted = cfg.num_distill_voices + cfg.num_eval_voices
    if wanted <= len(variants):
        num_eval_variants = cfg.num_eval_voices
    else:
        share = round(len(variants) * cfg.num_eval_voices / wanted)
        num_eval_variants = min(max(1, share), len(variants) - 1)
        logger.warning(
            "%d voices asked for but espeak-ng has %d variants: variants are reused with other "
            "pitches and rates (%d for evaluation, %d for distillation)",
            wanted,
            len(variants),
            num_eval_variants,
            len(variants) - num_eval_variants,
        )
    eval_variants, distill_variants = variants[:num_eval_variants], variants[num_eval_variants:]
    distill = make_voices(
        distill_variants, cfg.num_distill_voices, rng, cfg.pitch_range, cfg.rate_range
    )
    evaluation = make_voices(
        eval_variants, cfg.num_eval_voices, rng, cfg.pitch_range, cfg.rate_range
    )
    return distill, evaluation


class _Planner:
    """The random state and text sources shared by every split's planning."""

    def __init__(self, cfg: SynthConfig) -> None:
        self.cfg = cfg
        self.rng = random.Random(stable_seed("plan", cfg.seed))
        self.languages = cfg.resolved_languages()
        self.parallel = load_parallel_sentences()
        # one generator per language for the whole corpus: no sentence is drawn twice, and no
        # generated sentence equals a parallel one
        self.generators = {
            lang.code: SentenceGenerator(
                lang, cfg.seed, exclude={s.text[lang.code] for s in self.parallel}
            )
            for lang in self.languages
        }

    def parallel_utterances(
        self, split: str, sentences: list[ParallelSentence], voices: list[Voice]
    ) -> list[UtteranceSpec]:
        """Each parallel sentence once in every language, voices in rounds."""
        voice_cycle = _RoundRobin(voices, self.rng)
        specs: list[UtteranceSpec] = []
        for sentence in sentences:
            for lang in self.languages:
                text = sentence.text[lang.code]
                specs.append(_spec(split, len(specs), lang, next(voice_cycle), text, sentence))
        return specs

    def generated_utterances(
        self,
        split: str,
        budget_seconds: float,
        min_count: int,
        first_index: int,
        voices: list[Voice],
    ) -> list[UtteranceSpec]:
        """Generated sentences until their estimated duration reaches ``budget_seconds`` (and
        at least ``min_count``); languages and voices in rounds, so voice counts differ by at
        most one."""
        voice_cycle = _RoundRobin(voices, self.rng)
        language_cycle = _RoundRobin(self.languages, self.rng)
        specs: list[UtteranceSpec] = []
        total = 0.0
        while total < budget_seconds or len(specs) < min_count:
            lang, voice = next(language_cycle), next(voice_cycle)
            num_words = self.rng.randint(self.cfg.min_words, self.cfg.max_words)
            text = self.generators[lang.code].sentence(num_words)
            specs.append(_spec(split, first_index + len(specs), lang, voice, text, None))
            total += specs[-1].est_duration
        return specs


def _spec(
    split: str,
    index: int,
    lang: Language,
    voice: Voice,
    text: str,
    parallel: ParallelSentence | None,
) -> UtteranceSpec:
    return UtteranceSpec(
        id=f"{split}-{index:06d}-{lang.code}",
        split=split,
        language=lang.code,
        espeak_voice=lang.espeak_voice,
        voice=voice,
        text=text,
        text_en=parallel.text_en if parallel else None,
        sentence_id=parallel.sentence_id if parallel else None,
        est_duration=estimate_duration(text, lang, voice.rate),
    )


# ------------------------------------------------------------------------------ synthesis


@dataclass(frozen=True, kw_only=True)
class _RenderResult:
    id: str
    status: str  # "made" | "kept" | "failed"
    num_samples: int = 0
    phonemes: str = ""
    language_switch: bool = False
    error: str | None = None


class _EmptySynthesisError(RuntimeError):
    pass


def flac_num_samples(path: Path) -> int | None:
    """Samples of a complete 16 kHz mono FLAC at ``path``; None if missing, cut short,
    unreadable or in another format."""
    if not path.is_file():
        return None
    try:
        info = sf.info(str(path))
        if (info.format, info.samplerate, info.channels) != ("FLAC", SAMPLE_RATE, 1):
            return None
        if info.frames <= 0:
            return None
        data, _ = sf.read(str(path), dtype="int16")
    except (RuntimeError, OSError, ValueError):  # sf.LibsndfileError is a RuntimeError
        return None
    return len(data) if len(data) == info.frames else None


def _render(spec: UtteranceSpec, out_dir: str, binary: str) -> _RenderResult:
    """Make (or keep) one utterance's FLAC; runs in a worker process."""
    final = Path(out_dir) / spec.audio_path
    partial_flac = final.with_name(f".{spec.id}{_PARTIAL}.flac")
    partial_wav = final.with_name(f".{spec.id}{_PARTIAL}.wav")
    num_samples = flac_num_samples(final)
    if num_samples is not None:
        try:
            phonemes = _phonemes(phonemize(binary, spec.text, spec.espeak_voice, spec.voice))
        except (RuntimeError, OSError) as err:
            return _RenderResult(id=spec.id, status="failed", error=f"{type(err).__name__}: {err}")
        return _RenderResult(id=spec.id, status="kept", num_samples=num_samples, **phonemes)
    error = ""
    for _ in range(2):  # one retry
        try:
            num_samples, raw_ipa = _synthesize_flac(spec, binary, partial_wav, partial_flac)
            phonemes = _phonemes(raw_ipa)
            os.replace(partial_flac, final)
            return _RenderResult(id=spec.id, status="made", num_samples=num_samples, **phonemes)
        except (RuntimeError, OSError, ValueError) as err:  # EspeakError is a RuntimeError
            error = f"{type(err).__name__}: {err}"
        finally:
            partial_wav.unlink(missing_ok=True)
            partial_flac.unlink(missing_ok=True)
    return _RenderResult(id=spec.id, status="failed", error=error)


def _phonemes(raw_ipa: str) -> dict[str, Any]:
    """The result fields taken from espeak-ng's raw IPA; an error if it holds no phoneme."""
    phonemes = tokenize_ipa(raw_ipa)
    if not phonemes:
        raise _EmptySynthesisError(f"espeak-ng gave no phonemes (IPA output {raw_ipa!r})")
    return {"phonemes": " ".join(phonemes), "language_switch": "(" in raw_ipa}


def _synthesize_flac(
    spec: UtteranceSpec, binary: str, wav_path: Path, flac_path: Path
) -> tuple[int, str]:
    """espeak-ng -> 22.05 kHz WAV -> soxr to 16 kHz -> 16-bit FLAC at ``flac_path``.

    Returns (samples written, espeak-ng's raw IPA).
    """
    flac_path.parent.mkdir(parents=True, exist_ok=True)
    raw_ipa = synthesize(binary, spec.text, spec.espeak_voice, spec.voice, wav_path)
    audio, rate = sf.read(str(wav_path), dtype="float32", always_2d=True)
    audio = audio.mean(axis=1)
    if audio.size == 0 or float(np.abs(audio).max()) < _SILENT_PEAK:
        raise _EmptySynthesisError(f"espeak-ng produced no audio for {spec.text!r}")
    audio = np.clip(soxr.resample(audio, rate, SAMPLE_RATE), -1.0, 1.0)
    sf.write(str(flac_path), audio, SAMPLE_RATE, format="FLAC", subtype="PCM_16")
    return len(audio), raw_ipa


def _render_all(
    specs: list[UtteranceSpec], out_dir: Path, binary: str, num_workers: int, show_progress: bool
) -> Iterator[_RenderResult]:
    """Render in plan order, ``num_workers`` processes (1 = in this process)."""
    work = partial(_render, out_dir=str(out_dir), binary=binary)
    with tqdm(total=len(specs), unit="utt", desc="synthesizing", disable=not show_progress) as bar:
        if num_workers == 1:
            for spec in specs:
                yield work(spec)
                bar.update()
            return
        chunksize = max(1, min(16, len(specs) // (num_workers * 8)))
        context = multiprocessing.get_context("spawn")  # safe whatever threads the caller runs
        with ProcessPoolExecutor(max_workers=num_workers, mp_context=context) as pool:
            for result in pool.map(work, specs, chunksize=chunksize):
                yield result
                bar.update()


# --------------------------------------------------------------------------- corpus info


@dataclass(kw_only=True)
class SplitStats:
    """Counts and durations (seconds) of one split."""

    num_utterances: int
    hours: float
    duration_mean: float
    duration_min: float
    duration_p10: float
    duration_median: float
    duration_p90: float
    duration_max: float
    num_voices: int
    num_parallel: int
    utterances_per_language: dict[str, int]


@dataclass(kw_only=True)
class VoiceInfo:
    id: str
    variant: str
    pitch: int
    rate: int
    part: str
    """"distill" or "eval"."""


@dataclass(kw_only=True)
class CorpusInfo:
    """What corpus.json holds."""

    recipe_version: int
    seed: int
    hours_requested: float
    hours: float
    languages: list[str]
    voices: list[VoiceInfo]
    splits: dict[str, SplitStats]
    parallel_sentence_ids: dict[str, list[str]]
    """probe split -> parallel sentence ids whose renderings it holds."""
    num_failed: int
    failed: dict[str, str]
    """utterance id -> error, for utterances left out."""
    num_language_switches: int
    """Utterances where espeak-ng switched language for a word (e.g. French "dos" as English)."""
    espeak_ng_version: str
    faker_version: str
    recipe: dict[str, Any]
    synthesis: dict[str, float] = field(default_factory=dict)
    """This run: made, kept, wall_seconds, audio_seconds_per_wall_second, num_workers."""

    def voice_ids(self, part: str) -> list[str]:
        return [v.id for v in self.voices if v.part == part]

    def summary(self) -> str:
        """One line: hours, languages, voices, utterances per split."""
        counts = ", ".join(f"{k} {v.num_utterances}" for k, v in self.splits.items())
        return (
            f"{self.hours:.2f} h, {len(self.languages)} languages, {len(self.voices)} voices; "
            f"utterances: {counts}; failed {self.num_failed}"
        )


def manifest_path(out_dir: str | Path, split: str) -> Path:
    return Path(out_dir) / "manifests" / f"{split}.jsonl"


def lhotse_path(out_dir: str | Path, split: str) -> Path:
    return Path(out_dir) / "lhotse" / f"{split}_cuts.jsonl.gz"


def load_corpus_info(out_dir: str | Path) -> CorpusInfo:
    """Read ``out_dir/corpus.json``."""
    path = Path(out_dir) / CORPUS_INFO_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} does not exist: {out_dir} holds no finished corpus (run `colld data synth`)"
        )
    data = json.loads(path.read_text(encoding="utf-8"))
    try:
        data["voices"] = [VoiceInfo(**v) for v in data["voices"]]
        data["splits"] = {k: SplitStats(**v) for k, v in data["splits"].items()}
        return CorpusInfo(**data)
    except (KeyError, TypeError) as err:
        raise ValueError(f"{path} is not a colld corpus description: {err}") from err


def corpus_is_complete(out_dir: str | Path) -> bool:
    """Whether ``out_dir`` holds a finished corpus of this recipe version: corpus.json, every
    split's manifest (rows as counted, all valid) and CutSet, and every listed audio file."""
    try:
        info = load_corpus_info(out_dir)
    except (FileNotFoundError, ValueError, json.JSONDecodeError):
        return False
    if info.recipe_version != RECIPE_VERSION or set(info.splits) != set(SPLITS):
        return False
    for split, stats in info.splits.items():
        path = manifest_path(out_dir, split)
        if not path.is_file() or not lhotse_path(out_dir, split).is_file():
            return False
        rows, problems = read_manifest(path)
        if problems or len(rows) != stats.num_utterances:
            return False
        if not all(row.resolved_path(path.parent).is_file() for row in rows):
            return False
    return True


def load_manifests(out_dir: str | Path) -> dict[str, list[Utterance]]:
    """Every split's manifest; an error names the first unusable row."""
    manifests = {}
    for split in SPLITS:
        rows, problems = read_manifest(manifest_path(out_dir, split))
        if problems:
            raise ValueError(f"{len(problems)} unusable manifest rows, first: {problems[0]}")
        manifests[split] = rows
    return manifests


def load_lhotse_cuts(out_dir: str | Path, split: str) -> CutSet:
    """The split's CutSet with audio paths resolved against the corpus folder."""
    from lhotse import CutSet

    path = lhotse_path(out_dir, split)
    return CutSet.from_file(path).with_recording_path_prefix(str(path.parent))


# ----------------------------------------------------------------------------- the recipe


def synthesize_corpus(cfg: SynthConfig) -> CorpusInfo:
    """Build (or finish) the corpus described by ``cfg``; see the module docstring."""
    cfg.validate()
    binary = find_espeak()
    version = espeak_version(binary)
    languages = cfg.resolved_languages()
    _check_espeak_languages(binary, languages)
    variants = _available_variants(binary)
    plan = plan_corpus(cfg, variants)
    out_dir = cfg.out_dir
    recipe = {
        **cfg.recipe(),
        "recipe_version": RECIPE_VERSION,
        "espeak_ng_version": version,
        "faker_version": _faker_version(),
        "variants": sorted(variants),
    }
    _claim_out_dir(out_dir, recipe)
    num_workers = cfg.num_workers or os.cpu_count() or 1
    logger.info(
        "synthesizing %d utterances (~%.2f h planned) into %s with %d worker(s)",
        len(plan.utterances),
        sum(s.est_duration for s in plan.utterances) / 3600,
        out_dir,
        num_workers,
    )
    start = time.perf_counter()
    results = list(_render_all(plan.utterances, out_dir, binary, num_workers, cfg.show_progress))
    wall_seconds = time.perf_counter() - start
    rows = _manifest_rows(plan.utterances, results)
    for split in SPLITS:
        split_rows = [row for row in rows if row.split == split]
        write_manifest(split_rows, manifest_path(out_dir, split))
        _write_lhotse(split_rows, lhotse_path(out_dir, split))
    info = _corpus_info(cfg, plan, rows, results, version, recipe, wall_seconds, num_workers)
    write_json_atomic(out_dir / CORPUS_INFO_FILE, asdict(info))
    logger.info(
        "corpus %s: %.2f h, %d utterances, %d failed; %.0f audio s per wall s",
        out_dir,
        info.hours,
        len(rows),
        info.num_failed,
        info.synthesis["audio_seconds_per_wall_second"],
    )
    return info


def _faker_version() -> str:
    import faker  # here, not at the top: training imports this module but never synthesises

    return faker.VERSION


def _check_espeak_languages(binary: str, languages: list[Language]) -> None:
    installed = installed_languages(binary)
    missing = [lang.espeak_voice for lang in languages if lang.espeak_voice not in installed]
    if missing:
        raise EspeakError(
            f"espeak-ng at {binary} lacks the voices {missing}; "
            "install the full espeak-ng-data (e.g. `apt-get install espeak-ng`)"
        )


def _available_variants(binary: str) -> list[str]:
    installed = installed_variants(binary)
    missing = [v for v in VARIANTS if v not in installed]
    if missing:
        logger.warning("espeak-ng lacks %d of colld's voice variants: %s", len(missing), missing)
    return [v for v in VARIANTS if v in installed]


def _claim_out_dir(out_dir: Path, recipe: dict[str, Any]) -> None:
    """Record the recipe in a new out_dir, or check it matches the one already there; remove
    the previous corpus.json (it returns when this run finishes) and stale partial files."""
    out_dir.mkdir(parents=True, exist_ok=True)
    recipe_path = out_dir / RECIPE_FILE
    if recipe_path.is_file():
        previous = json.loads(recipe_path.read_text(encoding="utf-8"))
        changed = sorted(
            k for k in recipe.keys() | previous.keys() if recipe.get(k) != previous.get(k)
        )
        if changed:
            details = "; ".join(f"{k}: {previous.get(k)!r} -> {recipe.get(k)!r}" for k in changed)
            raise ValueError(
                f"{out_dir} holds a corpus made with another recipe ({details}); "
                "use another out_dir or delete this one"
            )
    else:
        write_json_atomic(recipe_path, recipe)
    (out_dir / CORPUS_INFO_FILE).unlink(missing_ok=True)
    for stale in (out_dir / "audio").glob(f"*/.*{_PARTIAL}.*"):
        stale.unlink()


def _manifest_rows(specs: list[UtteranceSpec], results: list[_RenderResult]) -> list[Utterance]:
    rows = []
    for spec, result in zip(specs, results, strict=True):
        if result.status == "failed":
            logger.warning("left out %s (%s): %s", spec.id, spec.text, result.error)
            continue
        rows.append(
            Utterance(
                id=spec.id,
                path=f"../{spec.audio_path}",  # relative to manifests/ (and lhotse/)
                duration=result.num_samples / SAMPLE_RATE,
                language=spec.language,
                voice=spec.voice.id,
                text=spec.text,
                text_en=spec.text_en,
                phonemes=result.phonemes,
                split=spec.split,
                sentence_id=spec.sentence_id,
            )
        )
    return rows


def _write_lhotse(rows: list[Utterance], path: Path) -> None:
    """The split as a lhotse CutSet (one MonoCut per utterance, cut id = utterance id)."""
    from lhotse import CutSet, MonoCut, Recording, SupervisionSegment
    from lhotse.audio import AudioSource

    cuts = []
    for row in rows:
        num_samples = round(row.duration * SAMPLE_RATE)
        duration = num_samples / SAMPLE_RATE
        recording = Recording(
            id=row.id,
            sources=[AudioSource(type="file", channels=[0], source=row.path)],
            sampling_rate=SAMPLE_RATE,
            num_samples=num_samples,
            duration=duration,
        )
        supervision = SupervisionSegment(
            id=row.id,
            recording_id=row.id,
            start=0.0,
            duration=duration,
            channel=0,
            text=row.text,
            language=row.language,
            speaker=row.voice,
            custom={
                "phonemes": row.phonemes,
                "text_en": row.text_en,
                "sentence_id": row.sentence_id,
                "split": row.split,
            },
        )
        cuts.append(
            MonoCut(
                id=row.id,
                start=0.0,
                duration=duration,
                channel=0,
                supervisions=[supervision],
                recording=recording,
            )
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}")  # keeps .jsonl.gz: lhotse picks the format by it
    CutSet.from_cuts(cuts).to_file(tmp)
    os.replace(tmp, path)


def _split_stats(rows: list[Utterance]) -> SplitStats:
    durations = sorted(row.duration for row in rows) or [0.0]
    deciles = (
        statistics.quantiles(durations, n=10, method="inclusive")
        if len(durations) > 1
        else durations * 9
    )
    return SplitStats(
        num_utterances=len(rows),
        hours=sum(durations) / 3600,
        duration_mean=statistics.fmean(durations),
        duration_min=durations[0],
        duration_p10=deciles[0],
        duration_median=statistics.median(durations),
        duration_p90=deciles[-1],
        duration_max=durations[-1],
        num_voices=len({row.voice for row in rows}),
        num_parallel=sum(row.sentence_id is not None for row in rows),
        utterances_per_language=dict(sorted(Counter(row.language for row in rows).items())),
    )


def _corpus_info(
    cfg: SynthConfig,
    plan: CorpusPlan,
    rows: list[Utterance],
    results: list[_RenderResult],
    version: str,
    recipe: dict[str, Any],
    wall_seconds: float,
    num_workers: int,
) -> CorpusInfo:
    status = Counter(r.status for r in results)
    made_seconds = sum(r.num_samples for r in results if r.status == "made") / SAMPLE_RATE
    voices = [
        VoiceInfo(id=v.id, variant=v.variant, pitch=v.pitch, rate=v.rate, part=part)
        for part, group in (("distill", plan.distill_voices), ("eval", plan.eval_voices))
        for v in group
    ]
    return CorpusInfo(
        recipe_version=RECIPE_VERSION,
        seed=cfg.seed,
        hours_requested=cfg.hours,
        hours=sum(row.duration for row in rows) / 3600,
        languages=[lang.code for lang in cfg.resolved_languages()],
        voices=voices,
        splits={s: _split_stats([row for row in rows if row.split == s]) for s in SPLITS},
        parallel_sentence_ids=plan.parallel_splits,
        num_failed=status["failed"],
        failed={r.id: r.error or "" for r in results if r.status == "failed"},
        num_language_switches=sum(r.language_switch for r in results),
        espeak_ng_version=version,
        faker_version=_faker_version(),
        recipe=recipe,
        synthesis={
            "made": status["made"],
            "kept": status["kept"],
            "wall_seconds": wall_seconds,
            "audio_seconds_made": made_seconds,
            "audio_seconds_per_wall_second": made_seconds / max(wall_seconds, 1e-9),
            "num_workers": num_workers,
        },
    )
