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

Retention: the last ``keep_last`` checkpoints plus the steps passed as ``keep_steps`` (the
recipe passes the best one, lowest dev loss, when ``train.keep_best``); resume always takes
the latest. ``check_disk_space`` refuses to start a run whose output disk lacks room for one
more checkpoint (estimated by ``estimate_checkpoint_bytes``).

Fault injection, for tests only: with the environment variable
``COLLD_FAULT_STALL_CHECKPOINT=<step>`` the save of that step logs a warning and sleeps for an
hour after writing ``trainable.safetensors`` and ``optimizer.pt`` to its temporary folder, so a
test can kill the process in the middle of a checkpoint write. Unset (always, outside tests) it
does nothing.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

log = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"^step_(\d{8})$")
STALL_ENV = "COLLD_FAULT_STALL_CHECKPOINT"
REQUIRED_FILES = (
    "trainable.safetensors",
    "optimizer.pt",
    "scheduler.pt",
    "rng.pt",
    "state.json",
    "config.yaml",
)
# rng.pt, state.json, config.yaml, file headers: a generous allowance beside the tensors.
_SMALL_FILES_BYTES = 1 << 20


class CheckpointError(ValueError):
    """A checkpoint that cannot be read; the message names the directory, file and remedy."""


class DiskSpaceError(ValueError):
    """Not enough free disk for a checkpoint (a ValueError so that the CLI prints it as an
    error message, like a bad config value, instead of a traceback)."""


@dataclass
class TrainState:
    """What the loop needs to continue exactly where it stopped."""

    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0
    audio_seconds: float = 0.0
    skipped_files: dict[str, str] = field(default_factory=dict)
    bad_steps: int = 0
    best_dev_loss: float | None = None  # lowest dev loss after step 0 (None: not evaluated)
    best_step: int | None = None  # the step that reached it (its checkpoint is kept)


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
    """The newest complete checkpoint. Writes are atomic (see the module docstring), so an
    incomplete ``step_*`` folder only appears when someone removed files by hand; it is
    skipped with a warning."""
    for path in reversed(list_checkpoints(run_dir)):
        missing = [name for name in REQUIRED_FILES if not (path / name).is_file()]
        if not missing:
            return path
        log.warning("ignoring incomplete checkpoint %s (missing %s)", path, ", ".join(missing))
    return None


def checkpoint_step(path: Path) -> int:
    """The step of a ``step_XXXXXXXX`` checkpoint directory."""
    match = _STEP_DIR.match(path.name)
    if match is None:
        raise ValueError(f"{path} is not a checkpoint directory (expected step_XXXXXXXX)")
    return int(match.group(1))


def best_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint with the lowest dev loss, as recorded by the latest checkpoint; None
    when no dev loss was recorded or that checkpoint is gone (``train.keep_best=false``)."""
    latest = latest_checkpoint(run_dir)
    if latest is None:
        return None
    step = json.loads((latest / "state.json").read_text(encoding="utf-8")).get("best_step")
    if step is None:
        return None
    path = checkpoint_dir(run_dir) / f"step_{step:08d}"
    return path if path.is_dir() else None


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
    keep_steps: Iterable[int] = (),
) -> Path:
    """Write a checkpoint atomically and prune old ones: the last ``keep_last`` stay, and so do
    the checkpoints of ``keep_steps`` (e.g. the best step)."""
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
    _maybe_stall(state.step, tmp)
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    torch.save(_rng_state(), tmp / "rng.pt")
    (tmp / "state.json").write_text(json.dumps(asdict(state), indent=1), encoding="utf-8")
    (tmp / "config.yaml").write_text(config_yaml, encoding="utf-8")
    _fsync_dir(tmp)
    if final.exists():  # the same step saved twice (e.g. final save right after a periodic one)
        _remove(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    protected = set(keep_steps)
    for old in list_checkpoints(run_dir)[:-keep_last]:
        if checkpoint_step(old) not in protected:
            _remove(old)
    log.info("checkpoint written: %s", final)
    return final


def _remove(path: Path) -> None:
    """Delete a checkpoint directory without ever leaving a partial ``step_*``: it is renamed
    to a ``.tmp-*`` name first (atomic), then deleted (a kill mid-way leaves only ``.tmp-*``)."""
    doomed = path.with_name(f".tmp-delete-{path.name}-{os.getpid()}")
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def _maybe_stall(step: int, tmp: Path) -> None:
    """The fault-injection hook of the module docstring (a no-op unless the variable is set)."""
    if os.environ.get(STALL_ENV, "") != str(step):
        return
    log.warning("%s=%d: stalling inside the checkpoint write (%s)", STALL_ENV, step, tmp)
    time.sleep(3600)


def estimate_checkpoint_bytes(module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Bytes one checkpoint of ``module`` and its AdamW ``optimizer`` takes: the state dict's
    tensors, two moment tensors per optimized parameter (AdamW's exp_avg and exp_avg_sq, in
    the parameter's dtype), and a small allowance for the other files."""
    weights = sum(t.numel() * t.element_size() for t in module.state_dict().values())
    moments = sum(
        2 * p.numel() * p.element_size()
        for group in optimizer.param_groups
        for p in group["params"]
    )
    return weights + moments + _SMALL_FILES_BYTES


