"""Students: the teacher's own family and HF class with a smaller config.

A student is built from a copy of the teacher's Hugging Face config with new sizes (per family
the field names differ, see ``_SIZE_FIELDS``), so the exported student loads with transformers
alone. Everything else stays the teacher's: the conv front end of waveform families (its size
does not depend on the transformer width, it feeds the width through the feature projection,
and keeping it lets ``init="teacher"`` copy it, as DistilHuBERT and FitHuBERT do), the
positional convolution's kernel and groups, w2v-BERT's Conformer kernel and fbank input,
Whisper's mel bins and position table length.

Sizes (``StudentSpec``):
    "deep-narrow" (default): the teacher's layer count; the width is chosen so that the student
        has about ``teacher_params / compression`` parameters. Widths are multiples of
        ``8 x num_heads``, with ``num_heads = round(width / teacher_head_dim)`` (the teacher's
        head size is kept approximately and every head size is a multiple of 8); the FFN keeps
        the teacher's FFN/width ratio. Whisper base (6 x 512, 19.8M counted) -> 6 x 288 with 4
        heads of 72 and FFN 1152.
    "shallow-wide": the teacher's width and heads, 2 layers, the FFN narrowed so the parameter
        count matches the deep-narrow student of the same ``compression`` (within 10%). Where
        two layers with the teacher's FFN stay below that budget (a heavy conv front end, e.g.
        HuBERT base at 3.3x) the fewest layers that reach it are used instead.
    Explicit fields (``num_layers``, ``hidden_dim``, ``num_heads``, ``ffn_dim``) override the
    preset; the preset solves only for the fields left unset.

Parameter counting (``count_encoder_parameters``): the parameters that produce hidden states
0..L. Not counted: Whisper's sinusoidal position table (fixed, never trained; 768k of Whisper
base's 20.6M), the mask embedding (training-time only, and a teacher may lack it), and
anything HF runs after the encoder (w2v-BERT's ``adapter`` / ``intermediate_ffn``).

Initialisation (one policy for every shape, so comparing shapes does not compare inits):
    "random": HF's own ``_init_weights`` for that class, under
        ``torch.manual_seed(seed)`` (the global RNG is left as it was).
    "auto" (default): "prune" where the family has a pruning layout (Whisper, wav2vec 2.0,
        HuBERT, data2vec-audio) and the
        student's shape keeps whole teacher heads (always so for the presets), else "teacher"
        (``resolve_init``). Why: docs/results/vs-compression.md — at the same size and CoLLD
        budget, the importance-pruned start scored 464 +- 5 against 142 +- 2 for weight
        selection (measured on Whisper base only).
    "teacher": the random init, then the front end (convs, feature projection, positional
        conv / table, HF's ``masked_spec_embed``; Whisper's mask embedding is colld's own and
        stays random), the final layer norm and teacher layer m(i) = ceil(i * L_T / L_S) for
        student layer i (every k-th layer for k = L_T / L_S) are copied. Where the student is narrower (width, FFN), every tensor keeps the first
        n entries of each smaller axis ("weight selection", Xu et al. 2024, "Initializing
        Models with Larger Ones"): one rule for every axis, so the residual stream keeps the
        same n dimensions in every layer, norm and position column and the layers still
        agree with each other; taking the first n (not every k-th) keeps whole attention
        heads where the head size allows. With the teacher's widths this is an exact copy.
        A student axis larger than the teacher's raises an error naming the tensor.
    "prune": structured pruning of the teacher by activation importance (Whisper, wav2vec 2.0,
        HuBERT, data2vec-audio;
        ``colld.students.prune``): the top residual channels, whole heads, FFN neurons and
        layers, measured on ``prune_seconds`` of training audio. The student's head size must
        be the teacher's: the deep-narrow preset then takes the whole-head width whose student
        (teacher FFN ratio) is nearest the budget and solves the FFN to the default student's
        exact count, e.g. Whisper base -> 6 x 256 with 4 heads of 64 and FFN 1448 (6.31M, the
        size of the 6 x 288 weight-selected student); shallow-wide keeps every head.

LayerDrop is set to 0 (layer-to-layer distillation needs every layer), HF's own random
SpecAugment is disabled (``mask_feature_prob = 0``, ``mask_time_prob > 0`` only so that
``masked_spec_embed`` exists; colld passes the mask itself, see ``colld.encoders.hf``). The
teacher's SpecAugment values are kept in ``config.colld_export_overrides`` and restored by
``colld.students.export``.
"""

