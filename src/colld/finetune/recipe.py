"""``colld finetune --task ctc``: fine-tune an encoder end to end with a CTC head.

Same trainer as distillation (``colld.train.recipe``: update, gradient accumulation, NaN
guard, atomic checkpoints, exact resume, progress bar): this module only supplies the model
(``CTCModel``), the ``LossFn`` (CTC on the batch's labels, looked up by utterance id) and a
dev evaluation (greedy decoding, CER / PER) that selects the exported step.

Data: by default the embedded corpus' evaluation part, fine-tuned on probe-train, selected
on probe-dev, reported on probe-test: voices and sentences that distillation (train / dev)
never used; the three probe splits share their voices but not their sentences. Otherwise
``data.train`` / ``data.dev`` / ``data.test``: any transcribed data ``colld.data.readers``
reads. Utterances are used whole (see ``colld.finetune.labels`` for what is left out).
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from torch import nn

from colld import __version__
from colld.config import DataConfig, to_dict
from colld.data.batch import Batch
from colld.data.dataset import make_loader
from colld.data.manifest import Utterance
from colld.data.synth import manifest_path
from colld.encoders.base import SpeechEncoder
from colld.eval.tasks import (
    SplitLabels,
    Task,
    Vocabulary,
    is_alphabetic,
    score,
    utterance_label,
)
from colld.finetune.config import CTCConfig, FinetuneConfig, FinetuneDataConfig
from colld.finetune.export import check_exportable, export_ctc_model
from colld.finetune.labels import (
    LabelledSplit,
    build_vocabulary,
    label_split,
    load_vocabulary,
    task_for_units,
    vocabulary_json,
)
from colld.finetune.model import CTCModel, ctc_batch_loss, greedy_decode
from colld.fsutil import write_json_atomic
from colld.objectives.objective import LossOutput
from colld.teachers import LoadedModel, load_teacher
from colld.train.checkpoint import best_checkpoint, load_checkpoint
from colld.train.data_setup import build_data, ensure_embedded_corpus
from colld.train.recipe import (
    LossFn,
    TrainRun,
    find_resume_point,
    make_accelerator,
    run_training,
    set_deterministic,
    start_training,
)

log = logging.getLogger(__name__)

CORPUS_SPLITS = {"train": "probe-train", "dev": "probe-dev", "test": "probe-test"}
MODEL_DIR = "model"


@dataclass
class Source:
    """One split's rows as read: ``name`` (the split or file), utterances, their root."""

    name: str
    utterances: list[Utterance]
    root: Path


@dataclass(kw_only=True)
class FinetuneRun(TrainRun):
    """A fine-tuning run: the shared loop's state plus labels and the pretrained model."""

    loaded: LoadedModel
    task: Task
    vocabulary: Vocabulary
    splits: dict[str, LabelledSplit]
    sources: dict[str, Source]


@dataclass
class FinetuneResult:
    model_dir: Path
    scores: dict[str, Any] | None


# ---------------------------------------------------------------- setup
def load_pretrained(cfg: FinetuneConfig) -> LoadedModel:
    """The encoder to fine-tune: an exported student directory or a teacher spec."""
    from colld.eval.models import is_student_dir
    from colld.students.export import load_student

    spec = cfg.model.spec
    if is_student_dir(spec):
        return load_student(spec)
    return load_teacher(
        spec, trust_remote_code=cfg.model.trust_remote_code, revision=cfg.model.revision
    )


def prepare_encoder(encoder: SpeechEncoder, cfg: CTCConfig) -> SpeechEncoder:
    """Make a loaded (frozen) encoder trainable: float32, train mode, gradients on, except
    the mask embedding (unused: no masking), Whisper's fixed sinusoid and, with
    ``ctc.freeze_feature_encoder``, the wav2vec 2.0 families' convolutional front end. HF
    models' own LayerDrop and channel masking are turned off (the adapter refuses them)."""
    check_exportable(encoder)
    encoder.float().train().requires_grad_(True)
    for param in encoder.mask_parameters():
        param.requires_grad_(False)
    if encoder.family == "whisper":
        encoder.model.embed_positions.requires_grad_(False)
    else:
        config = encoder.model.config
        for key in ("layerdrop", "mask_feature_prob"):
            if float(getattr(config, key, 0.0)) > 0.0:
                log.info("setting %s=%s of the model's config to 0", key, getattr(config, key))
                setattr(config, key, 0.0)
    if cfg.freeze_feature_encoder:
        frozen = [
            p for n, p in encoder.named_parameters() if n.startswith("model.feature_extractor.")
        ]
        for param in frozen:
            param.requires_grad_(False)
        if frozen:
            log.info("the convolutional feature encoder stays fixed (ctc.freeze_feature_encoder)")
    return encoder


