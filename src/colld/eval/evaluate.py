"""``colld evaluate``: probes, mimicry and efficiency of one model, written as one JSON file.

A result file (schema ``colld-eval/2``) holds:
    model, label, kind ("teacher" | "student" | "fbank" | "onnx"), fingerprint,
    corpus: {dir, fingerprint (of the three probe manifests), utterances per split},
    probes: task -> summary over probe seeds (mean, std, per seed, per language, layer weights),
    position_retrieval: per hidden state, how much absolute position dominates (probe-test;
        see ``colld.eval.mimicry.position_retrieval``),
    mimicry: (students) teacher, per-pair cosine, CKA matrix student x teacher layers,
    efficiency: parameters, FLOPs per audio second, latency / real-time factor, peak memory,
    onnx: (ONNX exports) file, precision, source, runtime, why clips were not batched (None:
        they were; ``onnx_info``),
    settings (tasks, seeds, probe config), machine, created, seconds.
An ONNX export (``colld export --onnx``, fp32 or int8) is evaluated like any model, its
features computed by onnxruntime. What needs the torch module is measured another way or left
out with the reason recorded: FLOPs (``efficiency.skipped``), and mimicry, which is measured
through the export's source student directory when that still holds the exported weights
(``mimicry.skipped`` otherwise).
``colld compare`` reads these files; the same model evaluated with the same settings on the same
corpus is not evaluated again (the file is reused), so an interrupted demo resumes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from colld import __version__
from colld.data.manifest import Utterance, read_manifest
from colld.data.synth import PROBE_SPLITS, manifest_path
from colld.eval.models import (
    FBANK,
    describe,
    file_slug,
    is_student_dir,
    load_eval_model,
    load_model_spec,
    onnx_file,
)
from colld.eval.score import aggregate_score, task_values
from colld.fsutil import write_json_atomic
from colld.students.card import CardScore, update_card
from colld.students.export import read_provenance
from colld.teachers.hf import weight_files_fingerprint

if TYPE_CHECKING:
    from colld.deploy.onnx import LoadedOnnx
    from colld.eval.features import FeatureSet

log = logging.getLogger(__name__)

SCHEMA = "colld-eval/2"
ALL_TASKS = ("lid", "sid", "pr", "char")
CKA_FRAMES = 8000
"""Frames (seeded subsample of probe-test) behind each CKA value: float64 products on
Whisper-base-sized states take ~30 s at 20000 frames on 2 cores, ~12 s at 8000."""


@dataclass
class EvalSettings:
    """What ``colld evaluate`` does; part of the result file (reuse needs equal settings)."""

    corpus_dir: str = "data/corpus"
    """Corpus whose probe-train / probe-dev / probe-test manifests are used."""
    tasks: tuple[str, ...] = ALL_TASKS
    seeds: tuple[int, ...] = (0, 1, 2)
    """Probe seeds (mean and spread are reported over them)."""
    mimicry: bool = True
    """Students: cosine to the teacher's targets and CKA against the teacher on probe-test."""
    efficiency: bool = True
    clip_seconds: float = 10.0
    """Efficiency: clip length for latency / real-time factor / FLOPs."""
    batch_size: int = 8
    """Efficiency: clips in the batched measurement."""
    repeats: int = 5
    isolated: bool = True
    """Efficiency: measure in a fresh process (clean peak memory; ~15 s to start one here)."""
    max_epochs: int | None = None
    """Probe epochs, utterance and CTC probes alike (None = ``ProbeConfig``'s defaults)."""
    device: str = "cpu"

    def key(self) -> dict[str, Any]:
        """The settings that decide the numbers (device and isolation excluded)."""
        data = dataclasses.asdict(self)
        data.pop("device")
        data.pop("isolated")
        data["tasks"] = list(self.tasks)
        data["seeds"] = list(self.seeds)
        return data


QUICK_EVAL: dict[str, Any] = dict(
    seeds=(0,), max_epochs=3, clip_seconds=2.0, batch_size=2, repeats=1, isolated=False
)
"""``--quick``: one probe seed, 3 epochs, a short in-process efficiency measurement (a smoke
test: its numbers are not worth reading)."""