from __future__ import annotations

import copy
import functools
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from colld.data.batch import Batch
from colld.encoders import wrap_encoder
from colld.encoders.base import SpeechEncoder
from colld.objectives.layer_map import SOURCE_MAP, uniform_layer_map
from colld.objectives.objective import ObjectiveConfig
from colld.students.prune import (
    PrunePlan,
    can_prune,
    copy_pruned_weights,
    measure_importance,
    plan_pruning,
)

logger = logging.getLogger(__name__)

PRESETS = ("deep-narrow", "shallow-wide")
INITS = ("auto", "random", "teacher", "prune")
SHALLOW_WIDE_LAYERS = 2
# Every head size is a multiple of this (fast attention kernels want it).
HEAD_DIM_MULTIPLE = 8
FFN_MULTIPLE = 8
# HF's default, used only when the teacher's config has mask_time_prob == 0: any value > 0
# makes HF create masked_spec_embed; colld always passes the mask itself.
STUDENT_MASK_TIME_PROB = 0.05
# Config attribute holding the teacher's values that export restores.
EXPORT_OVERRIDES_ATTR = "colld_export_overrides"


@dataclass(frozen=True)
class _SizeFields:
    """Names of the size fields in a family's HF config."""

    num_layers: str
    hidden_dim: str
    num_heads: str
    ffn_dim: str
    layerdrop: str
    layer_prefix: str  # state-dict prefix of the transformer layers


_WHISPER_FIELDS = _SizeFields(
    "encoder_layers", "d_model", "encoder_attention_heads", "encoder_ffn_dim",
    "encoder_layerdrop", "layers.",
)  # fmt: skip
_HF_FIELDS = _SizeFields(
    "num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size",
    "layerdrop", "encoder.layers.",
)  # fmt: skip
# Parameters not counted by count_encoder_parameters (see the module docstring).
_UNCOUNTED_PREFIXES = {
    "whisper": ("embed_positions.",),
    "hf": ("masked_spec_embed", "adapter.", "intermediate_ffn."),
}


def _fields(config: Any) -> _SizeFields:
    return _WHISPER_FIELDS if config.model_type == "whisper" else _HF_FIELDS


@dataclass(kw_only=True)
class StudentSpec:
    """How to size and initialise a student.

    preset: "deep-narrow" (teacher's depth, narrower) or "shallow-wide" (teacher's width,
        2 layers, narrower FFN) at the same parameter count.
    num_layers, hidden_dim, num_heads, ffn_dim: explicit sizes; override the preset.
    init: "auto" (default: "prune" where possible, else "teacher"; ``resolve_init``),
        "teacher" (front end and every k-th layer from the teacher, narrower axes keep their
        first n entries), "random" (HF init under the seed) or "prune" (the teacher's most
        important channels, heads, neurons and layers; not WavLM / w2v-BERT). Chosen by
        measurement: docs/results/demo.md ("Follow-up": teacher over random) and
        docs/results/vs-compression.md (prune over teacher).
    compression: teacher parameters / student parameters the presets aim at.
    prune_seconds: seconds of training audio (in manifest order) the teacher's activations
        are measured on for ``init="prune"``.
    """

    preset: str = "deep-narrow"
    num_layers: int | None = None
    hidden_dim: int | None = None
    num_heads: int | None = None
    ffn_dim: int | None = None
    init: str = "auto"
    compression: float = 3.3
    prune_seconds: float = 300.0

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(f"StudentSpec.preset={self.preset!r}; expected one of {PRESETS}")
        if self.init not in INITS:
            raise ValueError(f"StudentSpec.init={self.init!r}; expected one of {INITS}")
        if not self.compression >= 1.0:
            raise ValueError(
                f"StudentSpec.compression={self.compression}; expected >= 1 (teacher "
                "parameters / student parameters)"
            )
        if not self.prune_seconds > 0:
            raise ValueError(
                f"StudentSpec.prune_seconds={self.prune_seconds}; expected > 0 (seconds of "
                "audio the teacher's activations are measured on for init='prune')"
            )
        for name in ("num_layers", "hidden_dim", "num_heads", "ffn_dim"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or int(value) != value or value < 1):
                raise ValueError(f"StudentSpec.{name}={value!r}; expected a positive integer")


