"""Configuration of ``colld finetune --task ctc|s2t``: typed kw-only dataclasses, built like the
distillation config (YAML overrides, then ``a.b=c``; ``colld.config``) and validated once.

The ``train`` section is distillation's ``TrainConfig`` (the same trainer runs both) with the
defaults of ``FINETUNE_TRAIN_DEFAULTS``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from colld.config import (
    ConfigError,
    TrainConfig,
    config_tree,
    from_dict,
    validate_batching,
    validate_train,
)

Units = Literal["chars", "phonemes"]
FinetuneTask = Literal["ctc", "s2t"]
AdapterInit = Literal["lstsq", "identity", "random"]

# Where fine-tuning's defaults differ from distillation's (a whole encoder is trained, so a
# smaller peak LR; the dev error rate selects the exported step, so evaluate more often).
FINETUNE_TRAIN_DEFAULTS: dict[str, object] = {
    "max_steps": 500,
    "lr": 1e-4,
    "warmup_steps": 50,
    "eval_every": 50,
    "eval_batches": 0,
    "ckpt_every": 50,
    "output_dir": "runs/finetune",
}
# Speech-to-text trains a linear adapter under a frozen decoder by default: a larger LR, and
# the dev loss (teacher-forced, cheap) selects the step.
S2T_TRAIN_DEFAULTS: dict[str, object] = {
    **FINETUNE_TRAIN_DEFAULTS,
    "max_steps": 300,
    "lr": 1e-3,
    "warmup_steps": 30,
    "output_dir": "runs/finetune-s2t",
}
TRAIN_DEFAULTS: dict[str, dict[str, object]] = {
    "ctc": FINETUNE_TRAIN_DEFAULTS,
    "s2t": S2T_TRAIN_DEFAULTS,
}


@dataclass(kw_only=True)
class ModelConfig:
    spec: str = "whisper-base"
    """The encoder to fine-tune: an exported student directory, an embedded teacher name
    (``whisper-base``), a Hugging Face model directory or hub id (what ``colld evaluate``
    accepts, except ``fbank``)."""
    trust_remote_code: bool = False
    """Allow a hub model's own Python code to run (hub ids only)."""
    revision: str | None = None
    """Hub revision for hub ids."""


@dataclass(kw_only=True)
class CTCConfig:
    units: Units = "chars"
    """``chars``: characters of the ``text`` field (``colld.eval.tasks.char_tokens``, as the
    ``char`` probe); ``phonemes``: the space-separated IPA of the ``phonemes`` field (as the
    ``pr`` probe)."""
    vocab: str | None = None
    """A ``vocab.json`` ({token: id}, id 0 the blank, an ``<unk>`` token) to use instead of
    building the vocabulary from the training split, e.g. that of an earlier fine-tune. Symbols
    of the training data outside it are counted, logged and trained as ``<unk>``."""
    final_dropout: float = 0.1
    """Dropout on the last hidden state before the linear head (HF ForCTC's ``final_dropout``)."""
    freeze_feature_encoder: bool = True
    """Keep the convolutional waveform front end (``feature_extractor`` of the wav2vec 2.0
    families) fixed, as Hugging Face's CTC fine-tuning recipes do. Whisper's convolutions and
    w2v-BERT's feature projection are always trained."""


@dataclass(kw_only=True)
class S2TConfig:
    decoder: str = "whisper-base"
    """The Whisper model whose frozen decoder and tokenizer are used: an embedded name
    (``whisper-base``, ``whisper-tiny.en``), a CTranslate2 directory, or a Hugging Face
    Whisper directory / hub id with its decoder. Its own encoder sets the frame rate the
    encoder must have and, with ``adapter_init=lstsq``, the adapter's regression target."""
    tasks: list[str] = field(default_factory=lambda: ["transcribe", "translate"])
    """``transcribe`` (the ``text`` in its language) and / or ``translate`` (X->En, rows with
    a ``text_en`` whose language is not English)."""
    train_adapter: bool = True
    """Train the adapter. Off (with ``train_encoder`` off) nothing is trained: the initialised
    adapter is scored as it is (e.g. Whisper as shipped, or a student with the lstsq map)."""
    train_encoder: bool = False
    """Also train the encoder (else only the adapter)."""
    adapter_init: AdapterInit = "lstsq"
    """``lstsq``: ridge regression onto the decoder's own encoder's last states over
    ``lstsq_utterances`` training clips; ``identity`` (equal widths only); ``random``."""
    lstsq_utterances: int = 200
    """Training clips the ``lstsq`` init regresses over."""
    ridge: float = 1e-3
    """Ridge penalty of the ``lstsq`` init, relative to the mean input variance."""
    pad_to_window: bool = False
    """Whisper encoders only: pad each clip to the 30 s window with silence and let the
    decoder attend to every frame, as Whisper itself runs (10x the encoder cost on 3 s
    clips). With ``train.max_steps=0`` and the decoder's own encoder this is Whisper as
    shipped (``adapter_init`` becomes identity)."""
    max_new_tokens: int = 224
    """Greedy decoding stops after this many tokens without ``<|endoftext|>`` (Whisper's
    own limit: half its 448 positions)..."""
    max_tokens_per_second: float = 50.0
    """...or after 8 + this many tokens per second of the clip, whichever comes first (the
    corpus' densest reference, Bengali, has 38 tokens per second): a decoder stuck in a
    repetition loop stops early instead of running to ``max_new_tokens``."""


