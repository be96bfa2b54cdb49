"""Data-parallel training through HF Accelerate: two CPU processes (gloo) under torchrun.

Two tiny runs on the same data: 2 processes x ``train.grad_accum=1`` and 1 process x
``grad_accum=2``. Both have the same global batch per update, and more: the sampler deals one
global batch sequence out to the processes (``colld.data.sampler``) and the trainer seeds masks,
distractors and dropout by a batch's slot in the update (``recipe.train_update``), so process
``r`` of the first run trains on micro-batch ``r`` of the second with the same random draws.
What is left to differ is rounding: DDP's all-reduce of the two gradients against in-place
accumulation, and how the logged means are taken (both runs use ``OMP_NUM_THREADS=1``, so the
kernels' own summation order matches) - hence tolerances rather than equality (``LOSS_ATOL``).
The tiny teacher is Whisper's (50 frames/s); with the tiny wav2vec 2.0 one (1,600 frames/s)
attention made each run take a minute here instead of 15 s.

The runs' evidence comes from what colld records anyway: ``metrics.jsonl``, the run directory,
and the debug log (``colld -v``) lines naming each process' batch ids per update and its
parameter fingerprint at the end.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file

from colld.data.manifest import Utterance
from colld.data.sampler import DurationBucketSampler, effective_duration
from colld.testing import TINY_RUN_OVERRIDES, tiny_teacher_dir, write_tones
from colld.train.checkpoint import list_checkpoints
from colld.train.metrics import parameter_fingerprint

REPO = Path(__file__).resolve().parents[2]
NUM_STEPS = 4
NUM_PROCESSES = 2
# Same batches and draws; only rounding differs (module doc). Measured here: losses 1.2e-7
# apart (the float32 mean over micro-batches against the float64 mean over processes), grad
# norms and final weights bit-identical. 1e-5 leaves room for other CPUs' kernels and reduction
# orders without hiding a real mismatch: another batch, mask or init moves the loss by 1e-2-1e-1.
LOSS_ATOL = 1e-5
WEIGHT_ATOL = 1e-5
OVERRIDES = (
    *TINY_RUN_OVERRIDES,
    "data.batch_seconds=4",
    "data.max_duration=2",
    f"train.max_steps={NUM_STEPS}",
    "train.device=cpu",
)
BATCH_LINE = re.compile(
    r"batch ids: step=(\d+) rank=(\d+) micro=(\d+) epoch=(\d+) index=(\d+): (\S*)"
)
FINGERPRINT_LINE = re.compile(r"parameter fingerprint: step=(\d+) rank=(\d+): ([0-9a-f]+)")


@dataclass
class RunRecord:
    run_dir: Path
    log: str  # stdout + stderr of every process

    def batches(self) -> dict[tuple[int, int, int], tuple[int, int, list[str]]]:
        """(step, rank, micro) -> (epoch, index in the rank's epoch, utterance ids)."""
        found = {}
        for step, rank, micro, epoch, index, ids in BATCH_LINE.findall(self.log):
            key = (int(step), int(rank), int(micro))
            assert key not in found, f"two batches logged for {key}"
            found[key] = (int(epoch), int(index), ids.split(","))
        return found

    def train_rows(self) -> list[dict]:
        lines = (self.run_dir / "metrics.jsonl").read_text().splitlines()
        return [row for row in map(json.loads, lines) if "train/loss" in row]


def _launch(module_args: list[str], out: Path) -> RunRecord:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", *module_args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-6000:]
    return RunRecord(out, proc.stdout)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, RunRecord]:
    root = tmp_path_factory.mktemp("multiprocess")
    teacher = tiny_teacher_dir("whisper", root / "teacher")  # 50 frames/s: cheap attention
    durations = np.random.default_rng(1).uniform(0.6, 2.0, size=24).tolist()
    audio = write_tones(root / "audio", durations)

    def colld_args(out: Path, *extra: str) -> list[str]:
        paths = ["--teacher", str(teacher), "--data", str(audio), "--output", str(out)]
        return ["colld", "-v", "distill", *paths, *OVERRIDES, *extra]

    torchrun = ["torch.distributed.run", "--standalone", f"--nproc_per_node={NUM_PROCESSES}", "-m"]
    multi = _launch([*torchrun, *colld_args(root / "multi")], root / "multi")
    single = _launch(
        colld_args(root / "single", f"train.grad_accum={NUM_PROCESSES}"), root / "single"
    )
    return {"multi": multi, "single": single}


def test_processes_train_on_disjoint_batches(runs: dict[str, RunRecord]) -> None:
    batches = runs["multi"].batches()
    expected = {(s, r, 0) for s in range(1, NUM_STEPS + 1) for r in range(NUM_PROCESSES)}
    assert set(batches) == expected, "every process logs one batch per update"
    # The comparison below is meant to stay inside the first epoch, before its last round.
    assert {epoch for epoch, _, _ in batches.values()} == {0}
    seen: list[str] = []
    for step in range(1, NUM_STEPS + 1):
        per_rank = [batches[(step, r, 0)] for r in range(NUM_PROCESSES)]
        assert [index for _, index, _ in per_rank] == [step - 1] * NUM_PROCESSES
        ids = [set(utts) for _, _, utts in per_rank]
        assert all(ids), f"step {step}: a process got an empty batch"
        assert not ids[0] & ids[1], f"step {step}: processes share {ids[0] & ids[1]}"
        seen += [u for _, _, utts in per_rank for u in utts]
    assert len(seen) == len(set(seen)), "an utterance came twice within one epoch"


