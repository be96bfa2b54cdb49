"""Atomic training checkpoints and resume.

A checkpoint is a directory ``<run>/checkpoints/step_00001234/`` holding
    trainable.safetensors   student + heads + normaliser buffers (the Distiller's state)
    optimizer.pt, scheduler.pt   their state dicts (loaded with weights_only=True)
    rng.pt                  torch / numpy / python RNG states (weights_only-safe tensors)
    state.json              step, data position, counters
    config.yaml             the resolved run config
It is written under a temporary name in the same folder and renamed when complete, so a
directory named ``step_*`` is always whole; a kill during the write leaves only a ``.tmp-*``
folder, which is ignored and cleaned up by the next save.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

log = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"^step_(\d{8})$")


@dataclass
class TrainState:
    """What the loop needs to continue exactly where it stopped."""

    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0
    audio_seconds: float = 0.0
    skipped_files: dict[str, str] = field(default_factory=dict)
    bad_steps: int = 0
    best_dev_loss: float | None = None


def checkpoint_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name)]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def _rng_state() -> dict[str, torch.Tensor]:
    state = {
        "torch": torch.get_rng_state(),
        "numpy": torch.from_numpy(np.frombuffer(_pickle_free_numpy_state(), dtype=np.uint8).copy()),
        "python": torch.tensor(list(random.getstate()[1]), dtype=torch.int64),
    }
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            state[f"cuda{i}"] = s
    return state


def _pickle_free_numpy_state() -> bytes:
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    header = json.dumps(
        {"name": name, "pos": int(pos), "has_gauss": int(has_gauss), "gauss": float(gauss)}
    )
    head = header.encode().ljust(256, b" ")
    return head + np.asarray(keys, dtype=np.uint32).tobytes()


def _restore_rng(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["torch"])
    raw = state["numpy"].numpy().tobytes()
    meta = json.loads(raw[:256].decode().strip())
    keys = np.frombuffer(raw[256:], dtype=np.uint32)
    np.random.set_state((meta["name"], keys, meta["pos"], meta["has_gauss"], meta["gauss"]))
    py = state["python"].tolist()
    random.setstate((3, tuple(py), None))
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            if f"cuda{i}" in state:
                torch.cuda.set_rng_state(state[f"cuda{i}"], i)


def save_checkpoint(
    run_dir: Path,
    *,
    trainable: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    state: TrainState,
    config_yaml: str,
    keep_last: int,
) -> Path:
    """Write a checkpoint atomically and prune old ones (keep the last ``keep_last``)."""
    root = checkpoint_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    final = root / f"step_{state.step:08d}"
    tmp = root / f".tmp-step_{state.step:08d}-{os.getpid()}"
    tmp.mkdir()
    tensors = {k: v.detach().contiguous().cpu() for k, v in trainable.items()}
    save_file(tensors, str(tmp / "trainable.safetensors"))
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    torch.save(_rng_state(), tmp / "rng.pt")
    (tmp / "state.json").write_text(json.dumps(asdict(state), indent=1), encoding="utf-8")
    (tmp / "config.yaml").write_text(config_yaml, encoding="utf-8")
    _fsync_dir(tmp)
    if final.exists():  # the same step saved twice (e.g. final save right after a periodic one)
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    for old in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    log.info("checkpoint written: %s", final)
    return final


def _fsync_dir(path: Path) -> None:
    for item in path.iterdir() if path.is_dir() else []:
        if item.is_file():
            with open(item, "rb") as f:
                os.fsync(f.fileno())


@dataclass
class LoadedCheckpoint:
    trainable: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    state: TrainState
    config_yaml: str
    path: Path


def load_checkpoint(path: Path, *, restore_rng: bool = True) -> LoadedCheckpoint:
    """Load a checkpoint directory. Training state is read with ``weights_only=True``."""
    for name in ("trainable.safetensors", "optimizer.pt", "scheduler.pt", "state.json"):
        if not (path / name).is_file():
            raise FileNotFoundError(f"checkpoint {path} is incomplete: {name} is missing")
    raw_state = json.loads((path / "state.json").read_text(encoding="utf-8"))
    state = TrainState(**raw_state)
    ckpt = LoadedCheckpoint(
        trainable=load_file(str(path / "trainable.safetensors")),
        optimizer=torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu"),
        scheduler=torch.load(path / "scheduler.pt", weights_only=True, map_location="cpu"),
        state=state,
        config_yaml=(path / "config.yaml").read_text(encoding="utf-8"),
        path=path,
    )
    if restore_rng and (path / "rng.pt").is_file():
        _restore_rng(torch.load(path / "rng.pt", weights_only=True))
    return ckpt