def check_disk_space(run_dir: Path, needed_bytes: int, *, margin: float = 1.1) -> None:
    """Raise DiskSpaceError when the disk holding ``run_dir`` (or its nearest existing parent)
    has less free space than ``margin`` x ``needed_bytes``: one more checkpoint must fit, as
    old ones are pruned only after the new one is complete."""
    probe = Path(run_dir).absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    wanted = int(needed_bytes * margin)
    if free < wanted:
        raise DiskSpaceError(
            f"not enough free disk space for a checkpoint in {run_dir}: one checkpoint takes "
            f"about {needed_bytes / 1e6:.1f} MB (weights and AdamW state; {wanted / 1e6:.1f} MB "
            f"with {100 * (margin - 1):.0f}% to spare) but {probe} has {free / 1e6:.1f} MB free; "
            "free some space or set train.output_dir to a folder on a larger disk"
        )


def _fsync_dir(path: Path) -> None:
    """Flush the folder's files and the folder itself (its entries: a rename) to disk."""
    for item in path.iterdir() if path.is_dir() else []:
        if item.is_file():
            with open(item, "rb") as f:
                os.fsync(f.fileno())
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot fsync a directory
    finally:
        os.close(fd)


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
    for name in REQUIRED_FILES:
        if not (path / name).is_file():
            raise FileNotFoundError(f"checkpoint {path} is incomplete: {name} is missing")
    raw_state = json.loads((path / "state.json").read_text(encoding="utf-8"))
    known = {f for f in TrainState.__dataclass_fields__}
    state = TrainState(**{k: v for k, v in raw_state.items() if k in known})
    try:
        trainable = load_file(str(path / "trainable.safetensors"))
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error types
        raise _unreadable(path, "trainable.safetensors", err) from err
    ckpt = LoadedCheckpoint(
        trainable=trainable,
        optimizer=_load_tensors(path, "optimizer.pt"),
        scheduler=_load_tensors(path, "scheduler.pt"),
        state=state,
        config_yaml=(path / "config.yaml").read_text(encoding="utf-8"),
        path=path,
    )
    if restore_rng:
        _restore_rng(_load_tensors(path, "rng.pt"))
    return ckpt


def _load_tensors(path: Path, name: str) -> Any:
    """``torch.load(weights_only=True)``: tensors and plain containers only, never code."""
    try:
        return torch.load(path / name, weights_only=True, map_location="cpu")
    except Exception as err:  # noqa: BLE001 - pickle and torch raise many types
        raise _unreadable(path, name, err) from err


def _unreadable(path: Path, name: str, err: Exception) -> CheckpointError:
    first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return CheckpointError(
        f"checkpoint {path}: {name} cannot be read safely ({type(err).__name__}: {first_line}); "
        "colld loads only plain tensors (safetensors, torch.load weights_only=True), so the file "
        "is corrupt or was not written by colld. Delete that checkpoint directory to resume "
        "from the previous one"
    )
