"""The model card (README.md) of an exported student: rendering, export, update after
evaluation. Fabricated provenance and results; one tiny Whisper student for the export."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from transformers import WhisperFeatureExtractor

from colld.eval.evaluate import refresh_model_cards
from colld.objectives.objective import ObjectiveConfig
from colld.students import card as card_module
from colld.students.build import StudentSpec, build_student
from colld.students.card import (
    CARD_FILE,
    NOT_MEASURED,
    CardScore,
    StudentFacts,
    render_card,
    update_card,
)
from colld.students.export import export_student, read_provenance
from colld.teachers.hf import wrap_hf_teacher
from colld.testing import fake_result, tiny_model

FACTS = StudentFacts(
    family="whisper",
    model_class="WhisperEncoder",
    num_layers=6,
    hidden_dim=256,
    parameters=6_234_567,
    frame_rate=50.0,
)
VALUES = {"lid": 0.8125, "sid": 0.6437, "pr": 0.2931, "char": 0.4018}


def fake_provenance(*, teacher: str = "whisper-base", steps: int = 250) -> dict[str, Any]:
    """What ``colld.train.recipe.provenance`` records, with made-up numbers."""
    objective = {**vars(ObjectiveConfig()), "tau": 0.07, "num_negatives": 64}
    return {
        "colld_version": "0.1.0",
        "argv": ["/venv/bin/colld", "distill", "--output", "runs/my run", "train.max_steps=250"],
        "teacher": {"spec": teacher, "fingerprint": "f" * 64, "parameters": 20_590_592},
        "objective": objective,
        "pairs": [[i, i] for i in range(1, 7)],
        "student_dim": 256,
        "num_student_layers": 6,
        "teacher_dim": 512,
        "num_teacher_layers": 6,
        "steps": steps,
        "audio_hours_seen": 5.5417,
        "data": {
            "source": "embedded",
            "train": None,
            "train_utterances": 1234,
            "train_hours": 1.2143,
            "corpus_dir": "data/corpus",
            "languages": ["en", "de", "fr"],
            "espeak_ng_version": "1.51",
        },
        "config": {
            "data": {"batch_seconds": 80.0, "corpus_dir": "data/corpus", "train": None},
            "train": {"grad_accum": 1, "lr": 0.0005, "seed": 7},
        },
    }


def front_matter(text: str) -> dict[str, Any]:
    match = re.match(r"---\n(.*?)\n---\n", text, re.DOTALL)
    assert match, "the card must open with YAML front matter"
    return yaml.safe_load(match.group(1))


def outside_sections(text: str) -> str:
    """The card without the bodies of the two sections ``update_card`` owns."""
    for name in ("efficiency", "scores"):
        text = re.sub(rf"<!-- colld:{name} -->\n.*?<!-- /colld:{name} -->", "", text, flags=re.S)
    return text


def test_card_holds_front_matter_provenance_and_every_result_number() -> None:
    result = fake_result("student:run", "student", VALUES, parameters=6_234_567)
    score = CardScore(
        value=512.4,
        teacher="whisper-base",
        per_task={"lid": 700.2, "sid": 324.6},
        flagged={"pr": "teacher and fbank differ by 0.0100 < 0.0200"},
    )
    text = render_card(FACTS, fake_provenance(), name="student", result=result, score=score)
    meta = front_matter(text)
    assert meta == {
        "library_name": "transformers",
        "license": "mit",
        "tags": ["colld", "knowledge-distillation", "speech", "audio", "whisper"],
        "base_model": "openai/whisper-base",
        "pipeline_tag": "feature-extraction",
    }
    # Every number of the result's probes and efficiency.
    for summary in result["probes"].values():
        assert f"{summary['mean']:.3f} ± {summary['std']:.3f}" in text
        for value in summary["per_language"].values():
            assert f"{value:.3f}" in text
    eff = result["efficiency"]
    assert f"| parameters | {eff['parameters']:,} (6.23 M) |" in text
    assert f"| FLOPs per audio second | {eff['flops_per_audio_second'] / 1e9:.2f} G |" in text
    assert f"{eff['rtf_batch1']:.4f} (100x faster than real time)" in text
    assert f"{eff['rtf_batched']:.4f}" in text and f"{eff['latency_batch1_s']:.3f} s" in text
    assert result["created"] in text and "**512**" in text and "lid 700, sid 325" in text
    assert "`pr` left out: teacher and fbank differ" in text
    # Provenance: teacher, size, objective, data, training, command, limitations.
    assert "6 layers x 256 wide, 6.23 M parameters" in text
    assert "(6 layers x 512, 20.59 M parameters" in text and "3.30x fewer parameters" in text
    assert "tau 0.07, K = 64 negatives" in text and "spans of 10 frames, mask_prob 0.65" in text
    assert "normalised by layer_norm" in text and "s1->t1, s2->t2" in text and "s6->t6" in text
    assert "espeak-ng 1.51, 3 languages), train split 1.21 h in 1234 utterances" in text
    assert "250 updates, 5.54 h of audio seen; batches of 80.0 s" in text and "seed 7" in text
    assert "colld distill --output 'runs/my run' train.max_steps=250" in text
    assert "1.21 hours of synthetic espeak-ng speech" in text
    assert "distillation demo, not a production model" in text
    assert "WhisperEncoder.from_pretrained(" in text and "AutoModel.from_pretrained" not in text


def test_card_without_evaluation_or_known_licence(tmp_path: Path) -> None:
    teacher_dir = tmp_path / "my-teacher"
    teacher_dir.mkdir()
    prov = fake_provenance(teacher=str(teacher_dir), steps=0)
    facts = StudentFacts(**{**vars(FACTS), "family": "wav2vec2", "model_class": "Wav2Vec2Model"})
    text = render_card(facts, prov)
    meta = front_matter(text)
    assert meta["license"] == "unknown" and "base_model" not in meta
    assert "Licence: unknown (no model card of" in text
    assert text.count(NOT_MEASURED) == 2 and "Untrained" in text
    assert "AutoModel.from_pretrained(" in text
    # A teacher directory with its own card gives its licence.
    (teacher_dir / CARD_FILE).write_text("---\nlicense: apache-2.0\n---\n# teacher\n")
    assert front_matter(render_card(facts, prov))["license"] == "apache-2.0"
    # A hub id becomes base_model; no provenance at all still renders.
    hub = render_card(facts, fake_provenance(teacher="facebook/w2v-bert-2.0"))
    assert front_matter(hub)["base_model"] == "facebook/w2v-bert-2.0"
    bare = render_card(facts, None)
    assert front_matter(bare)["license"] == "unknown" and "teacher is unknown" in bare


def _export_tiny(out_dir: Path, metadata: dict[str, Any] | None) -> Path:
    sizes = dict(num_layers=2, hidden=32, heads=2, ffn=64, num_mel_bins=16)
    teacher = wrap_hf_teacher(tiny_model("whisper", **sizes, max_source_positions=64)).encoder
    student = build_student(teacher, StudentSpec(init="teacher"), seed=0)
    return export_student(
        student, WhisperFeatureExtractor(feature_size=16), out_dir, metadata=metadata
    )


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    prov = fake_provenance()
    prov["teacher"]["fingerprint"] = "teacher-fp"
    return _export_tiny(tmp_path_factory.mktemp("export") / "student", prov)


def test_export_writes_the_card(exported: Path, tmp_path: Path) -> None:
    text = (exported / CARD_FILE).read_text()
    assert front_matter(text)["tags"][-1] == "whisper"
    assert "transformers `WhisperEncoder`): 2 layers x" in text
    assert text.count(NOT_MEASURED) == 2
    assert oct((exported / CARD_FILE).stat().st_mode & 0o777) == "0o644"
    bare = _export_tiny(tmp_path / "bare", None)  # no provenance: a card all the same
    assert "teacher is unknown" in (bare / CARD_FILE).read_text()


def test_update_replaces_only_the_two_sections(exported: Path, tmp_path: Path) -> None:
    card = tmp_path / "student"
    card.mkdir()
    before = (exported / CARD_FILE).read_text()
    (card / CARD_FILE).write_text(before)
    result = fake_result(str(card), "student", VALUES)
    assert update_card(card, result)
    once = (card / CARD_FILE).read_text()
    assert outside_sections(once) == outside_sections(before) and NOT_MEASURED not in once
    assert f"{VALUES['sid']:.3f} ± 0.001" in once and "Aggregate score: not computed" in once
    assert not update_card(card, result)  # idempotent: nothing to change
    assert (card / CARD_FILE).read_text() == once


def test_update_never_fails_the_evaluation(
    exported: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    result = fake_result("x", "student", VALUES)
    caplog.set_level(logging.WARNING)
    assert not update_card(tmp_path, result)  # no README
    assert "has no README.md" in caplog.text
    (tmp_path / CARD_FILE).write_text("# my own card\n")
    assert not update_card(tmp_path, result)  # no markers: left alone
    assert (tmp_path / CARD_FILE).read_text() == "# my own card\n"
    (tmp_path / CARD_FILE).write_text((exported / CARD_FILE).read_text())

    def read_only(*args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Read-only file system")

    monkeypatch.setattr(card_module, "write_text_atomic", read_only)
    assert not update_card(tmp_path, result)
    assert "could not update" in caplog.text and NOT_MEASURED in (tmp_path / CARD_FILE).read_text()


def test_evaluate_hook_adds_the_aggregate_when_teacher_and_fbank_sit_beside(
    exported: Path, tmp_path: Path
) -> None:
    student_dir = tmp_path / "student"
    student_dir.mkdir()
    for item in exported.iterdir():
        (student_dir / item.name).write_bytes(item.read_bytes())
    out = tmp_path / "results"
    out.mkdir()
    student = fake_result(str(student_dir), "student", VALUES)
    teacher = fake_result(
        "whisper-base", "teacher", {t: min(v + 0.1, 0.99) for t, v in VALUES.items()}
    )
    teacher["fingerprint"] = read_provenance(student_dir)["teacher"]["fingerprint"]
    fbank = fake_result("fbank", "fbank", {t: v - 0.2 for t, v in VALUES.items()})
    (out / "student.json").write_text(json.dumps(student))
    refresh_model_cards(out, student)  # alone: per-task numbers only
    assert "Aggregate score: not computed" in (student_dir / CARD_FILE).read_text()
    for result in (teacher, fbank):
        (out / f"{result['label']}.json").write_text(json.dumps(result))
    (out / "notes.json").write_text("[1, 2]")  # not a result: ignored
    refresh_model_cards(out, fbank)  # a reference result refreshes the students' cards
    text = (student_dir / CARD_FILE).read_text()
    assert "Aggregate score: **" in text and "1000 = the teacher `whisper-base`" in text
    assert outside_sections(text) == outside_sections((exported / CARD_FILE).read_text())
