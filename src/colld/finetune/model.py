"""The CTC model: an encoder's last hidden state -> dropout -> Linear(D, V), blank id 0.

The last hidden state (not a learned sum of all states) is what Hugging Face's ForCTC classes
feed their ``lm_head``, so a fine-tuned wav2vec 2.0-family model is saved as that class with
the same logits (``colld.finetune.export``). The encoder runs without masking (no SpecAugment).

Shape legend: B batch, S samples, F front-end frames, C channels, T encoder frames, D width,
V vocabulary, U label tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from colld.data.batch import Batch
from colld.encoders.base import SpeechEncoder
from colld.eval.probes import greedy_ctc
from colld.objectives.objective import LossOutput

BLANK_ID = 0


@dataclass
class CTCOutput:
    """logits: Shape (B, T, V), padded frames arbitrary; lengths: valid frames, Shape (B,)."""

    logits: Tensor
    lengths: Tensor


class CTCModel(nn.Module):
    """``encoder`` + a linear CTC head on its last hidden state.

    Shape: features (B, F, C) or (B, S), feature_lengths (B,) -> logits (B, T, V).
    """

    def __init__(self, encoder: SpeechEncoder, vocab_size: int, *, final_dropout: float) -> None:
        super().__init__()
        self.encoder = encoder
        self.dropout = nn.Dropout(final_dropout)
        self.head = nn.Linear(encoder.hidden_dim, vocab_size)

    @property
    def vocab_size(self) -> int:
        return self.head.out_features

    def forward(self, features: Tensor, feature_lengths: Tensor) -> CTCOutput:
        last = self.encoder.num_layers
        out = self.encoder(features, feature_lengths, layers=[last])
        hidden = out.hidden_states[last]  # (B, T, D)
        return CTCOutput(logits=self.head(self.dropout(hidden)), lengths=out.lengths)


def ctc_loss(logits: Tensor, lengths: Tensor, targets: Sequence[Sequence[int]]) -> Tensor:
    """Mean over utterances of each one's CTC loss divided by its label length (PyTorch's and
    HF's ``ctc_loss_reduction="mean"``), in fp32; infeasible alignments count 0.

    logits: (B, T, V); lengths: (B,); targets: B lists of ids (none of them the blank).
    """
    log_probs = F.log_softmax(logits.float(), dim=-1).transpose(0, 1)  # (T, B, V)
    flat = torch.tensor([t for target in targets for t in target], dtype=torch.long)
    target_lengths = torch.tensor([len(t) for t in targets], dtype=torch.long)
    return F.ctc_loss(
        log_probs,
        flat.to(logits.device),
        lengths.to(torch.long),
        target_lengths.to(logits.device),
        blank=BLANK_ID,
        reduction="mean",
        zero_infinity=True,
    )


def ctc_batch_loss(
    module: nn.Module, batch: Batch, targets: dict[str, list[int]]
) -> tuple[LossOutput, CTCOutput]:
    """The CTC loss of ``batch`` (labels looked up by utterance id) and the model output."""
    out = module(batch.features, batch.feature_lengths)
    missing = [uid for uid in batch.ids if uid not in targets]
    if missing:
        raise KeyError(f"no CTC label for utterance(s) {missing[:5]}")
    loss = ctc_loss(out.logits, out.lengths, [targets[uid] for uid in batch.ids])
    return LossOutput(total=loss, parts={"ctc": loss.detach()}), out


def greedy_decode(logits: Tensor, lengths: Tensor) -> list[list[int]]:
    """Frame-wise argmax, repeats collapsed, blanks dropped. Shape: (B, T, V), (B,) -> B lists."""
    best = logits.argmax(dim=-1).cpu()  # (B, T)
    lengths = lengths.cpu().tolist()
    return [greedy_ctc(row[:n], blank=BLANK_ID) for row, n in zip(best, lengths, strict=True)]