def test_weights_are_identical_on_every_process(runs: dict[str, RunRecord]) -> None:
    log = runs["multi"].log
    found = {(int(step), int(rank)): fp for step, rank, fp in FINGERPRINT_LINE.findall(log)}
    assert set(found) == {(NUM_STEPS, r) for r in range(NUM_PROCESSES)}
    assert len(set(found.values())) == 1, found
    assert "weights differ" not in log
    # What the main process saved is what every process holds (this run's trainable state
    # has no buffers, so the checkpoint's tensors are exactly the parameters).
    final = list_checkpoints(runs["multi"].run_dir)[-1]
    assert final.name == f"step_{NUM_STEPS:08d}"
    saved = load_file(str(final / "trainable.safetensors"))
    assert parameter_fingerprint(saved.items()) == found[(NUM_STEPS, 0)]


def test_loss_curve_matches_one_process_with_the_same_global_batch(
    runs: dict[str, RunRecord],
) -> None:
    multi, single = runs["multi"], runs["single"]
    # Same batches: process r's batch at an update is micro-batch r of the single process.
    single_batches = single.batches()
    assert set(single_batches) == {
        (s, 0, m) for s in range(1, NUM_STEPS + 1) for m in range(NUM_PROCESSES)
    }
    for (step, rank, _), (_, _, ids) in multi.batches().items():
        assert ids == single_batches[(step, 0, rank)][2], f"step {step}, process {rank}"
    # Same losses (the logged loss is the mean over the update's batches in both runs).
    multi_rows, single_rows = multi.train_rows(), single.train_rows()
    assert [r["step"] for r in multi_rows] == [r["step"] for r in single_rows]
    multi_loss = np.array([r["train/loss"] for r in multi_rows])
    single_loss = np.array([r["train/loss"] for r in single_rows])
    assert np.all(np.isfinite(multi_loss))
    assert np.abs(multi_loss - single_loss).max() <= LOSS_ATOL, (multi_loss, single_loss)
    assert multi_loss[-1] != multi_loss[0]  # the weights moved: the curves compare something
    # And the same weights at the end.
    a = load_file(str(multi.run_dir / "student" / "model.safetensors"))
    b = load_file(str(single.run_dir / "student" / "model.safetensors"))
    assert a.keys() == b.keys()
    worst = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    assert worst <= WEIGHT_ATOL, worst


def test_only_the_main_process_writes(runs: dict[str, RunRecord]) -> None:
    multi, single = runs["multi"], runs["single"]
    assert [r["step"] for r in multi.train_rows()] == list(range(1, NUM_STEPS + 1))
    assert sorted(p.name for p in multi.run_dir.iterdir()) == sorted(
        p.name for p in single.run_dir.iterdir()
    )
    events = list((multi.run_dir / "tensorboard").rglob("events.out.tfevents.*"))
    assert len(events) == 1, events
    names = [p.name for p in list_checkpoints(multi.run_dir)]
    assert names and names == [p.name for p in list_checkpoints(single.run_dir)]
    assert not list((multi.run_dir / "checkpoints").glob(".tmp-*"))
    written = re.findall(r"checkpoint written: (\S+)", multi.log)
    assert written, "the checkpoint log line changed: update this test"
    assert len(written) == len(set(written)), "a checkpoint was written twice"


def test_accelerate_config_files_load() -> None:
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
    from accelerate.utils import DistributedType

    files = sorted((REPO / "configs" / "accelerate").glob("*.yaml"))
    assert [f.name for f in files] == ["multi-gpu.yaml", "multi-node.yaml", "single-gpu-bf16.yaml"]
    configs = {f.stem: load_config_from_file(str(f)) for f in files}
    assert all(isinstance(c, ClusterConfig) for c in configs.values())
    assert all(c.mixed_precision == "bf16" and not c.use_cpu for c in configs.values())
    assert configs["single-gpu-bf16"].distributed_type == DistributedType.NO
    assert configs["multi-gpu"].distributed_type == DistributedType.MULTI_GPU
    node = configs["multi-node"]
    assert node.distributed_type == DistributedType.MULTI_GPU and node.num_machines > 1
    assert node.main_process_ip and node.main_process_port


@pytest.mark.parametrize("world_size", [2, 3, 4])
@pytest.mark.parametrize("num_utterances", [9, 57, 203])
def test_ranks_deal_out_the_single_process_batch_sequence(
    world_size: int, num_utterances: int
) -> None:
    """Metadata only: what makes the runs above comparable, for more world sizes."""
    rng = np.random.default_rng(num_utterances)
    utts = [
        Utterance(id=f"u{i}", path=f"{i}.wav", duration=float(d))
        for i, d in enumerate(rng.uniform(0.5, 20.0, size=num_utterances))
    ]
    kwargs = dict(batch_seconds=50.0, max_duration=10.0, seed=3)
    single = DurationBucketSampler(utts, rank=0, world_size=1, **kwargs)
    ranks = [DurationBucketSampler(utts, rank=r, world_size=world_size, **kwargs) for r in range(world_size)]  # fmt: skip
    for epoch in (0, 1):
        order = [[u.id for u in b] for b in single.epoch_batches(epoch)]
        per_rank = [[[u.id for u in b] for b in s.epoch_batches(epoch)] for s in ranks]
        num = len(per_rank[0])
        assert all(len(batches) == num for batches in per_rank)
        # Round k is global batches k*W .. k*W + W-1, except an epoch's last two rounds.
        for k in range(num - 2):
            assert [batches[k] for batches in per_rank] == order[
                k * world_size : (k + 1) * world_size
            ]
        ids = [i for batches in per_rank for b in batches for i in b]
        assert sorted(ids) == sorted(u.id for u in utts)  # each once: no repeats, none lost
        for batches in per_rank:
            for b in batches:
                seconds = [effective_duration(utts[int(i[1:])], 10.0) for i in b]
                assert b and len(seconds) * max(seconds) <= 50.0 + 1e-6  # padded budget
