"""Run configuration: typed kw-only dataclasses, YAML files of overrides, ``a.b=c`` overrides.

Every section is a dataclass with a docstring per field. Building a config from YAML or
overrides checks each key and value against the dataclass types (unknown keys get a
"did you mean" suggestion), and ``validate`` runs once, before any heavy work. Values are
parsed with ``yaml.safe_load`` and never evaluated as code.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from colld.data.augment import AugmentConfig
from colld.objectives.objective import ObjectiveConfig, resolve_head_init
from colld.students.build import StudentSpec


class ConfigError(ValueError):
    """A configuration problem; the message names the key, the value and what was expected."""


@dataclass(kw_only=True)
class TeacherConfig:
    spec: str = "whisper-base"
    """Embedded name (``whisper-base``, ``whisper-tiny.en``), a CTranslate2 directory holding
    model.bin, a local Hugging Face model directory, or a hub id (needs network)."""
    trust_remote_code: bool = False
    """Allow a hub model's own Python code to run. Off unless you trust the source."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) for hub ids."""


@dataclass(kw_only=True)
class DataConfig:
    corpus_dir: str = "data/corpus"
    """The embedded espeak-ng corpus; built here on first use when ``train`` is not given."""
    corpus_hours: float = 1.0
    """Hours of speech to synthesise when the embedded corpus is built."""
    train: str | None = None
    """Your training data: a JSONL/TSV manifest, a lhotse CutSet, a directory of audio, or a
    HF dataset saved to disk. None = the embedded corpus' train split."""
    dev: str | None = None
    """Held-out data for the dev loss. None = the embedded corpus' dev split (or none)."""
    train_hours: float | None = None
    """Train on only this many hours of the training data: the shortest prefix of one fixed
    shuffle of it (the same for every run and seed, so smaller subsets lie inside larger ones)
    that reaches them. With ``target_cache`` the cache still covers the whole training data
    (one cache serves every subset). None = all of it."""
    batch_seconds: float = 80.0
    """Seconds of audio per batch and process (before gradient accumulation)."""
    max_duration: float = 15.0
    """Utterances longer than this are cropped to a random segment of this many seconds."""
    num_workers: int = 2
    """DataLoader worker processes (front ends are computed in them)."""
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    """Waveform augmentation applied before teacher and student see the audio."""
    target_cache: str | None = None
    """A teacher-target cache directory (``colld cache-teacher``): training reads the teacher's
    targets from it instead of running the teacher, on the cache's fixed segments (utterances
    cut into ``max_duration`` pieces, used whole: no random crops). A cache built for another
    teacher, layers, front end, ``max_duration`` or data is refused, as is a partial one.
    The dev loss reads the cache's dev part the same way; when every target comes from the
    cache the teacher stays on the CPU (it is not moved to the training device). Needs
    augmentation off. None = run the teacher online."""


@dataclass(kw_only=True)
class TrainConfig:
    max_steps: int = 250
    """Optimizer updates. The default fits the main job in ~25 minutes on 2 CPU cores
    (~5.2 s per 59 s batch, docs/benchmarks.md); a GPU run wants tens of thousands."""
    lr: float = 5e-4
    """Peak learning rate (AdamW)."""
    warmup_steps: int = 25
    """Linear warm-up steps."""
    schedule: Literal["linear", "cosine", "constant_with_warmup"] = "linear"
    """Decay after warm-up (transformers' scheduler names)."""
    weight_decay: float = 0.01
    """AdamW weight decay (not applied to biases, norms and the mask embedding)."""
    grad_clip: float = 10.0
    """Clip the global gradient norm to this value (0 = off)."""
    grad_accum: int = 1
    """Batches accumulated per optimizer update."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """Mixed precision. auto = bf16 where the device supports it natively (CUDA with bf16, a
    CPU with AVX512-BF16 or AMX), fp16 on older CUDA, fp32 otherwise. Losses are always
    computed in fp32."""
    seed: int = 0
    """Seeds student initialisation, data order, crops, augmentation, masks and distractors."""
    deterministic: bool = False
    """``torch.use_deterministic_algorithms(True)`` (and, on CUDA, deterministic cuDNN and
    cuBLAS workspaces): a rerun, or a killed run resumed from its checkpoint, ends with
    bit-identical weights on the same machine and thread count. Slower on GPUs (an op without
    a deterministic kernel raises). CPU runs measured here were exact without it too."""
    log_every: int = 10
    """Steps between log lines / TensorBoard points."""
    eval_every: int = 125
    """Steps between dev-loss evaluations (0 = only at the end)."""
    eval_batches: int = 20
    """Dev batches per evaluation (0 = the whole dev set)."""
    ckpt_every: int = 50
    """Steps between checkpoints (written atomically)."""
    keep_last: int = 2
    """Checkpoints to keep (older ones are deleted)."""
    keep_best: bool = True
    """Also keep the checkpoint with the lowest dev loss (saved when an evaluation sets a new
    best, whatever ``ckpt_every`` says); never pruned. Resuming still takes the latest."""
    max_bad_steps: int = 5
    """Stop after this many NaN/Inf steps in a row (each bad step is skipped, not applied)."""
    output_dir: str = "runs/colld"
    """Where checkpoints, logs and the exported student go."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto = what accelerate picks (GPU when present)."""


