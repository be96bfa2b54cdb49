"""SUPERB-style probes on frozen features: a learnable weighted sum of all hidden states and a
small task head, trained on probe-train, early-stopped on probe-dev, scored on probe-test.

Featurizer (as SUPERB's): softmax-normalised weights over the L + 1 hidden states, all equal at
the start. Each state is layer-normed WITHOUT affine parameters before the weighting: Whisper
(and wav2vec 2.0-family) states carry a few outlier dimensions whose magnitude grows with depth
and differs by orders of magnitude between layers; unnormalised, the weighted sum would be
dominated by those dimensions and the learned weights would mostly compensate for scale
instead of telling which layer holds the information.

Heads:
- utterance tasks (lid, sid): mean over valid frames, then a linear layer. The weighted sum is
  linear, so the per-layer layer-norm and mean-pool are done once up front; an epoch then only
  touches an (L + 1, N, D) tensor.
- pr: a linear CTC head (SUPERB's PR probe).
- char: a rank-128 linear CTC head (Linear(D, 128) -> Linear(128, V)); V is ~540 characters
  (Han and kana included), where the full linear head costs 1.8x the PR head for the same CER.
  A BiLSTM head is available (``ProbeConfig.char_head="lstm"``) but needs far more epochs than
  the time budget allows (see ``ProbeConfig.char_head``).

CTC inputs are layer-normed once and kept as fixed, length-sorted, padded float32 batches
((L + 1) x frames x D x 4 bytes: ~1.5 GB for whisper-base on the three probe splits of the
embedded corpus); float16 storage would halve that but the per-step conversion cost ~15% of
the time.

Training: Adam, minibatches, greedy CTC decoding on probe-dev every epoch, early stopping with
``patience`` epochs, probe-test scored with the best-dev weights. Deterministic for a seed on
one thread count (CPU; initialisation, dropout and shuffling draw from the seed only, the
caller's global RNG is left alone).

Shape legend: N utterances, B batch, T frames, D width, L + 1 hidden states, V vocabulary.
"""

from __future__ import annotations

import copy
import logging
import math
import statistics
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from colld.eval.features import FeatureSet
from colld.eval.tasks import Score, SplitLabels, Task, TaskData, get_task, prepare_task, score

logger = logging.getLogger(__name__)

CTC_HEADS = ("linear", "lowrank", "lstm")


@dataclass(kw_only=True)
class ProbeConfig:
    """Probe hyper-parameters, sized so that one whisper-base probe on the embedded corpus takes
    about 15 s or less on this project's 2-core CPU (see ``sequence_max_epochs``)."""

    utterance_lr: float = 1e-2
    """Adam learning rate of the utterance probes (lid, sid)."""
    utterance_batch_size: int = 32
    utterance_max_epochs: int = 150
    utterance_patience: int = 20
    sequence_lr: float = 2e-2
    """Adam learning rate of the CTC probes (pr, char)."""
    sequence_batch_size: int = 8
    """Utterances per CTC step (batches are fixed groups of similar length)."""
    sequence_max_epochs: int = 5
    """An epoch of a whisper-base CTC probe costs ~2.5 s on one core of this CPU (train + dev
    decoding), so 5 epochs keep a probe near 15 s. PER is still falling slowly at epoch 5."""
    sequence_lr_decay: bool = True
    """Decay the CTC probes' learning rate linearly to 0 over ``sequence_max_epochs``."""
    sequence_patience: int = 2
    pr_head: str = "linear"
    """CTC head of ``pr``: one of ``CTC_HEADS`` (see ``CTCProbe``); linear as SUPERB's PR."""
    char_head: str = "lowrank"
    """CTC head of ``char``: one of ``CTC_HEADS``. lowrank (P = 128) measured as linear
    (whisper-base, 5 epochs: CER 0.692 vs 0.680) in 3/4 of the time; the BiLSTM heads were
    still at CER 1.0 (only blanks) after 5 epochs and 3-5x slower."""
    projection_dim: int = 128
    """P, the width of the lowrank / lstm heads' projection."""
    lstm_hidden: int = 128
    """Hidden units per direction of the lstm head's BiLSTM."""
    dropout: float = 0.1
    """Dropout around the lstm head's BiLSTM."""
    eval_batch_size: int = 32
    """Utterances per forward pass when scoring a CTC probe on probe-dev / probe-test."""
    num_threads: int | None = 1
    """torch intra-op threads while a probe is prepared and trained (None = leave the caller's
    setting); restored afterwards. One by default: probe tensors are small and on a 2-core
    machine shared with other work a second thread mostly adds synchronisation (measured on
    whisper-base pr: 2.0-2.3 s per epoch on 1 thread, 9-11 s on 2; utterance probes 11x slower)."""

    def __post_init__(self) -> None:
        for name in ("utterance_batch_size", "utterance_max_epochs", "utterance_patience",
                     "sequence_batch_size", "sequence_max_epochs", "sequence_patience",
                     "projection_dim", "lstm_hidden", "eval_batch_size"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ValueError(f"ProbeConfig.{name} must be >= 1, found {getattr(self, name)}")
        for name in ("pr_head", "char_head"):
            if getattr(self, name) not in CTC_HEADS:
                raise ValueError(
                    f"ProbeConfig.{name} must be one of {CTC_HEADS}, found {getattr(self, name)!r}"
                )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"ProbeConfig.dropout must lie in [0, 1), found {self.dropout}")


