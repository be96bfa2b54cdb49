"""``colld finetune MODEL --task s2t``: an encoder in place of Whisper's encoder, under the
frozen Whisper decoder, joined by a learned linear adapter (``colld.finetune.s2t_model``).

Same trainer as distillation and CTC fine-tuning (``colld.train.recipe``); the loss is the
decoder's teacher-forced cross-entropy over every transcription and X->En translation
sequence of the batch; the dev loss selects the exported step. The test split is decoded
greedily with the decoder's own task tokens (the language is given, not detected) and scored:

- transcription: WER per language on Whisper's ``BasicTextNormalizer`` output (lower case,
  no punctuation), CER beside it; for languages written without spaces (``NO_SPACE``) the
  WER column holds the CER. The aggregate WER pools the words of the languages with spaces.
- translation: BLEU and chrF (sacrebleu, default 13a tokenisation, case-sensitive) of the
  English hypotheses against ``text_en``, per source language and over all of them.

Data: the embedded corpus' probe-train / probe-dev / probe-test by default (the parallel
sentences are spread over the three, so no test sentence is trained on), or ``data.train``
etc. Export: ``<run>/model`` holds ``adapter.safetensors``, ``s2t.json`` (what joins what)
and ``s2t_scores.json``, plus ``encoder/`` when the encoder was trained; ``load_s2t_model``
loads it back.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from colld import __version__
from colld.audio import FrontEnd
from colld.config import to_dict
from colld.data.dataset import make_loader
from colld.data.manifest import Utterance
from colld.finetune.config import FinetuneConfig
from colld.finetune.decoder import WhisperTextDecoder, load_text_decoder
from colld.finetune.recipe import (
    Source,
    check_max_duration,
    load_pretrained,
    loader_config,
    one_pass_loader,
    resolve_finetune_sources,
    select_weights,
)
from colld.finetune.s2t_model import (
    AdaptedStates,
    S2TModel,
    S2TSplit,
    batch_sequences,
    check_compatible,
    fit_adapter,
    label_s2t_split,
    s2t_batch_loss,
    set_identity,
)
from colld.fsutil import atomic_dir, write_json_atomic
from colld.teachers import LoadedModel
from colld.train.data_setup import build_data
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

MODEL_DIR = "model"
ADAPTER_FILE = "adapter.safetensors"
S2T_FILE = "s2t.json"
SCORES_FILE = "s2t_scores.json"
NO_SPACE = frozenset({"zh", "ja", "th", "lo", "km", "my", "yue"})
"""Languages written without spaces between words: scored by CER in the WER column."""


@dataclass
class Prepared:
    """Everything but the trainer: the pretrained encoder, decoder, data and the model."""

    loaded: LoadedModel
    decoder: WhisperTextDecoder
    sources: dict[str, Source]
    splits: dict[str, S2TSplit]
    model: S2TModel
    adapter_fit: dict[str, Any]


@dataclass(kw_only=True)
class S2TRun(TrainRun):
    """A speech-to-text run: the shared loop's state plus decoder, splits and sources."""

    prepared: Prepared


@dataclass
class S2TResult:
    model_dir: Path
    scores: dict[str, Any]


# ---------------------------------------------------------------- setup
def load_decoder_side(cfg: FinetuneConfig) -> tuple[WhisperTextDecoder, LoadedModel]:
    """The frozen decoder and the decoder's own encoder (its frame rate and lstsq target)."""
    from colld.eval.models import load_model_spec

    decoder = load_text_decoder(cfg.s2t.decoder)
    reference = load_model_spec(cfg.s2t.decoder)
    assert reference is not None  # "fbank" is no Whisper model: load_text_decoder refused it
    return decoder, reference