@dataclass(frozen=True, kw_only=True)
class StudentSizes:
    """Resolved student sizes."""

    num_layers: int
    hidden_dim: int
    num_heads: int
    ffn_dim: int


def count_encoder_parameters(encoder: SpeechEncoder) -> int:
    """Parameters that produce the hidden states (see the module docstring for what is left
    out: Whisper's fixed position table, the mask embedding, post-encoder adapters)."""
    return _count_module(encoder.model)


def teacher_sizes(teacher: SpeechEncoder) -> StudentSizes:
    """The teacher's own sizes, read off its HF config."""
    config = teacher.model.config
    fields = _fields(config)
    return StudentSizes(
        num_layers=int(getattr(config, fields.num_layers)),
        hidden_dim=int(getattr(config, fields.hidden_dim)),
        num_heads=int(getattr(config, fields.num_heads)),
        ffn_dim=int(getattr(config, fields.ffn_dim)),
    )


def resolve_init(teacher: SpeechEncoder, spec: StudentSpec) -> StudentSpec:
    """``spec`` with ``init="auto"`` made concrete: "prune" where ``teacher``'s family has a
    pruning layout and the student's sizes keep whole teacher heads (the presets always do;
    explicit sizes may not), else "teacher". Other values are returned unchanged."""
    if spec.init != "auto":
        return spec
    if can_prune(teacher):
        pruned = replace(spec, init="prune")
        sizes, full = resolve_student_sizes(teacher, pruned), teacher_sizes(teacher)
        head_dim = full.hidden_dim // full.num_heads
        if sizes.hidden_dim == sizes.num_heads * head_dim:
            return pruned
        logger.info(
            "student.init=auto: %d heads over width %d cannot keep the teacher's whole heads "
            "of %d dims; weight selection (init=teacher) instead of pruning",
            sizes.num_heads, sizes.hidden_dim, head_dim,
        )  # fmt: skip
    return replace(spec, init="teacher")


def resolve_student_sizes(teacher: SpeechEncoder, spec: StudentSpec) -> StudentSizes:
    """Apply the preset and the explicit fields of ``spec``; validates the result."""
    spec = resolve_init(teacher, spec)
    config = teacher.model.config
    cls = type(teacher.model)
    full = teacher_sizes(teacher)
    _check_not_larger(full, spec.num_layers, spec.hidden_dim)  # before any counting
    budget = _count_module(teacher.model) / spec.compression

    @functools.cache
    def count(sizes: StudentSizes) -> int:
        # Layers are identical in size (WavLM's shared position bias sits in layer 1, counted
        # by the one-layer build), so 1- and 2-layer builds give every depth exactly.
        one, two = (
            _count_module(_build_on_meta(cls, student_config(config, replace(sizes, num_layers=n))))
            for n in (1, 2)
        )
        return one + (sizes.num_layers - 1) * (two - one)

    deep_narrow = _solve_deep_narrow(
        full, spec if spec.preset == "deep-narrow" else StudentSpec(), config, budget, count
    )
    if spec.preset == "deep-narrow" and spec.init == "prune" and spec.hidden_dim is None:
        sizes = _solve_whole_heads(full, spec, deep_narrow, count)
    elif spec.preset == "deep-narrow":
        sizes = deep_narrow
    else:
        sizes = _solve_shallow_wide(full, spec, count(deep_narrow), count)
    _validate(full, sizes, config)
    return sizes


