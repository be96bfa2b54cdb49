"""The distillation recipe: setup -> train -> save, readable on one screen per function.

Runs unchanged on one CPU, one GPU, or many processes under ``accelerate launch`` /
``torchrun`` (HF Accelerate does all distributed work; colld has none of its own).

The loop itself (``train_update``, ``train_loop``, ``evaluate_dev``, ``_save``,
``run_training``) works on a ``TrainRun``: a trained module, a ``LossFn`` and the optimisation
state. Distillation (``Run``, below) and CTC fine-tuning (``colld.finetune.recipe``) are two
such runs, so both share the update, gradient accumulation, NaN guard, checkpoints, exact
resume and progress display; ``start_training`` is their shared setup tail.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, gather_object
from torch import nn
from transformers import get_scheduler

from colld import __version__
from colld.config import ConfigError, RunConfig, dump_config, from_dict, resolve, to_dict
from colld.data.batch import Batch
from colld.encoders.base import SpeechEncoder
from colld.errors import RunStoppedError
from colld.objectives.objective import DistillObjective, LossOutput
from colld.students.build import (
    build_student,
    count_encoder_parameters,
    plan_pruned_student,
    resolve_init,
    resolve_source_map,
    source_layers,
)
from colld.students.export import export_student
from colld.teachers import LoadedModel, load_teacher
from colld.train.checkpoint import (
    TrainState,
    check_disk_space,
    estimate_checkpoint_bytes,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from colld.train.data_setup import (
    BatchStream,
    build_data,
    calibration_batches,
    resolve_sources,
)
from colld.train.metrics import (
    RunLogger,
    loss_scalars,
    mean_losses,
    mean_over_processes,
    parameter_fingerprint,
)
from colld.train.precision import resolve_precision, warn_slow_cpu_bf16
from colld.train.step import Distiller, distill_loss, step_generator
from colld.train.teacher_cache import open_dev_cache, open_run_cache

log = logging.getLogger(__name__)

# Config keys that may change between a run and its resumption (they do not change the math).
RESUMABLE_CHANGES = {
    "train.max_steps",
    "train.log_every",
    "train.eval_every",
    "train.eval_batches",
    "train.ckpt_every",
    "train.keep_last",
    "train.output_dir",
    "train.device",
    "data.num_workers",
    "train.max_bad_steps",
    "train.keep_best",
    "train.deterministic",
}


class BadStepsError(RunStoppedError):
    """Too many non-finite steps in a row."""


LossFn = Callable[[nn.Module, Batch, torch.Generator], LossOutput]
"""(the trained module as prepared, a batch on the device, the step's generator) -> loss."""


def set_deterministic(enabled: bool) -> None:
    """``train.deterministic``: deterministic kernels everywhere (see TrainConfig). cuBLAS
    reads its workspace setting when it starts, so it is set before any CUDA work."""
    if not enabled:
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    log.info(
        "deterministic mode: deterministic kernels, %d intra-op threads (results are exact "
        "for the same thread count)",
        torch.get_num_threads(),
    )


def dropout_seed(seed: int, step: int, rank: int) -> int:
    """The global torch RNG's seed for update ``step`` on ``rank`` (dropout draws from it).
    Reseeding every update makes a resumed run's dropout that of the uninterrupted run, even
    though other code (a DataLoader iterator's base seed) draws from the global RNG in
    between; it differs from ``step_generator``'s seed so dropout and masks are independent."""
    return (seed * 1_000_003 + step * 7_919 + rank * 104_729 + 0x9E3779B9) % (2**63 - 1)


@dataclass(kw_only=True)
class TrainRun:
    """What the shared loop needs.

    cfg: the run's config; the loop reads ``cfg.train`` (a ``TrainConfig``) only.
    module: the trained module as prepared by Accelerate (possibly DDP-wrapped).
    loss_fn: the loss of one batch (see ``LossFn``).
    dev_metrics: the dev evaluation, called with the module in eval mode under no_grad;
        returns named scalars. None = ``mean_dev_loss`` (the mean of ``loss_fn`` on dev).
    selection_key: the scalar of ``dev_metrics`` whose lowest value after step 0 is the best
        step (kept as ``TrainState.best_dev_loss`` / ``best_step``).
    """

    cfg: Any
    accelerator: Accelerator
    module: nn.Module
    loss_fn: LossFn
    optimizer: torch.optim.Optimizer
    scheduler: object
    train: BatchStream
    dev: BatchStream | None
    state: TrainState
    run_dir: Path
    logger: RunLogger
    dev_metrics: Callable[[TrainRun], dict[str, float]] | None = None
    selection_key: str = "dev/loss"
    bad_batch_ids: list[str] = field(default_factory=list)  # of the last skipped update


@dataclass(kw_only=True)
class Run(TrainRun):
    """A distillation run: the shared loop's state plus the teacher, student and objective."""

    teacher: LoadedModel
    student: SpeechEncoder
    objective: DistillObjective
    student_init: dict[str, Any]
    """How the student was initialised: {"init": "teacher" | "prune" | "random", "from_layers":
    the teacher layer (1..L_T) each student layer was copied from, or None}."""

    @property
    def distiller(self) -> nn.Module:
        """The prepared (possibly DDP-wrapped) Distiller."""
        return self.module


def distill_loss_fn(teacher: SpeechEncoder, objective: DistillObjective) -> LossFn:
    """Distillation's ``LossFn``: ``distill_loss`` against the frozen ``teacher``."""

    def loss(module: nn.Module, batch: Batch, generator: torch.Generator) -> LossOutput:
        return distill_loss(module, teacher, objective, batch, generator)

    return loss


def make_accelerator(cfg: Any, *, find_unused_parameters: bool | None = None) -> Accelerator:
    """The run's Accelerator from ``cfg.train`` (device, precision). find_unused_parameters:
    DDP's setting; None = distillation's rule (True for unmasked runs)."""
    cpu = cfg.train.device == "cpu" or (
        cfg.train.device == "auto" and not torch.cuda.is_available()
    )
    probe = torch.device("cpu" if cpu else "cuda")
    if find_unused_parameters is None:
        # Unmasked runs leave the mask embedding unused: DDP must be told to tolerate that.
        find_unused_parameters = not cfg.objective.mask
    ddp = DistributedDataParallelKwargs(find_unused_parameters=find_unused_parameters)
    mixed_precision = resolve_precision(cfg.train.precision, probe)
    warn_slow_cpu_bf16(mixed_precision, probe)
    launcher = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")  # set by accelerate launch
    if launcher not in ("no", mixed_precision):
        log.warning(
            "the accelerate config asks for mixed_precision=%s but colld follows "
            "train.precision=%s (-> %s); set train.precision=%s to use it",
            launcher,
            cfg.train.precision,
            mixed_precision,
            launcher,
        )
    return Accelerator(
        cpu=cpu,
        mixed_precision=mixed_precision,
        kwargs_handlers=[ddp],
        step_scheduler_with_optimizer=False,
    )


def param_groups(module: torch.nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on biases, norms (1-D tensors) and the mask embedding."""
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "mask" in name else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def setup(cfg: RunConfig, *, resume: bool) -> Run:
    cfg = resolve(cfg)  # a RunConfig built in code, not by load_config, may still hold "auto"
    set_deterministic(cfg.train.deterministic)
    accelerator = make_accelerator(cfg)
    run_dir = Path(cfg.train.output_dir)
    checkpoint = find_resume_point(run_dir, cfg, resume)
    teacher = load_teacher(
        cfg.teacher.spec,
        trust_remote_code=cfg.teacher.trust_remote_code,
        revision=cfg.teacher.revision,
    )
    with accelerator.main_process_first():  # one process synthesises a missing corpus
        sources = resolve_sources(cfg.data, cfg.train.seed)
    spec = resolve_init(teacher.encoder, cfg.student)  # "auto" -> prune or teacher
    log.info("student.init=%s%s", spec.init, " (auto)" if cfg.student.init == "auto" else "")
    plan = None
    if spec.init == "prune":  # deterministic: a resumed run plans the same student
        calibration = calibration_batches(
            cfg.data, sources[0], teacher.feature_extractor, spec.prune_seconds
        )
        plan = plan_pruned_student(teacher.encoder, spec, calibration)
    student = build_student(teacher.encoder, spec, seed=cfg.train.seed, plan=plan)
    # layer_map "source" -> a list; the export records the objective as resolved
    objective_cfg = resolve_source_map(cfg.objective, teacher.encoder, spec, plan)
    with torch.random.fork_rng(devices=[]):  # the heads' init: from the seed, not the RNG's state
        torch.manual_seed(cfg.train.seed + 1)
        objective = DistillObjective.for_encoders(
            objective_cfg,
            student,
            teacher.encoder,
            head_channels=None if plan is None else plan.residual.tolist(),
        )
    _log_sizes(teacher.encoder, student, objective)
    target_cache = dev_cache = None
    if cfg.data.target_cache is not None:
        target_cache = open_run_cache(cfg, teacher, objective.teacher_layers, sources[0][0])
        if sources[1] is not None:
            dev_cache = open_dev_cache(cfg, teacher, objective.teacher_layers, sources[1][0])
    train, dev = build_data(
        cfg.data,
        teacher.feature_extractor,
        cfg.train.seed,
        accelerator,
        sources=sources,
        target_cache=target_cache,
        dev_cache=dev_cache,
    )
    if target_cache is not None and (dev is None or dev_cache is not None):
        # Every target comes from the cache: the teacher never runs (it still gives frame
        # counts, arithmetic on the lengths), so it stays off the training device.
        log.info("all teacher targets come from the cache: the teacher stays on the CPU")
    else:
        teacher.encoder.to(accelerator.device)
    started = start_training(cfg, accelerator, Distiller(student, objective), train, checkpoint)
    return Run(
        cfg=cfg,
        accelerator=accelerator,
        module=started.module,
        loss_fn=distill_loss_fn(teacher.encoder, objective),
        optimizer=started.optimizer,
        scheduler=started.scheduler,
        train=train,
        dev=dev,
        state=started.state,
        run_dir=run_dir,
        logger=started.logger,
        teacher=teacher,
        student=student,
        objective=objective,
        student_init={
            "init": spec.init,
            "from_layers": None
            if spec.init == "random"
            else source_layers(teacher.encoder, spec, plan),
        },
    )


@dataclass
class Started:
    """What ``start_training`` returns: the prepared module and optimizer, the scheduler, the
    (resumed) state and the logger."""

    module: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    state: TrainState
    logger: RunLogger


def start_training(
    cfg: Any,
    accelerator: Accelerator,
    module: nn.Module,
    train: BatchStream,
    checkpoint: Path | None,
    *,
    desc: str = "distill",
) -> Started:
    """The setup every recipe ends with: AdamW and the LR schedule from ``cfg.train``, the
    ``checkpoint``'s weights, optimizer, scheduler, RNG and data position (None = step 0), the
    metrics file trimmed to the resume point, the disk checked, Accelerate's ``prepare``, the
    config written to ``train.output_dir`` and the logger (progress bar titled ``desc``)."""
    run_dir = Path(cfg.train.output_dir)
    optimizer = torch.optim.AdamW(param_groups(module, cfg.train.weight_decay), lr=cfg.train.lr)
    scheduler = get_scheduler(
        cfg.train.schedule,
        optimizer,
        num_warmup_steps=cfg.train.warmup_steps,
        num_training_steps=cfg.train.max_steps,
    )
    state = TrainState()
    if checkpoint is not None:
        ckpt = load_checkpoint(checkpoint)
        module.load_state_dict(ckpt.trainable)
        optimizer.load_state_dict(ckpt.optimizer)
        scheduler.load_state_dict(ckpt.scheduler)
        state = ckpt.state
        train.seek(state.epoch, state.batches_in_epoch)
        log.info("resumed from %s at step %d", checkpoint, state.step)
    if accelerator.is_main_process:  # rows a killed attempt logged past its checkpoint
        _trim_metrics(run_dir / "metrics.jsonl", state.step if checkpoint is not None else -1)
    # Every process checks (the same disk, the same answer), so none waits for a failed one.
    check_disk_space(run_dir, estimate_checkpoint_bytes(module, optimizer))
    module, optimizer = accelerator.prepare(module, optimizer)
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, run_dir / "config.yaml")
    logger = RunLogger(
        run_dir,
        enabled=accelerator.is_main_process,
        total_steps=cfg.train.max_steps,
        start_step=state.step,
        desc=desc,
    )
    return Started(module, optimizer, scheduler, state, logger)


def find_resume_point(run_dir: Path, cfg: Any, resume: bool) -> Path | None:
    """The checkpoint to continue from. A run directory that holds checkpoints is always
    continued (so rerunning a command is idempotent and a killed run picks up where it
    stopped), provided the config matches; ``resume`` only makes a missing one worth a warning."""
    latest = latest_checkpoint(run_dir)
    if latest is None:
        if resume:
            log.warning("--resume: no checkpoint in %s yet; starting from step 0", run_dir)
        return None
    if not resume:
        log.info(
            "%s already holds %s: continuing that run (set train.output_dir to start a new one)",
            run_dir,
            latest.name,
        )
    saved = yaml.safe_load((latest / "config.yaml").read_text(encoding="utf-8"))
    try:  # keys added to colld since the run was written take their defaults, as they ran
        loaded = from_dict(type(cfg), saved)
        saved = to_dict(resolve(loaded) if isinstance(loaded, RunConfig) else loaded)
    except ConfigError:
        pass  # a key since removed or retyped: compare as written, it will be named
    changed = _config_differences(saved, to_dict(cfg)) - RESUMABLE_CHANGES
    if changed:
        raise ValueError(
            f"cannot resume {run_dir}: the config changed in ways that matter: "
            + ", ".join(sorted(changed))
            + " (restore them, or start a new run with another train.output_dir)"
        )
    return latest


def _trim_metrics(path: Path, step: int) -> None:
    """Drop metrics rows past the resumed ``step`` (-1: all rows, for a start from scratch): a
    killed run logged steps that it never checkpointed, and the resumed run logs them again."""
    if not path.is_file():
        return
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    kept = [line for line in lines if _metrics_step(line) <= step]
    if len(kept) < len(lines):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(kept), encoding="utf-8")
        os.replace(tmp, path)


def _metrics_step(line: str) -> float:
    """The step of a metrics row; a torn last row (killed mid-write) counts as past any step."""
    try:
        return json.loads(line).get("step", 0)
    except json.JSONDecodeError:
        return math.inf


def _config_differences(a: dict, b: dict, prefix: str = "") -> set[str]:
    keys = set(a) | set(b)
    diffs: set[str] = set()
    for key in keys:
        path = f"{prefix}{key}"
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            diffs |= _config_differences(va, vb, path + ".")
        elif va != vb:
            diffs.add(path)
    return diffs


def _log_sizes(teacher: SpeechEncoder, student: SpeechEncoder, objective: DistillObjective) -> None:
    t, s = count_encoder_parameters(teacher), count_encoder_parameters(student)
    log.info(
        "teacher %s: %d layers, width %d, %.2fM params | student: %d layers, width %d, %.2fM "
        "params (%.2fx smaller) | pairs %s",
        teacher.family,
        teacher.num_layers,
        teacher.hidden_dim,
        t / 1e6,
        student.num_layers,
        student.hidden_dim,
        s / 1e6,
        t / max(s, 1),
        ", ".join(f"s{i}->t{j}" for i, j in objective.pairs),
    )


def train_update(run: TrainRun) -> tuple[LossOutput, float, bool]:
    """One optimizer update over ``grad_accum`` batches. Returns (loss, grad norm, applied);
    the loss is this process' mean over its batches, detached."""
    acc, cfg = run.accelerator, run.cfg.train
    buffers = _snapshot_buffers(run.module)
    outs, ids = [], []
    for micro in range(cfg.grad_accum):
        batch = run.train.next_batch().to(acc.device)
        ids += batch.ids
        _log_batch_ids(run, micro, batch)
        # Masks, distractors and dropout are seeded by the batch's slot in the global update,
        # so W processes with grad_accum G draw what one process with G * W draws for the
        # same batches (colld.data.sampler deals the batches out the same way).
        slot = micro * acc.num_processes + acc.process_index
        generator = step_generator(cfg.seed, run.state.step, slot, acc.device)
        torch.manual_seed(dropout_seed(cfg.seed, run.state.step, slot))
        sync = nullcontext() if micro == cfg.grad_accum - 1 else acc.no_sync(run.module)
        with sync, acc.autocast():
            out = run.loss_fn(run.module, batch, generator)
            acc.backward(out.total / cfg.grad_accum)
        outs.append(out)
        seconds = acc.reduce(batch.durations.sum().to(acc.device).float(), reduction="sum")
        run.state.audio_seconds += float(seconds)
    params = [p for p in run.module.parameters() if p.requires_grad]
    max_norm = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
    grad_norm = float(acc.clip_grad_norm_(params, max_norm))
    out = mean_losses(outs)
    finite = torch.tensor(
        float(math.isfinite(grad_norm) and torch.isfinite(out.total).item()), device=acc.device
    )
    applied = bool(acc.reduce(finite, reduction="mean").item() == 1.0)
    if applied:
        run.optimizer.step()
        run.scheduler.step()
    else:
        log.warning(
            "step %d: non-finite loss or gradient (loss %s, grad norm %s); skipped, batch ids: %s",
            run.state.step,
            float(out.total),
            grad_norm,
            ", ".join(ids),
        )
        run.bad_batch_ids = ids
        _restore_buffers(run.module, buffers)  # e.g. running target statistics
    run.optimizer.zero_grad(set_to_none=True)
    return out, grad_norm, applied


def _snapshot_buffers(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the module's buffers (running statistics: small), so that a skipped update
    leaves no trace: its forward pass may already have merged NaN into them."""
    return {name: b.detach().clone() for name, b in module.named_buffers()}


@torch.no_grad()
def _restore_buffers(module: torch.nn.Module, saved: dict[str, torch.Tensor]) -> None:
    for name, buffer in module.named_buffers():
        buffer.copy_(saved[name])


def train_loop(run: TrainRun) -> None:
    cfg = run.cfg.train
    run.logger.start_window(run.state.audio_seconds)
    while run.state.step < cfg.max_steps:
        out, grad_norm, applied = train_update(run)
        run.state.bad_steps = 0 if applied else run.state.bad_steps + 1
        if run.state.bad_steps >= cfg.max_bad_steps:
            saved = _save(run)
            raise BadStepsError(
                f"{run.state.bad_steps} non-finite steps in a row (NaN/Inf loss or gradient; "
                f"train.max_bad_steps={cfg.max_bad_steps}) at step {run.state.step}, the last on "
                f"batch ids {', '.join(run.bad_batch_ids)}. None of them changed the weights: "
                f"the last good ones are in {saved or run.run_dir / 'checkpoints'}. Check the "
                f"files of those ids (colld data scan DIR --verify decodes every file) and the "
                f"warnings above for the other skipped steps, or lower train.lr"
            )
        if not applied:
            continue
        run.state.step += 1
        run.state.epoch, run.state.batches_in_epoch = run.train.position()
        _after_step(run, out, grad_norm)
    check_replicas(run)
    _save(run)


def _log_batch_ids(run: TrainRun, micro: int, batch: Batch) -> None:
    """At debug level (``colld -v``): the utterances each process trains on, per update."""
    if log.isEnabledFor(logging.DEBUG):
        log.debug(
            "batch ids: step=%d rank=%d micro=%d epoch=%d index=%d: %s",
            run.state.step + 1,
            run.accelerator.process_index,
            micro,
            batch.epoch,
            batch.batch_index,
            ",".join(batch.ids),
        )


def check_replicas(run: TrainRun) -> bool:
    """Whether every process holds bit-identical weights, as data parallelism must keep
    them. Logs each process' fingerprint at debug level, and a warning when they differ."""
    acc = run.accelerator
    fingerprint = parameter_fingerprint(acc.unwrap_model(run.module).named_parameters())
    log.debug(
        "parameter fingerprint: step=%d rank=%d: %s", run.state.step, acc.process_index, fingerprint
    )
    if acc.num_processes == 1:
        return True
    everyone = gather_object([fingerprint])
    if len(set(everyone)) == 1:
        return True
    log.warning(
        "the processes' weights differ at step %d (parameter fingerprints by rank: %s); the "
        "run directory holds the main process' weights",
        run.state.step,
        ", ".join(everyone),
    )
    return False


def _after_step(run: TrainRun, out: LossOutput, grad_norm: float) -> None:
    cfg, step = run.cfg.train, run.state.step
    if step % cfg.log_every == 0 or step == cfg.max_steps:
        speed = run.logger.throughput(run.state.audio_seconds)
        # The global update's means (over micro-batches and processes), not one process' share.
        scalars = mean_over_processes(loss_scalars(out, "train"), run.accelerator)
        scalars.update(
            {
                "train/grad_norm": grad_norm,
                "train/lr": run.scheduler.get_last_lr()[0],
                "train/audio_s_per_s": speed,
                "train/epoch": run.state.epoch,
                "train/audio_hours": run.state.audio_seconds / 3600,
            }
        )
        run.logger.log(step, scalars)
        postfix = {"loss": f"{scalars['train/loss']:.3f}"}
        if "train/acc" in scalars or run.selection_key == "dev/loss":
            postfix["acc"] = f"{scalars.get('train/acc', float('nan')):.2f}"
        postfix["audio_s/s"] = f"{speed:.1f}"
        run.logger.progress(step, postfix)
        run.logger.start_window(run.state.audio_seconds)
    if run.dev is not None and cfg.eval_every and step % cfg.eval_every == 0:
        evaluate_dev(run)
    new_best = cfg.keep_best and run.state.best_step == step
    if (step % cfg.ckpt_every == 0 or new_best) and step < cfg.max_steps:
        _save(run)


@torch.no_grad()
def evaluate_dev(run: TrainRun) -> dict[str, float]:
    """Evaluate on dev (``run.dev_metrics``, by default ``mean_dev_loss``), log the scalars and
    track the best step by ``run.selection_key`` (lower is better)."""
    run.module.eval()
    means = (run.dev_metrics or mean_dev_loss)(run)
    run.module.train()
    if not means:
        return {}
    run.logger.log(run.state.step, means)
    value = means[run.selection_key]
    best = run.state.best_dev_loss
    if run.state.step > 0 and (best is None or value < best):  # step 0: the untrained model
        run.state.best_dev_loss, run.state.best_step = value, run.state.step
    log.info(
        "step %d %s %.4f%s",
        run.state.step,
        run.selection_key.replace("/", " "),
        value,
        f" acc {means['dev/acc']:.3f}" if "dev/acc" in means else "",
    )
    return means


def mean_dev_loss(run: TrainRun) -> dict[str, float]:
    """Mean dev loss and health signals with fixed masks/distractors (seeded per batch),
    averaged over processes; {} when dev yields no batch."""
    acc = run.accelerator
    totals: dict[str, float] = {}
    count = 0
    for index, batch in enumerate(run.dev.one_pass(run.cfg.train.eval_batches)):
        generator = step_generator(run.cfg.train.seed + 1, index, acc.process_index, acc.device)
        with acc.autocast():
            out = run.loss_fn(run.module, batch.to(acc.device), generator)
        for key, value in loss_scalars(out, "dev").items():
            totals[key] = totals.get(key, 0.0) + value
        count += 1
    if count == 0:
        return {}
    return {
        k: float(acc.reduce(torch.tensor(v / count, device=acc.device), "mean"))
        for k, v in totals.items()
    }


def _save(run: TrainRun) -> Path | None:
    """Checkpoint the run (main process); returns the directory written (None elsewhere)."""
    run.accelerator.wait_for_everyone()
    if not run.accelerator.is_main_process:
        return None
    run.state.skipped_files.update(run.train.skipped())
    trainable = run.accelerator.unwrap_model(run.module).state_dict()
    best = run.state.best_step
    return save_checkpoint(
        run.run_dir,
        trainable=trainable,
        optimizer=run.optimizer,
        scheduler=run.scheduler,
        state=run.state,
        config_yaml=yaml.safe_dump(to_dict(run.cfg), sort_keys=False),
        keep_last=run.cfg.train.keep_last,
        keep_steps=(best,) if run.cfg.train.keep_best and best is not None else (),
    )


def export(run: Run) -> Path:
    """Write the student as a plain Hugging Face model directory; heads beside it."""
    out_dir = run.run_dir / "student"
    if run.accelerator.is_main_process:
        distiller = run.accelerator.unwrap_model(run.distiller)
        # The wrapper's own training-only tensors (Whisper's mask embedding) are added by
        # export_student; HF families keep theirs inside the model (masked_spec_embed).
        heads = {f"objective.{k}": v for k, v in distiller.objective.state_dict().items()}
        export_student(
            distiller.student,
            run.teacher.feature_extractor,
            out_dir,
            extra_files={"distill_heads.safetensors": heads},
            metadata=provenance(run, distiller.student, distiller.objective),
        )
    run.accelerator.wait_for_everyone()
    return out_dir


def provenance(run: Run, student: SpeechEncoder, objective: DistillObjective) -> dict[str, Any]:
    """What ``colld.json`` beside an exported student records (see ``export_student``)."""
    return {
        "colld_version": __version__,
        "argv": list(sys.argv),  # the command that produced it (the model card shows it)
        "teacher": {
            "spec": run.cfg.teacher.spec,
            "fingerprint": run.teacher.fingerprint,
            "parameters": count_encoder_parameters(run.teacher.encoder),
        },
        "objective": to_dict(objective.config),  # as resolved (layer_map "source" -> list)
        "pairs": [list(pair) for pair in objective.pairs],
        "student_init": run.student_init,
        "student_dim": student.hidden_dim,
        "num_student_layers": student.num_layers,
        "teacher_dim": run.teacher.encoder.hidden_dim,
        "num_teacher_layers": run.teacher.encoder.num_layers,
        "steps": run.state.step,
        "audio_hours_seen": run.state.audio_seconds / 3600,
        "data": data_provenance(run),
        "config": to_dict(run.cfg),
    }


def data_provenance(run: Run) -> dict[str, Any]:
    """What the student was trained on, for the model card: the train utterances' count and
    hours, and for the embedded corpus its languages and espeak-ng version (corpus.json)."""
    from colld.data.synth import load_corpus_info

    utterances = run.train.sampler.utterances
    data = {
        "source": "embedded" if run.cfg.data.train is None else "manifest",
        "train": run.cfg.data.train,
        "train_utterances": len(utterances),
        "train_hours": sum(u.duration for u in utterances) / 3600,
    }
    if run.cfg.data.train is None:
        info = load_corpus_info(run.cfg.data.corpus_dir)
        data.update(
            corpus_dir=run.cfg.data.corpus_dir,
            languages=info.languages,
            espeak_ng_version=info.espeak_ng_version,
        )
    return data


def run_training(run: TrainRun) -> None:
    """Evaluate the starting point on dev, train to ``train.max_steps``, evaluate the end
    (unless the loop just did) and checkpoint again when that made it the best step."""
    if run.dev is not None and run.state.step == 0:
        evaluate_dev(run)
    train_loop(run)
    every = run.cfg.train.eval_every
    if run.dev is not None and not (every and run.state.step % every == 0):
        evaluate_dev(run)  # the loop has not just done it
        if run.cfg.train.keep_best and run.state.best_step == run.state.step:
            _save(run)  # the final checkpoint's state now names itself the best


def distill(cfg: RunConfig, *, resume: bool = False) -> Path:
    """Run the whole recipe; returns the exported student directory."""
    run = setup(cfg, resume=resume)
    try:
        run_training(run)
        student_dir = export(run)
        skipped = run.train.skipped()
        if skipped:
            log.warning(
                "%d files were skipped during training (see the log lines above)", len(skipped)
            )
        return student_dir
    finally:
        run.logger.close()
        run.train.close()