@dataclass
class ProbeResult:
    """One trained probe (one task, one seed). Values are the task's metric (accuracy, PER,
    CER); ``per_language`` on probe-test; ``layer_weights`` the softmax weights (L + 1)."""

    task: str
    seed: int
    metric: str
    higher_is_better: bool
    test_value: float
    dev_value: float
    per_language: dict[str, float]
    layer_weights: list[float]
    epochs: int
    best_epoch: int
    seconds: float
    num_train: int
    num_test: int


@dataclass
class TaskSummary:
    """A task over seeds: mean and sample std (ddof 1; 0 for one seed) of the probe-test value,
    per-seed values, per-language means, mean layer weights. ``skipped`` holds the reason when
    the task could not run (mean and std are then None, the lists empty)."""

    task: str
    metric: str
    higher_is_better: bool
    mean: float | None = None
    std: float | None = None
    values: list[float] = field(default_factory=list)
    dev_values: list[float] = field(default_factory=list)
    per_language: dict[str, float] = field(default_factory=dict)
    layer_weights: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    prepare_seconds: float = 0.0
    skipped: str | None = None
    results: list[ProbeResult] = field(default_factory=list)


# ---------------------------------------------------------------- modules
class WeightedLayerSum(nn.Module):
    """Softmax-weighted sum over hidden states that were layer-normed beforehand.

    Shape: (L + 1, ...) -> (...): the first dimension is the hidden state.
    """

    def __init__(self, num_states: int) -> None:
        super().__init__()
        self.logits = nn.Parameter(torch.zeros(num_states))

    def weights(self) -> Tensor:
        """Shape: (L + 1,), sums to 1."""
        return torch.softmax(self.logits, dim=0)

    def forward(self, states: Tensor) -> Tensor:
        rest = states.shape[1:]
        return (self.weights() @ states.reshape(states.shape[0], -1)).reshape(rest)


class UtteranceProbe(nn.Module):
    """Weighted sum of mean-pooled, layer-normed states -> linear. (L + 1, B, D) -> (B, C)."""

    def __init__(self, num_states: int, dim: int, num_classes: int) -> None:
        super().__init__()
        self.featurizer = WeightedLayerSum(num_states)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, pooled: Tensor) -> Tensor:
        return self.head(self.featurizer(pooled))


