"""colld.data.readers: every layout, and every kind of bad entry skipped with a problem line."""

from __future__ import annotations

import builtins
import gzip
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from colld.audio import SAMPLE_RATE, AudioError, FrontEnd, load_audio
from colld.data.dataset import DistillDataset
from colld.data.manifest import (
    ManifestError,
    Utterance,
    read_manifest,
    row_to_utterance,
    write_manifest,
)
from colld.data.readers import (
    ReaderError,
    read_any,
    read_directory,
    read_hf_dataset,
    read_jsonl,
    read_lhotse,
    read_tsv,
    scan_directory,
)
from colld.data.utterance_audio import load_utterance
from colld.testing import harmonic_tone


def _tone(path: Path, seconds: float, rate: int = SAMPLE_RATE, channels: int = 1) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(round(seconds * rate)) / rate
    x = (0.3 * np.sin(2 * np.pi * 300 * t)).astype(np.float32)
    sf.write(path, np.stack([x] * channels, axis=1) if channels > 1 else x, rate)
    return path


def _write_bad(folder: Path) -> dict[str, Path]:
    """Files whose header shows the problem, and (last three) ones only decoding shows."""
    folder.mkdir(parents=True, exist_ok=True)
    bad = {
        "empty": folder / "empty.wav",
        "text": folder / "notaudio.wav",
        "zero": folder / "zero.wav",
        "truncated_wav": folder / "truncated.wav",
        "header_only": folder / "header_only.wav",
    }
    bad["empty"].write_bytes(b"")
    bad["text"].write_text("not audio at all\n" * 10)
    sf.write(bad["zero"], np.zeros(0, np.float32), SAMPLE_RATE)
    data = _tone(folder / "_src.wav", 1.0).read_bytes()
    bad["truncated_wav"].write_bytes(data[: len(data) // 2])
    bad["header_only"].write_bytes(data[:30])
    (folder / "_src.wav").unlink()
    decode_only = {"nan": folder / "nan.wav", "inf": folder / "inf.wav"}
    for name, value in (("nan", np.nan), ("inf", np.inf)):
        x = np.full(8000, 0.1, np.float32)
        x[10] = value
        sf.write(decode_only[name], x, SAMPLE_RATE, subtype="FLOAT")
    flac = _tone(folder / "_src.flac", 1.0).read_bytes()
    (folder / "truncated.flac").write_bytes(flac[: len(flac) // 2])
    (folder / "_src.flac").unlink()
    decode_only["truncated_flac"] = folder / "truncated.flac"
    return bad | decode_only


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    """A folder of good files in several formats and rates, nested, plus bad files."""
    root = tmp_path / "corpus"
    _tone(root / "spk1" / "a.wav", 1.0)
    _tone(root / "spk1" / "b.FLAC", 1.25, rate=44100, channels=2)
    _tone(root / "spk2" / "deep" / "c.ogg", 0.5, rate=8000)
    _tone(root / "spk2" / "d.mp3", 2.0)
    (root / "spk2" / "notes.txt").write_text("ignored: not an audio suffix")
    _write_bad(root / "bad")
    return root


GOOD_IDS = ["spk1/a", "spk1/b", "spk2/d", "spk2/deep/c"]


# ---------------------------------------------------------------- directory
def test_read_directory(corpus: Path) -> None:
    utterances, root, problems = read_directory(corpus)
    assert root == corpus
    by_id = {u.id: u for u in utterances}
    # nan/inf/truncated FLAC look fine in the header; the five header-visible bad files are skipped
    assert sorted(by_id) == sorted(GOOD_IDS + ["bad/nan", "bad/inf", "bad/truncated"])
    assert by_id["spk1/b"].path == "spk1/b.FLAC"
    assert by_id["spk1/b"].duration == pytest.approx(1.25)
    assert by_id["spk2/deep/c"].duration == pytest.approx(0.5)
    assert by_id["spk2/d"].duration == pytest.approx(2.0, abs=0.03)
    assert all(u.resolved_path(root).is_file() for u in utterances)
    assert len(problems) == 5
    for name in ("empty.wav", "notaudio.wav", "zero.wav", "truncated.wav", "header_only.wav"):
        assert sum(name in line for line in problems) == 1, (name, problems)


def test_read_directory_verify_decodes(corpus: Path) -> None:
    utterances, _, problems = read_directory(corpus, verify=True)
    assert sorted(u.id for u in utterances) == GOOD_IDS
    assert len(problems) == 8
    assert any("nan.wav" in p and "NaN/Inf" in p for p in problems)
    assert any("inf.wav" in p for p in problems)
    assert any("truncated.flac" in p for p in problems)


def test_read_directory_duplicate_ids_and_cycles(tmp_path: Path) -> None:
    _tone(tmp_path / "x" / "a.wav", 0.5)
    _tone(tmp_path / "x" / "a.flac", 0.5)
    (tmp_path / "x" / "loop").symlink_to(tmp_path / "x", target_is_directory=True)
    utterances, _, problems = read_directory(tmp_path / "x")
    assert [u.id for u in utterances] == ["a"]
    assert len(problems) == 1 and "duplicate id 'a'" in problems[0]


def test_read_directory_nothing_usable(tmp_path: Path) -> None:
    _write_bad(tmp_path / "only_bad")
    with pytest.raises(ReaderError, match="only_bad: no usable utterances") as info:
        read_directory(tmp_path / "only_bad", verify=True)
    assert "8 skipped" in str(info.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ReaderError, match="empty: no audio files"):
        read_directory(tmp_path / "empty")
    with pytest.raises(ReaderError, match="not a directory"):
        read_directory(tmp_path / "nope")


def test_scan_directory_writes_a_manifest(corpus: Path, tmp_path: Path) -> None:
    inside = scan_directory(corpus, corpus / "manifest.jsonl")
    utterances, problems = read_manifest(inside)
    assert problems == []
    assert sorted(u.id for u in utterances) == sorted(
        GOOD_IDS + ["bad/nan", "bad/inf", "bad/truncated"]
    )
    assert all(not Path(u.path).is_absolute() for u in utterances)
    assert all(u.resolved_path(corpus).is_file() for u in utterances)
    elsewhere = scan_directory(corpus, tmp_path / "out" / "m.jsonl", verify=True)
    utterances, _ = read_manifest(elsewhere)
    assert sorted(u.id for u in utterances) == GOOD_IDS
    assert all(Path(u.path).is_absolute() and Path(u.path).is_file() for u in utterances)
    assert read_any(elsewhere).utterances == utterances


# ---------------------------------------------------------------- JSONL
def test_read_jsonl_skips_bad_rows(tmp_path: Path) -> None:
    _tone(tmp_path / "audio" / "a.wav", 1.0)
    _tone(tmp_path / "audio" / "b.wav", 1.0)
    rows = [
        {"id": "a", "path": "audio/a.wav", "duration": 1.0, "language": "en"},
        {"id": "b", "path": str(tmp_path / "audio" / "b.wav"), "duration": 1.0},
        {"id": "a", "path": "audio/b.wav", "duration": 1.0},  # duplicate id
        {"id": "c", "path": "audio/missing.wav", "duration": 1.0},  # missing file
        {"id": "d", "path": "audio/a.wav", "duration": "1.0"},  # wrong type
        {"id": "e", "duration": 1.0},  # no path
        {"id": "f", "path": "audio/a.wav", "duration": 0.0},  # zero length
        {"id": "g", "path": "audio/a.wav", "duration": 1.0, "language": 7},  # wrong type
    ]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n".join(json.dumps(r) for r in rows) + "\n{not json\n")
    result = read_jsonl(manifest)
    assert [u.id for u in result.utterances] == ["a", "b"]
    assert result.root == tmp_path
    assert len(result.problems) == 7
    for needle in (
        "duplicate id 'a'",
        "missing.wav",
        "'duration'",
        "'path'",
        "duration 0.0",
        "'language'",
        "JSON",
    ):
        assert any(needle in line for line in result.problems), needle
    assert read_any(manifest).utterances == result.utterances


def test_read_jsonl_nothing_usable(tmp_path: Path) -> None:
    manifest = write_manifest(
        [Utterance(id="x", path="gone.wav", duration=1.0)], tmp_path / "m.jsonl"
    )
    with pytest.raises(ReaderError, match=r"m\.jsonl: no usable utterances.*gone\.wav"):
        read_any(manifest)


def test_manifest_offset_zero_is_a_region_and_no_offset_the_whole_file(tmp_path: Path) -> None:
    rows = [
        Utterance(id="head", path="a.wav", duration=1.5, offset=0.0),
        Utterance(id="whole", path="a.wav", duration=4.0),
        Utterance(id="mid", path="a.wav", duration=1.0, offset=2.0),
    ]
    path = write_manifest(rows, tmp_path / "m.jsonl")
    lines = path.read_text().splitlines()
    assert json.loads(lines[0])["offset"] == 0.0 and json.loads(lines[2])["offset"] == 2.0
    assert lines[1] == (  # whole-file rows: the layout manifests had before regions existed
        '{"id": "whole", "path": "a.wav", "duration": 4.0, "language": null, "voice": null, '
        '"text": null, "text_en": null, "phonemes": null, "split": null, "sentence_id": null}'
    )
    read, problems = read_manifest(path)
    assert read == rows and problems == []
    assert [(u.is_region, u.start) for u in read] == [(True, 0.0), (False, 0.0), (True, 2.0)]

    old = tmp_path / "old.jsonl"
    old.write_text(
        '{"id": "a", "path": "a.wav", "duration": 1.0}\n'
        '{"id": "b", "path": "b.wav", "duration": 1.0, "offset": null}\n'
        '{"id": "c", "path": "c.wav", "duration": 1.0, "offset": 0}\n'
    )
    read, _ = read_manifest(old)
    assert [u.offset for u in read] == [None, None, 0.0]

    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        '{"id": "x", "path": "x.wav", "duration": 1.0, "offset": -0.5}\n'
        '{"id": "y", "path": "y.wav", "duration": 1.0, "offset": true}\n'
        '{"id": "z", "path": "z.wav", "duration": 1.0, "offset": "0"}\n'
    )
    utterances, problems = read_manifest(bad)
    assert utterances == []
    assert [p.split(": field")[0] for p in problems] == [f"{bad}:{n}" for n in (1, 2, 3)]
    assert all("'offset'" in p for p in problems)
    assert "found -0.5" in problems[0] and "found True" in problems[1] and "'0'" in problems[2]


# ---------------------------------------------------------------- TSV
def test_read_tsv_with_header(tmp_path: Path) -> None:
    _tone(tmp_path / "wavs" / "a.wav", 1.0)
    _tone(tmp_path / "wavs" / "b.flac", 2.0)
    lines = [
        "id\tpath\tduration\tsentence\tlocale\tclient_id",
        "a\twavs/a.wav\t1.0\tHello there.\ten\tspk1",
        "b\twavs/b.flac\t2.0\t\tde\t",
        "a\twavs/b.flac\t2.0\tdup\ten\tspk1",  # duplicate id
        "c\twavs/a.wav\tabc\tx\ten\tspk1",  # wrong-typed duration
        "d\twavs/a.wav\t1.0",  # missing fields
        "e\t\t1.0\tx\ten\tspk1",  # empty path
        "f\twavs/none.wav\t1.0\tx\ten\tspk1",  # missing file
        "g\twavs/a.wav\t-1\tx\ten\tspk1",  # negative duration
    ]
    tsv = tmp_path / "train.tsv"
    tsv.write_text("\n".join(lines) + "\n")
    utterances, root, problems = read_tsv(tsv)
    assert root == tmp_path
    assert [u.id for u in utterances] == ["a", "b"]
    a, b = utterances
    assert (a.text, a.language, a.voice, a.duration) == ("Hello there.", "en", "spk1", 1.0)
    assert (b.text, b.language, b.voice) == (None, "de", None)
    assert len(problems) == 6
    for needle in (
        ":4: ",
        "'abc' is not a number",
        "found 3",
        "empty path",
        "none.wav",
        "duration -1.0",
    ):
        assert any(needle in line for line in problems), (needle, problems)
    assert read_any(tsv).utterances == utterances


def test_read_tsv_common_voice_layout_without_durations(tmp_path: Path) -> None:
    _tone(tmp_path / "clips" / "cv_1.mp3", 1.5)
    _tone(tmp_path / "clips" / "cv_2.mp3", 0.8)
    (tmp_path / "clips" / "cv_3.mp3").write_text("not an mp3")
    tsv = tmp_path / "validated.tsv"
    tsv.write_text(
        "client_id\tpath\tsentence\tup_votes\tlocale\n"
        'c1\tcv_1.mp3\tEin "Satz".\t2\tde\n'
        "c2\tcv_2.mp3\tNoch einer.\t3\tde\n"
        "c3\tcv_3.mp3\tKaputt.\t1\tde\n"
    )
    utterances, root, problems = read_tsv(tsv)
    assert root == tmp_path / "clips"
    assert [u.id for u in utterances] == ["cv_1", "cv_2"]
    assert utterances[0].text == 'Ein "Satz".'  # no CSV quoting
    assert utterances[0].duration == pytest.approx(1.5, abs=0.03)
    assert utterances[1].voice == "c2" and utterances[1].language == "de"
    assert len(problems) == 1 and "cv_3.mp3" in problems[0] and ":4:" in problems[0]


def test_read_fairseq_tsv(tmp_path: Path) -> None:
    _tone(tmp_path / "audio" / "s1" / "u1.flac", 1.0)
    _tone(tmp_path / "audio" / "s1" / "u2.flac", 0.5)
    tsv = tmp_path / "manifests" / "train.tsv"
    tsv.parent.mkdir()
    tsv.write_text(
        "../audio\n"
        "s1/u1.flac\t16000\n"
        "s1/u2.flac\t8000\n"
        "s1/u3.flac\t16000\n"  # missing file
        "s1/u1.flac\tlots\n"  # wrong type
        "s1/u2.flac\n"  # missing field
    )
    utterances, root, problems = read_tsv(tsv)
    assert root == tmp_path / "manifests" / "../audio"
    assert [(u.id, u.path, u.duration) for u in utterances] == [
        ("s1/u1", "s1/u1.flac", 1.0),
        ("s1/u2", "s1/u2.flac", 0.5),
    ]
    assert len(problems) == 3
    assert any("u3.flac" in p for p in problems)
    assert any("'lots' is not a whole number" in p for p in problems)
    assert any(":6:" in p for p in problems)
    (tmp_path / "abs.tsv").write_text(f"{tmp_path / 'audio'}\ns1/u2.flac\t8000\n")
    assert read_any(tmp_path / "abs.tsv").root == tmp_path / "audio"


def test_read_tsv_rejects_unknown_layouts(tmp_path: Path) -> None:
    tsv = tmp_path / "x.tsv"
    tsv.write_text("name\tseconds\nfoo.wav\t1.0\n")
    with pytest.raises(ReaderError, match="x.tsv: the first line is neither"):
        read_tsv(tsv)
    tsv.write_text("\n")
    with pytest.raises(ReaderError, match="empty TSV"):
        read_tsv(tsv)
    tsv.write_text("path\tduration\nnothere.wav\t1.0\n")
    with pytest.raises(ReaderError, match=r"x\.tsv: no usable utterances"):
        read_tsv(tsv)


# ---------------------------------------------------------------- lhotse
def _lhotse_manifests(tmp_path: Path) -> tuple[Path, Path]:
    from lhotse import CutSet, MonoCut, Recording, RecordingSet, SupervisionSegment
    from lhotse.audio import AudioSource

    rec_a = Recording.from_file(_tone(tmp_path / "wav" / "a.wav", 2.0), recording_id="ra")
    rec_b = Recording.from_file(_tone(tmp_path / "wav" / "b.wav", 1.0), recording_id="rb")
    stereo = Recording.from_file(
        _tone(tmp_path / "wav" / "st.wav", 1.0, channels=2), recording_id="st"
    )
    url = Recording(
        id="web",
        sources=[AudioSource(type="url", channels=[0], source="https://example.org/x.wav")],
        sampling_rate=16000,
        num_samples=16000,
        duration=1.0,
    )
    sup = SupervisionSegment(
        id="sa",
        recording_id="ra",
        start=0.0,
        duration=2.0,
        text="hello world",
        language="en",
        speaker="spk7",
    )
    whole = MonoCut(
        id="cut-a", start=0.0, duration=2.0, channel=0, recording=rec_a, supervisions=[sup]
    )
    cuts = CutSet.from_cuts(
        [
            whole,
            rec_b.to_cut(),
            whole.truncate(offset=0.5, duration=1.0).with_id("cut-a-seg"),  # a segment
            MonoCut(id="st-right", start=0.0, duration=1.0, channel=1, recording=stereo),
            stereo.to_cut().with_id("st-both"),  # MultiCut over both channels: kept, downmixed
            url.to_cut(),
        ]
    )
    cut_path = tmp_path / "cuts.jsonl.gz"
    cuts.to_file(cut_path)
    with gzip.open(cut_path, "at") as f:
        f.write('{"id": "broken", "type": "MonoCut"}\n')
    rec_path = tmp_path / "recordings.jsonl"
    RecordingSet.from_recordings([rec_a, rec_b]).to_file(rec_path)
    return cut_path, rec_path


def test_read_lhotse_cutset(tmp_path: Path) -> None:
    cut_path, rec_path = _lhotse_manifests(tmp_path)
    utterances, _, problems = read_lhotse(cut_path)
    by_id = {u.id: u for u in utterances}
    assert sorted(by_id) == ["cut-a", "cut-a-seg", "rb", "st-both", "st-right"]
    assert (by_id["st-right"].channel, by_id["st-both"].channel, by_id["rb"].channel) == (
        1,
        None,
        None,
    )
    a = by_id["cut-a"]
    assert (a.text, a.language, a.voice, a.duration) == ("hello world", "en", "spk7", 2.0)
    assert Path(a.path) == (tmp_path / "wav" / "a.wav").absolute()
    assert a.offset is None and by_id["rb"].offset is None  # whole recordings: whole files
    segment = by_id["cut-a-seg"]
    assert (segment.offset, segment.duration, segment.path) == (0.5, 1.0, a.path)
    assert len(problems) == 2
    assert any("'url' source" in p for p in problems)
    assert any(":7:" in p and "not a lhotse cut" in p for p in problems)
    assert read_any(cut_path).utterances == utterances

    recordings = read_any(rec_path)  # .jsonl holding lhotse recordings, not a colld manifest
    assert [(u.id, u.duration) for u in recordings.utterances] == [("ra", 2.0), ("rb", 1.0)]


def test_read_lhotse_channels_match_lhotse(tmp_path: Path) -> None:
    """One channel of a multi-channel recording reads that channel alone, equal to lhotse's
    own ``load_audio`` of the cut, for one multi-channel file and for one file per channel."""
    from lhotse import CutSet, MonoCut, MultiCut, Recording
    from lhotse.audio import AudioSource

    t = np.arange(SAMPLE_RATE) / SAMPLE_RATE
    columns = [0.5 * np.sin(2 * np.pi * f * t) for f in (220.0, 330.0, 550.0)]
    (tmp_path / "wav").mkdir()
    sf.write(tmp_path / "wav" / "three.wav", np.stack(columns, axis=1), SAMPLE_RATE)
    three = Recording.from_file(tmp_path / "wav" / "three.wav", recording_id="three")
    for k, column in enumerate(columns):
        sf.write(tmp_path / "wav" / f"mic{k}.wav", column, SAMPLE_RATE)
    per_file = Recording(
        id="array",
        sources=[
            AudioSource(type="file", channels=[k], source=str(tmp_path / "wav" / f"mic{k}.wav"))
            for k in range(3)
        ],
        sampling_rate=SAMPLE_RATE,
        num_samples=SAMPLE_RATE,
        duration=1.0,
    )
    cuts = [
        MonoCut(id="three-2", start=0.25, duration=0.5, channel=2, recording=three),
        MonoCut(id="array-1", start=0.0, duration=1.0, channel=1, recording=per_file),
        MultiCut(id="three-all", start=0.0, duration=1.0, channel=[0, 1, 2], recording=three),
        MultiCut(id="three-01", start=0.0, duration=1.0, channel=[0, 1], recording=three),
        MultiCut(id="array-all", start=0.0, duration=1.0, channel=[0, 1, 2], recording=per_file),
    ]
    path = tmp_path / "cuts.jsonl"
    CutSet.from_cuts(cuts).to_file(path)
    utterances, _, problems = read_lhotse(path)
    by_id = {u.id: u for u in utterances}
    assert sorted(by_id) == ["array-1", "three-2", "three-all"]
    assert by_id["three-2"].channel == 2 and by_id["three-2"].offset == 0.25
    assert by_id["array-1"].channel is None  # its own mono file
    assert Path(by_id["array-1"].path).name == "mic1.wav"
    assert any("three-01" in p and "channels [0, 1]" in p for p in problems)
    assert any("array" in p and "3 sources" in p for p in problems)
    for cut in cuts[:3]:
        ours = load_utterance(by_id[cut.id], tmp_path, SAMPLE_RATE)
        theirs = cut.load_audio()
        expected = theirs.mean(axis=0) if theirs.shape[0] > 1 else theirs[0]
        np.testing.assert_allclose(ours, expected, atol=1e-6, err_msg=cut.id)
    # the channel survives a manifest round trip; a bad channel value is named
    written = write_manifest(utterances, tmp_path / "m.jsonl")
    assert read_manifest(written)[0] == utterances
    row = json.loads(written.read_text().splitlines()[0])
    with pytest.raises(ManifestError, match=r"field 'channel' should be an integer >= 0"):
        row_to_utterance({**row, "channel": -1}, "m.jsonl:1")
    with pytest.raises(AudioError, match=r"channel 3 requested, the file has 3"):
        load_audio(tmp_path / "wav" / "three.wav", channel=3)


def test_read_lhotse_relative_sources_and_nothing_usable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lhotse import CutSet, Recording

    _tone(tmp_path / "wav" / "a.wav", 1.0)
    monkeypatch.chdir(tmp_path)
    cuts = CutSet.from_cuts([Recording.from_file("wav/a.wav", recording_id="a").to_cut()])
    cuts.to_file(tmp_path / "c.jsonl")
    monkeypatch.chdir("/")  # relative to the manifest's folder when not found from the cwd
    (utt,) = read_lhotse(tmp_path / "c.jsonl").utterances
    assert Path(utt.path) == tmp_path / "wav" / "a.wav"
    (tmp_path / "wav" / "a.wav").unlink()
    with pytest.raises(ReaderError, match=r"c\.jsonl: no usable utterances.*not found"):
        read_any(tmp_path / "c.jsonl")


def test_read_lhotse_segments_load_exactly_their_samples(tmp_path: Path) -> None:
    """Segments of a FLAC recording (one from 0.0 s, shorter than the recording) read as
    regions; the dataset then loads exactly the samples soundfile reads for each."""
    from lhotse import CutSet, MonoCut, Recording

    flac = tmp_path / "long.flac"
    sf.write(flac, harmonic_tone(3.0, np.random.default_rng(0)), SAMPLE_RATE)
    recording = Recording.from_file(flac, recording_id="long")
    whole = recording.to_cut()
    segments = {
        "head": (0.0, 1.25),  # starts at 0, shorter than the recording
        "middle": (1.0, 0.75),
        "tail": (2.5, 0.5),
    }
    cuts = [whole] + [
        whole.truncate(offset=start, duration=seconds).with_id(name)
        for name, (start, seconds) in segments.items()
    ]
    past = MonoCut(id="past", start=2.5, duration=1.0, channel=0, recording=recording)
    path = tmp_path / "cuts.jsonl.gz"
    CutSet.from_cuts([*cuts, past]).to_file(path)
    utterances, root, problems = read_lhotse(path, verify=True)
    by_id = {u.id: u for u in utterances}
    assert sorted(by_id) == sorted([whole.id, *segments])
    assert by_id[whole.id].offset is None
    assert {name: (by_id[name].offset, by_id[name].duration) for name in segments} == segments
    assert len(problems) == 1 and "'past'" in problems[0] and "past the end" in problems[0]

    frontend = FrontEnd.for_family("wav2vec2", do_normalize=False)
    dataset = DistillDataset(root, frontend, max_duration=None)
    for name, (start, seconds) in segments.items():
        first, num = round(start * SAMPLE_RATE), round(seconds * SAMPLE_RATE)
        expected, _ = sf.read(flac, start=first, frames=num, dtype="float32")
        np.testing.assert_array_equal(dataset.prepare_waveform(by_id[name], 0), expected)
        lhotse_audio = next(c for c in cuts if c.id == name).load_audio()[0]
        np.testing.assert_allclose(expected, lhotse_audio, atol=1e-6)  # what lhotse reads
    assert dataset.prepare_waveform(by_id[whole.id], 0).shape == (3 * SAMPLE_RATE,)
    batch = dataset[list(by_id.values())]
    assert batch.feature_lengths.tolist() == [48000, 20000, 12000, 8000]

    manifest = write_manifest(utterances, tmp_path / "segments.jsonl")
    assert read_jsonl(manifest).utterances == utterances  # regions (from 0 too) survive


# ---------------------------------------------------------------- Hugging Face datasets
def test_read_hf_dataset(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    datasets.disable_progress_bars()
    a = _tone(tmp_path / "src" / "a.wav", 1.0)
    b = _tone(tmp_path / "src" / "b.flac", 0.5, rate=22050)
    broken = tmp_path / "src" / "broken.wav"
    broken.write_text("nope")
    table = {
        "audio": [str(a), str(b), str(broken)],
        "sentence": ["one", "two", "three"],
        "speaker_id": [1, 2, 3],
    }
    ds = datasets.Dataset.from_dict(table).cast_column("audio", datasets.Audio())
    ds.save_to_disk(str(tmp_path / "single"))
    datasets.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(str(tmp_path / "dd"))
    for source in (a, b, broken):
        source.unlink()  # save_to_disk embedded the bytes: the reader must not need the sources

    utterances, root, problems = read_any(tmp_path / "single")
    assert root == tmp_path / "single-audio"
    assert [(u.id, u.text, u.voice, u.split) for u in utterances] == [
        ("a", "one", "1", None),
        ("b", "two", "2", None),
    ]
    assert utterances[0].duration == pytest.approx(1.0) and utterances[1].duration == pytest.approx(
        0.5
    )
    assert all(u.resolved_path(root).is_file() for u in utterances)
    assert len(problems) == 1 and "[2]" in problems[0] and "broken" in problems[0]
    again = read_hf_dataset(tmp_path / "single")  # second run reuses the exported files
    assert again.utterances == utterances

    both = read_hf_dataset(tmp_path / "dd", export_dir=tmp_path / "exp")
    assert [(u.id, u.split) for u in both.utterances] == [("a", "train"), ("b", "train")]
    assert any("duplicate id 'a'" in p for p in both.problems)  # the test split repeats row 0
    test_only = read_hf_dataset(tmp_path / "dd", split="test", export_dir=tmp_path / "exp")
    assert [(u.id, u.split) for u in test_only.utterances] == [("a", "test")]
    with pytest.raises(ReaderError, match="no split 'dev'"):
        read_hf_dataset(tmp_path / "dd", split="dev")
    with pytest.raises(ReaderError, match="no audio column 'speech'"):
        read_hf_dataset(tmp_path / "single", audio_column="speech")


def test_read_hf_dataset_with_path_strings(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    datasets.disable_progress_bars()
    _tone(tmp_path / "files" / "x.wav", 1.0)
    ds = datasets.Dataset.from_dict({"file": ["files/x.wav", "files/gone.wav"], "id": ["u1", "u2"]})
    ds.save_to_disk(str(tmp_path / "paths"))
    shutil.move(tmp_path / "files", tmp_path / "paths" / "files")  # relative to the dataset folder
    utterances, _, problems = read_hf_dataset(tmp_path / "paths", audio_column="file")
    assert [(u.id, Path(u.path)) for u in utterances] == [
        ("u1", tmp_path / "paths" / "files" / "x.wav")
    ]
    assert len(problems) == 1 and "gone.wav" in problems[0]


def test_read_hf_dataset_without_the_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_import = builtins.__import__

    def no_datasets(name: str, *args: object, **kwargs: object) -> object:
        if name == "datasets":
            raise ImportError("No module named 'datasets'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_datasets)
    with pytest.raises(ImportError, match="pip install datasets"):
        read_hf_dataset(tmp_path)


# ---------------------------------------------------------------- dispatch
def test_read_any_dispatch_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="missing"):
        read_any(tmp_path / "missing")
    (tmp_path / "notes.csv").write_text("a,b\n")
    with pytest.raises(ReaderError, match=r"notes\.csv: cannot tell what this is"):
        read_any(tmp_path / "notes.csv")


def test_real_speech_corpus_round_trip(tmp_path: Path) -> None:
    """espeak-ng speech at 22050 Hz: directory -> manifest -> read_any -> load_audio at 16 kHz."""
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed")
    from colld.audio import load_audio

    for language, text in (("en", "One small step for a man."), ("fr", "Bonjour tout le monde.")):
        wav = tmp_path / "speech" / language / "utt.wav"
        wav.parent.mkdir(parents=True)
        subprocess.run(["espeak-ng", "-v", language, "-w", str(wav), text], check=True)
    manifest = scan_directory(tmp_path / "speech", tmp_path / "speech.jsonl")
    utterances, root, problems = read_any(manifest)
    assert problems == [] and root == tmp_path and len(utterances) == 2
    for utt in utterances:
        x = load_audio(utt.resolved_path(root))
        assert abs(len(x) / SAMPLE_RATE - utt.duration) < 1e-3
