"""Structured pruning of the teacher as a student's initialisation (``student.init=prune``).

Issue 5's "vs-compression" grid compares CoLLD with the other way to shrink an encoder: prune
the teacher to the student's parameter count, then spend the same distillation budget. The
pruning follows Minitron's activation-based importance (Muralidharan et al. 2024, "Compact
Language Models via Pruning and Knowledge Distillation"): the teacher runs on a few minutes of
training audio and every prunable unit gets a score,

    residual channel d    mean |output| of every LayerNorm, summed over the norms
                          (each layer's two pre-norms and the final norm: what the layers read)
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

Why written here: torch.nn.utils.prune zeroes weights without shrinking tensors; dependency-graph
pruners (Torch-Pruning) are not in this project's package sources, score by weight magnitude
rather than by activations, and would leave the HF config to patch by hand. Here the student is
built from its own HF config (``colld.students.build``) and filled with index-selected slices of
the teacher, so it exports and reloads like every other student.

Only families with a layout table (``_LAYOUTS``: Whisper encoders) can be pruned; others raise
a ValueError naming the supported ones (``init=teacher`` works for every family).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from colld.data.batch import Batch
from colld.encoders.base import SpeechEncoder

logger = logging.getLogger(__name__)

# Axis roles of a parameter: "r" residual channel, "a" attention inner dim (whole heads),
# "f" FFN neuron, "-" unchanged (must equal the teacher's size).
Roles = tuple[str, ...]


@dataclass(frozen=True)
class _Layout:
    """Where a family keeps what pruning needs (module paths relative to a layer)."""

    layers: str  # the ModuleList of transformer layers
    attn_out: str  # its input is the heads' concatenated output, (B, T, H * head_dim)
    ffn_out: str  # its input is the FFN activation, (B, T, F)
    layer_norms: tuple[str, ...]  # pre-norms inside a layer
    final_norm: str | None  # the encoder's last norm
    outer: dict[str, Roles]  # parameters outside the layers
    inner: dict[str, Roles]  # parameters of one layer (relative names)


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
_LAYOUTS: dict[str, _Layout] = {"whisper": _WHISPER}


@dataclass(frozen=True)
class Importance:
    """Activation importance of the teacher's prunable units (higher = keep).

    residual: Shape: (D_t,). heads: Shape: (L_t, H_t). ffn: Shape: (L_t, F_t).
    layers: block influence. Shape: (L_t,).
    frames: valid frames the means are over.
    """

    residual: Tensor
    heads: Tensor
    ffn: Tensor
    layers: Tensor
    frames: int


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
            f"student.init=prune supports the families {sorted(_LAYOUTS)}; the teacher is "
            f"{encoder.family!r} ({type(encoder.model).__name__}). Use student.init=teacher "
            "(weight selection, every family) or student.init=random"
        )
    return _LAYOUTS[encoder.family]


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
    """Keep the top units of each kind (ties: the lower index); errors name the sizes."""
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
    layers = _top(importance.layers, num_layers)
    return PrunePlan(
        layers=layers.tolist(),
        residual=_top(importance.residual, hidden_dim),
        heads=torch.stack([_top(importance.heads[j], num_heads) for j in layers.tolist()]),
        ffn=torch.stack([_top(importance.ffn[j], ffn_dim) for j in layers.tolist()]),
        head_dim=head_dim,
    )


def _top(scores: Tensor, k: int) -> Tensor:
    """Indices of the k highest scores, ascending; ties keep the lower index."""
    order = sorted(range(scores.numel()), key=lambda i: (-float(scores[i]), i))
    return torch.tensor(sorted(order[:k]), dtype=torch.long)


def copy_pruned_weights(teacher: SpeechEncoder, student: SpeechEncoder, plan: PrunePlan) -> None:
    """Fill every student parameter with its slice of the teacher per ``plan``.

    Raises ValueError for a student parameter the family's layout does not know (a new model
    version must not be half-initialised silently) or whose shape does not match the plan.
    """
    layout = layout_for(teacher)
    teacher_state = teacher.model.state_dict()
    prefix = layout.layers + "."
    selected: dict[str, Tensor] = {}
    for name, tensor in student.model.state_dict().items():
        if name.startswith(prefix):
            index, rest = name[len(prefix) :].split(".", 1)
            student_layer = int(index)
            source = f"{prefix}{plan.layers[student_layer]}.{rest}"
            roles = layout.inner.get(rest)
        else:
            student_layer, source, rest = -1, name, name
            roles = layout.outer.get(name)
        if roles is None:
            raise ValueError(
                f"student.init=prune: parameter {name} has no entry in the {teacher.family} "
                "pruning layout (colld.students.prune); cannot tell which teacher slice it takes"
            )
        indices = {
            "r": plan.residual,
            "a": plan.attention_dims(student_layer) if student_layer >= 0 else None,
            "f": plan.ffn[student_layer] if student_layer >= 0 else None,
        }
        value = teacher_state[source]
        for axis, role in enumerate(roles):
            if role != "-":
                value = value.index_select(axis, indices[role])
        if value.shape != tensor.shape:
            raise ValueError(
                f"student.init=prune: {name} is {tuple(tensor.shape)} but the plan selects "
                f"{tuple(value.shape)} from the teacher's {source}"
            )
        selected[name] = value.clone()
    student.model.load_state_dict(selected, strict=True)
