"""Teacher-target cache: epoch time of the default recipe with cached targets vs the online
teacher, the cache's build time and its disk cost per hour of audio, all in one run.

Builds the cache of the default recipe's training data (embedded Whisper base teacher,
embedded corpus, ``data.max_duration`` 15 s segments, the 6 mapped layers), sets up two runs of
the default recipe (online teacher, ``data.target_cache``) and times whole optimizer updates
(``recipe.train_update``: data wait, teacher or cache read, student, loss, backward, AdamW)
alternating between the two runs update by update, so that load from other processes hits
both alike. An epoch is not run: its time is the median seconds per update times the batches
per epoch of each run's sampler (the cached run has slightly more audio per epoch: the tails of
utterances longer than 15 s are segments of their own instead of being cropped away).

With ``--epoch`` each run instead times one epoch's worth of updates (its sampler's batches
per epoch, after the warm-up), so the epoch time is measured, not estimated.
``--random-teacher w2v-bert-2.0`` times a teacher of that published architecture with random
weights (``colld.testing.full_size_teacher_dir``; speed does not depend on the weights), the
size the mission is about; ``--max-hours`` keeps the first hours of the training data so that
its cache build fits a session. On a GPU it also prints each run's GPU memory (a run whose
targets all come from the cache keeps its teacher on the CPU).

    python bench/bench_cache.py                          # ~2-9 min on 2 CPU cores
    python bench/bench_cache.py --epoch                  # whole epochs, ~2 min on 2 cores
    python bench/bench_cache.py --rounds 4 --cache-dir /tmp/cache --keep   # reuse a cache
    python bench/bench_cache.py --epoch --random-teacher w2v-bert-2.0 --max-hours 0.25 \
        data.batch_seconds=40 data.num_workers=1        # 580M teacher: ~15 min, 16 GiB RAM
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from colld.config import RunConfig, load_config
from colld.data.manifest import write_manifest
from colld.testing import FULL_SIZE_TEACHERS, full_size_teacher_dir
from colld.train.data_setup import first_hours, resolve_sources
from colld.train.recipe import Run, evaluate_dev, setup, train_update
from colld.train.teacher_cache import build_cache


def timed_update(run: Run, peaks: list[int]) -> tuple[float, float]:
    """(seconds, audio seconds) of one optimizer update of ``run``; on CUDA, appends to
    ``peaks`` the bytes the update allocated above what was resident before it."""
    resident = _reset_peak()
    audio0, t0 = run.state.audio_seconds, time.perf_counter()
    train_update(run)
    run.state.step += 1
    seconds = time.perf_counter() - t0
    if torch.cuda.is_available():
        peaks.append(torch.cuda.max_memory_allocated() - resident)
    return seconds, run.state.audio_seconds - audio0


def timed_dev(run: Run) -> float | None:
    """Seconds of one dev evaluation of ``run`` (None: the run has no dev data)."""
    if run.dev is None:
        return None
    t0 = time.perf_counter()
    evaluate_dev(run)
    return time.perf_counter() - t0


def _reset_peak() -> int:
    """Bytes allocated on the GPU now (0 without one), with the peak counter reset."""
    if not torch.cuda.is_available():
        return 0
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=8, help="updates per run, alternating")
    parser.add_argument("--warmup", type=int, default=1, help="untimed updates per run")
    parser.add_argument("--cache-dir", help="cache directory (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the cache and run dirs")
    parser.add_argument(
        "--epoch", action="store_true", help="time one epoch's worth of updates per run"
    )
    parser.add_argument(
        "--random-teacher",
        choices=sorted(FULL_SIZE_TEACHERS),
        help="a random-weight teacher of this published architecture (timing only)",
    )
    parser.add_argument(
        "--max-hours", type=float, help="train on the first this many hours of the data"
    )
    parser.add_argument("overrides", nargs="*", help="config overrides for both runs")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-cache-"))
    cache_dir = Path(args.cache_dir) if args.cache_dir else work / "cache"
    base = list(args.overrides)
    if args.random_teacher:
        teacher_dir = full_size_teacher_dir(args.random_teacher, work / "teacher")
        base.append(f"teacher.spec={teacher_dir}")
    if args.max_hours is not None:
        base.append(f"data.train={_first_hours(load_config(None, base), args.max_hours, work)}")
    online_cfg = load_config(None, [*base, f"train.output_dir={work / 'online'}"])
    cached_cfg = load_config(
        None,
        [*base, f"train.output_dir={work / 'cached'}", f"data.target_cache={cache_dir}"],
    )
    load_start = os.getloadavg()
    try:
        summary = build_cache(online_cfg, cache_dir)
        runs: dict[str, Run] = {}
        held: dict[str, int] = {}  # GPU bytes each run keeps after setup (weights)
        for name, cfg in (("online", online_cfg), ("cached", cached_cfg)):
            before = _reset_peak()
            runs[name] = setup(cfg, resume=False)
            held[name] = _reset_peak() - before
        peaks: dict[str, list[int]] = {name: [] for name in runs}
        for name, run in runs.items():
            for _ in range(args.warmup):
                timed_update(run, peaks[name])
        times: dict[str, list[tuple[float, float]]] = {name: [] for name in runs}
        updates = {
            name: run.train.sampler.num_batches(0) if args.epoch else args.rounds
            for name, run in runs.items()
        }
        for index in range(max(updates.values())):
            # The k-th batches of both runs are nearly the same clips (same seed and sampler);
            # alternate which goes first so that drifting load from other processes hits both.
            order = list(runs) if index % 2 == 0 else list(runs)[::-1]
            for name in order:
                if index < updates[name]:
                    times[name].append(timed_update(runs[name], peaks[name]))
        rows = {
            name: _row(name, run, times[name], online_cfg, args.epoch) for name, run in runs.items()
        }
        paired = [
            (c_audio / c_s) / (a_audio / a_s)  # pairs while both runs still update
            for (a_s, a_audio), (c_s, c_audio) in zip(
                times["online"], times["cached"], strict=False
            )
        ]
        dev_seconds = {name: timed_dev(run) for name, run in runs.items()}
        for run in runs.values():
            run.logger.close()
            run.train.close()
        print_table(rows, summary, paired, args, load_start, os.getloadavg())
        print_dev(rows, dev_seconds, online_cfg.train.eval_every)
        if torch.cuda.is_available():
            print_memory(held, peaks)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
            if args.cache_dir is None:
                shutil.rmtree(cache_dir, ignore_errors=True)
        else:
            print(f"kept: {work} and {cache_dir}")


def _first_hours(cfg: RunConfig, hours: float, work: Path) -> Path:
    """A manifest of the first ``hours`` of ``cfg``'s training data (absolute paths)."""
    (utterances, root), _ = resolve_sources(cfg.data, cfg.train.seed)
    kept = [
        dataclasses.replace(u, path=os.path.abspath(u.resolved_path(root)))  # root: maybe relative
        for u in first_hours(utterances, hours)
    ]
    return write_manifest(kept, work / "train-first-hours.jsonl")


