"""Structured pruning of the teacher as a student's initialisation (``student.init=prune``).

Issue 5's "vs-compression" grid compares CoLLD with the other way to shrink an encoder: prune
the teacher to the student's parameter count, then spend the same distillation budget. The
pruning follows Minitron's activation-based importance (Muralidharan et al. 2024, "Compact
Language Models via Pruning and Knowledge Distillation"): the teacher runs on a few minutes of
training audio and every prunable unit gets a score,

    residual channel d    mean |output| of every LayerNorm, summed over the norms
                          (each layer's two pre-norms and the final norm: what the layers read;
                          post-LN wav2vec 2.0 / HuBERT / data2vec: the two post-norms and the
                          encoder norm before the first layer)
    head h of layer l     mean L2 norm of the head's output (the out-projection's input slice)
    FFN neuron n of l     mean |activation| (fc2's input)
    layer l               block influence 1 - cos(layer input, layer output), mean over frames
                          (Men et al. 2024, "ShortGPT")

(means over valid frames, padding excluded). The student keeps the top D_s residual channels
(the same set everywhere: conv outputs, positions, norms and the residual side of every
projection, so the residual stream stays consistent), the top H_s whole heads and top F_s
neurons of each kept layer, and the top L_s layers in teacher order. Kept indices are sorted.
Heads are kept whole: the student's head size must equal the teacher's (D_s = H_s x head_dim),
e.g. Whisper base (6 x 512, 8 heads of 64) -> 6 x 256 with 4 heads (``PrunePlan`` says which).

Grouped positional convolution (wav2vec 2.0, HuBERT, data2vec-audio: G =
``num_conv_pos_embedding_groups``, weight (D, D / G, K)): its output channel d reads only the
channels of d's own group, so the kept residual set is group-balanced: the top D_s / G channels
of each teacher group (D_s must be divisible by G; the global top D_s could leave the groups
unequal, which a grouped conv cannot hold). Student channel i (teacher channel R[i], group
i // (D_s / G)) then reads the kept channels of that same group, given per group as indices
within the teacher's group (``_group_local``). Families without a grouped conv (Whisper) keep
the global top D_s.

Weight norm (wav2vec 2.0 and HuBERT's positional conv, ``weight_norm(conv, dim=2)``: the
effective weight is W = g * v / ||v||, the norm over dims 0 and 1 for each tap k): slicing v
changes ||v||, so the student takes v_s = v sliced like W and g_s = g * ||v_s|| / ||v||, whose
effective weight g_s * v_s / ||v_s|| = g * v_s / ||v|| is exactly the teacher's W sliced (and
at the teacher's own sizes the very tensors g, v, so the copy is bit-exact). Both names are
read: torch's parametrizations (``...parametrizations.weight.original0`` = g, ``original1`` = v)
and the older ``weight_g`` / ``weight_v``.

Why written here: torch.nn.utils.prune zeroes weights without shrinking tensors; dependency-graph
pruners (Torch-Pruning) are not in this project's package sources, score by weight magnitude
rather than by activations, and would leave the HF config to patch by hand. Here the student is
built from its own HF config (``colld.students.build``) and filled with index-selected slices of
the teacher, so it exports and reloads like every other student.

Only families with a layout table (``_LAYOUTS``) can be pruned: Whisper encoders, wav2vec 2.0
(incl. the stable-layer-norm variants, XLS-R / MMS), HuBERT and data2vec-audio. The waveform
families' conv front end (feature extractor and the feature projection's norm) is not pruned:
its width does not depend on the transformer's, and the student keeps the teacher's. WavLM
(gated relative position bias) and w2v-BERT (Conformer layers) raise a ValueError naming the
supported families (``init=teacher`` works for every family).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn
from torch.nn.utils.weight_norm import WeightNorm

from colld.data.batch import Batch
from colld.encoders.base import SpeechEncoder

logger = logging.getLogger(__name__)

# Axis roles of a parameter: "r" residual channel, "a" attention inner dim (whole heads),
# "f" FFN neuron, "g" the input axis of a grouped conv whose axis 0 is "r" (each kept output
# channel reads the kept channels of its own group, as indices within the teacher's group),
# "-" unchanged (must equal the teacher's size).
Roles = tuple[str, ...]


@dataclass(frozen=True)
class _Layout:
    """Where a family keeps what pruning needs (module paths relative to a layer)."""

    layers: str  # the ModuleList of transformer layers
    attn_out: str  # its input is the heads' concatenated output, (B, T, H * head_dim)
    ffn_out: str  # its input is the FFN activation, (B, T, F)
    layer_norms: tuple[str, ...]  # pre-norms inside a layer (post-norms for post-LN families)
    final_norm: str | None  # the encoder's last (post-LN: first) norm outside the layers
    outer: dict[str, Roles]  # parameters outside the layers; "*" stands for a module index
    inner: dict[str, Roles]  # parameters of one layer (relative names)
    unchanged: tuple[str, ...] = ()  # name prefixes of outer parameters copied whole
    optional: tuple[str, ...] = ()  # outer parameters a teacher may lack (student's init kept)
    conv_groups: str | None = None  # config field: the groups of the "g" convs (None: 1)
    weight_norm: tuple[str, ...] = ()  # modules whose weight is weight-normed (outer has
    # "<module>.weight": the roles of the effective weight)


_WHISPER = _Layout(
    layers="layers",
    attn_out="self_attn.out_proj",
    ffn_out="fc2",
    layer_norms=("self_attn_layer_norm", "final_layer_norm"),
    final_norm="layer_norm",
    outer={
        "conv1.weight": ("r", "-", "-"), "conv1.bias": ("r",),
        "conv2.weight": ("r", "r", "-"), "conv2.bias": ("r",),
        "embed_positions.weight": ("-", "r"),  # the fixed sinusoid's kept columns
        "layer_norm.weight": ("r",), "layer_norm.bias": ("r",),
    },
    inner={
        "self_attn_layer_norm.weight": ("r",), "self_attn_layer_norm.bias": ("r",),
        "self_attn.q_proj.weight": ("a", "r"), "self_attn.q_proj.bias": ("a",),
        "self_attn.k_proj.weight": ("a", "r"),
        "self_attn.v_proj.weight": ("a", "r"), "self_attn.v_proj.bias": ("a",),
        "self_attn.out_proj.weight": ("r", "a"), "self_attn.out_proj.bias": ("r",),
        "final_layer_norm.weight": ("r",), "final_layer_norm.bias": ("r",),
        "fc1.weight": ("f", "r"), "fc1.bias": ("f",),
        "fc2.weight": ("r", "f"), "fc2.bias": ("r",),
    },
)  # fmt: skip
# wav2vec 2.0 (post-LN and stable-layer-norm layers share the parameter names), HuBERT and
# data2vec-audio: the same transformer; the conv front end is kept whole.
_HF_OUTER: dict[str, Roles] = {
    "masked_spec_embed": ("r",),
    "feature_projection.projection.weight": ("r", "-"),
    "feature_projection.projection.bias": ("r",),
    "encoder.layer_norm.weight": ("r",), "encoder.layer_norm.bias": ("r",),
}  # fmt: skip
_WAV2VEC2 = _Layout(
    layers="encoder.layers",
    attn_out="attention.out_proj",
    ffn_out="feed_forward.output_dense",
    layer_norms=("layer_norm", "final_layer_norm"),
    final_norm="encoder.layer_norm",
    outer={
        **_HF_OUTER,
        "encoder.pos_conv_embed.conv.weight": ("r", "g", "-"),  # weight-normed, see the doc
        "encoder.pos_conv_embed.conv.bias": ("r",),
    },
    inner={
        "layer_norm.weight": ("r",), "layer_norm.bias": ("r",),
        "attention.q_proj.weight": ("a", "r"), "attention.q_proj.bias": ("a",),
        "attention.k_proj.weight": ("a", "r"), "attention.k_proj.bias": ("a",),
        "attention.v_proj.weight": ("a", "r"), "attention.v_proj.bias": ("a",),
        "attention.out_proj.weight": ("r", "a"), "attention.out_proj.bias": ("r",),
        "final_layer_norm.weight": ("r",), "final_layer_norm.bias": ("r",),
        "feed_forward.intermediate_dense.weight": ("f", "r"),
        "feed_forward.intermediate_dense.bias": ("f",),
        "feed_forward.output_dense.weight": ("r", "f"),
        "feed_forward.output_dense.bias": ("r",),
    },
    unchanged=("feature_extractor.", "feature_projection.layer_norm."),
    optional=("masked_spec_embed",),  # only when the config has mask_time/feature_prob > 0
    conv_groups="num_conv_pos_embedding_groups",
    weight_norm=("encoder.pos_conv_embed.conv",),
)  # fmt: skip
# data2vec-audio: a stack of grouped convs without weight norm (their LayerNorms are
# parameter-free).
_DATA2VEC_AUDIO = replace(
    _WAV2VEC2,
    outer={
        **_HF_OUTER,
        "encoder.pos_conv_embed.layers.*.conv.weight": ("r", "g", "-"),
        "encoder.pos_conv_embed.layers.*.conv.bias": ("r",),
    },
    weight_norm=(),
)
_LAYOUTS: dict[str, _Layout] = {
    "whisper": _WHISPER,
    "wav2vec2": _WAV2VEC2,
    "hubert": _WAV2VEC2,
    "data2vec-audio": _DATA2VEC_AUDIO,
}


@dataclass(frozen=True)
class Importance:
    """Activation importance of the teacher's prunable units (higher = keep).

    residual: Shape: (D_t,). heads: Shape: (L_t, H_t). ffn: Shape: (L_t, F_t).
    layers: block influence. Shape: (L_t,).
    frames: valid frames the means are over.
    groups: the teacher's positional-conv groups (1: no grouped conv); the plan keeps the same
        number of residual channels in each.
    """

    residual: Tensor
    heads: Tensor
    ffn: Tensor
    layers: Tensor
    frames: int
    groups: int = 1


@dataclass(frozen=True)
class PrunePlan:
    """Which teacher units a pruned student keeps (ascending indices).

    layers: kept teacher layers, 0-based, in order; student layer i is teacher layer layers[i].
    residual: kept residual channels. Shape: (D_s,).
    heads: per kept layer, kept heads. Shape: (L_s, H_s).
    ffn: per kept layer, kept neurons. Shape: (L_s, F_s).
    head_dim: the teacher's (and student's) head size.
    """

    layers: list[int]
    residual: Tensor
    heads: Tensor
    ffn: Tensor
    head_dim: int

    def attention_dims(self, student_layer: int) -> Tensor:
        """The q/k/v rows (out_proj columns) of the kept heads. Shape: (H_s * head_dim,)."""
        heads = self.heads[student_layer]
        offsets = torch.arange(self.head_dim)
        return (heads[:, None] * self.head_dim + offsets[None, :]).reshape(-1)


def can_prune(encoder: SpeechEncoder) -> bool:
    """Whether ``encoder``'s family has a pruning layout (``student.init=prune`` works)."""
    return encoder.family in _LAYOUTS