def last_states(
    loaded: LoadedModel, utterances: list[Utterance], root: Path, batch_seconds: float
) -> dict[str, torch.Tensor]:
    """id -> the encoder's last hidden state of each clip (float32, CPU). Shape: (T, D)."""
    loader, _ = make_loader(
        utterances, root, FrontEnd(loaded.feature_extractor),
        batch_seconds=batch_seconds, max_duration=None, num_workers=0, seed=0, num_epochs=1,
    )  # fmt: skip
    encoder, last = loaded.encoder, loaded.encoder.num_layers
    states: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for batch in loader:
            out = encoder(batch.features, batch.feature_lengths, layers=[last])
            for row, uid in enumerate(batch.ids):
                states[uid] = out.hidden_states[last][row, : int(out.lengths[row])].float()
    return states


def init_adapter(
    cfg: FinetuneConfig,
    model: S2TModel,
    loaded: LoadedModel,
    reference: LoadedModel,
    train: Source,
    split: S2TSplit,
) -> dict[str, Any]:
    """Initialise the adapter (``s2t.adapter_init``); returns what was done (for the report)."""
    choice = cfg.s2t.adapter_init
    same_encoder = cfg.model.spec == cfg.s2t.decoder
    if cfg.s2t.pad_to_window or (choice == "lstsq" and same_encoder):
        choice = "identity"  # the decoder's own encoder: the regression's answer is known
    if choice == "identity":
        set_identity(model.adapter)
        return {"init": "identity"}
    if choice == "random":
        return {"init": "random"}
    clips = sorted(split.utterances, key=lambda u: u.id)[: cfg.s2t.lstsq_utterances]
    batch_seconds = cfg.data.batch_seconds
    ours = last_states(loaded, clips, train.root, batch_seconds)
    theirs = last_states(reference, clips, train.root, batch_seconds)
    inputs, targets = [], []
    for uid, x in ours.items():
        y = theirs.get(uid)
        if y is None:
            continue
        n = min(len(x), len(y))  # the same rate; a frame of rounding apart at most
        inputs.append(x[:n])
        targets.append(y[:n])
    if not inputs:
        raise ValueError(f"{train.name}: no clip could be encoded for the lstsq adapter init")
    r2 = fit_adapter(model.adapter, torch.cat(inputs), torch.cat(targets), ridge=cfg.s2t.ridge)
    frames = sum(len(x) for x in inputs)
    log.info("adapter init: lstsq over %d clips (%d frames), R^2 %.3f", len(inputs), frames, r2)
    return {"init": "lstsq", "clips": len(inputs), "frames": frames, "r2": r2}


def prepare_s2t(cfg: FinetuneConfig, accelerator: Any, *, from_checkpoint: bool) -> Prepared:
    """Load encoder and decoder, check they fit, label the data, build and initialise the
    model (the init is skipped when a checkpoint will overwrite it)."""
    loaded = load_pretrained(cfg)
    decoder, reference = load_decoder_side(cfg)
    check_compatible(loaded.encoder, reference.encoder, f"{cfg.model.spec} -> {cfg.s2t.decoder}")
    check_max_duration(loaded.encoder, cfg.data.max_duration)
    with accelerator.main_process_first():  # one process synthesises a missing corpus
        sources = resolve_finetune_sources(cfg.data, cfg.train.seed)
    splits = {
        key: label_s2t_split(
            source.name,
            source.utterances,
            decoder,
            cfg.s2t.tasks,
            max_duration=cfg.data.max_duration,
        )  # fmt: skip
        for key, source in sources.items()
    }
    for key, split in splits.items():
        if not split.utterances:
            raise ValueError(
                f"{sources[key].name} ({key}): no usable row of {len(sources[key].utterances)} "
                f"(left out: {split.summary()['skipped']})"
            )
    encoder = loaded.encoder.float()
    with torch.random.fork_rng(devices=[]):  # the adapter's init: from the seed only
        torch.manual_seed(cfg.train.seed + 1)
        model = S2TModel(
            encoder, decoder.width,
            train_encoder=cfg.s2t.train_encoder, train_adapter=cfg.s2t.train_adapter,
            pad_to_window=cfg.s2t.pad_to_window,
        )  # fmt: skip
    adapter_fit = (
        {"init": "from checkpoint"}
        if from_checkpoint
        else init_adapter(cfg, model, loaded, reference, sources["train"], splits["train"])
    )
    decoder.to(accelerator.device)
    log.info(
        "speech-to-text: %s (%s, width %d) -> adapter (%s) -> frozen decoder of %s (width %d); "
        "training %s", cfg.model.spec, encoder.family, encoder.hidden_dim, adapter_fit["init"],
        cfg.s2t.decoder, decoder.width, trained_parts(cfg),
    )  # fmt: skip
    return Prepared(loaded, decoder, sources, splits, model, adapter_fit)


