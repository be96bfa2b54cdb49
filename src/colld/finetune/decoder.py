"""A frozen Whisper text decoder that reads any encoder's (adapted) states: teacher-forced
logits for training and batched greedy decoding with the decoder's own task tokens.

Why not ``WhisperForConditionalGeneration.generate``: its decoder passes no encoder mask to
cross-attention (Whisper always sees a full 30 s window), so a batch of unpadded encoder
states of different lengths would attend to its padding, and results would depend on what a
clip is batched with. This module runs the same decoder layers (transformers'
``WhisperDecoderLayer``, their weights untouched) with an explicit cross-attention mask and
an ``EncoderDecoderCache``; a batch decodes exactly as each clip alone does (tested).

Decoding is greedy with Whisper's prompt ``<|startoftranscript|><|xx|><|task|><|notimestamps|>``;
only text tokens and ``<|endoftext|>`` can be produced (timestamps, language and task tokens
and the model's ``suppress_tokens`` are masked out).

Shape legend: B batch, T encoder frames, D decoder width, U tokens, V vocabulary.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from transformers import (
    WhisperForConditionalGeneration,
    WhisperTokenizer,
)
from transformers.cache_utils import DynamicCache, EncoderDecoderCache

log = logging.getLogger(__name__)

TASKS = ("transcribe", "translate")
IGNORE = -100
"""Label id of positions that carry no loss (prompt and padding)."""


class DecoderSpecError(ValueError):
    """A decoder spec that names no usable Whisper decoder, or a language it lacks."""


@dataclass(frozen=True)
class SpecialTokens:
    """Ids of Whisper's control tokens in one vocabulary."""

    start: int  # <|startoftranscript|>
    end: int  # <|endoftext|>
    no_timestamps: int
    tasks: dict[str, int]  # transcribe / translate; empty for English-only models
    languages: dict[str, int]  # "de" -> id of <|de|>; empty for English-only models


def _special_tokens(tokenizer: WhisperTokenizer) -> SpecialTokens:
    vocab = tokenizer.get_vocab()

    def need(token: str) -> int:
        if token not in vocab:
            raise DecoderSpecError(f"the Whisper tokenizer has no {token} token")
        return vocab[token]

    languages = {
        token[2:-2]: i
        for token, i in vocab.items()
        if token.startswith("<|") and token.endswith("|>") and 2 <= len(token) - 4 <= 3
        and token[2:-2].isalpha() and token[2:-2].islower()
    }  # fmt: skip
    tasks = {task: vocab[f"<|{task}|>"] for task in TASKS if f"<|{task}|>" in vocab}
    return SpecialTokens(
        start=need("<|startoftranscript|>"),
        end=need("<|endoftext|>"),
        no_timestamps=need("<|notimestamps|>"),
        tasks=tasks,
        languages=languages if tasks else {},
    )