def check_max_duration(encoder: SpeechEncoder, max_duration: float) -> None:
    """ValueError when utterances of ``max_duration`` seconds exceed Whisper's positions."""
    if encoder.family != "whisper":
        return
    limit = encoder.max_positions / encoder.frame_rate
    if max_duration > limit:
        raise ValueError(
            f"data.max_duration={max_duration:g} s exceeds what this Whisper encoder can take "
            f"({encoder.max_positions} positions = {limit:g} s); set data.max_duration <= {limit:g}"
        )


def read_source(name: str, path: str | Path) -> Source:
    """Rows of a manifest / CutSet / dataset (``colld.data.readers.read_any``); unusable rows
    are logged and counted."""
    from colld.data.readers import read_any

    utterances, root, problems = read_any(path)
    for problem in problems:
        log.warning("skipping: %s", problem)
    if problems:
        log.warning("%d entries of %s were skipped", len(problems), path)
    return Source(name=name, utterances=utterances, root=Path(root))


def resolve_finetune_sources(cfg: FinetuneDataConfig, seed: int) -> dict[str, Source]:
    """train (always), dev and test (when there are any) as described in the module docstring."""
    if cfg.train is None:
        corpus = ensure_embedded_corpus(Path(cfg.corpus_dir), cfg.corpus_hours, seed)
        return {
            key: read_source(split, manifest_path(corpus, split))
            for key, split in CORPUS_SPLITS.items()
        }
    sources = {"train": read_source(cfg.train, cfg.train)}
    for key in ("dev", "test"):
        path = getattr(cfg, key)
        if path is not None:
            sources[key] = read_source(path, path)
    return sources


def make_vocabulary(cfg: CTCConfig, task: Task, train: Source) -> Vocabulary:
    """``ctc.vocab`` when given, else every symbol of the training labels."""
    if cfg.vocab is not None:
        return load_vocabulary(cfg.vocab, cfg.units)
    labels = [utterance_label(task, u) for u in train.utterances]
    labels = [label for label in labels if label is not None]
    if not labels:
        raise ValueError(
            f"{train.name}: none of its {len(train.utterances)} rows has a '{task.field}' "
            f"label; --units {cfg.units} needs transcripts in the '{task.field}' field"
        )
    return build_vocabulary(labels)


def label_sources(
    sources: dict[str, Source],
    task: Task,
    vocabulary: Vocabulary,
    *,
    max_duration: float,
    frame_rate: float,
) -> dict[str, LabelledSplit]:
    """Each split's usable rows and labels; ValueError when a split keeps none."""
    splits = {}
    for key, source in sources.items():
        split = label_split(
            source.name,
            source.utterances,
            task,
            vocabulary,
            max_duration=max_duration,
            frame_rate=frame_rate if key == "train" else None,
        )
        if not split.utterances:
            raise ValueError(
                f"{source.name} ({key}): no usable row of {len(source.utterances)} "
                f"({len(split.unlabelled)} without a '{task.field}' label, {len(split.too_long)} "
                f"longer than data.max_duration={max_duration:g} s, {len(split.too_short)} too "
                "short for their label)"
            )
        splits[key] = split
    return splits


def check_vocabulary(
    run_dir: Path, vocabulary: Vocabulary, units: str, *, resuming: bool, is_main: bool
) -> None:
    """Record the vocabulary in ``run_dir/vocab.json``; a resumed run must build the same."""
    path = run_dir / "vocab.json"
    wanted = vocabulary_json(vocabulary, units)
    if resuming and path.is_file():
        found = json.loads(path.read_text(encoding="utf-8"))
        if found != wanted:
            raise ValueError(
                f"cannot resume {run_dir}: its vocab.json ({len(found)} tokens) differs from "
                f"the vocabulary of this data ({len(wanted)} tokens); the training data changed "
                "(start a new run with another train.output_dir)"
            )
    elif is_main:
        write_json_atomic(path, wanted)