class CTCProbe(nn.Module):
    """Weighted sum of layer-normed states -> CTC head -> log-probabilities.

    head "linear": Linear(D, V). "lowrank": Linear(D, P) -> Linear(P, V), a linear map of rank
    <= P (about D / P times cheaper for P << V). "lstm": Linear(D, P) -> dropout ->
    BiLSTM(P, H) -> dropout -> Linear(2H, V). Shape: (L + 1, B, T, D), lengths (B,) -> (B, T, V).
    """

    def __init__(self, num_states: int, dim: int, vocab_size: int, *, head: str,
                 projection_dim: int, lstm_hidden: int, dropout: float) -> None:  # fmt: skip
        super().__init__()
        if head not in CTC_HEADS:
            raise ValueError(f"CTC head must be one of {CTC_HEADS}, found {head!r}")
        self.featurizer = WeightedLayerSum(num_states)
        self.head_kind = head
        self.dropout = nn.Dropout(dropout)
        self.projection = None if head == "linear" else nn.Linear(dim, projection_dim)
        self.lstm = None
        if head == "lstm":
            self.lstm = nn.LSTM(projection_dim, lstm_hidden, batch_first=True, bidirectional=True)
        output_dim = {"linear": dim, "lowrank": projection_dim, "lstm": 2 * lstm_hidden}[head]
        self.output = nn.Linear(output_dim, vocab_size)

    def forward(self, states: Tensor, lengths: Tensor) -> Tensor:
        hidden = self.featurizer(states)  # (B, T, D)
        if self.projection is not None:
            hidden = self.projection(hidden)  # (B, T, P)
        if self.lstm is not None:
            packed = pack_padded_sequence(
                self.dropout(hidden), lengths, batch_first=True, enforce_sorted=False
            )
            hidden, _ = pad_packed_sequence(
                self.lstm(packed)[0], batch_first=True, total_length=states.shape[2]
            )  # (B, T, 2H)
            hidden = self.dropout(hidden)
        return F.log_softmax(self.output(hidden), dim=-1)


# ---------------------------------------------------------------- prepared inputs
@dataclass
class PaddedBatch:
    """Rows of a split, layer-normed and padded. states Shape: (L + 1, B, T, D) float32;
    lengths (B,); rows: positions in the task's ``SplitLabels`` lists."""

    states: Tensor
    lengths: Tensor
    rows: list[int]


def layer_norm_states(states: Tensor) -> Tensor:
    """Each hidden state normed over D, no affine. Shape: (L + 1, T, D) -> same, float32."""
    return F.layer_norm(states.float(), (states.shape[-1],))


def pooled_states(features: FeatureSet, indices: Sequence[int]) -> Tensor:
    """Layer-normed states mean-pooled over frames. Shape: (L + 1, N, D) float32."""
    pooled = [layer_norm_states(features.states[i]).mean(dim=1) for i in indices]  # (L+1, D)
    return torch.stack(pooled, dim=1)


def padded_batches(
    features: FeatureSet, indices: Sequence[int], batch_size: int
) -> list[PaddedBatch]:
    """Rows ``indices`` sorted by length, layer-normed, in padded groups of ``batch_size``."""
    order = sorted(range(len(indices)), key=lambda r: (features.states[indices[r]].shape[1], r))
    batches = []
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        states = [features.states[indices[r]] for r in rows]
        lengths = torch.tensor([s.shape[1] for s in states], dtype=torch.int64)
        num_states, dim = states[0].shape[0], states[0].shape[2]
        padded = torch.zeros(num_states, len(rows), int(lengths.max()), dim)
        for n, utt_states in enumerate(states):
            padded[:, n, : utt_states.shape[1]] = layer_norm_states(utt_states)
        batches.append(PaddedBatch(states=padded, lengths=lengths, rows=rows))
    return batches


@dataclass
class ProbeInputs:
    """What one task's probes train on, built once and shared by all seeds.

    utterance tasks: ``pooled`` per split, Shape (L + 1, N, D); sequence tasks: ``batches``.
    """

    data: TaskData
    num_states: int
    dim: int
    pooled: dict[str, Tensor] = field(default_factory=dict)
    batches: dict[str, list[PaddedBatch]] = field(default_factory=dict)