@dataclass(kw_only=True)
class RunConfig:
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    """The frozen teacher."""
    student: StudentSpec = field(default_factory=StudentSpec)
    """The student's shape and initialisation."""
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    """The distillation objective (CoLLD by default)."""
    data: DataConfig = field(default_factory=DataConfig)
    """Training and dev data."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """The optimisation loop."""


# ``colld distill --quick``: a run that finishes in a few minutes on 2 CPU cores (CI uses it).
QUICK_OVERRIDES: tuple[str, ...] = (
    "data.corpus_dir=data/corpus-quick",
    "data.corpus_hours=0.05",
    "data.batch_seconds=24",
    "data.max_duration=8",
    "data.num_workers=1",
    "train.max_steps=12",
    "train.warmup_steps=3",
    "train.log_every=2",
    "train.eval_every=6",
    "train.eval_batches=2",
    "train.ckpt_every=6",
    "train.output_dir=runs/quick",
)


# --------------------------------------------------------------------------------------
# Building dataclasses from nested dicts, with checks.


def from_dict(cls: type, data: dict[str, Any], where: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``, checking keys and value types recursively."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, found {data!r}")
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls) if f.init]
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f"; known keys: {', '.join(known)}"
            raise ConfigError(f"unknown config key '{path}'{hint}")
        kwargs[key] = _coerce(hints[key], value, path)
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, path)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, path)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{path}: {value!r} fits none of {tp}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{path}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{path}: expected a list, found {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{path}: expected {len(args)} values, found {value!r}")
            return tuple(
                _coerce(a, v, f"{path}[{i}]")
                for i, (a, v) in enumerate(zip(args, value, strict=False))
            )
        item = args[0] if args else Any
        coerced = [_coerce(item, v, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(coerced) if origin is tuple else coerced
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, found {value!r}")
        return value
    if tp is float:
        if isinstance(value, str) and _FLOAT_LITERAL.fullmatch(value.strip()):
            return float(value)  # YAML 1.1 reads "1e-4" (no dot) as a string
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{path}: expected a number, found {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, found {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, found {value!r}")
        return value
    raise ConfigError(f"{path}: unsupported config type {tp}")


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict (tuples as lists) for YAML and checkpoints."""

    def plain(value: Any) -> Any:
        if isinstance(value, tuple | list):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(dataclasses.asdict(cfg))