def _row(name: str, run: Run, times: list[tuple[float, float]], cfg, epoch: bool) -> dict:
    utterances = run.train.sampler.utterances
    if name == "online":  # cropped to max_duration
        epoch_audio = sum(min(u.duration, cfg.data.max_duration) for u in utterances)
    else:  # segments, whole
        epoch_audio = sum(u.duration for u in utterances)
    seconds = [s for s, _ in times]
    batches = run.train.sampler.num_batches(0)
    return {
        "items": len(utterances),
        "epoch_audio_h": epoch_audio / 3600,
        "batches": batches,
        "median_s": statistics.median(seconds),
        "min_s": min(seconds),
        "updates": len(seconds),
        "audio_per_s": sum(a for _, a in times) / sum(seconds),
        "epoch_s": sum(seconds) if epoch else statistics.median(seconds) * batches,
    }


def print_table(rows, summary, paired, args, load_start, load_end) -> None:
    cpu = platform.processor() or platform.machine()
    if args.epoch:
        updates = "one epoch (" + " / ".join(str(r["updates"]) for r in rows.values())
        updates += " updates)"
        epoch_column = "s/epoch (measured)"
    else:
        updates, epoch_column = f"{args.rounds} updates", "s/epoch (median x batches)"
    print(
        f"\n{datetime.date.today()}, {cpu}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; {updates} per run after {args.warmup} "
        f"warm-up, alternating online / cached; 1-min load average {load_start[0]:.2f} at the "
        f"start, {load_end[0]:.2f} at the end"
    )
    print(
        "| run | items/epoch | audio h/epoch | batches/epoch | median s/update | min s/update "
        f"| audio s/s | {epoch_column} |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(
            f"| {name} | {r['items']} | {r['epoch_audio_h']:.3f} | {r['batches']} | "
            f"{r['median_s']:.2f} | {r['min_s']:.2f} | {r['audio_per_s']:.1f} | "
            f"{r['epoch_s']:.0f} |"
        )
    online, cached = rows["online"], rows["cached"]
    print(f"speed-up per epoch ({epoch_column}): {online['epoch_s'] / cached['epoch_s']:.2f}x")
    print(
        f"speed-up in audio s/s: {cached['audio_per_s'] / online['audio_per_s']:.2f}x overall, "
        f"{statistics.median(paired):.2f}x median of the {len(paired)} adjacent pairs, "
        f"{online['min_s'] / cached['min_s']:.2f}x fastest update vs fastest update"
    )
    print(
        f"cache: {summary.num_segments} segments, {summary.audio_hours:.3f} h, "
        f"{summary.num_bytes / 1e6:.0f} MB on disk = {summary.mb_per_hour:.0f} MB per hour of "
        f"audio; build: {summary.build_seconds:.0f} s for {summary.built} segments"
        + (" (reused, not built in this run)" if summary.built == 0 else "")
    )
    saved = online["epoch_s"] - cached["epoch_s"]
    if summary.built and saved > 0:
        print(f"the build pays for itself after {summary.build_seconds / saved:.1f} epochs")