def prepare_inputs(
    data: TaskData,
    train: FeatureSet,
    dev: FeatureSet,
    test: FeatureSet,
    config: ProbeConfig,
    *,
    shared: dict[tuple, Tensor | list[PaddedBatch]] | None = None,
) -> ProbeInputs:
    """Layer-norm (and for utterance tasks mean-pool) the states of the task's rows.

    shared: kept by the caller across tasks on the same FeatureSets, so that tasks on the same
    rows (lid and sid; pr and char when every row is labelled) prepare them once.
    """
    _check_compatible(train, dev, test)
    shared = {} if shared is None else shared
    inputs = ProbeInputs(data=data, num_states=train.num_layers, dim=train.dim)
    splits = {"train": (train, data.train), "dev": (dev, data.dev), "test": (test, data.test)}
    for name, (features, labels) in splits.items():
        size = config.sequence_batch_size if name == "train" else config.eval_batch_size
        key = (name, data.task.kind, size, tuple(labels.indices))
        if key not in shared:
            with _intra_op_threads(config.num_threads):
                if data.task.kind == "utterance":
                    shared[key] = pooled_states(features, labels.indices)
                else:
                    shared[key] = padded_batches(features, labels.indices, size)
        if data.task.kind == "utterance":
            inputs.pooled[name] = shared[key]
        else:
            inputs.batches[name] = shared[key]
    return inputs


def _check_compatible(train: FeatureSet, dev: FeatureSet, test: FeatureSet) -> None:
    shapes = {name: (fs.num_layers, fs.dim, fs.fingerprint)
              for name, fs in (("train", train), ("dev", dev), ("test", test))}  # fmt: skip
    if len({shape for shape in shapes.values()}) != 1:
        raise ValueError(
            f"probe splits come from different models: (L + 1, D, fingerprint) per split {shapes}"
        )


# ---------------------------------------------------------------- training
def train_probe(
    task: str | Task,
    train: FeatureSet,
    dev: FeatureSet,
    test: FeatureSet,
    *,
    seed: int,
    config: ProbeConfig,
) -> ProbeResult:
    """Train one probe of ``task`` on ``train``, early-stop on ``dev``, score on ``test``.

    Raises ValueError when the task cannot run on these splits (``prepare_task``'s reason).
    """
    task = get_task(task) if isinstance(task, str) else task
    data = prepare_task(task, train.utterances, dev.utterances, test.utterances)
    if isinstance(data, str):
        raise ValueError(f"probe task {task.name} cannot run: {data}")
    return train_prepared(prepare_inputs(data, train, dev, test, config), seed=seed, config=config)


def train_prepared(inputs: ProbeInputs, *, seed: int, config: ProbeConfig) -> ProbeResult:
    """Train and score one probe on prepared inputs (see ``train_probe``)."""
    start = time.perf_counter()
    task = inputs.data.task
    with torch.random.fork_rng(devices=[]), _intra_op_threads(config.num_threads):
        torch.manual_seed(seed)
        generator = torch.Generator().manual_seed(seed)
        model = _build_model(inputs, config)
        trainer = (
            _UtteranceTrainer(inputs, config)
            if task.kind == "utterance"
            else _CTCTrainer(inputs, config)
        )
        best = _fit(model, trainer, generator)
        model.load_state_dict(best.state)
        model.eval()
        test_score = trainer.evaluate(model, "test")
    weights = model.featurizer.weights().detach().tolist()
    result = ProbeResult(
        task=task.name,
        seed=seed,
        metric=task.metric,
        higher_is_better=task.higher_is_better,
        test_value=test_score.value,
        dev_value=best.dev_value,
        per_language=test_score.per_language,
        layer_weights=[round(w, 6) for w in weights],
        epochs=best.epochs,
        best_epoch=best.epoch,
        seconds=time.perf_counter() - start,
        num_train=len(inputs.data.train.indices),
        num_test=len(inputs.data.test.indices),
    )
    logger.info(
        "%s seed %d: test %s %.4f (dev %.4f, best epoch %d of %d, %.1f s)",
        task.name, seed, task.metric, result.test_value, result.dev_value,
        result.best_epoch, result.epochs, result.seconds,
    )  # fmt: skip
    return result