def ctc_loss_fn(targets: dict[str, list[int]]) -> LossFn:
    """The ``LossFn`` of fine-tuning: CTC on the batch's labels (no masks: the generator is
    unused)."""

    def loss(module: nn.Module, batch: Batch, generator: torch.Generator) -> LossOutput:
        return ctc_batch_loss(module, batch, targets)[0]

    return loss


def setup_finetune(cfg: FinetuneConfig, *, resume: bool) -> FinetuneRun:
    set_deterministic(cfg.train.deterministic)
    # The unused mask embedding is frozen; True still tolerates models with other unused parts.
    accelerator = make_accelerator(cfg, find_unused_parameters=True)
    run_dir = Path(cfg.train.output_dir)
    checkpoint = find_resume_point(run_dir, cfg, resume)
    loaded = load_pretrained(cfg)
    encoder = prepare_encoder(loaded.encoder, cfg.ctc)
    check_max_duration(encoder, cfg.data.max_duration)
    task = task_for_units(cfg.ctc.units)
    with accelerator.main_process_first():  # one process synthesises a missing corpus
        sources = resolve_finetune_sources(cfg.data, cfg.train.seed)
    vocabulary = make_vocabulary(cfg.ctc, task, sources["train"])
    splits = label_sources(
        sources,
        task,
        vocabulary,
        max_duration=cfg.data.max_duration,
        frame_rate=encoder.frame_rate,
    )
    check_vocabulary(
        run_dir,
        vocabulary,
        cfg.ctc.units,
        resuming=checkpoint is not None,
        is_main=accelerator.is_main_process,
    )
    log.info(
        "fine-tuning %s (%s, %d layers, width %d) with a CTC head over %d %s tokens",
        cfg.model.spec, encoder.family, encoder.num_layers, encoder.hidden_dim,
        len(vocabulary), cfg.ctc.units,
    )  # fmt: skip
    with torch.random.fork_rng(devices=[]):  # the head's init: from the seed only
        torch.manual_seed(cfg.train.seed + 1)
        model = CTCModel(encoder, len(vocabulary), final_dropout=cfg.ctc.final_dropout)
    dev = splits.get("dev")
    train_stream, dev_stream = build_data(
        loader_config(cfg.data),
        loaded.feature_extractor,
        cfg.train.seed,
        accelerator,
        sources=(
            (splits["train"].utterances, sources["train"].root),
            None if dev is None else (dev.utterances, sources["dev"].root),
        ),
        crop=False,
    )
    started = start_training(cfg, accelerator, model, train_stream, checkpoint, desc="finetune")
    return FinetuneRun(
        cfg=cfg,
        accelerator=accelerator,
        module=started.module,
        loss_fn=ctc_loss_fn(splits["train"].targets),
        optimizer=started.optimizer,
        scheduler=started.scheduler,
        train=train_stream,
        dev=dev_stream,
        state=started.state,
        run_dir=run_dir,
        logger=started.logger,
        dev_metrics=dev_error_rate,
        selection_key=f"dev/{task.metric}",
        loaded=loaded,
        task=task,
        vocabulary=vocabulary,
        splits=splits,
        sources=sources,
    )


def loader_config(cfg: FinetuneDataConfig) -> DataConfig:
    """The distillation data settings ``build_data`` reads (no augmentation, no cache)."""
    return DataConfig(
        corpus_dir=cfg.corpus_dir,
        batch_seconds=cfg.batch_seconds,
        max_duration=cfg.max_duration,
        num_workers=cfg.num_workers,
    )


# ---------------------------------------------------------------- evaluation
@dataclass
class Decoded:
    """Greedy hypotheses (id -> token ids) of every process, and the mean CTC loss."""

    hypotheses: dict[str, list[int]]
    loss: float