def print_dev(rows: dict, dev_seconds: dict[str, float | None], eval_every: int) -> None:
    """One dev evaluation per run, and the epoch speed-up with the recipe's evaluations (one
    every ``eval_every`` updates) spread over the epochs."""
    online, cached = dev_seconds["online"], dev_seconds["cached"]
    if online is None or cached is None:
        print("dev evaluation: not timed (no dev data)")
        return
    print(f"dev evaluation: online {online:.1f} s, cached {cached:.1f} s")
    if eval_every > 0:
        epochs = {
            name: r["epoch_s"] + dev_seconds[name] * r["batches"] / eval_every
            for name, r in rows.items()
        }
        print(
            f"s/epoch with one dev evaluation every {eval_every} updates: online "
            f"{epochs['online']:.0f}, cached {epochs['cached']:.0f} = "
            f"{epochs['online'] / epochs['cached']:.2f}x"
        )


def print_memory(held: dict[str, int], peaks: dict[str, list[int]]) -> None:
    """GPU memory per run: what setup left resident (the online run's teacher weights among
    it; a fully cached run keeps its teacher on the CPU) and the most one update allocated on
    top (the online run's teacher forward among it)."""
    print(f"\nGPU memory ({torch.cuda.get_device_name()}), MB")
    print("| run | resident after setup | peak above resident per update (max) | sum |")
    print("|---|---|---|---|")
    for name in held:
        peak = max(peaks[name], default=0)
        total = (held[name] + peak) / 1e6
        print(f"| {name} | {held[name] / 1e6:.0f} | {peak / 1e6:.0f} | {total:.0f} |")


if __name__ == "__main__":
    main()