@dataclass
class ProbeData:
    """The evaluation part of a corpus: the three probe splits' rows and their root folder."""

    splits: dict[str, list[Utterance]]
    root: Path
    fingerprint: str
    problems: list[str] = field(default_factory=list)


def load_probe_data(corpus_dir: str | Path) -> ProbeData:
    """Read probe-train / probe-dev / probe-test; unusable rows are counted and logged."""
    splits, problems = {}, []
    hasher = hashlib.sha256()
    root = manifest_path(corpus_dir, PROBE_SPLITS[0]).parent
    for split in PROBE_SPLITS:
        path = manifest_path(corpus_dir, split)
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} does not exist: {corpus_dir} has no evaluation part "
                f"(build one with `colld data synth --out {corpus_dir}`)"
            )
        rows, bad = read_manifest(path)
        for line in bad:
            log.warning("skipping manifest row: %s", line)
        problems += bad
        if not rows:
            raise ValueError(f"{path} holds no usable rows")
        splits[split] = rows
        for utt in rows:
            hasher.update(f"{split}\t{utt.id}\t{utt.duration:.4f}\n".encode())
    return ProbeData(splits, root, hasher.hexdigest()[:16], problems)


def result_path(out_dir: str | Path, spec: str) -> Path:
    """Where the result of ``spec`` goes: a file name made from its label."""
    return Path(out_dir) / f"{file_slug(describe(spec))}.json"


def model_kind(spec: str) -> str:
    """ "fbank", "student", "onnx" (an ONNX export) or "teacher"."""
    if spec == FBANK:
        return "fbank"
    if is_student_dir(spec):
        return "student"
    return "onnx" if onnx_file(spec) is not None else "teacher"