def decode_batches(
    accelerator: Accelerator,
    module: nn.Module,
    batches: Iterable[Batch],
    targets: dict[str, list[int]],
) -> Decoded:
    """Run ``module`` (in eval mode, no_grad) over this process' ``batches``; hypotheses
    and the loss are gathered from every process."""
    hypotheses: dict[str, list[int]] = {}
    totals = torch.zeros(2, dtype=torch.float64, device=accelerator.device)  # loss sum, batches
    with torch.no_grad():
        for batch in batches:
            batch = batch.to(accelerator.device)
            with accelerator.autocast():
                loss, out = ctc_batch_loss(module, batch, targets)
            totals += torch.tensor([float(loss.total), 1.0], device=accelerator.device)
            for uid, ids in zip(batch.ids, greedy_decode(out.logits, out.lengths), strict=True):
                hypotheses[uid] = ids
    totals = accelerator.reduce(totals, reduction="sum")
    merged: dict[str, list[int]] = {}
    for part in gather_object([hypotheses]):
        merged.update(part)
    loss = float(totals[0] / totals[1]) if float(totals[1]) > 0 else float("nan")
    return Decoded(hypotheses=merged, loss=loss)


def score_split(
    task: Task, vocabulary: Vocabulary, split: LabelledSplit, hypotheses: dict[str, list[int]]
) -> dict[str, Any] | None:
    """CER / PER of the decoded rows of ``split`` (``colld.eval.tasks.score``: for chars the
    aggregate is over alphabetic languages, or all rows when none is), per language with
    utterance counts; None when no row was decoded."""
    ids = [u.id for u in split.utterances if u.id in hypotheses]
    if not ids:
        return None
    labels = SplitLabels(
        indices=list(range(len(ids))),
        targets=[split.targets[i] for i in ids],
        references=[split.references[i] for i in ids],
        languages=[split.languages[i] for i in ids],
    )
    result = score(task, labels, [vocabulary.decode(hypotheses[i]) for i in ids])
    counts: dict[str, int] = {}
    for language in labels.languages:
        counts[language] = counts.get(language, 0) + 1
    in_aggregate = len(ids)
    if task.name == "char":  # as ``score`` aggregates
        in_aggregate = sum(is_alphabetic(lang) for lang in labels.languages) or len(ids)
    return {
        "metric": task.metric,
        "value": result.value,
        "per_language": {
            lang: {"value": value, "utterances": counts[lang]}
            for lang, value in result.per_language.items()
        },
        "utterances": len(ids),
        "aggregate_utterances": in_aggregate,
    }


def dev_error_rate(run: FinetuneRun) -> dict[str, float]:
    """The dev CTC loss and CER / PER (greedy) over ``train.eval_batches`` dev batches."""
    split = run.splits["dev"]
    decoded = decode_batches(
        run.accelerator,
        run.module,
        run.dev.one_pass(run.cfg.train.eval_batches),
        split.targets,
    )
    scored = score_split(run.task, run.vocabulary, split, decoded.hypotheses)
    if scored is None:
        return {}
    return {"dev/loss": decoded.loss, f"dev/{run.task.metric}": scored["value"]}


def select_weights(run: TrainRun) -> int:
    """Load the best dev step's weights (``train.keep_best`` keeps them; lowest
    ``run.selection_key``) into the model; returns the selected step (the last one when
    there is no dev data or no best). Shared by every fine-tuning task."""
    path = best_checkpoint(run.run_dir) if run.dev is not None else None
    if path is None:
        if run.dev is not None:
            log.warning("no best-dev checkpoint kept (train.keep_best=false?): using the last step")
        return run.state.step
    ckpt = load_checkpoint(path, restore_rng=False)
    run.accelerator.unwrap_model(run.module).load_state_dict(ckpt.trainable)
    log.info("selected step %d (best %s)", ckpt.state.step, run.selection_key)
    return ckpt.state.step


