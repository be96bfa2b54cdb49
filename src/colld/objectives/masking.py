"""Time-span masking of the student's input (wav2vec 2.0 / HuBERT style).

Semantics follow Hugging Face's ``_compute_mask_indices`` (``mask_time_prob``) and fairseq's
``compute_mask_indices`` ("static" span lengths), vectorised over the batch:

* utterance ``b`` with ``L_b`` valid frames gets ``n_b = floor(mask_prob * L_b / span + u_b)``
  spans, ``u_b ~ U[0, 1)`` (probabilistic rounding, drawn per utterance as fairseq does for
  padded batches; HF draws one ``u`` per batch; the expectation is the same);
* ``n_b`` is raised to ``min_spans`` and then capped at ``L_b // span`` (HF's cap, applied to the
  utterance's own length so that a mask never depends on how much padding the batch has);
* span starts are drawn uniformly *without* replacement from ``0 .. L_b - span``, so every span
  lies inside the valid frames (no clipping needed, nothing lands on padding); spans may
  overlap, which is why ~48% of the frames are covered at ``mask_prob`` 0.65, span 10;
* an utterance shorter than ``span`` frames gets no span at all (as in HF: a span would cover
  the whole utterance and leave the student nothing to infer the masked frames from).

Shape legend: B batch, T frames.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _check_span_args(mask_prob: float, span: int, min_spans: int) -> None:
    if not 0.0 <= mask_prob <= 1.0:
        raise ValueError(f"mask_prob must lie in [0, 1], got {mask_prob}")
    if span < 1:
        raise ValueError(f"span must be >= 1 frame, got {span}")
    if min_spans < 0:
        raise ValueError(f"min_spans must be >= 0, got {min_spans}")


def num_spans(
    lengths: Tensor,
    *,
    mask_prob: float,
    span: int,
    min_spans: int,
    generator: torch.Generator | None,
) -> Tensor:
    """Number of spans to mask per utterance (probabilistic rounding, see module docstring).

    Shape: lengths (B,) -> (B,) int64.
    """
    rounding = torch.rand(lengths.shape, generator=generator, device=lengths.device)
    count = torch.floor(mask_prob * lengths.double() / span + rounding.double()).long()
    count = count.clamp(min=min_spans)
    return torch.minimum(count, lengths.long() // span)


def span_mask(
    lengths: Tensor,
    num_frames: int,
    *,
    mask_prob: float,
    span: int,
    min_spans: int,
    generator: torch.Generator | None,
) -> Tensor:
    """Draw a span mask: True on frames the student sees replaced by the mask embedding.

    lengths: valid frames per utterance (right padding). Shape: (B,).
    num_frames: padded length T (>= lengths.max()).
    generator: source of randomness; must live on ``lengths.device`` (torch's rule). None uses
        the global generator.

    Shape: (B,) -> (B, T) bool, on ``lengths.device``.
    """
    _check_span_args(mask_prob, span, min_spans)
    if lengths.dim() != 1:
        raise ValueError(f"lengths must have shape (B,), got {tuple(lengths.shape)}")
    batch_size = lengths.shape[0]
    device = lengths.device
    lengths = lengths.long()
    if batch_size and int(lengths.max()) > num_frames:
        raise ValueError(
            f"num_frames={num_frames} is shorter than the longest utterance ({int(lengths.max())})"
        )
    counts = num_spans(
        lengths, mask_prob=mask_prob, span=span, min_spans=min_spans, generator=generator
    )
    frames = torch.arange(num_frames, device=device)
    # A start t is allowed when the whole span [t, t + span) lies within the valid frames.
    allowed = frames[None, :] <= (lengths - span)[:, None]  # (B, T)
    # Uniform sampling without replacement: rank the allowed starts by random keys and keep the
    # counts[b] best (a random permutation restricted to the allowed starts).
    keys = torch.rand((batch_size, num_frames), generator=generator, device=device)
    keys = keys.masked_fill(~allowed, -1.0)  # disallowed starts rank last
    order = keys.argsort(dim=1, descending=True)  # (B, T)
    rank = torch.empty_like(order).scatter_(1, order, frames.expand(batch_size, -1))
    starts = (rank < counts[:, None]) & allowed  # (B, T); counts <= number of allowed starts
    # Frame t is covered when a start lies in [t - span + 1, t]: a windowed count via cumsum.
    cum = F.pad(starts.long().cumsum(dim=1), (span, 0))  # (B, span + T)
    covered = (cum[:, span:] - cum[:, :-span]) > 0  # (B, T)
    return covered & (frames[None, :] < lengths[:, None])


def valid_frames(lengths: Tensor, num_frames: int) -> Tensor:
    """True on valid (non-padding) frames of right-padded utterances.

    Shape: (B,) -> (B, T) bool.
    """
    return torch.arange(num_frames, device=lengths.device)[None, :] < lengths[:, None]