def layout_for(encoder: SpeechEncoder) -> _Layout:
    """The pruning layout of ``encoder``'s family; ValueError for families without one."""
    if encoder.family not in _LAYOUTS:
        raise ValueError(
            f"student.init=prune supports the families {sorted(_LAYOUTS)} (Whisper encoders, "
            "wav2vec 2.0 incl. stable-layer-norm, HuBERT, data2vec-audio); the teacher is "
            f"{encoder.family!r} ({type(encoder.model).__name__}), which has no pruning layout. "
            "Use student.init=teacher (weight selection, every family) or student.init=random"
        )
    return _LAYOUTS[encoder.family]


def _conv_groups(encoder: SpeechEncoder, layout: _Layout) -> int:
    """Groups of the family's grouped conv ("g" axes), from the HF config; 1 without one."""
    if layout.conv_groups is None:
        return 1
    return int(getattr(encoder.model.config, layout.conv_groups))


@torch.no_grad()
def measure_importance(
    teacher: SpeechEncoder, batches: Iterable[Batch], *, num_heads: int
) -> Importance:
    """Run the frozen teacher over ``batches`` and score its units (see the module doc).

    num_heads: the teacher's attention heads (its config's).

    Raises ValueError when the batches hold no valid frame.
    """
    layout = layout_for(teacher)
    layers: nn.ModuleList = teacher.model.get_submodule(layout.layers)
    sums: dict[str, Tensor] = {}
    valid: list[Tensor] = []  # the current batch's (B, T) frame mask, set before each forward

    def add(key: str, per_frame: Tensor) -> None:
        """per_frame: Shape: (B, T, ...); adds its sum over valid frames to ``sums[key]``."""
        total = per_frame.float()[valid[0]].sum(0)
        sums[key] = sums[key] + total if key in sums else total

    def on_norm(_m: nn.Module, _i: tuple, output: Tensor) -> None:
        add("residual", output.abs())

    def on_attn(index: int):
        def hook(_m: nn.Module, inputs: tuple[Tensor, ...]) -> None:
            b, t, width = inputs[0].shape
            per_head = inputs[0].reshape(b, t, num_heads, width // num_heads)
            add(f"heads{index}", per_head.float().norm(dim=-1))

        return hook

    def on_ffn(index: int):
        def hook(_m: nn.Module, inputs: tuple[Tensor, ...]) -> None:
            add(f"ffn{index}", inputs[0].abs())

        return hook

    def on_layer(index: int):
        def hook(_m: nn.Module, inputs: tuple, output: Tensor | tuple) -> None:
            out = output[0] if isinstance(output, tuple) else output
            cos = nn.functional.cosine_similarity(inputs[0].float(), out.float(), dim=-1)
            add(f"layer{index}", (1.0 - cos)[..., None])

        return hook

    frames = 0
    device = next(teacher.parameters()).device
    with _hooks(teacher, layout, layers, on_norm, on_attn, on_ffn, on_layer):
        for batch in batches:
            if not batch.size:  # every clip of the request was unreadable
                continue
            batch = batch.to(device)
            lengths = teacher.output_lengths(batch.feature_lengths)
            num_frames = int(teacher.output_lengths(torch.tensor([batch.features.shape[1]]))[0])
            positions = torch.arange(num_frames, device=device)
            valid[:] = [positions[None, :] < lengths[:, None]]
            frames += int(lengths.sum())
            teacher(batch.features, batch.feature_lengths)
    if frames == 0:
        raise ValueError(
            "student.init=prune: the calibration batches hold no valid frame; the teacher's "
            "activations cannot be measured (check data.train and student.prune_seconds)"
        )
    count = len(layers)
    return Importance(
        residual=sums["residual"].cpu() / frames,
        heads=torch.stack([sums[f"heads{i}"] for i in range(count)]).cpu() / frames,
        ffn=torch.stack([sums[f"ffn{i}"] for i in range(count)]).cpu() / frames,
        layers=torch.cat([sums[f"layer{i}"] for i in range(count)]).cpu() / frames,
        frames=frames,
        groups=_conv_groups(teacher, layout),
    )


@contextmanager
def _hooks(teacher, layout, layers, on_norm, on_attn, on_ffn, on_layer) -> Iterator[None]:
    handles = []
    for index, layer in enumerate(layers):
        handles.append(
            layer.get_submodule(layout.attn_out).register_forward_pre_hook(on_attn(index))
        )
        handles.append(layer.get_submodule(layout.ffn_out).register_forward_pre_hook(on_ffn(index)))
        handles.append(layer.register_forward_hook(on_layer(index)))
        for name in layout.layer_norms:
            handles.append(layer.get_submodule(name).register_forward_hook(on_norm))
    if layout.final_norm is not None:
        handles.append(
            teacher.model.get_submodule(layout.final_norm).register_forward_hook(on_norm)
        )
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def plan_pruning(
    importance: Importance, *, num_layers: int, hidden_dim: int, num_heads: int, ffn_dim: int,
    head_dim: int,
) -> PrunePlan:  # fmt: skip
    """Keep the top units of each kind (ties: the lower index); errors name the sizes.

    Residual channels are kept group-balanced where ``importance.groups > 1`` (the top
    hidden_dim / groups of each teacher group, see the module doc).
    """
    teacher_layers, teacher_heads = importance.heads.shape
    wanted = {
        "layers": (num_layers, teacher_layers),
        "hidden_dim": (hidden_dim, importance.residual.numel()),
        "num_heads": (num_heads, teacher_heads),
        "ffn_dim": (ffn_dim, importance.ffn.shape[1]),
    }
    for name, (student, teacher) in wanted.items():
        if not 1 <= student <= teacher:
            raise ValueError(
                f"student.init=prune: student {name} {student} must be between 1 and the "
                f"teacher's {teacher}"
            )
    if hidden_dim != num_heads * head_dim:
        raise ValueError(
            f"student.init=prune keeps whole teacher heads of {head_dim} dims: a student of "
            f"width {hidden_dim} with {num_heads} heads has heads of {hidden_dim / num_heads:g}; "
            f"set student.hidden_dim to num_heads x {head_dim} (e.g. {num_heads * head_dim})"
        )
    groups = importance.groups
    if hidden_dim % groups:
        raise ValueError(
            f"student.init=prune keeps the same number of residual channels in each of the "
            f"teacher's {groups} positional-conv groups (config.num_conv_pos_embedding_groups): "
            f"student hidden_dim {hidden_dim} is not divisible by {groups}"
        )
    layers = _top(importance.layers, num_layers)
    return PrunePlan(
        layers=layers.tolist(),
        residual=_top_per_group(importance.residual, hidden_dim, groups),
        heads=torch.stack([_top(importance.heads[j], num_heads) for j in layers.tolist()]),
        ffn=torch.stack([_top(importance.ffn[j], ffn_dim) for j in layers.tolist()]),
        head_dim=head_dim,
    )


def _top(scores: Tensor, k: int) -> Tensor:
    """Indices of the k highest scores, ascending; ties keep the lower index."""
    order = sorted(range(scores.numel()), key=lambda i: (-float(scores[i]), i))
    return torch.tensor(sorted(order[:k]), dtype=torch.long)


def _top_per_group(scores: Tensor, k: int, groups: int) -> Tensor:
    """The top k / groups indices of each of ``groups`` equal consecutive blocks of ``scores``,
    ascending (``_top`` itself for one group). scores: Shape: (D,). Returns Shape: (k,)."""
    size, per_group = scores.numel() // groups, k // groups
    blocks = [_top(scores[g * size : (g + 1) * size], per_group) + g * size for g in range(groups)]
    return torch.cat(blocks)


def copy_pruned_weights(teacher: SpeechEncoder, student: SpeechEncoder, plan: PrunePlan) -> None:
    """Fill every student parameter with its slice of the teacher per ``plan``.

    Weight-normed weights get v sliced and g rescaled so the effective weight is the teacher's
    sliced (module doc). Raises ValueError for a student parameter the family's layout does not
    know (a new model version must not be half-initialised silently), whose shape does not
    match the plan, or for a residual set a grouped conv cannot hold.
    """
    layout = layout_for(teacher)
    groups = _conv_groups(teacher, layout)
    local = _group_local(plan.residual, groups, teacher.hidden_dim)
    teacher_state = teacher.model.state_dict()
    weight_norms = _pruned_weight_norms(teacher, layout, teacher_state, plan, local)
    selected: dict[str, Tensor] = {}
    for name, tensor in student.model.state_dict().items():
        if name in weight_norms:
            source, value = name, weight_norms[name]
        elif name.startswith(layout.unchanged):
            source, value = name, teacher_state[name]
        elif name in layout.optional and name not in teacher_state:
            logger.info("init='prune': the teacher has no %s; the student keeps its own", name)
            source, value = name, tensor
        else:
            source, roles, student_layer = _source_of(teacher.family, layout, plan, name)
            value = _slice(teacher_state[source], roles, plan, student_layer, local)
        if value.shape != tensor.shape:
            raise ValueError(
                f"student.init=prune: {name} is {tuple(tensor.shape)} but the plan selects "
                f"{tuple(value.shape)} from the teacher's {source}"
            )
        selected[name] = value.clone()
    student.model.load_state_dict(selected, strict=True)


def _source_of(family: str, layout: _Layout, plan: PrunePlan, name: str) -> tuple[str, Roles, int]:
    """The teacher parameter a student parameter is cut from, its axis roles and the student
    layer (-1 outside the layers). Raises ValueError for a name the layout does not know."""
    prefix = layout.layers + "."
    if name.startswith(prefix):
        index, rest = name[len(prefix) :].split(".", 1)
        student_layer = int(index)
        source = f"{prefix}{plan.layers[student_layer]}.{rest}"
        roles = layout.inner.get(rest)
    else:
        student_layer, source = -1, name
        roles = layout.outer.get(name, layout.outer.get(re.sub(r"\.\d+(?=\.)", ".*", name)))
    if roles is None:
        raise ValueError(
            f"student.init=prune: parameter {name} has no entry in the {family} pruning layout "
            "(colld.students.prune); cannot tell which teacher slice it takes"
        )
    return source, roles, student_layer


def _slice(
    value: Tensor, roles: Roles, plan: PrunePlan, student_layer: int, local: Tensor | None
) -> Tensor:
    """``value`` cut to the plan along each axis per ``roles`` ("g": a per-row gather of
    ``local``, after axis 0 was cut to the kept residual channels; with one group, no
    ``local``, it is "r")."""
    if "g" in roles and roles[0] != "r":
        raise ValueError(
            f"student.init=prune: a grouped-conv input axis needs residual output channels on "
            f"axis 0; the layout gives roles {roles}"
        )
    for axis, role in enumerate(roles):
        if role == "-":
            continue
        if role == "g" and local is not None:
            target = list(value.shape)
            target[axis] = local.shape[1]
            shape = [1] * value.dim()
            shape[0], shape[axis] = local.shape
            value = value.gather(axis, local.reshape(shape).expand(target))
            continue
        indices = {
            "r": plan.residual,
            "g": plan.residual,
            "a": plan.attention_dims(student_layer) if student_layer >= 0 else None,
            "f": plan.ffn[student_layer] if student_layer >= 0 else None,
        }[role]
        value = value.index_select(axis, indices)
    return value


def _group_local(residual: Tensor, groups: int, width: int) -> Tensor | None:
    """For each kept residual channel, the kept channels of its conv group as indices within
    the teacher's group (what a grouped conv's input axis keeps); None for ``groups == 1``.

    residual: kept channels, ascending. Shape: (D_s,). width: the teacher's D_t.
    Returns Shape: (D_s, D_s / groups). Raises ValueError unless every group keeps D_s / groups.
    """
    if groups == 1:
        return None
    size = width // groups
    counts = torch.bincount(residual // size, minlength=groups)
    if residual.numel() % groups or bool((counts != residual.numel() // groups).any()):
        raise ValueError(
            f"student.init=prune: the plan keeps {counts.tolist()} residual channels in the "
            f"teacher's {groups} positional-conv groups of {size}; a grouped conv needs the same "
            "number in each (plan_pruning balances them: Importance.groups)"
        )
    per_group = residual.reshape(groups, -1) - (torch.arange(groups) * size)[:, None]
    return per_group.repeat_interleave(per_group.shape[1], dim=0)


def _weight_norm_names(module: str) -> list[tuple[str, str]]:
    """(g, v) state-dict names of ``module``'s weight-normed weight: torch's parametrizations,
    then the older ``torch.nn.utils.weight_norm``."""
    return [
        (f"{module}.parametrizations.weight.original0", f"{module}.parametrizations.weight.original1"),
        (f"{module}.weight_g", f"{module}.weight_v"),
    ]  # fmt: skip


def _weight_norm_dim(module: nn.Module, name: str) -> int:
    """The ``dim`` ``module``'s weight norm keeps (its norm is over every other dim)."""
    parametrizations = getattr(module, "parametrizations", None)
    if parametrizations is not None and "weight" in parametrizations:
        for parametrization in parametrizations["weight"]:
            if hasattr(parametrization, "dim"):
                return int(parametrization.dim)
    for hook in module._forward_pre_hooks.values():
        if isinstance(hook, WeightNorm):
            return int(hook.dim)
    raise ValueError(
        f"student.init=prune: {name} looks weight-normed but the teacher's module has no "
        "weight norm (torch.nn.utils.parametrizations.weight_norm or weight_norm) to read dim from"
    )


def _pruned_weight_norms(
    teacher: SpeechEncoder, layout: _Layout, teacher_state: dict[str, Tensor], plan: PrunePlan,
    local: Tensor | None,
) -> dict[str, Tensor]:  # fmt: skip
    """The student's g and v of each weight-normed module: v_s = v cut like the effective
    weight (the layout's "<module>.weight" roles), g_s = g * ||v_s|| / ||v||, so that
    g_s * v_s / ||v_s|| is the teacher's g * v / ||v|| cut by the plan. Keyed by state-dict name
    (both namings); a module whose teacher weight is plain is left to the layout's
    "<module>.weight" entry."""
    out: dict[str, Tensor] = {}
    for module in layout.weight_norm:
        names = [pair for pair in _weight_norm_names(module) if pair[0] in teacher_state]
        if not names:
            continue
        (g_name, v_name), roles = names[0], layout.outer[f"{module}.weight"]
        dim = _weight_norm_dim(teacher.model.get_submodule(module), v_name)
        if roles[dim] != "-":
            raise ValueError(
                f"student.init=prune: {v_name} is weight-normed along dim {dim}, which the "
                f"layout cuts (roles {roles}); only the other axes can be pruned"
            )
        g, v = teacher_state[g_name], teacher_state[v_name]
        v_kept = _slice(v, roles, plan, -1, local)
        norms = torch.norm_except_dim(v_kept, 2, dim) / torch.norm_except_dim(v, 2, dim)
        for student_g, student_v in _weight_norm_names(module):  # whichever the student uses
            out[student_g], out[student_v] = g * norms, v_kept
    return out