def trained_parts(cfg: FinetuneConfig) -> str:
    if cfg.s2t.train_encoder:
        return "encoder + adapter"
    return "adapter" if cfg.s2t.train_adapter else "nothing"


def setup_s2t(cfg: FinetuneConfig, *, resume: bool) -> S2TRun:
    set_deterministic(cfg.train.deterministic)
    accelerator = make_accelerator(cfg, find_unused_parameters=True)
    run_dir = Path(cfg.train.output_dir)
    checkpoint = find_resume_point(run_dir, cfg, resume)
    p = prepare_s2t(cfg, accelerator, from_checkpoint=checkpoint is not None)
    dev = p.splits.get("dev")
    train_stream, dev_stream = build_data(
        loader_config(cfg.data),
        p.loaded.feature_extractor,
        cfg.train.seed,
        accelerator,
        sources=(
            (p.splits["train"].utterances, p.sources["train"].root),
            None if dev is None else (dev.utterances, p.sources["dev"].root),
        ),
        crop=False,
    )
    started = start_training(cfg, accelerator, p.model, train_stream, checkpoint, desc="s2t")
    sequences = {k: v for split in p.splits.values() for k, v in split.sequences.items()}
    return S2TRun(
        cfg=cfg,
        accelerator=accelerator,
        module=started.module,
        loss_fn=s2t_loss_fn(p.decoder, sequences),
        optimizer=started.optimizer,
        scheduler=started.scheduler,
        train=train_stream,
        dev=dev_stream,
        state=started.state,
        run_dir=run_dir,
        logger=started.logger,
        prepared=p,
    )


def s2t_loss_fn(decoder: WhisperTextDecoder, sequences: dict[str, list[Any]]) -> LossFn:
    """The ``LossFn``: teacher-forced cross-entropy (no masks: the generator is unused)."""

    def loss(module: nn.Module, batch: Any, generator: torch.Generator) -> Any:
        return s2t_batch_loss(module, decoder, batch, sequences)

    return loss


# ---------------------------------------------------------------- decoding and scoring
def decode_split(
    cfg: FinetuneConfig,
    accelerator: Any,
    module: nn.Module,
    decoder: WhisperTextDecoder,
    feature_extractor: Any,
    split: S2TSplit,
    root: Path,
) -> dict[tuple[str, str], str]:
    """(utterance id, task) -> greedy hypothesis text for every sequence of ``split`` (this
    process' share; one process is the supported case for scoring)."""
    loader = one_pass_loader(cfg, accelerator, split.utterances, root, feature_extractor)
    was_training = module.training
    module.eval()
    hypotheses: dict[tuple[str, str], str] = {}
    progress = tqdm(loader, desc="decode", unit="batch", disable=not accelerator.is_main_process)
    with torch.no_grad():
        for batch in progress:
            batch = batch.to(accelerator.device)
            with accelerator.autocast():
                adapted: AdaptedStates = module(batch.features, batch.feature_lengths)
            for task in cfg.s2t.tasks:
                rows, seqs = batch_sequences(batch.ids, split.sequences, [task])
                if not rows:
                    continue
                index = torch.tensor(rows, device=adapted.states.device)
                limits = [
                    min(
                        cfg.s2t.max_new_tokens,
                        8 + math.ceil(seconds * cfg.s2t.max_tokens_per_second),
                    )
                    for seconds in batch.durations[index.cpu()].tolist()
                ]
                tokens = decoder.greedy(
                    adapted.states[index].float(), adapted.lengths[index],
                    [s.tokens[: s.prompt_length] for s in seqs], max_new_tokens=limits,
                )  # fmt: skip
                for row, ids in zip(rows, tokens, strict=True):
                    hypotheses[(batch.ids[row], task)] = decoder.decode_text(ids)
    module.train(was_training)
    return hypotheses