class WhisperTextDecoder(nn.Module):
    """The decoder half of a Whisper model, frozen, with its tokenizer.

    ``source`` names where it came from (embedded name, directory or hub id).
    """

    def __init__(
        self, model: WhisperForConditionalGeneration, tokenizer: WhisperTokenizer, source: str
    ) -> None:
        super().__init__()
        self.decoder = model.model.decoder
        self.proj_out = model.proj_out  # tied to decoder.embed_tokens
        self.tokenizer = tokenizer
        self.source = source
        self.special = _special_tokens(tokenizer)
        suppress = list(getattr(model.generation_config, "suppress_tokens", None) or [])
        vocab_size = self.proj_out.out_features
        banned = torch.zeros(vocab_size, dtype=torch.bool)
        banned[self.special.end + 1 :] = True  # every control token after <|endoftext|>
        banned[[i for i in suppress if 0 <= i < vocab_size]] = True
        self.register_buffer("banned", banned, persistent=False)
        self.requires_grad_(False)
        self.eval()

    @property
    def width(self) -> int:
        return self.decoder.config.d_model

    @property
    def max_tokens(self) -> int:
        return self.decoder.config.max_target_positions

    @property
    def multilingual(self) -> bool:
        return bool(self.special.tasks)

    def train(self, mode: bool = True) -> WhisperTextDecoder:
        """Always eval mode: the decoder is frozen (no dropout while the adapter trains)."""
        return super().train(False)

    # ------------------------------------------------------------ tokens
    def prompt(self, language: str, task: str) -> list[int]:
        """The decoder prompt for ``task`` on speech in ``language``."""
        if not self.multilingual:
            if task != "transcribe":
                raise DecoderSpecError(
                    f"the decoder of {self.source} is English-only: it cannot {task}"
                )
            return [self.special.start, self.special.no_timestamps]
        if language not in self.special.languages:
            raise DecoderSpecError(
                f"language {language!r} has no token in the Whisper decoder of {self.source} "
                f"(it knows {len(self.special.languages)} languages, e.g. "
                f"{sorted(self.special.languages)[:8]})"
            )
        if task not in self.special.tasks:
            raise DecoderSpecError(f"unknown task {task!r}; expected one of {TASKS}")
        return [
            self.special.start,
            self.special.languages[language],
            self.special.tasks[task],
            self.special.no_timestamps,
        ]

    def encode_text(self, text: str) -> list[int]:
        """Text tokens of a transcript or translation, as Whisper writes them (a leading
        space), followed by ``<|endoftext|>``."""
        ids = self.tokenizer.encode(" " + text.strip(), add_special_tokens=False)
        return [*ids, self.special.end]

    def decode_text(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True).strip()

    # ------------------------------------------------------------ forward
    def _run(
        self,
        input_ids: Tensor,
        encoder_states: Tensor,
        cross_mask: Tensor,
        cache: EncoderDecoderCache | None,
        offset: int,
    ) -> Tensor:
        """Decoder layers over ``input_ids`` at positions ``offset...``. Returns the final
        hidden states. Shape: (B, U), (B, T, D), (B, 1, 1, T) -> (B, U, D)."""
        u = input_ids.shape[1]
        if offset + u > self.max_tokens:
            raise ValueError(
                f"{offset + u} tokens exceed the decoder's {self.max_tokens} positions"
            )
        x = self.decoder.embed_tokens(input_ids) + self.decoder.embed_positions.weight[
            offset : offset + u
        ].to(encoder_states.dtype)
        self_mask = None
        if u > 1:  # causal over the new tokens; every cached position is visible
            future = torch.ones(u, offset + u, dtype=torch.bool, device=x.device).triu(offset + 1)
            self_mask = torch.zeros(u, offset + u, dtype=x.dtype, device=x.device)
            self_mask = self_mask.masked_fill(future, torch.finfo(x.dtype).min)[None, None]
        for layer in self.decoder.layers:
            x = layer(
                x,
                self_mask,
                encoder_states,
                encoder_attention_mask=cross_mask,
                past_key_values=cache,
                use_cache=cache is not None,
            )
        return self.decoder.layer_norm(x)

    @staticmethod
    def cross_mask(lengths: Tensor, frames: int, dtype: torch.dtype) -> Tensor:
        """Additive mask hiding padded encoder frames. Shape: (B,) -> (B, 1, 1, T)."""
        pad = torch.arange(frames, device=lengths.device)[None] >= lengths[:, None]
        mask = torch.zeros(pad.shape, dtype=dtype, device=lengths.device)
        return mask.masked_fill(pad, torch.finfo(dtype).min)[:, None, None]

    def forward(self, encoder_states: Tensor, lengths: Tensor, input_ids: Tensor) -> Tensor:
        """Teacher-forced logits. Shape: (B, T, D), (B,), (B, U) -> (B, U, V)."""
        mask = self.cross_mask(lengths, encoder_states.shape[1], encoder_states.dtype)
        return self.proj_out(self._run(input_ids, encoder_states, mask, None, 0))

    @torch.no_grad()
    def greedy(
        self,
        encoder_states: Tensor,
        lengths: Tensor,
        prompts: Sequence[Sequence[int]],
        *,
        max_new_tokens: int | Sequence[int],
    ) -> list[list[int]]:
        """Greedy decoding of each clip from its prompt (all prompts of one length), until
        ``<|endoftext|>`` or its ``max_new_tokens`` (one for all or one per clip). Returns the
        text tokens (no prompt, no ``<|endoftext|>``). Shape: (B, T, D), (B,) -> B lists."""
        if len({len(p) for p in prompts}) != 1:
            raise ValueError("greedy decoding needs prompts of one length")
        batch = encoder_states.shape[0]
        ids = torch.tensor([list(p) for p in prompts], device=encoder_states.device)
        mask = self.cross_mask(lengths, encoder_states.shape[1], encoder_states.dtype)
        cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
        if isinstance(max_new_tokens, int):
            max_new_tokens = [max_new_tokens] * batch
        limits = torch.tensor(list(max_new_tokens), device=ids.device).clamp(
            max=self.max_tokens - ids.shape[1]
        )
        budget = int(limits.max())
        out = torch.full((batch, budget), self.special.end, dtype=torch.long)
        done = limits <= 0
        step_ids, offset = ids, 0
        for step in range(budget):
            hidden = self._run(step_ids, encoder_states, mask, cache, offset)
            logits = self.proj_out(hidden[:, -1]).float()  # (B, V)
            logits = logits.masked_fill(self.banned, float("-inf"))
            token = logits.argmax(dim=-1).masked_fill(done, self.special.end)
            out[:, step] = token.cpu()
            done |= (token == self.special.end) | (limits <= step + 1)
            if bool(done.all()):
                break
            offset += step_ids.shape[1]
            step_ids = token[:, None]
        result = []
        for row in out.tolist():
            end = row.index(self.special.end) if self.special.end in row else len(row)
            result.append(row[:end])
        return result


def load_text_decoder(spec: str) -> WhisperTextDecoder:
    """The frozen decoder + tokenizer of a Whisper model: an embedded name (``whisper-base``,
    ``whisper-tiny.en``), a CTranslate2 directory, or a Hugging Face Whisper directory / hub
    id holding a full ``WhisperForConditionalGeneration`` and its tokenizer."""
    from colld.teachers.ctranslate2 import ct2_to_hf_whisper, is_ct2_dir, load_ct2_tokenizer
    from colld.teachers.embedded import EMBEDDED, embedded_model_dir

    if spec in EMBEDDED or is_ct2_dir(spec):
        directory = embedded_model_dir(spec) if spec in EMBEDDED else Path(spec)
        model = ct2_to_hf_whisper(directory, encoder_only=False)
        tokenizer = load_ct2_tokenizer(directory)
    else:
        try:
            model = WhisperForConditionalGeneration.from_pretrained(spec, dtype=torch.float32)
            tokenizer = WhisperTokenizer.from_pretrained(spec)
        except (OSError, ValueError) as err:
            raise DecoderSpecError(
                f"decoder '{spec}': expected an embedded Whisper name ({sorted(EMBEDDED)}), a "
                f"CTranslate2 Whisper directory or a Hugging Face Whisper model with its "
                f"decoder and tokenizer ({err})"
            ) from err
    return WhisperTextDecoder(model.float().eval(), tokenizer, source=spec)
