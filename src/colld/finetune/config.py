"""Configuration of ``colld finetune --task ctc``: typed kw-only dataclasses, built like the
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
    model: ModelConfig = field(default_factory=ModelConfig)
    """The pretrained encoder."""
    ctc: CTCConfig = field(default_factory=CTCConfig)
    """Units, vocabulary and head."""
    data: FinetuneDataConfig = field(default_factory=FinetuneDataConfig)
    """Training, dev and test data."""
    train: TrainConfig = field(default_factory=lambda: TrainConfig(**FINETUNE_TRAIN_DEFAULTS))
    """The optimisation loop (the distillation trainer's)."""


def load_finetune_config(
    path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> FinetuneConfig:
    """Defaults (``FINETUNE_TRAIN_DEFAULTS`` for ``train``), the YAML file, then overrides."""
    tree = config_tree(path, overrides, base={"train": dict(FINETUNE_TRAIN_DEFAULTS)})
    cfg = from_dict(FinetuneConfig, tree)
    validate_finetune(cfg)
    return cfg


def validate_finetune(cfg: FinetuneConfig) -> None:
    """Checks that need no model or data."""
    d = cfg.data
    validate_batching(d, "the longest utterance")
    validate_train(cfg.train)
    if not 0.0 <= cfg.ctc.final_dropout < 1.0:
        raise ConfigError(f"ctc.final_dropout must lie in [0, 1), found {cfg.ctc.final_dropout}")
    if cfg.model.spec == "fbank":
        raise ConfigError("model.spec 'fbank' has no weights to fine-tune; name an encoder")
    if d.train is None and (d.dev is not None or d.test is not None):
        raise ConfigError(
            "data.dev / data.test need data.train: with the embedded corpus the probe splits "
            f"are used (found data.dev={d.dev!r}, data.test={d.test!r})"
        )