def plan_pruned_student(
    teacher: SpeechEncoder, spec: StudentSpec, calibration: Iterable[Batch]
) -> PrunePlan:
    """What ``init="prune"`` keeps of ``teacher`` for the student ``spec`` describes, from the
    teacher's activations on ``calibration`` (batches of training audio)."""
    spec = resolve_init(teacher, spec)
    if spec.init != "prune":
        raise ValueError(f"plan_pruned_student: student.init={spec.init!r}, not prune")
    sizes = resolve_student_sizes(teacher, spec)
    full = teacher_sizes(teacher)
    importance = measure_importance(teacher, calibration, num_heads=full.num_heads)
    plan = plan_pruning(
        importance,
        num_layers=sizes.num_layers,
        hidden_dim=sizes.hidden_dim,
        num_heads=sizes.num_heads,
        ffn_dim=sizes.ffn_dim,
        head_dim=full.hidden_dim // full.num_heads,
    )
    logger.info(
        "init='prune': teacher activations over %d frames; keeps teacher layers %s, %d of %d "
        "residual channels, %d of %d heads and %d of %d FFN neurons per layer",
        importance.frames, [j + 1 for j in plan.layers], sizes.hidden_dim, full.hidden_dim,
        sizes.num_heads, full.num_heads, sizes.ffn_dim, full.ffn_dim,
    )  # fmt: skip
    return plan