@dataclass(kw_only=True)
class FinetuneDataConfig:
    corpus_dir: str = "data/corpus"
    """The embedded corpus: its probe-train / probe-dev / probe-test splits are used when
    ``train`` is not given (built here with ``corpus_hours`` when missing)."""
    corpus_hours: float = 1.0
    """Hours of speech to synthesise when the embedded corpus is built."""
    train: str | None = None
    """Transcribed training data (a JSONL/TSV manifest, lhotse CutSet, HF dataset on disk)
    whose rows carry ``text`` (chars) or ``phonemes``. None = the corpus' probe-train."""
    dev: str | None = None
    """Dev data that selects the exported step. None = probe-dev with the corpus, else none."""
    test: str | None = None
    """Data the final CER / PER is reported on. None = probe-test with the corpus, else none."""
    batch_seconds: float = 60.0
    """Seconds of audio per batch and process (before gradient accumulation)."""
    max_duration: float = 20.0
    """Utterances longer than this are left out (counted and logged), never cropped: a crop
    would cut the audio away from its transcript. At most 30 for Whisper."""
    num_workers: int = 2
    """DataLoader worker processes."""


@dataclass(kw_only=True)
class FinetuneConfig:
    task: FinetuneTask = "ctc"
    """``ctc``: encoder + CTC head; ``s2t``: encoder + adapter under a frozen Whisper decoder."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The pretrained encoder."""
    ctc: CTCConfig = field(default_factory=CTCConfig)
    """Units, vocabulary and head (``task=ctc``)."""
    s2t: S2TConfig = field(default_factory=S2TConfig)
    """Decoder, tasks and adapter (``task=s2t``)."""
    data: FinetuneDataConfig = field(default_factory=FinetuneDataConfig)
    """Training, dev and test data."""
    train: TrainConfig = field(default_factory=lambda: TrainConfig(**FINETUNE_TRAIN_DEFAULTS))
    """The optimisation loop (the distillation trainer's)."""


def load_finetune_config(
    path: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    *,
    task: FinetuneTask = "ctc",
) -> FinetuneConfig:
    """Defaults (``TRAIN_DEFAULTS[task]`` for ``train``), the YAML file, then overrides."""
    if task not in TRAIN_DEFAULTS:
        raise ConfigError(
            f"unknown fine-tuning task {task!r}; expected one of {sorted(TRAIN_DEFAULTS)}"
        )
    base = {"task": task, "train": dict(TRAIN_DEFAULTS[task])}
    tree = config_tree(path, overrides, base=base)
    if tree.get("task") != task:
        raise ConfigError(
            f"the config says task={tree.get('task')!r} but --task is {task!r}; drop one"
        )
    cfg = from_dict(FinetuneConfig, tree)
    validate_finetune(cfg)
    return cfg


def validate_finetune(cfg: FinetuneConfig) -> None:
    """Checks that need no model or data."""
    d = cfg.data
    validate_batching(d, "the longest utterance")
    validate_train(cfg.train)
    if cfg.task == "s2t":
        validate_s2t(cfg.s2t)
    if not 0.0 <= cfg.ctc.final_dropout < 1.0:
        raise ConfigError(f"ctc.final_dropout must lie in [0, 1), found {cfg.ctc.final_dropout}")
    if cfg.model.spec == "fbank":
        raise ConfigError("model.spec 'fbank' has no weights to fine-tune; name an encoder")
    if d.train is None and (d.dev is not None or d.test is not None):
        raise ConfigError(
            "data.dev / data.test need data.train: with the embedded corpus the probe splits "
            f"are used (found data.dev={d.dev!r}, data.test={d.test!r})"
        )


def validate_s2t(cfg: S2TConfig) -> None:
    if not cfg.tasks or any(t not in ("transcribe", "translate") for t in cfg.tasks):
        raise ConfigError(f"s2t.tasks must list transcribe and / or translate, found {cfg.tasks}")
    if cfg.lstsq_utterances < 1:
        raise ConfigError(f"s2t.lstsq_utterances must be >= 1, found {cfg.lstsq_utterances}")
    if cfg.ridge < 0:
        raise ConfigError(f"s2t.ridge must be >= 0, found {cfg.ridge}")
    if cfg.max_tokens_per_second <= 0:
        raise ConfigError(
            f"s2t.max_tokens_per_second must be > 0, found {cfg.max_tokens_per_second}"
        )
    if cfg.max_new_tokens < 1:
        raise ConfigError(f"s2t.max_new_tokens must be >= 1, found {cfg.max_new_tokens}")