@contextmanager
def _intra_op_threads(num_threads: int | None) -> Iterator[None]:
    """torch's intra-op thread count set to ``num_threads`` (None: unchanged), then restored."""
    previous = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _build_model(inputs: ProbeInputs, config: ProbeConfig) -> nn.Module:
    data = inputs.data
    if data.task.kind == "utterance":
        return UtteranceProbe(inputs.num_states, inputs.dim, len(data.vocabulary))
    head = config.char_head if data.task.name == "char" else config.pr_head
    return CTCProbe(inputs.num_states, inputs.dim, len(data.vocabulary), head=head,
                    projection_dim=config.projection_dim, lstm_hidden=config.lstm_hidden,
                    dropout=config.dropout)  # fmt: skip


@dataclass
class _Best:
    state: dict[str, Tensor]
    dev_value: float
    epoch: int
    epochs: int = 0


def _fit(
    model: nn.Module, trainer: _UtteranceTrainer | _CTCTrainer, generator: torch.Generator
) -> _Best:
    """Epochs of Adam steps on ``trainer``'s losses with early stopping on the dev metric."""
    task = trainer.task
    optimizer = torch.optim.Adam(model.parameters(), lr=trainer.lr)
    total_steps = trainer.max_epochs * trainer.num_batches
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 1.0 - step / total_steps if trainer.lr_decay else 1.0
    )
    best = _Best(state=copy.deepcopy(model.state_dict()), dev_value=math.nan, epoch=0)
    for epoch in range(1, trainer.max_epochs + 1):
        model.train()
        for loss in trainer.losses(model, generator):
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
        model.eval()
        dev_value = trainer.evaluate(model, "dev").value
        best.epochs = epoch
        if math.isnan(best.dev_value) or _better(dev_value, best.dev_value, task.higher_is_better):
            best.state = copy.deepcopy(model.state_dict())
            best.dev_value, best.epoch = dev_value, epoch
        elif epoch - best.epoch >= trainer.patience:
            break
    return best


def _better(value: float, best: float, higher_is_better: bool) -> bool:
    return value > best if higher_is_better else value < best


class _UtteranceTrainer:
    """Minibatch cross-entropy on pooled states; accuracy on a split."""

    def __init__(self, inputs: ProbeInputs, config: ProbeConfig) -> None:
        self.task = inputs.data.task
        self.inputs = inputs
        self.lr = config.utterance_lr
        self.lr_decay = False
        self.max_epochs = config.utterance_max_epochs
        self.patience = config.utterance_patience
        self.batch_size = config.utterance_batch_size
        self.targets = torch.tensor([t[0] for t in inputs.data.train.targets])

    @property
    def num_batches(self) -> int:
        return math.ceil(len(self.targets) / self.batch_size)

    def losses(self, model: nn.Module, generator: torch.Generator) -> Iterator[Tensor]:
        """One epoch of minibatch cross-entropy losses, in a shuffled order."""
        pooled = self.inputs.pooled["train"]  # (L+1, N, D)
        for rows in torch.randperm(pooled.shape[1], generator=generator).split(self.batch_size):
            yield F.cross_entropy(model(pooled[:, rows]), self.targets[rows])

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: str) -> Score:
        predicted = model(self.inputs.pooled[split]).argmax(dim=-1).tolist()
        vocabulary = self.inputs.data.vocabulary
        return score(
            self.task, _labels(self.inputs.data, split), [[vocabulary.tokens[p]] for p in predicted]
        )


