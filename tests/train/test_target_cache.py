"""The teacher-target cache: segments, exact targets, stale/partial refusal, cached training."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from transformers import WhisperFeatureExtractor

from colld.audio import FrontEnd, load_audio
from colld.cli import main
from colld.config import ConfigError, load_config
from colld.data.dataset import DistillDataset
from colld.data.manifest import Utterance, read_manifest, write_manifest
from colld.data.target_cache import (
    BUILD_CONFIG_FILE,
    DEV_DIR,
    FEATURES_FILE,
    FINGERPRINT_FILE,
    INDEX_FILE,
    PROGRESS_FILE,
    CacheBusyError,
    CacheWriter,
    PartialCacheError,
    StaleCacheError,
    data_record,
    layer_file,
    open_cache,
    plan_segments,
)
from colld.objectives.objective import DistillObjective
from colld.students.build import build_student
from colld.teachers import load_teacher
from colld.testing import TINY_RUN_OVERRIDES, tiny_teacher_dir, write_tones
from colld.train import step as step_module
from colld.train import teacher_cache
from colld.train.data_setup import resolve_sources
from colld.train.recipe import evaluate_dev, setup, train_update
from colld.train.step import Distiller, distill_loss, step_generator
from colld.train.teacher_cache import (
    build_cache,
    cache_teacher_layers,
    open_dev_cache,
    open_run_cache,
)

RATE = 16000
DURATIONS = (0.8, 1.2, 2.0, 2.5, 7.1, 1.5)  # u4 (7.1 s) becomes segments of 3 + 3 + 1.1 s
DEV_DURATIONS = (1.0, 4.0)  # d1 becomes segments of 3 + 1 s


def _teacher(out: Path, seed: int = 0) -> Path:
    return tiny_teacher_dir("whisper", out, seed=seed)


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cache-assets")
    return {
        "teacher": _teacher(root / "teacher"),
        "other_teacher": _teacher(root / "other-teacher", seed=1),
        "audio": write_tones(root / "audio", DURATIONS, prefix="u"),
        "dev": write_tones(root / "dev", DEV_DURATIONS, prefix="d", seed=1),
        "other_dev": write_tones(root / "other-dev", (1.0,), prefix="d", seed=2),
    }


def _overrides(assets: dict[str, Path], tmp_path: Path, *extra: str) -> list[str]:
    return [
        f"teacher.spec={assets['teacher']}",
        f"data.train={assets['audio']}",
        f"train.output_dir={tmp_path / 'run'}",
        *TINY_RUN_OVERRIDES,
        *extra,
    ]


def _config(assets: dict[str, Path], tmp_path: Path, *extra: str):
    return load_config(None, _overrides(assets, tmp_path, *extra))


def _cli(assets, tmp_path: Path, command: str, *extra: str, run: str = "run") -> int:
    paths = ["--teacher", str(assets["teacher"]), "--data", str(assets["audio"])]
    if command == "distill":
        paths += ["--output", str(tmp_path / run)]
    return main([command, *paths, *TINY_RUN_OVERRIDES, *extra])


# ---------------------------------------------------------------- manifests and segments
def test_utterance_offset_round_trips_through_a_manifest(tmp_path: Path) -> None:
    rows = [
        Utterance(id="a", path="a.wav", duration=3.0, offset=12.5, language="de"),
        Utterance(id="b", path="b.wav", duration=1.0),
    ]
    path = write_manifest(rows, tmp_path / "m.jsonl")
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines[0]["offset"] == 12.5 and "offset" not in lines[1]  # whole files unchanged
    assert read_manifest(path) == (rows, [])
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        '{"id": "x", "path": "x.wav", "duration": 1.0, "offset": -1}\n'
        '{"id": "y", "path": "y.wav", "duration": 1.0, "offset": "2"}\n'
    )
    utterances, problems = read_manifest(bad)
    assert utterances == [] and len(problems) == 2
    assert all("offset" in p for p in problems)


def test_a_row_with_an_offset_reads_its_region(assets, tmp_path: Path) -> None:
    frontend = FrontEnd(WhisperFeatureExtractor(feature_size=80))
    whole = load_audio(assets["audio"] / "u4.wav")
    utt = Utterance(id="r", path="u4.wav", duration=2.0, offset=1.5)
    dataset = DistillDataset(assets["audio"], frontend, max_duration=None)
    np.testing.assert_array_equal(dataset.prepare_waveform(utt, 0), whole[24000:56000])
    cropped = DistillDataset(assets["audio"], frontend, max_duration=1.0, seed=3)
    piece = cropped.prepare_waveform(utt, 0)
    assert piece.shape == (16000,)
    starts = [
        int(i)
        for i in np.flatnonzero(whole == piece[0])
        if np.array_equal(whole[i : i + 16000], piece)
    ]
    assert len(starts) == 1 and 24000 <= starts[0] <= 40000  # the crop stays in the region


def test_long_utterances_become_consecutive_segments() -> None:
    utt = Utterance(id="long", path="x.wav", duration=7.1, offset=0.5)
    segments = plan_segments([utt], 3.0, RATE, min_samples=160)
    assert [s.id for s in segments] == ["long#0", "long#1", "long#2"]
    assert [s.offset for s in segments] == pytest.approx([0.5, 3.5, 6.5])
    assert [s.duration for s in segments] == pytest.approx([3.0, 3.0, 1.1])
    # A remainder shorter than the front end's minimum (160 samples) is dropped.
    short_tail = Utterance(id="t", path="t.wav", duration=6.005)
    assert [s.duration for s in plan_segments([short_tail], 3.0, RATE, 160)] == [3.0, 3.0]
    assert plan_segments([Utterance(id="s", path="s.wav", duration=0.005)], 3.0, RATE, 160) == []


def test_whole_file_rows_keep_the_data_hash_of_caches_built_before_regions() -> None:
    """Caches built when a whole file was offset 0 stay valid: a whole-file row hashes and
    segments as the region from 0 it reads as; every segment is a region row."""
    rows = [
        Utterance(id="a", path="a.wav", duration=3.0),
        Utterance(id="b", path="b.wav", duration=1.0, offset=2.0),
    ]
    old = hashlib.blake2b(digest_size=12)  # the format every existing fingerprint used
    old.update(b"a\ta.wav\t0.000000\t3.000000\nb\tb.wav\t2.000000\t1.000000\n")
    assert data_record(rows) == {"num_utterances": 2, "hash": old.hexdigest()}
    one_channel = [rows[0], replace(rows[1], channel=1)]  # other audio, other hash
    assert data_record(one_channel)["hash"] != old.hexdigest()
    segments = [s.as_utterance() for s in plan_segments(rows, 2.0, RATE, min_samples=160)]
    assert [(s.id, s.offset, s.duration) for s in segments] == [
        ("a#0", 0.0, 2.0),
        ("a#1", 2.0, 1.0),
        ("b#0", 2.0, 1.0),
    ]


# ---------------------------------------------------------------- building
def _teacher_states(
    teacher, wave: torch.Tensor, layers: list[int], *, bf16: bool = False
) -> dict[int, torch.Tensor]:
    features = FrontEnd(teacher.feature_extractor)(wave)[None]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = teacher.encoder(features, torch.tensor([features.shape[1]]), layers=layers)
    return {j: out.hidden_states[j][0].float() for j in layers}


def test_cached_targets_equal_the_teacher_on_the_same_segment(assets, tmp_path: Path) -> None:
    cfg = _config(assets, tmp_path, "train.precision=fp32")
    summary = build_cache(cfg, tmp_path / "cache", progress=False)
    assert summary.num_segments == 8 and summary.num_skipped == 0
    cache = open_cache(tmp_path / "cache")
    long_rows = [r for r in cache.rows if r["utterance_id"] == "u4"]
    assert [(r["offset"], r["num_samples"]) for r in long_rows] == [
        (0.0, 48000),
        (3.0, 48000),
        (6.0, 17600),
    ]
    teacher = load_teacher(str(assets["teacher"]))
    frontend = FrontEnd(teacher.feature_extractor)
    assert cache.layers == cache_teacher_layers(cfg, teacher) == [2, 4]
    for row in cache.rows:
        wave = load_audio(
            assets["audio"] / row["path"], offset_s=row["offset"], duration_s=row["duration"]
        )
        states = _teacher_states(teacher, wave, [2, 4])
        assert torch.equal(torch.from_numpy(cache.read_features(row["id"])), frontend(wave))
        for layer, cached in cache.read(row["id"]).items():
            assert cached.dtype == np.float16
            reference = states[layer].numpy()
            np.testing.assert_allclose(cached.astype(np.float32), reference, rtol=2e-3, atol=2e-3)
    # Rerunning is a no-op on a complete cache.
    assert build_cache(cfg, tmp_path / "cache", progress=False).built == 0


def test_the_cache_runs_the_teacher_under_the_runs_precision(assets, tmp_path: Path) -> None:
    """train.precision=bf16: targets computed under bf16 autocast, as an online bf16 run's are
    (so they match those, not the fp32 teacher's, up to float16 storage)."""
    build_cache(_config(assets, tmp_path, "train.precision=bf16"), tmp_path / "c", progress=False)
    cache = open_cache(tmp_path / "c")
    teacher = load_teacher(str(assets["teacher"]))
    row = max(cache.rows, key=lambda r: r["num_samples"])
    wave = load_audio(
        assets["audio"] / row["path"], offset_s=row["offset"], duration_s=row["duration"]
    )
    fp32 = _teacher_states(teacher, wave, [4])[4]
    bf16 = _teacher_states(teacher, wave, [4], bf16=True)[4]
    cached = torch.from_numpy(cache.read(row["id"])[4].astype(np.float32))
    to_bf16 = (cached - bf16.half().float()).abs().max().item()
    to_fp32 = (cached - fp32).abs().max().item()
    assert to_bf16 < 1e-3 and to_bf16 < to_fp32 / 4


def _segments(cache) -> list[Utterance]:
    utterances = [
        Utterance(id=f"u{i}", path=f"u{i}.wav", duration=d) for i, d in enumerate(DURATIONS)
    ]
    return cache.segment_utterances(utterances)


def test_cached_batches_take_the_stored_features_not_the_audio(assets, tmp_path: Path) -> None:
    build_cache(_config(assets, tmp_path), tmp_path / "cache", progress=False)
    cache = open_cache(tmp_path / "cache")
    assert cache.has_features
    frontend = FrontEnd(load_teacher(str(assets["teacher"])).feature_extractor)
    segments = _segments(cache)
    from_audio = DistillDataset(assets["audio"], frontend, max_duration=None)[segments]
    no_audio = tmp_path / "no-audio"
    no_audio.mkdir()
    cached = DistillDataset(no_audio, frontend, max_duration=None, targets=cache)[segments]
    assert cached.ids == from_audio.ids == [s.id for s in segments] and not cached.skipped
    assert torch.equal(cached.features, from_audio.features)
    assert torch.equal(cached.feature_lengths, from_audio.feature_lengths)
    assert torch.allclose(cached.durations, from_audio.durations)
    # A cache built before features were stored has no "features" entry: its batches read
    # (and check) the audio, so without the audio every segment is skipped.
    path = tmp_path / "cache" / FINGERPRINT_FILE
    fingerprint = json.loads(path.read_text())
    del fingerprint["features"]
    path.write_text(json.dumps(fingerprint))
    older = open_cache(tmp_path / "cache")
    assert not older.has_features
    batch = DistillDataset(assets["audio"], frontend, max_duration=None, targets=older)[segments]
    assert torch.equal(batch.features, cached.features)
    skipped = DistillDataset(no_audio, frontend, max_duration=None, targets=older)[segments]
    assert len(skipped.skipped) == len(segments)


def test_a_waveform_family_cache_stores_the_normalised_samples(tmp_path: Path) -> None:
    teacher = tiny_teacher_dir("hubert", tmp_path / "hubert")
    audio = write_tones(tmp_path / "audio", (0.5, 1.3), prefix="w")
    cfg = load_config(
        None,
        [
            f"teacher.spec={teacher}",
            f"data.train={audio}",
            f"train.output_dir={tmp_path / 'run'}",
            *TINY_RUN_OVERRIDES,
        ],
    )
    build_cache(cfg, tmp_path / "cache", progress=False)
    cache = open_cache(tmp_path / "cache")
    frontend = FrontEnd(load_teacher(str(teacher)).feature_extractor)
    assert cache.features == {"dtype": "float32", "dim": None}
    for row in cache.rows:
        stored = cache.read_features(row["id"])
        assert stored.shape == (row["num_samples"],)
        wave = load_audio(audio / row["path"], offset_s=row["offset"], duration_s=row["duration"])
        assert torch.equal(torch.from_numpy(stored), frontend(wave))


def test_stale_cache_is_refused_naming_the_key(assets, tmp_path: Path, capsys) -> None:
    cache = tmp_path / "cache"
    assert _cli(assets, tmp_path, "cache-teacher", "--out", str(cache)) == 0
    assert "MB per hour" in capsys.readouterr().out
    use = f"data.target_cache={cache}"
    cases = {
        "teacher_layers": ("objective.layer_map=[1,4]",),
        "segment_seconds": ("data.max_duration=2",),
        "target": ("objective.target=ffn",),
    }
    for key, extra in cases.items():
        assert _cli(assets, tmp_path, "distill", use, *extra, run=f"run-{key}") == 2
        err = capsys.readouterr().err
        assert key in err and "does not match" in err, err
    other = ["--teacher", str(assets["other_teacher"]), "--data", str(assets["audio"])]
    code = main(["distill", *other, "--output", str(tmp_path / "r2"), *TINY_RUN_OVERRIDES, use])
    assert code == 2 and "teacher_fingerprint" in capsys.readouterr().err
    # A run that needs a subset of the cached layers may use it; other data may not.
    cfg = _config(assets, tmp_path, use)
    teacher = load_teacher(str(assets["teacher"]))
    (utterances, _), _ = resolve_sources(cfg.data, 0)
    assert open_run_cache(cfg, teacher, [4], utterances).layers == [2, 4]
    with pytest.raises(StaleCacheError, match="data: cache vs run: hash="):
        open_run_cache(cfg, teacher, [2, 4], utterances[:3])
    # Building into a cache made for another config is refused too.
    with pytest.raises(StaleCacheError, match="segment_seconds"):
        build_cache(_config(assets, tmp_path, "data.max_duration=2"), cache, progress=False)


def test_partial_cache_is_refused_then_completed(assets, tmp_path: Path, monkeypatch, capsys):
    cfg = _config(assets, tmp_path)
    partial, fresh = tmp_path / "partial", tmp_path / "fresh"
    real = teacher_cache._teacher_chunk
    calls = {"n": 0}

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 2:
            raise KeyboardInterrupt("simulated kill")
        return real(*args, **kwargs)

    monkeypatch.setattr(teacher_cache, "_teacher_chunk", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build_cache(cfg, partial, chunk_seconds=3.0, progress=False)
    monkeypatch.undo()
    progress = json.loads((partial / PROGRESS_FILE).read_text())
    assert 0 < progress["segments"] < progress["planned"] == 8
    # A kill in the middle of the next chunk leaves uncommitted bytes and rows behind.
    for torn in (layer_file(partial, 2), partial / FEATURES_FILE):
        with torn.open("ab") as f:
            f.write(b"\x00" * 100)
    with (partial / INDEX_FILE).open("a") as f:
        f.write('{"id": "torn"}\n')

    with pytest.raises(PartialCacheError, match=f"after {progress['segments']} of 8 segments"):
        open_cache(partial)
    code = _cli(assets, tmp_path, "distill", f"data.target_cache={partial}")
    err = capsys.readouterr().err
    assert code == 2 and "partial" in err and "colld cache-teacher --config" in err, err

    summary = build_cache(cfg, partial, chunk_seconds=3.0, progress=False)
    assert summary.built == 8 - progress["segments"]
    build_cache(cfg, fresh, chunk_seconds=3.0, progress=False)
    completed, rebuilt = open_cache(partial), open_cache(fresh)
    assert completed.rows == rebuilt.rows
    for layer in completed.layers:
        assert layer_file(partial, layer).read_bytes() == layer_file(fresh, layer).read_bytes()
    assert (partial / FEATURES_FILE).read_bytes() == (fresh / FEATURES_FILE).read_bytes()


# ---------------------------------------------------------------- training
def test_cached_step_gives_the_online_loss(assets, tmp_path: Path) -> None:
    cfg = _config(assets, tmp_path, "student.init=teacher")  # built here without a prune plan
    build_cache(cfg, tmp_path / "cache", progress=False)
    cache = open_cache(tmp_path / "cache")
    teacher = load_teacher(str(assets["teacher"]))
    student = build_student(teacher.encoder, cfg.student, seed=0)
    objective = DistillObjective.for_encoders(cfg.objective, student, teacher.encoder)
    distiller = Distiller(student, objective)
    frontend = FrontEnd(teacher.feature_extractor)
    segments = _segments(cache)
    dataset = DistillDataset(assets["audio"], frontend, max_duration=None, targets=cache)
    batch = dataset[[s for s in segments if s.id in ("u2#0", "u4#1", "u4#2")]]
    assert batch.targets[4].shape == (3, 150, 32)
    assert batch.target_lengths.tolist() == [100, 150, 55]
    online = replace(batch, targets=None, target_lengths=None)

    def loss(b):
        generator = step_generator(0, 0, 0, torch.device("cpu"))
        with torch.no_grad():
            return distill_loss(distiller, teacher.encoder, objective, b, generator)

    cached_out, online_out = loss(batch), loss(online)
    assert float(cached_out.total) == pytest.approx(float(online_out.total), rel=1e-3)
    for name, part in online_out.parts.items():
        assert float(cached_out.parts[name]) == pytest.approx(float(part), rel=1e-3)
    # Targets that do not fit the features' frames are refused.
    with pytest.raises(ValueError, match="rebuild the teacher-target cache"):
        loss(replace(batch, target_lengths=batch.target_lengths + 1))


def test_cached_distill_runs_and_resumes_through_the_cli(assets, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    assert _cli(assets, tmp_path, "cache-teacher", "--out", str(cache)) == 0
    # One worker process: the cache travels to it without its memory maps.
    use = (f"data.target_cache={cache}", "data.num_workers=1")
    assert _cli(assets, tmp_path, "distill", *use, "train.max_steps=2") == 0
    assert _cli(assets, tmp_path, "distill", *use, "train.max_steps=4") == 0  # continues
    # Switching the same run to the online teacher changes the data: refused.
    assert _cli(assets, tmp_path, "distill", "data.num_workers=1", "train.max_steps=6") == 2
    run_dir = tmp_path / "run"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r for r in rows if "train/loss" in r]
    assert [r["step"] for r in losses] == [1, 2, 3, 4]
    assert all(np.isfinite(r["train/loss"]) for r in losses)
    state = json.loads(
        sorted((run_dir / "checkpoints").glob("step_*"))[-1].joinpath("state.json").read_text()
    )
    assert state["step"] == 4
    assert (run_dir / "student" / "model.safetensors").is_file()


def test_one_cache_serves_a_subset_of_the_hours(assets, tmp_path: Path) -> None:
    """data.train_hours with the cache of all the data: the run trains on its subset's
    segments only, and the student records the subset."""
    cache = tmp_path / "cache"
    assert _cli(assets, tmp_path, "cache-teacher", "--out", str(cache)) == 0
    hours = 3.0 / 3600  # 3 s of the 15.1 s: the subset takes one or two of the six tones
    use = (f"data.target_cache={cache}", "data.num_workers=0", f"data.train_hours={hours}")
    assert _cli(assets, tmp_path, "distill", *use, "train.max_steps=2") == 0
    provenance = json.loads((tmp_path / "run" / "student" / "colld.json").read_text())
    data = provenance["data"]
    assert 1 <= data["train_utterances"] < len(DURATIONS)
    assert 3.0 / 3600 <= data["train_hours"] < sum(DURATIONS) / 3600
    asked = (f"data.train_hours={sum(DURATIONS)}",)  # hours, not seconds: more than there is
    assert _cli(assets, tmp_path, "distill", *asked, "train.max_steps=2", run="too-much") == 2


def test_one_build_at_a_time_writes_a_cache(assets, tmp_path: Path, monkeypatch, capsys) -> None:
    """A second build of the same directory is refused while the first holds its lock, and a
    build under accelerate launch / torchrun (WORLD_SIZE > 1), whose processes would all write
    the same files, is refused before it starts."""
    cfg = _config(assets, tmp_path)
    cache = tmp_path / "cache"
    teacher = load_teacher(str(assets["teacher"]))
    (utterances, _), _ = resolve_sources(cfg.data, 0)
    frontend = FrontEnd(teacher.feature_extractor)
    fingerprint = teacher_cache.run_fingerprint(cfg, teacher, [2, 4], utterances, frontend)
    first = CacheWriter(cache, fingerprint, 8, 32)
    with pytest.raises(CacheBusyError, match=f"building the teacher-target cache in {cache}"):
        build_cache(cfg, cache, progress=False)
    first.close()
    assert build_cache(cfg, cache, progress=False).num_segments == 8
    monkeypatch.setenv("WORLD_SIZE", "2")
    code = _cli(assets, tmp_path, "cache-teacher", "--out", str(tmp_path / "other"))
    assert code == 2 and "WORLD_SIZE=2" in capsys.readouterr().err
    assert not (tmp_path / "other").exists()


def test_augmentation_and_a_cache_are_refused_together(assets, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="data.augment.enabled"):
        _config(assets, tmp_path, "data.target_cache=somewhere", "data.augment.enabled=true")
    with pytest.raises(ConfigError, match="augment"):
        build_cache(_config(assets, tmp_path, "data.augment.enabled=true"), tmp_path / "c")
    with pytest.raises(ConfigError, match="--out"):
        build_cache(_config(assets, tmp_path), None)


def test_a_segment_skipped_at_build_keeps_the_others_aligned(tmp_path: Path) -> None:
    """A file the front end refuses (NaN samples: its header is fine) becomes a skipped row with
    its reason and no targets or features; the segments after it read their own."""
    audio = write_tones(tmp_path / "audio", (1.0, 1.5, 2.0), prefix="u")
    nan = np.full(RATE, np.nan, dtype=np.float32)
    sf.write(audio / "u1x.wav", nan, RATE, subtype="FLOAT")  # sorts between u1 and u2
    teacher = tiny_teacher_dir("whisper", tmp_path / "teacher")
    overrides = [f"teacher.spec={teacher}", f"data.train={audio}", *TINY_RUN_OVERRIDES]
    summary = build_cache(load_config(None, overrides), tmp_path / "cache", progress=False)
    assert summary.num_segments == 4 and summary.num_skipped == 1
    cache = open_cache(tmp_path / "cache")
    skipped = [r for r in cache.rows if r.get("skipped")]
    assert [r["id"] for r in skipped] == ["u1x#0"] and "non_finite" in skipped[0]["skipped"]
    assert "feature_offset" not in skipped[0]
    frontend = FrontEnd(load_teacher(str(teacher)).feature_extractor)
    utterances = [
        Utterance(id=f"u{i}", path=f"u{i}.wav", duration=d)
        for i, d in zip((0, 1, 2), (1.0, 1.5, 2.0), strict=True)
    ] + [Utterance(id="u1x", path="u1x.wav", duration=1.0)]
    segments = cache.segment_utterances(utterances)
    assert [s.id for s in segments] == ["u0#0", "u1#0", "u2#0"]
    with pytest.raises(KeyError, match="skipped"):
        cache.read_features("u1x#0")
    for segment in segments:
        wave = load_audio(audio / segment.path)
        assert torch.equal(torch.from_numpy(cache.read_features(segment.id)), frontend(wave))


# ---------------------------------------------------------------- the dev part
def test_the_dev_data_are_cached_beside_the_training_data(assets, tmp_path: Path, capsys) -> None:
    cfg = _config(assets, tmp_path, f"data.dev={assets['dev']}", "train.precision=fp32")
    cache = tmp_path / "cache"
    summary = build_cache(cfg, cache, progress=False)
    assert summary.num_segments == 8 and summary.dev is not None
    assert summary.dev.directory == cache / DEV_DIR and summary.dev.num_segments == 3
    assert any(line.startswith("dev: 3 segments") for line in summary.lines())
    dev = open_cache(cache / DEV_DIR)
    assert [(r["id"], r["num_samples"]) for r in dev.rows] == [
        ("d0#0", 16000),
        ("d1#0", 48000),
        ("d1#1", 16000),
    ]
    assert dev.layers == [2, 4] and not (cache / DEV_DIR / BUILD_CONFIG_FILE).exists()
    teacher = load_teacher(str(assets["teacher"]))
    wave = load_audio(assets["dev"] / "d1.wav", offset_s=3.0, duration_s=1.0)
    reference = _teacher_states(teacher, wave, [4])[4].numpy()
    cached = dev.read("d1#1")[4].astype(np.float32)
    np.testing.assert_allclose(cached, reference, rtol=2e-3, atol=2e-3)
    # The training part is a cache of its own: the nested directory does not disturb it.
    assert len(open_cache(cache).rows) == 8
    # A cache built before dev was cached: a rerun adds the dev part only.
    shutil.rmtree(cache / DEV_DIR)
    again = build_cache(cfg, cache, progress=False)
    assert again.built == 0 and again.dev is not None and again.dev.built == 3
    # Another run's dev data: refused, naming the data; a partial dev part names the command
    # that completes it, which is the training cache's build.
    other = _config(assets, tmp_path, f"data.dev={assets['other_dev']}")
    teacher_layers = cache_teacher_layers(other, teacher)
    (dev_utts, _) = resolve_sources(other.data, 0)[1]
    with pytest.raises(StaleCacheError, match="data: .*rebuilds the dev part alone"):
        open_dev_cache(replace_cache(other, cache), teacher, teacher_layers, dev_utts)
    shutil.rmtree(cache / DEV_DIR)  # as the message says
    rebuilt = build_cache(other, cache, progress=False)
    assert rebuilt.built == 0 and rebuilt.dev is not None and rebuilt.dev.num_segments == 1
    assert open_dev_cache(replace_cache(other, cache), teacher, teacher_layers, dev_utts)
    (cache / DEV_DIR / "complete").unlink()
    with pytest.raises(PartialCacheError) as err:
        open_cache(cache / DEV_DIR)
    assert f"--config {cache / BUILD_CONFIG_FILE} --out {cache}" in str(err.value)


def replace_cache(cfg, cache: Path):
    """``cfg`` with ``data.target_cache`` = ``cache``."""
    return replace(cfg, data=replace(cfg.data, target_cache=str(cache)))


def test_a_fully_cached_run_never_runs_the_teacher(
    assets, tmp_path: Path, monkeypatch, caplog
) -> None:
    """Training and dev targets from the cache: the teacher is never run, and stays on the CPU.
    A cache without its dev part still serves, with the dev loss computed online."""
    dev = (f"data.dev={assets['dev']}", "train.eval_every=2")
    cache = tmp_path / "cache"
    assert _cli(assets, tmp_path, "cache-teacher", "--out", str(cache), *dev) == 0
    runs: list[int] = []
    real = step_module.teacher_targets

    def counted(*args, **kwargs):
        runs.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(step_module, "teacher_targets", counted)
    use = (f"data.target_cache={cache}", *dev, "train.max_steps=2")
    with caplog.at_level(logging.INFO, logger="colld"):
        assert _cli(assets, tmp_path, "distill", *use) == 0
    assert runs == [] and "the teacher stays on the CPU" in caplog.text
    rows = [json.loads(r) for r in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    dev_losses = [r["dev/loss"] for r in rows if "dev/loss" in r]
    assert len(dev_losses) == 2 and all(np.isfinite(dev_losses))  # steps 0 and 2

    # The run needs none of the teacher's weights: with them on the meta device (no data), its
    # updates and dev loss still run, as they do on a GPU with the teacher left on the CPU.
    cfg = _config(assets, tmp_path, *use[:2], f"train.output_dir={tmp_path / 'meta'}")
    run = setup(cfg, resume=False)
    run.teacher.encoder.to("meta")
    out, _, applied = train_update(run)
    assert applied and np.isfinite(float(out.total))
    assert np.isfinite(evaluate_dev(run)["dev/loss"])
    run.train.close()

    shutil.rmtree(cache / DEV_DIR)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="colld"):
        assert _cli(assets, tmp_path, "distill", *use, run="older-cache") == 0
    assert runs and "holds no dev targets" in caplog.text
    assert "the teacher stays on the CPU" not in caplog.text