def _normalizer() -> Any:
    from transformers.models.whisper.english_normalizer import BasicTextNormalizer

    return BasicTextNormalizer()


def transcription_scores(pairs: dict[str, list[tuple[str, str]]]) -> dict[str, Any]:
    """WER / CER per language of (reference, hypothesis) pairs, and the pooled WER over the
    languages written with spaces (``NO_SPACE``: the WER column holds the CER)."""
    import jiwer

    norm = _normalizer()
    per_language: dict[str, Any] = {}
    pooled_refs: list[str] = []
    pooled_hyps: list[str] = []
    for lang, rows in sorted(pairs.items()):
        refs = [norm(r).strip() or "<empty>" for r, _ in rows]
        hyps = [norm(h).strip() for _, h in rows]
        chars_ref = [r.replace(" ", "") for r in refs]
        chars_hyp = [h.replace(" ", "") for h in hyps]
        cer = float(jiwer.cer(chars_ref, chars_hyp))
        wer = cer if lang in NO_SPACE else float(jiwer.wer(refs, hyps))
        per_language[lang] = {"wer": wer, "cer": cer, "utterances": len(rows)}
        if lang not in NO_SPACE:
            pooled_refs += refs
            pooled_hyps += hyps
    pooled = float(jiwer.wer(pooled_refs, pooled_hyps)) if pooled_refs else None
    return {"per_language": per_language, "wer": pooled}


def translation_scores(pairs: dict[str, list[tuple[str, str]]]) -> dict[str, Any]:
    """Corpus BLEU and chrF (sacrebleu) per source language and over all pairs."""
    import sacrebleu

    def corpus(rows: list[tuple[str, str]]) -> dict[str, float]:
        refs = [[r for r, _ in rows]]
        hyps = [h for _, h in rows]
        return {
            "bleu": float(sacrebleu.corpus_bleu(hyps, refs).score),
            "chrf": float(sacrebleu.corpus_chrf(hyps, refs).score),
            "utterances": len(rows),
        }

    every = [row for rows in pairs.values() for row in rows]
    return {
        "per_language": {lang: corpus(rows) for lang, rows in sorted(pairs.items()) if rows},
        **({"all": corpus(every)} if every else {"all": None}),
    }


def score_hypotheses(split: S2TSplit, hypotheses: dict[tuple[str, str], str]) -> dict[str, Any]:
    """Transcription and translation scores of the decoded sequences of ``split``; a few
    examples per task are kept for the report."""
    by_task: dict[str, dict[str, list[tuple[str, str]]]] = {"transcribe": {}, "translate": {}}
    examples: dict[str, list[dict[str, str]]] = {"transcribe": [], "translate": []}
    for uid, seqs in split.sequences.items():
        for seq in seqs:
            hyp = hypotheses.get((uid, seq.task))
            if hyp is None:
                continue
            lang = split.languages[uid]
            by_task[seq.task].setdefault(lang, []).append((seq.reference, hyp))
            if sum(e["language"] == lang for e in examples[seq.task]) < 1:
                examples[seq.task].append(
                    {"id": uid, "language": lang, "reference": seq.reference, "hypothesis": hyp}
                )
    out: dict[str, Any] = {"examples": examples}
    if by_task["transcribe"]:
        out["transcribe"] = transcription_scores(by_task["transcribe"])
    if by_task["translate"]:
        out["translate"] = translation_scores(by_task["translate"])
    return out