def build_student(
    teacher: SpeechEncoder, spec: StudentSpec, *, seed: int, plan: PrunePlan | None = None
) -> SpeechEncoder:
    """A student of the teacher's family and HF class, sized and initialised per ``spec``.

    plan: for ``init="prune"`` (required there): ``plan_pruned_student``'s result.
    Returned in train mode, wrapped like the teacher (``colld.encoders.wrap_encoder``).
    """
    asked, spec = spec.init, resolve_init(teacher, spec)
    if spec.init == "prune" and plan is None:
        raise ValueError(
            f"student.init={asked} {'(prune for this teacher) ' if asked == 'auto' else ''}"
            "needs a pruning plan: plan_pruned_student(teacher, spec, calibration batches) "
            "measures the teacher on training audio; or ask for init='teacher'"
        )
    sizes = resolve_student_sizes(teacher, spec)
    config = student_config(teacher.model.config, sizes)
    cls = type(teacher.model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        student = wrap_encoder(cls(config))
    if spec.init == "teacher":
        copy_teacher_weights(teacher, student)
    elif spec.init == "prune":
        assert plan is not None
        copy_pruned_weights(teacher, student, plan)
    student.train()
    student.requires_grad_(True)
    if cls.__name__ == "WhisperEncoder":
        student.model.embed_positions.requires_grad_(False)  # the fixed sinusoid
    student_count, teacher_count = (
        count_encoder_parameters(student),
        count_encoder_parameters(teacher),
    )
    logger.info(
        "student %s: %d layers x %d (heads %d, FFN %d), %d parameters (teacher %d, %.2fx)",
        cls.__name__, sizes.num_layers, sizes.hidden_dim, sizes.num_heads, sizes.ffn_dim,
        student_count, teacher_count, teacher_count / student_count,
    )  # fmt: skip
    return student


def source_layers(
    teacher: SpeechEncoder, spec: StudentSpec, plan: PrunePlan | None = None
) -> list[int]:
    """The teacher layer (1..L_T) each student layer's weights are copied from, in student
    layer order: the uniform map for ``init="teacher"``, the plan's kept layers for
    ``init="prune"`` (``plan`` required). ``objective.layer_map="source"`` trains on these.

    Raises ValueError for ``init="random"`` (no layer is copied) or a prune spec without a plan.
    """
    spec = resolve_init(teacher, spec)
    if spec.init == "prune":
        if plan is None:
            raise ValueError(
                "objective.layer_map=source with student.init=prune needs the pruning plan "
                "(plan_pruned_student): the kept teacher layers are measured on training audio"
            )
        return [layer + 1 for layer in plan.layers]
    if spec.init == "teacher":
        sizes = resolve_student_sizes(teacher, spec)
        return uniform_layer_map(sizes.num_layers, teacher.num_layers)
    raise ValueError(
        f"objective.layer_map=source needs student.init=teacher or prune (the layers the "
        f"student is copied from); student.init={spec.init!r} copies no teacher layer"
    )


def resolve_source_map(
    objective: ObjectiveConfig,
    teacher: SpeechEncoder,
    spec: StudentSpec,
    plan: PrunePlan | None = None,
) -> ObjectiveConfig:
    """``objective`` with ``layer_map="source"`` replaced by ``source_layers``; other values
    are returned unchanged."""
    if objective.layer_map != SOURCE_MAP:
        return objective
    return replace(objective, layer_map=source_layers(teacher, spec, plan))


def student_config(teacher_config: Any, sizes: StudentSizes) -> Any:
    """A copy of the teacher's HF config with the student's sizes and training settings."""
    config = copy.deepcopy(teacher_config)
    fields = _fields(config)
    setattr(config, fields.num_layers, sizes.num_layers)
    setattr(config, fields.hidden_dim, sizes.hidden_dim)
    setattr(config, fields.num_heads, sizes.num_heads)
    setattr(config, fields.ffn_dim, sizes.ffn_dim)
    setattr(config, fields.layerdrop, 0.0)
    if config.model_type == "whisper":
        config.architectures = ["WhisperEncoder"]
        return config
    overrides = getattr(teacher_config, EXPORT_OVERRIDES_ATTR, None) or {
        "mask_time_prob": float(teacher_config.mask_time_prob),
        "mask_feature_prob": float(teacher_config.mask_feature_prob),
    }
    setattr(config, EXPORT_OVERRIDES_ATTR, dict(overrides))
    if not config.mask_time_prob > 0:
        config.mask_time_prob = STUDENT_MASK_TIME_PROB
    config.mask_feature_prob = 0.0
    config.apply_spec_augment = True
    # Adapters shorten the output and are not part of the encoder contract.
    config.add_adapter = False
    if hasattr(config, "use_intermediate_ffn_before_adapter"):
        config.use_intermediate_ffn_before_adapter = False
    if hasattr(config, "adapter_attn_dim"):  # MMS per-language attention adapters
        config.adapter_attn_dim = None
    if hasattr(config, "output_hidden_size"):
        config.output_hidden_size = sizes.hidden_dim
    return config


def copy_teacher_weights(teacher: SpeechEncoder, student: SpeechEncoder) -> None:
    """Initialise the student from the teacher: front end, final norm and teacher layer m(i)
    into student layer i; axes where the student is smaller keep their first n entries.

    Raises ValueError when a student tensor is larger than its teacher tensor on some axis.
    """
    t_sizes, s_sizes = teacher_sizes(teacher), teacher_sizes(student)
    prefix = _fields(teacher.model.config).layer_prefix
    layer_map = uniform_layer_map(s_sizes.num_layers, t_sizes.num_layers)
    teacher_state = teacher.model.state_dict()
    student_state = student.model.state_dict()
    copied: dict[str, torch.Tensor] = {}
    for name, tensor in student_state.items():
        source = name
        if name.startswith(prefix):
            index, rest = name[len(prefix) :].split(".", 1)
            source = f"{prefix}{layer_map[int(index)] - 1}.{rest}"
        if source not in teacher_state and name in teacher_state:
            # A parameter only some layers have (WavLM's relative position bias lives in
            # layer 1 alone and is shared by all): take the teacher's at the same position.
            source = name
        if source not in teacher_state:
            logger.info("init='teacher': %s has no teacher counterpart; kept random", name)
            continue
        copied[name] = _select(teacher_state[source], tensor.shape, name, source)
    student.model.load_state_dict(copied, strict=False)
    narrowed = sorted(
        {f"{t} -> {s}" for t, s in zip(_axes(t_sizes), _axes(s_sizes), strict=True) if t != s}
    )
    logger.info(
        "init='teacher': copied teacher layers %s%s", layer_map,
        f"; kept the first entries of narrower axes ({', '.join(narrowed)})" if narrowed else "",
    )  # fmt: skip


def _axes(sizes: StudentSizes) -> tuple[int, int]:
    return sizes.hidden_dim, sizes.ffn_dim


def _select(source: torch.Tensor, shape: torch.Size, name: str, source_name: str) -> torch.Tensor:
    """The first ``shape[d]`` entries of ``source`` along every axis d (weight selection)."""
    if source.dim() != len(shape) or any(s > t for s, t in zip(shape, source.shape, strict=True)):
        raise ValueError(
            f"init='teacher': student {name} {tuple(shape)} does not fit in teacher "
            f"{source_name} {tuple(source.shape)}; every student axis must be at most the "
            "teacher's (use init='random' for a student wider than its teacher on some axis)"
        )
    return source[tuple(slice(0, size) for size in shape)].clone()


# --- sizing helpers --------------------------------------------------------------------------
def _count_module(module: nn.Module) -> int:
    key = "whisper" if module.config.model_type == "whisper" else "hf"
    skip = _UNCOUNTED_PREFIXES[key]
    return sum(p.numel() for n, p in module.named_parameters() if not n.startswith(skip))


def _build_on_meta(cls: type[nn.Module], config: Any) -> nn.Module:
    """The model without memory or init cost, for counting parameters."""
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        return cls(config)


def _round_to(value: float, multiple: int) -> int:
    return max(multiple, int(round(value / multiple)) * multiple)


def _default_heads(width: int, teacher: StudentSizes) -> int:
    """Heads keeping about the teacher's head size."""
    if width == teacher.hidden_dim:
        return teacher.num_heads
    return max(1, round(width * teacher.num_heads / teacher.hidden_dim))


def _default_ffn(width: int, teacher: StudentSizes) -> int:
    return _round_to(width * teacher.ffn_dim / teacher.hidden_dim, FFN_MULTIPLE)


def _width_candidates(teacher: StudentSizes, num_heads: int | None, config: Any) -> list[int]:
    """Widths <= the teacher's whose heads divide them into multiples of 8."""
    groups = int(getattr(config, "num_conv_pos_embedding_groups", 1))
    out = []
    for width in range(HEAD_DIM_MULTIPLE, teacher.hidden_dim + 1, HEAD_DIM_MULTIPLE):
        heads = num_heads or _default_heads(width, teacher)
        if width % (heads * HEAD_DIM_MULTIPLE) == 0 and width % groups == 0:
            out.append(width)
    return out


def _solve_deep_narrow(
    teacher: StudentSizes,
    spec: StudentSpec,
    config: Any,
    budget: float,
    count: Callable[[StudentSizes], int],
) -> StudentSizes:
    num_layers = spec.num_layers or teacher.num_layers

    def sizes_for(width: int) -> StudentSizes:
        return StudentSizes(
            num_layers=num_layers,
            hidden_dim=width,
            num_heads=spec.num_heads or _default_heads(width, teacher),
            ffn_dim=spec.ffn_dim or _default_ffn(width, teacher),
        )

    if spec.hidden_dim is not None:
        return sizes_for(spec.hidden_dim)
    candidates = _width_candidates(teacher, spec.num_heads, config)
    if not candidates:
        raise ValueError(
            f"no student width <= the teacher's {teacher.hidden_dim} is divisible into "
            f"{spec.num_heads} heads of a multiple of {HEAD_DIM_MULTIPLE}; set hidden_dim"
        )
    # Parameter counts grow with the width: bisect for the first candidate at/above budget.
    low, high = 0, len(candidates) - 1
    while low < high:
        middle = (low + high) // 2
        if count(sizes_for(candidates[middle])) < budget:
            low = middle + 1
        else:
            high = middle
    nearby = {candidates[low], candidates[max(low - 1, 0)]}
    best = min(nearby, key=lambda width: abs(count(sizes_for(width)) - budget))
    return sizes_for(best)


def _solve_whole_heads(
    teacher: StudentSizes,
    spec: StudentSpec,
    deep_narrow: StudentSizes,
    count: Callable[[StudentSizes], int],
) -> StudentSizes:
    """The deep-narrow student for ``init="prune"``, which keeps whole teacher heads: the width
    (a multiple of the teacher's head size) whose student with the teacher's FFN ratio is
    nearest ``deep_narrow``'s count, its FFN then solved to that exact count."""
    head_dim = teacher.hidden_dim // teacher.num_heads
    budget = count(deep_narrow)

    def with_default_ffn(heads: int) -> StudentSizes:
        width = heads * head_dim
        return replace(deep_narrow, hidden_dim=width, num_heads=heads,
                       ffn_dim=spec.ffn_dim or _default_ffn(width, teacher))  # fmt: skip

    choices = [spec.num_heads] if spec.num_heads else range(1, teacher.num_heads + 1)
    heads = min(choices, key=lambda h: abs(count(with_default_ffn(h)) - budget))
    fixed = replace(spec, num_layers=deep_narrow.num_layers, hidden_dim=heads * head_dim,
                    num_heads=heads)  # fmt: skip
    return _solve_shallow_wide(teacher, fixed, budget, count)


def _solve_shallow_wide(
    teacher: StudentSizes,
    spec: StudentSpec,
    budget: int,
    count: Callable[[StudentSizes], int],
) -> StudentSizes:
    width = spec.hidden_dim or teacher.hidden_dim
    heads = spec.num_heads or _default_heads(width, teacher)
    max_ffn = spec.ffn_dim or _default_ffn(width, teacher)

    def sizes_for(num_layers: int, ffn_dim: int) -> StudentSizes:
        return StudentSizes(
            num_layers=num_layers, hidden_dim=width, num_heads=heads, ffn_dim=ffn_dim
        )

    num_layers = spec.num_layers or SHALLOW_WIDE_LAYERS
    if spec.num_layers is None:  # fewest layers (>= 2) that reach the budget
        while num_layers < teacher.num_layers and count(sizes_for(num_layers, max_ffn)) < budget:
            num_layers += 1
    if spec.ffn_dim is not None:
        return sizes_for(num_layers, spec.ffn_dim)
    # The count is linear in the FFN width: solve from two points.
    base = count(sizes_for(num_layers, FFN_MULTIPLE))
    slope = (count(sizes_for(num_layers, 2 * FFN_MULTIPLE)) - base) / FFN_MULTIPLE
    if base > budget:
        raise ValueError(
            f"a shallow-wide student of {num_layers} layers x {width} has {base} parameters "
            f"even with FFN {FFN_MULTIPLE}, above the budget {budget} (the deep-narrow student "
            "of the same compression); lower hidden_dim or the compression"
        )
    ffn_dim = _round_to(FFN_MULTIPLE + (budget - base) / slope, FFN_MULTIPLE)
    return sizes_for(num_layers, ffn_dim)


def _validate(teacher: StudentSizes, student: StudentSizes, config: Any) -> None:
    """The size checks of a resolved student; errors name both sizes."""
    _check_not_larger(teacher, student.num_layers, student.hidden_dim)
    if student.hidden_dim % student.num_heads:
        raise ValueError(
            f"student width {student.hidden_dim} is not divisible by its {student.num_heads} heads"
        )
    groups = int(getattr(config, "num_conv_pos_embedding_groups", 1))
    if student.hidden_dim % groups:
        raise ValueError(
            f"student width {student.hidden_dim} is not divisible by the positional "
            f"convolution's {groups} groups (config.num_conv_pos_embedding_groups)"
        )


def _check_not_larger(
    teacher: StudentSizes, num_layers: int | None, hidden_dim: int | None
) -> None:
    if num_layers is not None and num_layers > teacher.num_layers:
        raise ValueError(
            f"student has {num_layers} layers but the teacher only {teacher.num_layers}; a "
            "student must not be deeper than its teacher"
        )
    if hidden_dim is not None and hidden_dim > teacher.hidden_dim:
        raise ValueError(
            f"student width {hidden_dim} is wider than the teacher's {teacher.hidden_dim}; a "
            "student must not be wider than its teacher"
        )
