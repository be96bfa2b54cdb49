"""The embedded espeak-ng corpus: splits, determinism, resuming, formats, errors.

One tiny corpus (3 languages, 7 voices, 6 parallel sentences, ~4 min of audio) is synthesised
once per module and copied where a test changes it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections import defaultdict
from pathlib import Path

import pytest
import soundfile as sf

from colld.data import synth
from colld.data.manifest import Utterance, read_manifest
from colld.data.synth import (
    PROBE_SPLITS,
    SPLITS,
    CorpusInfo,
    SynthConfig,
    corpus_is_complete,
    flac_num_samples,
    load_corpus_info,
    load_lhotse_cuts,
    load_manifests,
    plan_corpus,
    split_counts,
    synthesize_corpus,
)
from colld.data.text import (
    LANGUAGES,
    SentenceGenerator,
    UnknownLanguageError,
    load_parallel_sentences,
    parallel_sentences_path,
)
from colld.data.voices import (
    VARIANTS,
    EspeakError,
    EspeakNotFoundError,
    Voice,
    tokenize_ipa,
)

pytestmark = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="needs espeak-ng")

TINY = {
    "hours": 0.02,
    "languages": ("en", "ru", "zh"),
    "num_distill_voices": 4,
    "num_eval_voices": 3,
    "num_parallel_sentences": 6,
    "show_progress": False,
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, CorpusInfo]:
    out_dir = tmp_path_factory.mktemp("synth") / "corpus"
    info = synthesize_corpus(SynthConfig(out_dir=out_dir, num_workers=2, **TINY))
    return out_dir, info


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _by_split(out_dir: Path) -> dict[str, list[Utterance]]:
    return load_manifests(out_dir)


# ---------------------------------------------------------------- the synthesised corpus


def test_manifests_valid_and_corpus_complete(corpus: tuple[Path, CorpusInfo]) -> None:
    out_dir, info = corpus
    assert corpus_is_complete(out_dir)
    assert info.num_failed == 0 and info.failed == {}
    assert info.languages == ["en", "ru", "zh"]
    assert len(info.voice_ids("distill")) == 4 and len(info.voice_ids("eval")) == 3
    assert info.espeak_ng_version.startswith("1.")
    assert load_corpus_info(out_dir) == info
    total = 0
    for split in SPLITS:
        path = out_dir / "manifests" / f"{split}.jsonl"
        rows, problems = read_manifest(path)
        assert problems == []
        assert len(rows) == info.splits[split].num_utterances > 0
        total += len(rows)
        for row in rows:
            assert row.split == split and row.language in TINY["languages"]
            expected = out_dir / "audio" / split / f"{row.id}.flac"
            assert row.resolved_path(path.parent).resolve() == expected.resolve()
            assert row.text and row.phonemes and row.voice and row.duration > 0.3
    assert total == info.synthesis["made"]
    assert abs(info.hours * 3600 - sum(s.hours * 3600 for s in info.splits.values())) < 1e-6


def test_audio_is_16k_mono_flac_of_the_manifest_duration(corpus: tuple[Path, CorpusInfo]) -> None:
    out_dir, _ = corpus
    for split, rows in _by_split(out_dir).items():
        for row in rows:
            path = out_dir / "audio" / split / f"{row.id}.flac"
            info = sf.info(str(path))
            assert (info.format, info.samplerate, info.channels) == ("FLAC", 16000, 1)
            assert info.frames == round(row.duration * 16000)
            assert flac_num_samples(path) == info.frames


def test_voices_and_sentences_are_disjoint_between_parts_and_probe_splits(
    corpus: tuple[Path, CorpusInfo],
) -> None:
    out_dir, info = corpus
    manifests = _by_split(out_dir)
    distill_voices = {r.voice for s in ("train", "dev") for r in manifests[s]}
    eval_voices = {r.voice for s in PROBE_SPLITS for r in manifests[s]}
    assert distill_voices == set(info.voice_ids("distill"))
    assert eval_voices == set(info.voice_ids("eval"))
    assert not distill_voices & eval_voices
    variants = {v.part: set() for v in info.voices}
    for v in info.voices:
        variants[v.part].add(v.variant)
    assert not variants["distill"] & variants["eval"], "eval voices reuse a distillation variant"
    # every (language, text) once in the whole corpus: splits share no sentence
    texts = [(r.language, r.text) for rows in manifests.values() for r in rows]
    assert len(texts) == len(set(texts))
    sentence_ids = {s: {r.sentence_id for r in manifests[s] if r.sentence_id} for s in SPLITS}
    assert sentence_ids["train"] == sentence_ids["dev"] == set()
    for i, a in enumerate(PROBE_SPLITS):
        for b in PROBE_SPLITS[i + 1 :]:
            assert not sentence_ids[a] & sentence_ids[b]


def test_every_eval_voice_in_every_probe_split(corpus: tuple[Path, CorpusInfo]) -> None:
    out_dir, info = corpus
    manifests = _by_split(out_dir)
    for split in PROBE_SPLITS:
        assert {r.voice for r in manifests[split]} == set(info.voice_ids("eval")), split


def test_parallel_subset_in_every_language_with_english_reference(
    corpus: tuple[Path, CorpusInfo],
) -> None:
    out_dir, info = corpus
    shipped = {s.sentence_id: s for s in load_parallel_sentences()}
    renderings: dict[str, set[str]] = defaultdict(set)
    for split, rows in _by_split(out_dir).items():
        for row in rows:
            if row.sentence_id is None:
                assert row.text_en is None
                continue
            assert row.sentence_id in info.parallel_sentence_ids[split]
            sentence = shipped[row.sentence_id]
            assert row.text == sentence.text[row.language]
            assert row.text_en == sentence.text_en
            renderings[row.sentence_id].add(row.language)
    assert len(renderings) == 6
    assert all(langs == set(TINY["languages"]) for langs in renderings.values())
    assert all(len(info.parallel_sentence_ids[s]) >= 1 for s in PROBE_SPLITS)


def test_ipa_phonemes(corpus: tuple[Path, CorpusInfo]) -> None:
    out_dir, _ = corpus
    rows = [r for rows in _by_split(out_dir).values() for r in rows]
    for row in rows:
        tokens = row.phonemes.split(" ")
        assert tokens and all(tokens), row.id
        assert not set("ˈˌ()_") & set(row.phonemes), row.phonemes
    # Mandarin keeps its tone marks; a Russian sentence has Cyrillic-free IPA
    assert any(ch.isdigit() for r in rows if r.language == "zh" for ch in r.phonemes)
    assert not any(
        "\u0400" <= ch <= "\u04ff" for r in rows if r.language == "ru" for ch in r.phonemes
    )


def test_lhotse_cutsets_load_with_audio(corpus: tuple[Path, CorpusInfo]) -> None:
    out_dir, _ = corpus
    manifests = _by_split(out_dir)
    for split in SPLITS:
        cuts = load_lhotse_cuts(out_dir, split)
        rows = {r.id: r for r in manifests[split]}
        assert sorted(c.id for c in cuts) == sorted(rows)
        for cut in cuts:
            sup = cut.supervisions[0]
            row = rows[cut.id]
            assert (sup.text, sup.language, sup.speaker) == (row.text, row.language, row.voice)
            assert sup.custom["phonemes"] == row.phonemes
            assert sup.custom["text_en"] == row.text_en
            assert cut.duration == pytest.approx(row.duration, abs=1e-6)
    cut = next(iter(load_lhotse_cuts(out_dir, "probe-test")))
    audio = cut.load_audio()
    assert audio.shape == (1, cut.num_samples) and cut.sampling_rate == 16000


def test_same_seed_gives_identical_corpus(corpus: tuple[Path, CorpusInfo], tmp_path: Path) -> None:
    out_dir, _ = corpus
    other = tmp_path / "again"
    synthesize_corpus(SynthConfig(out_dir=other, num_workers=1, **TINY))  # other worker count
    for split in SPLITS:
        name = f"manifests/{split}.jsonl"
        assert (other / name).read_text() == (out_dir / name).read_text(), split
    flacs = sorted(p.relative_to(out_dir) for p in (out_dir / "audio").rglob("*.flac"))
    assert flacs and all(_digest(out_dir / p) == _digest(other / p) for p in flacs)


def test_other_seed_gives_other_plan() -> None:
    cfg = SynthConfig(out_dir=Path("unused"), **TINY)
    first = plan_corpus(cfg, list(VARIANTS))
    again = plan_corpus(cfg, list(VARIANTS))
    other = plan_corpus(SynthConfig(out_dir=Path("unused"), **{**TINY, "seed": 1}), list(VARIANTS))
    assert first.utterances == again.utterances
    assert [u.text for u in first.utterances] != [u.text for u in other.utterances]
    assert {v.id for v in first.eval_voices} != {v.id for v in other.eval_voices}


def test_rerun_repairs_only_missing_and_broken_files(
    corpus: tuple[Path, CorpusInfo], tmp_path: Path
) -> None:
    source, _ = corpus
    out_dir = tmp_path / "copy"
    shutil.copytree(source, out_dir)  # copy2 keeps the mtimes
    flacs = sorted((out_dir / "audio").rglob("*.flac"))
    deleted, truncated = flacs[3], flacs[-2]
    originals = {p: _digest(p) for p in (deleted, truncated)}
    deleted.unlink()
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    stale = [  # left by a killed run: one of a broken file, one of a good file
        truncated.with_name(f".{truncated.stem}.partial.flac"),
        flacs[5].with_name(f".{flacs[5].stem}.partial.wav"),
    ]
    for path in stale:
        path.write_bytes(b"half a file")
    before = {p: p.stat().st_mtime_ns for p in flacs if p not in originals}
    assert not corpus_is_complete(out_dir)

    info = synthesize_corpus(SynthConfig(out_dir=out_dir, num_workers=2, **TINY))

    assert (info.synthesis["made"], info.synthesis["kept"]) == (2, len(flacs) - 2)
    assert {p: p.stat().st_mtime_ns for p in before} == before
    assert all(_digest(p) == digest for p, digest in originals.items())
    assert not any(path.exists() for path in stale)
    assert corpus_is_complete(out_dir)
    for split in SPLITS:
        name = f"manifests/{split}.jsonl"
        assert (out_dir / name).read_text() == (source / name).read_text()


def test_rerun_with_another_recipe_is_refused(
    corpus: tuple[Path, CorpusInfo], tmp_path: Path
) -> None:
    out_dir = tmp_path / "copy"
    shutil.copytree(corpus[0], out_dir)
    with pytest.raises(ValueError, match="seed: 0 -> 1"):
        synthesize_corpus(SynthConfig(out_dir=out_dir, **{**TINY, "seed": 1}))


# ------------------------------------------------------------------------ failures, errors


def _small(out_dir: Path) -> SynthConfig:
    return SynthConfig(
        out_dir=out_dir, hours=0.003, languages=("de",), num_distill_voices=1,
        num_eval_voices=1, num_parallel_sentences=0, min_eval_utts_per_voice=1,
        num_workers=1, show_progress=False,
    )  # fmt: skip


def test_failed_synthesis_is_retried_once_then_left_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = _small(tmp_path / "c")
    plan = plan_corpus(cfg, list(VARIANTS))
    broken, silent = plan.utterances[0], plan.utterances[-1]
    calls: dict[str, int] = defaultdict(int)
    real = synth.synthesize

    def flaky(binary: str, text: str, espeak_voice: str, voice: Voice, wav_path: Path) -> str:
        calls[text] += 1
        if text == broken.text:
            raise EspeakError("simulated espeak-ng crash")
        raw = real(binary, text, espeak_voice, voice, wav_path)
        if text == silent.text:
            sf.write(str(wav_path), [0.0] * 100, 22050, subtype="PCM_16")
        return raw

    monkeypatch.setattr(synth, "synthesize", flaky)
    info = synthesize_corpus(cfg)
    assert info.num_failed == 2
    assert set(info.failed) == {broken.id, silent.id}
    assert "simulated espeak-ng crash" in info.failed[broken.id]
    assert calls[broken.text] == 2 and calls[silent.text] == 2
    ids = {r.id for rows in load_manifests(cfg.out_dir).values() for r in rows}
    assert ids == {u.id for u in plan.utterances} - {broken.id, silent.id}
    assert json.loads((cfg.out_dir / "corpus.json").read_text())["num_failed"] == 2


def test_clear_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="hours must be > 0"):
        synthesize_corpus(SynthConfig(out_dir=tmp_path, hours=0))
    with pytest.raises(UnknownLanguageError, match="'xx'.*available: en, de"):
        synthesize_corpus(SynthConfig(out_dir=tmp_path, languages=("en", "xx")))
    with pytest.raises(ValueError, match="probe_fractions"):
        SynthConfig(out_dir=tmp_path, probe_fractions=(0.5, 0.5, 0.5)).validate()
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(EspeakNotFoundError, match="apt-get install espeak-ng"):
        synthesize_corpus(SynthConfig(out_dir=tmp_path / "c"))
    assert not (tmp_path / "c").exists()


# --------------------------------------------------------------------- plan and text (fast)


def test_default_plan_is_diverse_and_sized_by_hours() -> None:
    cfg = SynthConfig(out_dir=Path("unused"), hours=2.0, num_parallel_sentences=0)
    plan = plan_corpus(cfg, list(VARIANTS))
    assert len(LANGUAGES) >= 12
    assert len({lang.script for lang in LANGUAGES.values()}) >= 6
    assert any(lang.tonal for lang in LANGUAGES.values())
    assert len(plan.distill_voices) + len(plan.eval_voices) >= 40
    variants = {v.variant for v in plan.distill_voices + plan.eval_voices}
    assert len(variants) == len(plan.distill_voices) + len(plan.eval_voices)
    assert {u.language for u in plan.utterances} == set(LANGUAGES)
    pitches = [v.pitch for v in plan.distill_voices]
    rates = [v.rate for v in plan.distill_voices]
    assert max(pitches) - min(pitches) > 50 and max(rates) / min(rates) > 1.8
    estimated = sum(u.est_duration for u in plan.utterances) / 3600
    assert estimated == pytest.approx(2.0, rel=0.03)
    lengths = [len(u.text.split()) for u in plan.utterances if u.language == "en"]
    assert min(lengths) == cfg.min_words and max(lengths) == cfg.max_words


def test_split_counts() -> None:
    assert split_counts(6, (0.6, 0.2, 0.2)) == [4, 1, 1]
    assert split_counts(3, (0.8, 0.1, 0.1)) == [1, 1, 1]
    assert split_counts(40, (0.6, 0.2, 0.2)) == [24, 8, 8]
    assert split_counts(0, (0.6, 0.2, 0.2)) == [0, 0, 0]


def test_tokenize_ipa() -> None:
    raw = "(en)_b_ˈaɪ5_ə(cmn)_ tʃ_ˈaː2_w_ _b_ˈuə4\nɡ_ˈuː_t__ə_n\n"
    assert tokenize_ipa(raw) == [
        "b",
        "aɪ5",
        "ə",
        "tʃ",
        "aː2",
        "w",
        "b",
        "uə4",
        "ɡ",
        "uː",
        "t",
        "ə",
        "n",
    ]


def test_parallel_sentences_cover_every_language(tmp_path: Path) -> None:
    sentences = load_parallel_sentences()
    assert 30 <= len(sentences) <= 60
    assert len({s.sentence_id for s in sentences}) == len(sentences)
    for code in LANGUAGES:
        texts = [s.text[code] for s in sentences]
        assert len(set(texts)) == len(texts), code
    broken = json.loads(parallel_sentences_path().read_text(encoding="utf-8"))
    del broken["sentences"][2]["fa"]
    path = tmp_path / "p.json"
    path.write_text(json.dumps(broken), encoding="utf-8")
    with pytest.raises(ValueError, match="'p03' lacks a text for language 'fa'"):
        load_parallel_sentences(path)


def test_generated_sentences_are_new_and_in_the_language() -> None:
    ja = SentenceGenerator(LANGUAGES["ja"], seed=0)
    texts = [ja.sentence(5) for _ in range(50)]
    assert len(set(texts)) == 50
    assert all(len(t.split(" ")) == 5 and t.endswith("。") for t in texts)
    uk = SentenceGenerator(LANGUAGES["uk"], seed=0)
    assert not any("\u02bc" in uk.sentence(20) for _ in range(50))
    ru = SentenceGenerator(LANGUAGES["ru"], seed=3).sentence(8)
    assert ru == SentenceGenerator(LANGUAGES["ru"], seed=3).sentence(8)
    assert any("\u0400" <= ch <= "\u04ff" for ch in ru)