# ---------------------------------------------------------------- selection, report, export
def evaluate_test(
    cfg: FinetuneConfig, accelerator: Any, module: nn.Module, p: Prepared
) -> dict[str, Any] | None:
    """Decode and score the test split (None without one)."""
    if "test" not in p.splits:
        log.warning("no test data (data.test): no WER / BLEU is reported")
        return None
    split = p.splits["test"]
    hypotheses = decode_split(
        cfg, accelerator, module, p.decoder, p.loaded.feature_extractor, split,
        p.sources["test"].root,
    )  # fmt: skip
    return score_hypotheses(split, hypotheses)


def build_report(
    cfg: FinetuneConfig,
    p: Prepared,
    test: dict[str, Any] | None,
    *,
    selected: int,
    steps: int,
    best_dev_loss: float | None,
) -> dict[str, Any]:
    """What ``s2t_scores.json`` holds."""
    return {
        "task": "s2t",
        "model": cfg.model.spec,
        "decoder": cfg.s2t.decoder,
        "tasks": list(cfg.s2t.tasks),
        "trained": trained_parts(cfg),
        "adapter": p.adapter_fit,
        "pad_to_window": cfg.s2t.pad_to_window,
        "decoding": (
            f"greedy, language given, at most min({cfg.s2t.max_new_tokens}, 8 + "
            f"{cfg.s2t.max_tokens_per_second:g}/s) new tokens"
        ),
        "test_split": p.sources["test"].name if "test" in p.sources else None,
        "test": test,
        "selected_step": selected,
        "best_dev_loss": best_dev_loss,
        "steps": steps,
        "data": {key: split.summary() for key, split in p.splits.items()},
    }


def export(
    cfg: FinetuneConfig, accelerator: Any, model: S2TModel, p: Prepared, report: dict[str, Any]
) -> Path:
    """Write ``<train.output_dir>/model`` (see the module docstring); main process only."""
    out_dir = Path(cfg.train.output_dir) / MODEL_DIR
    if accelerator.is_main_process:
        encoder_spec = cfg.model.spec
        with atomic_dir(out_dir) as tmp:
            if cfg.s2t.train_encoder:
                from colld.students.export import export_student

                export_student(model.encoder, p.loaded.feature_extractor, tmp / "encoder")
                encoder_spec = "encoder"  # relative to the model directory
            save_file(
                {k: v.detach().cpu().contiguous() for k, v in model.adapter.state_dict().items()},
                str(tmp / ADAPTER_FILE),
                metadata={"format": "pt"},
            )
            write_json_atomic(
                tmp / S2T_FILE,
                {
                    "colld_version": __version__,
                    "argv": list(sys.argv),
                    "encoder": encoder_spec,
                    "encoder_fingerprint": p.loaded.fingerprint,
                    "decoder": cfg.s2t.decoder,
                    "encoder_width": model.adapter.in_features,
                    "decoder_width": model.adapter.out_features,
                    "pad_to_window": model.pad_to_window,
                    "tasks": list(cfg.s2t.tasks),
                    "config": to_dict(cfg),
                },
            )
            write_json_atomic(tmp / SCORES_FILE, report)
    accelerator.wait_for_everyone()
    return out_dir


@dataclass
class LoadedS2T:
    """An exported speech-to-text model: ``model`` (encoder + adapter, eval mode), the
    frozen ``decoder``, the encoder's ``feature_extractor`` and ``s2t.json``."""

    model: S2TModel
    decoder: WhisperTextDecoder
    feature_extractor: Any
    info: dict[str, Any]