class _CTCTrainer:
    """Minibatch CTC on padded layer-normed states; greedy decoding and PER / CER on a split."""

    def __init__(self, inputs: ProbeInputs, config: ProbeConfig) -> None:
        self.task = inputs.data.task
        self.inputs = inputs
        self.lr = config.sequence_lr
        self.lr_decay = config.sequence_lr_decay
        self.max_epochs = config.sequence_max_epochs
        self.patience = config.sequence_patience

    @property
    def num_batches(self) -> int:
        return len(self.inputs.batches["train"])

    def losses(self, model: nn.Module, generator: torch.Generator) -> Iterator[Tensor]:
        """One epoch of CTC losses over the fixed length-sorted batches, in a shuffled order."""
        batches = self.inputs.batches["train"]
        targets = self.inputs.data.train.targets
        for b in torch.randperm(len(batches), generator=generator).tolist():
            batch = batches[b]
            log_probs = model(batch.states, batch.lengths)  # (B, T, V)
            batch_targets = [targets[r] for r in batch.rows]
            yield F.ctc_loss(
                log_probs.transpose(0, 1),  # (T, B, V)
                torch.tensor([t for target in batch_targets for t in target], dtype=torch.int64),
                batch.lengths,
                torch.tensor([len(t) for t in batch_targets], dtype=torch.int64),
                blank=0,
                zero_infinity=True,
            )

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: str) -> Score:
        labels = _labels(self.inputs.data, split)
        hypotheses: list[list[str]] = [[] for _ in labels.references]
        vocabulary = self.inputs.data.vocabulary
        for batch in self.inputs.batches[split]:
            best_ids = model(batch.states, batch.lengths).argmax(dim=-1)  # (B, T)
            for n, row in enumerate(batch.rows):
                hypotheses[row] = vocabulary.decode(greedy_ctc(best_ids[n, : batch.lengths[n]]))
        return score(self.task, labels, hypotheses)


def greedy_ctc(best_ids: Tensor, blank: int = 0) -> list[int]:
    """Collapse repeats, then drop blanks. Shape: (T,) frame-wise argmax ids."""
    collapsed = torch.unique_consecutive(best_ids)
    return collapsed[collapsed != blank].tolist()


def _labels(data: TaskData, split: str) -> SplitLabels:
    return {"train": data.train, "dev": data.dev, "test": data.test}[split]


# ---------------------------------------------------------------- several tasks and seeds
def run_probes(
    task_names: Sequence[str],
    train: FeatureSet,
    dev: FeatureSet,
    test: FeatureSet,
    *,
    seeds: Sequence[int] = (0, 1, 2),
    config: ProbeConfig | None = None,
) -> dict[str, TaskSummary]:
    """Every task with every seed; a task that cannot run is summarised with its reason."""
    config = config or ProbeConfig()
    if not seeds:
        raise ValueError("run_probes needs at least one seed")
    tasks = [get_task(name) for name in task_names]  # unknown names fail before any work
    _check_compatible(train, dev, test)
    summaries: dict[str, TaskSummary] = {}
    shared: dict[tuple, Tensor | list[PaddedBatch]] = {}
    for task in tasks:
        summary = TaskSummary(
            task=task.name, metric=task.metric, higher_is_better=task.higher_is_better
        )
        data = prepare_task(task, train.utterances, dev.utterances, test.utterances)
        if isinstance(data, str):
            logger.warning("skipping probe task %s: %s", task.name, data)
            summary.skipped = data
        else:
            start = time.perf_counter()
            inputs = prepare_inputs(data, train, dev, test, config, shared=shared)
            summary.prepare_seconds = time.perf_counter() - start
            summary.results = [train_prepared(inputs, seed=seed, config=config) for seed in seeds]
            _summarise(summary)
        summaries[task.name] = summary
    return summaries


def _summarise(summary: TaskSummary) -> None:
    """Fill the means from ``summary.results``."""
    results = summary.results
    summary.values = [r.test_value for r in results]
    summary.dev_values = [r.dev_value for r in results]
    summary.seconds = [r.seconds for r in results]
    summary.mean = statistics.fmean(summary.values)
    summary.std = statistics.stdev(summary.values) if len(results) > 1 else 0.0
    languages = sorted({lang for r in results for lang in r.per_language})
    summary.per_language = {
        lang: statistics.fmean(r.per_language[lang] for r in results if lang in r.per_language)
        for lang in languages
    }
    summary.layer_weights = [
        statistics.fmean(ws) for ws in zip(*(r.layer_weights for r in results), strict=True)
    ]