def evaluate_model(
    spec: str,
    settings: EvalSettings,
    out_dir: str | Path,
    *,
    cache_dir: str | Path | None = None,
    reuse: bool = True,
) -> dict[str, Any]:
    """Evaluate ``spec`` and write ``out_dir/<label>.json``; returns the result dict.

    An existing result with the same model fingerprint, corpus and settings is returned as is
    when ``reuse`` (the model is loaded only to fingerprint it when it is a student or HF dir).
    """
    from colld.eval.features import extract_features
    from colld.eval.mimicry import position_retrieval
    from colld.eval.probes import ProbeConfig, run_probes

    start = time.perf_counter()
    torch.manual_seed(0)
    data = load_probe_data(settings.corpus_dir)
    loaded = load_eval_model(spec)
    fingerprint = loaded.fingerprint if loaded is not None else "fbank:whisper-log-mel-80"
    out_file = result_path(out_dir, spec)
    if reuse and out_file.is_file():
        try:
            previous = _read_result(out_file)
        except ValueError as err:  # another schema or a torn file: evaluate again
            log.info("not reusing %s: %s", out_file, err)
            previous = {}
        if _same_run(previous, fingerprint, data.fingerprint, settings):
            log.info("reusing %s (same model, corpus and settings)", out_file)
            refresh_model_cards(out_dir, previous)
            return previous
    cache = Path(cache_dir) if cache_dir is not None else Path(out_dir) / "features"
    features = {
        split: extract_features(
            loaded, rows, data.root, cache_dir=cache, device=settings.device, model_name=spec
        )
        for split, rows in data.splits.items()
    }
    probe_config = ProbeConfig()
    if settings.max_epochs is not None:
        probe_config = dataclasses.replace(
            probe_config,
            utterance_max_epochs=settings.max_epochs,
            sequence_max_epochs=settings.max_epochs,
        )
    summaries = run_probes(
        list(settings.tasks),
        features["probe-train"],
        features["probe-dev"],
        features["probe-test"],
        seeds=tuple(settings.seeds),
        config=probe_config,
    )
    result: dict[str, Any] = {
        "schema": SCHEMA,
        "model": spec,
        "label": describe(spec),
        "kind": model_kind(spec),
        "fingerprint": fingerprint,
        "corpus": {
            "dir": str(settings.corpus_dir),
            "fingerprint": data.fingerprint,
            "utterances": {split: len(rows) for split, rows in data.splits.items()},
            "skipped_rows": len(data.problems),
            "skipped_audio": {s: len(f.skipped) for s, f in features.items()},
        },
        "frame_rate": features["probe-train"].frame_rate,
        "num_hidden_states": features["probe-train"].num_layers,
        "probes": {task: _plain(summary) for task, summary in summaries.items()},
        "position_retrieval": position_retrieval(features["probe-test"]),
        "probe_config": _plain(probe_config),
        "settings": settings.key(),
        "mimicry": None,
        "efficiency": None,
        "onnx": None,
    }
    if settings.mimicry and result["kind"] == "student":
        result["mimicry"] = _mimicry(spec, features["probe-test"], data, cache, settings)
    if result["kind"] == "onnx":
        result["onnx"] = onnx_info(loaded)
        if settings.mimicry:
            result["mimicry"] = _onnx_mimicry(loaded, features["probe-test"], data, cache, settings)
    if settings.efficiency:
        from colld.eval.efficiency import measure_efficiency

        eff = measure_efficiency(
            spec,
            clip_seconds=settings.clip_seconds,
            batch_size=settings.batch_size,
            repeats=settings.repeats,
            isolated=settings.isolated,
        )
        result["efficiency"] = _plain(eff)
    result["machine"] = machine_info()
    result["colld_version"] = __version__
    result["created"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    result["seconds"] = round(time.perf_counter() - start, 1)
    write_json_atomic(out_file, result, indent=1)
    log.info("wrote %s", out_file)
    refresh_model_cards(out_dir, result)
    return result


def refresh_model_cards(out_dir: str | Path, result: dict[str, Any]) -> None:
    """Put a student's ``result`` into its README.md (``colld.students.card.update_card``); a
    teacher or fbank result refreshes the card of every student result in ``out_dir``, whose
    aggregate score it may complete. Problems are logged, never raised."""
    try:
        folder = []
        for path in sorted(Path(out_dir).glob("*.json")):
            try:
                folder.append(_read_result(path))
            except ValueError:
                continue  # not a result file
        students = [r for r in folder if r["kind"] == "student" and r["model"] != result["model"]]
        for student in [result] if result["kind"] == "student" else students:
            if Path(student["model"]).is_dir():
                update_card(student["model"], student, _card_score(student, folder))
    except (OSError, ValueError, KeyError) as err:
        log.warning("model cards in %s not updated: %s", out_dir, err)


def _card_score(student: dict[str, Any], folder: list[dict[str, Any]]) -> CardScore | None:
    """The aggregate score of ``student`` against the teacher it was distilled from (matched by
    weights fingerprint) and fbank, both evaluated alike in the same folder; else None."""
    teacher_print = ((read_provenance(student["model"]) or {}).get("teacher") or {}).get(
        "fingerprint"
    )

    def alike(r: dict[str, Any]) -> bool:
        keys = ("tasks", "seeds")
        return r["corpus"]["fingerprint"] == student["corpus"]["fingerprint"] and all(
            r["settings"][k] == student["settings"][k] for k in keys
        )

    teacher = next(
        (r for r in folder if r["kind"] == "teacher" and r["fingerprint"] == teacher_print), None
    )
    fbank = next((r for r in folder if r["kind"] == "fbank"), None)
    if teacher is None or fbank is None or not (alike(teacher) and alike(fbank)):
        return None
    values = [task_values(r["probes"]) for r in (student, teacher, fbank)]
    score = aggregate_score(*values)
    return CardScore(
        value=score.value, teacher=teacher["label"], per_task=score.per_task, flagged=score.flagged
    )


def onnx_info(loaded: LoadedOnnx) -> dict[str, Any]:
    """What the result records of an ONNX export: file, precision, source, runtime, batching."""
    import onnxruntime

    from colld.eval.features import unbatched_reason

    encoder = loaded.encoder
    return {
        "file": str(encoder.path),
        "precision": encoder.precision,
        "source": encoder.source,
        "runtime": f"onnxruntime {onnxruntime.__version__} (CPU)",
        "unbatched_reason": unbatched_reason(encoder),
    }


def _onnx_mimicry(
    loaded: LoadedOnnx,
    student_test: FeatureSet,
    data: ProbeData,
    cache: Path,
    settings: EvalSettings,
) -> dict[str, Any]:
    """``_mimicry`` of an ONNX export's features, with the teacher and heads of the student
    directory it was exported from; else the reason it is skipped (logged)."""
    source = loaded.encoder.source
    reason = onnx_mimicry_skip_reason(source, loaded.encoder.source_fingerprint)
    if reason is not None:
        log.info("mimicry of %s skipped: %s", loaded.source, reason)
        return {"skipped": reason}
    return {**_mimicry(source, student_test, data, cache, settings), "student_dir": source}


def onnx_mimicry_skip_reason(source: str, source_fingerprint: str) -> str | None:
    """Why an ONNX export's mimicry cannot be measured through ``source`` (the spec it was
    exported from), or None when ``source`` is a student directory that still holds the
    exported weights (``source_fingerprint``, recorded at export)."""
    if not source or not is_student_dir(source):
        return (
            f"the export's source '{source}' is not an exported student directory here (a "
            "teacher, or moved): its teacher and distillation heads are unknown"
        )
    if not source_fingerprint:
        return (
            "the export records no fingerprint of its source (colld.fingerprint: exported "
            f"before colld recorded it), so the heads in {source} may not belong to it; "
            "re-export it"
        )
    current = weight_files_fingerprint(Path(source))
    if current != source_fingerprint:
        return (
            f"{source} now holds other weights (fingerprint {current[:12]}) than the export "
            f"was made from ({source_fingerprint[:12]}): its heads do not belong to it"
        )
    return None


def _mimicry(
    spec: str, student_test: FeatureSet, data: ProbeData, cache: Path, settings: EvalSettings
) -> dict[str, Any]:
    """Cosine of each mapped pair and CKA of every student x teacher layer, on probe-test.

    spec: the student directory (its colld.json names the teacher; its heads give the pairs).
    """
    from colld.eval.features import extract_features
    from colld.eval.mimicry import (
        cka_matrix,
        load_objective,
        objective_unavailable_reason,
        pair_cosines,
    )

    info = read_provenance(spec)
    if info is None:
        return {"skipped": f"{spec} has no colld.json: its teacher is unknown"}
    if not isinstance(info.get("teacher"), dict) or "spec" not in info["teacher"]:
        return {"skipped": f"{spec}/colld.json names no teacher (teacher.spec)"}
    teacher_spec = info["teacher"]["spec"]
    teacher = load_model_spec(teacher_spec)
    teacher_test = extract_features(
        teacher,
        data.splits["probe-test"],
        data.root,
        cache_dir=cache,
        device=settings.device,
        model_name=teacher_spec,
    )
    out: dict[str, Any] = {"teacher": teacher_spec, "split": "probe-test"}
    if teacher is not None and teacher.fingerprint != info["teacher"]["fingerprint"]:
        out["warning"] = (
            f"teacher '{teacher_spec}' now has fingerprint {teacher.fingerprint}, the student "
            f"was distilled from {info['teacher']['fingerprint']}"
        )
    objective = load_objective(Path(spec))
    if objective is None:
        out["pair_cosine_skipped"] = objective_unavailable_reason(Path(spec))
    else:
        cosines = pair_cosines(objective, student_test, teacher_test)
        out["pair_cosine"] = dict(cosines)
        if cosines.skipped_reason:
            out["pair_cosine_skipped"] = cosines.skipped_reason
    out["cka"] = cka_matrix(student_test, teacher_test, max_frames=CKA_FRAMES).tolist()
    return out


def _same_run(
    previous: dict[str, Any], fingerprint: str, corpus: str, settings: EvalSettings
) -> bool:
    return (
        previous.get("schema") == SCHEMA
        and previous.get("fingerprint") == fingerprint
        and previous.get("corpus", {}).get("fingerprint") == corpus
        and previous.get("settings") == json.loads(json.dumps(settings.key()))
    )


def _read_result(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err.msg}, line {err.lineno})") from err
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        raise ValueError(f"{path} is not a colld evaluation result (schema {SCHEMA} expected)")
    return data


def read_result(path: str | Path) -> dict[str, Any]:
    """A result file written by ``evaluate_model``; other files are refused with the reason."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"result file {path} does not exist")
    return _read_result(path)


def machine_info() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }


def _plain(obj: Any) -> Any:
    """Dataclasses, tuples and tensors as JSON-ready values."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return _plain(dataclasses.asdict(obj))
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, float) and obj != obj:
        return None
    return obj