def load_s2t_model(path: str | Path) -> LoadedS2T:
    """Load what ``export`` wrote: the encoder (``encoder/`` or the spec it was trained
    from), the adapter and the decoder named in ``s2t.json``. IncompatibleAdapterError
    (from ``colld.finetune.s2t_model``) when the adapter's widths do not fit them."""
    from colld.eval.models import load_model_spec
    from colld.finetune.s2t_model import IncompatibleAdapterError

    path = Path(path)
    info_file = path / S2T_FILE
    if not info_file.is_file():
        raise FileNotFoundError(
            f"{info_file} not found; expected a `colld finetune --task s2t` model"
        )
    info = json.loads(info_file.read_text(encoding="utf-8"))
    spec = info["encoder"]
    loaded = load_model_spec(str(path / spec) if (path / spec).is_dir() else spec)
    if loaded is None:
        raise ValueError(f"{info_file}: encoder {spec!r} has no weights")
    decoder = load_text_decoder(info["decoder"])
    tensors = load_file(str(path / ADAPTER_FILE))
    want = (decoder.width, loaded.encoder.hidden_dim)
    if tuple(tensors["weight"].shape) != want:
        raise IncompatibleAdapterError(
            f"{path / ADAPTER_FILE}: adapter maps width {tensors['weight'].shape[1]} -> "
            f"{tensors['weight'].shape[0]}, but encoder {spec!r} has width {want[1]} and decoder "
            f"{info['decoder']!r} width {want[0]}"
        )
    model = S2TModel(loaded.encoder, decoder.width, pad_to_window=bool(info["pad_to_window"]))
    model.adapter.load_state_dict(tensors)
    return LoadedS2T(model.eval(), decoder, loaded.feature_extractor, info)


def finetune_s2t(cfg: FinetuneConfig, *, resume: bool = False) -> S2TResult:
    """Train (unless ``s2t.train_adapter`` and ``s2t.train_encoder`` are both off: then the
    initialised adapter is scored as it is), select on dev, decode and score test, export."""
    if not cfg.s2t.train_adapter and not cfg.s2t.train_encoder:
        accelerator = make_accelerator(cfg, find_unused_parameters=True)
        p = prepare_s2t(cfg, accelerator, from_checkpoint=False)
        model = p.model.to(accelerator.device)
        test = evaluate_test(cfg, accelerator, model, p)
        report = build_report(cfg, p, test, selected=0, steps=0, best_dev_loss=None)
        return S2TResult(export(cfg, accelerator, model, p, report), report)
    run = setup_s2t(cfg, resume=resume)
    try:
        run_training(run)
        selected = select_weights(run)
        model = run.accelerator.unwrap_model(run.module)
        test = evaluate_test(cfg, run.accelerator, model, run.prepared)
        report = build_report(
            cfg, run.prepared, test, selected=selected, steps=run.state.step,
            best_dev_loss=run.state.best_dev_loss,
        )  # fmt: skip
        return S2TResult(export(cfg, run.accelerator, model, run.prepared, report), report)
    finally:
        run.logger.close()
        run.train.close()


def s2t_table(report: dict[str, Any]) -> str:
    """The test scores as text: WER / CER per language, then BLEU / chrF per language."""
    test = report.get("test")
    if not test:
        return "no test split: no WER / BLEU reported"
    lines = []
    if "transcribe" in test:
        tr = test["transcribe"]
        lines.append(f"{'transcribe':<12} {'utts':>5} {'WER':>7} {'CER':>7}")
        for lang, e in tr["per_language"].items():
            lines.append(f"{lang:<12} {e['utterances']:>5} {e['wer']:>7.3f} {e['cer']:>7.3f}")
        if tr["wer"] is not None:
            lines.append(f"{'pooled WER':<12} {'':>5} {tr['wer']:>7.3f}")
    if "translate" in test:
        tl = test["translate"]
        lines.append(f"\n{'X->en':<12} {'utts':>5} {'BLEU':>7} {'chrF':>7}")
        for lang, e in tl["per_language"].items():
            lines.append(f"{lang:<12} {e['utterances']:>5} {e['bleu']:>7.1f} {e['chrf']:>7.1f}")
        if tl["all"] is not None:
            a = tl["all"]
            lines.append(f"{'all':<12} {a['utterances']:>5} {a['bleu']:>7.1f} {a['chrf']:>7.1f}")
    lines.append(
        f"({report['test_split']}; {report['decoding']}; step {report['selected_step']} "
        f"of {report['steps']}; adapter {report['adapter']['init']})"
    )
    return "\n".join(lines)