def evaluate_test(run: FinetuneRun) -> dict[str, Any] | None:
    """CER / PER on the test split with greedy decoding (None without a test split)."""
    if "test" not in run.splits:
        log.warning("no test data (data.test): no CER / PER is reported")
        return None
    split, acc = run.splits["test"], run.accelerator
    loader = one_pass_loader(
        run.cfg, acc, split.utterances, run.sources["test"].root, run.loaded.feature_extractor
    )
    run.module.eval()
    decoded = decode_batches(acc, run.module, loader, split.targets)
    run.module.train()
    return score_split(run.task, run.vocabulary, split, decoded.hypotheses)


def one_pass_loader(
    cfg: FinetuneConfig,
    accelerator: Accelerator,
    utterances: list[Utterance],
    root: Path,
    feature_extractor: Any,
) -> Iterable[Batch]:
    """This process' share of ``utterances``, once, whole clips, non-empty batches: what every
    fine-tuning task's test evaluation decodes."""
    loader, _ = make_loader(
        utterances,
        root,
        _frontend(feature_extractor),
        batch_seconds=cfg.data.batch_seconds,
        max_duration=None,
        num_workers=0,
        seed=cfg.train.seed,
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
        num_epochs=1,
    )
    return (batch for batch in loader if batch.ids)


def _frontend(feature_extractor: Any) -> Any:
    from colld.audio import FrontEnd

    return FrontEnd(feature_extractor)


# ---------------------------------------------------------------- report and export
def build_report(
    run: FinetuneRun, test: dict[str, Any] | None, selected_step: int
) -> dict[str, Any]:
    """What ``ctc_scores.json`` holds: the test scores, the selection and the data counts."""
    alphabetic = run.task.name == "char"
    return {
        "task": "ctc",
        "units": run.cfg.ctc.units,
        "metric": run.task.metric,
        "decoding": "greedy",
        "test_split": run.sources["test"].name if "test" in run.sources else None,
        "aggregate": "alphabetic languages (all rows when none)" if alphabetic else "all rows",
        "test": test,
        "selected_step": selected_step,
        "best_dev": run.state.best_dev_loss,
        "steps": run.state.step,
        "vocab_size": len(run.vocabulary),
        "data": {key: split.summary() for key, split in run.splits.items()},
    }


def export(run: FinetuneRun, report: dict[str, Any]) -> Path:
    """Write ``<run>/model`` (``colld.finetune.export``); main process only."""
    out_dir = run.run_dir / MODEL_DIR
    if run.accelerator.is_main_process:
        metadata = {
            "colld_version": __version__,
            "argv": list(sys.argv),
            "pretrained": {"spec": run.cfg.model.spec, "fingerprint": run.loaded.fingerprint},
            "steps": run.state.step,
            "selected_step": report["selected_step"],
            "config": to_dict(run.cfg),
        }
        export_ctc_model(
            run.accelerator.unwrap_model(run.module),
            run.loaded.feature_extractor,
            run.vocabulary,
            run.cfg.ctc.units,
            out_dir,
            metadata=metadata,
            scores=report,
        )
    run.accelerator.wait_for_everyone()
    return out_dir


def finetune(cfg: FinetuneConfig, *, resume: bool = False) -> FinetuneResult:
    """Fine-tune, select on dev, score on test, export; returns the model dir and report."""
    run = setup_finetune(cfg, resume=resume)
    try:
        run_training(run)
        selected = select_weights(run)
        report = build_report(run, evaluate_test(run), selected)
        return FinetuneResult(model_dir=export(run, report), scores=report)
    finally:
        run.logger.close()
        run.train.close()


def score_table(report: dict[str, Any]) -> str:
    """The test scores as a short text table (per language, then the aggregate)."""
    test = report.get("test")
    metric = report["metric"].upper()
    if test is None:
        return f"no test split: no {metric} reported"
    lines = [f"{'language':<12} {'utts':>6} {metric:>7}"]
    for lang, entry in sorted(test["per_language"].items()):
        lines.append(f"{lang or '-':<12} {entry['utterances']:>6} {entry['value']:>7.3f}")
    lines.append(f"{'aggregate':<12} {test['aggregate_utterances']:>6} {test['value']:>7.3f}")
    lines.append(
        f"({report['test_split']}; aggregate over {report['aggregate']}; greedy decoding; "
        f"step {report['selected_step']} of {report['steps']})"
    )
    return "\n".join(lines)