_FLOAT_LITERAL = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b=c`` -> (["a", "b"], value parsed as YAML: numbers, true/false, [lists], null)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key.sub=value")
    key, raw = text.split("=", 1)
    if not key.strip():
        raise ConfigError(f"override '{text}' has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"override '{text}': value is not valid YAML ({err})") from err
    return key.strip().split("."), value


def _set_nested(tree: dict[str, Any], keys: list[str], value: Any) -> None:
    node = tree
    for key in keys[:-1]:
        child = node.get(key)
        if not isinstance(child, dict):
            child = {}
            node[key] = child
        node = child
    node[keys[-1]] = value


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def load_config(
    path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> RunConfig:
    """Defaults, then the YAML file's values, then ``a.b=c`` overrides; validated once."""
    cfg = from_dict(RunConfig, config_tree(path, overrides))
    validate(cfg)
    return resolve(cfg)


def config_tree(
    path: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    base: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The nested dict of ``base`` (default values that differ from the dataclasses'), then the
    YAML file's values, then ``a.b=c`` overrides; not yet checked (``from_dict`` does that)."""
    tree: dict[str, Any] = _merge({}, base or {})
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {path} is not valid YAML: {err}") from err
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path}: expected a mapping at the top level")
        tree = _merge(tree, loaded)
    for text in overrides:
        keys, value = parse_override(text)
        _set_nested(tree, keys, value)
    return tree


def resolve(cfg: RunConfig) -> RunConfig:
    """Make the "auto" values concrete, so a run records what it actually used (today:
    ``objective.head_init``, which depends on ``student.init``). Idempotent."""
    objective = resolve_head_init(cfg.objective, cfg.student.init)
    return dataclasses.replace(cfg, objective=objective)


def validate(cfg: RunConfig) -> None:
    """Checks that need no model: ranges and combinations. Model-dependent checks (layer map
    against depths, student size against the teacher) run right after the teacher loads."""
    d = cfg.data
    validate_batching(d, "one cropped utterance")
    validate_train(cfg.train)
    if d.train_hours is not None:
        check_ranges(positive={"data.train_hours": d.train_hours})
    if d.target_cache is not None and not d.target_cache.strip():
        raise ConfigError("data.target_cache must name a directory or be null, found ''")
    if d.target_cache is not None and d.augment.enabled:
        raise ConfigError(
            "data.target_cache and data.augment.enabled cannot be combined: the cache holds the "
            "teacher's targets for un-augmented segments, while augmented audio changes every "
            "epoch; turn one of them off"
        )
    cfg.objective.validate_static()


def validate_batching(d: Any, unit: str) -> None:
    """The ``data`` section's sizes (shared by every recipe): positive sizes, workers >= 0, and
    ``batch_seconds >= max_duration`` so that ``unit`` (what max_duration bounds) fits a batch."""
    check_ranges(
        positive={
            "data.batch_seconds": d.batch_seconds,
            "data.max_duration": d.max_duration,
            "data.corpus_hours": d.corpus_hours,
        },
        non_negative={"data.num_workers": d.num_workers},
    )
    if d.batch_seconds < d.max_duration:
        raise ConfigError(
            f"data.batch_seconds ({d.batch_seconds}) must be at least data.max_duration "
            f"({d.max_duration}) so that {unit} fits a batch"
        )


def check_ranges(
    *, positive: dict[str, float] | None = None, non_negative: dict[str, float] | None = None
) -> None:
    """ConfigError naming the first key whose value is not > 0 (``positive``) or >= 0."""
    for key, value in (positive or {}).items():
        if value <= 0:
            raise ConfigError(f"{key} must be > 0, found {value}")
    for key, value in (non_negative or {}).items():
        if value < 0:
            raise ConfigError(f"{key} must be >= 0, found {value}")


def validate_train(t: TrainConfig) -> None:
    """The checks of the ``train`` section (shared by every recipe that uses TrainConfig)."""
    check_ranges(
        positive={
            "train.max_steps": t.max_steps,
            "train.lr": t.lr,
            "train.grad_accum": t.grad_accum,
            "train.log_every": t.log_every,
            "train.ckpt_every": t.ckpt_every,
            "train.keep_last": t.keep_last,
            "train.max_bad_steps": t.max_bad_steps,
        },
        non_negative={
            "train.warmup_steps": t.warmup_steps,
            "train.weight_decay": t.weight_decay,
            "train.grad_clip": t.grad_clip,
            "train.eval_every": t.eval_every,
            "train.eval_batches": t.eval_batches,
        },
    )
    if t.warmup_steps >= t.max_steps and t.schedule != "constant_with_warmup":
        raise ConfigError(
            f"train.warmup_steps ({t.warmup_steps}) must be below train.max_steps ({t.max_steps})"
        )


def dump_config(cfg: RunConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False), encoding="utf-8")
