"""Languages of the synthetic corpus and the text spoken in each.

Two sources of text:
- generated: random words of the language from Faker's word list for its locale, put together
  as Faker's ``sentence()`` does (not grammatical sentences), as many words as the caller asks;
- parallel: the everyday sentences shipped in ``colld/data/sentences/parallel.json``, the same
  sentence (``sentence_id``) in every language with an English reference (``text_en``).

Only languages where both work are registered: espeak-ng 1.51 speaks them and Faker gives words
of the language itself (not Latin filler). Two espeak-ng quirks are handled here:
- Mandarin uses the voice ``cmn-latn-pinyin``: 1.51's plain ``cmn`` voice reads the pinyin tone
  digits of every character as English numbers ("ni three hao three").
- Japanese is kana only: 1.51 reads any kanji as "Chinese letter". Generated Japanese draws on
  Faker's kana-only words, separated by spaces (see ``SentenceGenerator``); the parallel Japanese
  sentences are written in kana without spaces. espeak-ng reads the particles は and へ as "ha"
  and "he", not "wa" and "e".
Ukrainian: Faker's modifier apostrophe (U+02BC) becomes ``'`` (see ``normalize_text``).
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

PARALLEL_SENTENCES_FILE = "parallel.json"

_KANA_ONLY = r"[\u3040-\u30ffー]+"
_WORD_EXTRA = frozenset("'\u02bc- \u200c")


@dataclass(frozen=True, kw_only=True)
class Language:
    """One language of the corpus.

    code: the manifest's ``language`` (ISO 639-1; Whisper uses the same codes).
    name: English name.
    espeak_voice: espeak-ng voice (``-v``) that speaks it; a variant is appended as ``+name``.
    faker_locale: Faker locale whose ``sentence()`` gives words of this language.
    script: writing system of the text.
    tonal: whether the language is tonal.
    word_pattern: regular expression every generated word must match in full (None = any).
    word_connector: joins generated words (None = the Faker locale's own connector).
    seconds_per_char: measured speech seconds per text character at espeak-ng's default rate
        (175), used only to size the corpus before synthesis (see ``estimate_duration``).
    """

    code: str
    name: str
    espeak_voice: str
    faker_locale: str
    script: str
    tonal: bool = False
    word_pattern: str | None = None
    word_connector: str | None = None
    seconds_per_char: float


# seconds_per_char: median of (duration - 0.3 s) / characters over 160 utterances per language
# (120 generated sentences of 3-24 words and the 40 parallel ones), random variants, pitch 50,
# rate 175, espeak-ng 1.51. Only the corpus size estimate depends on it.
LANGUAGES: dict[str, Language] = {
    lang.code: lang
    for lang in (
        Language(code="en", name="English", espeak_voice="en-us", faker_locale="en_US",
                 script="Latin", seconds_per_char=0.053),
        Language(code="de", name="German", espeak_voice="de", faker_locale="de_DE",
                 script="Latin", seconds_per_char=0.052),
        Language(code="fr", name="French", espeak_voice="fr-fr", faker_locale="fr_FR",
                 script="Latin", seconds_per_char=0.044),
        Language(code="es", name="Spanish", espeak_voice="es", faker_locale="es_ES",
                 script="Latin", seconds_per_char=0.056),
        Language(code="it", name="Italian", espeak_voice="it", faker_locale="it_IT",
                 script="Latin", seconds_per_char=0.056),
        Language(code="nl", name="Dutch", espeak_voice="nl", faker_locale="nl_NL",
                 script="Latin", seconds_per_char=0.055),
        Language(code="cs", name="Czech", espeak_voice="cs", faker_locale="cs_CZ",
                 script="Latin", seconds_per_char=0.060),
        Language(code="pl", name="Polish", espeak_voice="pl", faker_locale="pl_PL",
                 script="Latin", seconds_per_char=0.064),
        Language(code="ru", name="Russian", espeak_voice="ru", faker_locale="ru_RU",
                 script="Cyrillic", seconds_per_char=0.050),
        Language(code="uk", name="Ukrainian", espeak_voice="uk", faker_locale="uk_UA",
                 script="Cyrillic", seconds_per_char=0.049),
        Language(code="el", name="Greek", espeak_voice="el", faker_locale="el_GR",
                 script="Greek", seconds_per_char=0.055),
        Language(code="ar", name="Arabic", espeak_voice="ar", faker_locale="ar_AA",
                 script="Arabic", seconds_per_char=0.084),
        Language(code="fa", name="Persian", espeak_voice="fa", faker_locale="fa_IR",
                 script="Arabic", seconds_per_char=0.077),
        Language(code="hy", name="Armenian", espeak_voice="hy", faker_locale="hy_AM",
                 script="Armenian", seconds_per_char=0.070),
        Language(code="bn", name="Bengali", espeak_voice="bn", faker_locale="bn_BD",
                 script="Bengali", seconds_per_char=0.068),
        Language(code="vi", name="Vietnamese", espeak_voice="vi", faker_locale="vi_VN",
                 script="Latin", tonal=True, seconds_per_char=0.051),
        Language(code="zh", name="Mandarin Chinese", espeak_voice="cmn-latn-pinyin",
                 faker_locale="zh_CN", script="Han", tonal=True, seconds_per_char=0.244),
        Language(code="ja", name="Japanese", espeak_voice="ja", faker_locale="ja_JP",
                 script="Kana", word_pattern=_KANA_ONLY, word_connector=" ", seconds_per_char=0.090),
    )
}  # fmt: skip


class UnknownLanguageError(ValueError):
    """A language code that the corpus recipe does not know."""


def get_language(code: str) -> Language:
    """The registered language ``code``; the error lists the available codes."""
    try:
        return LANGUAGES[code]
    except KeyError:
        raise UnknownLanguageError(
            f"unknown language {code!r}; available: {', '.join(LANGUAGES)}"
        ) from None


def estimate_duration(text: str, language: Language, rate: int) -> float:
    """Speech seconds espeak-ng will probably need for ``text`` at ``rate`` words per minute.

    Only used to size the corpus before synthesis; the manifests hold measured durations.
    """
    return 0.3 + len(text) * language.seconds_per_char * 175.0 / rate


def stable_seed(*parts: object) -> int:
    """A 63-bit seed derived from ``parts`` (stable across runs, unlike ``hash``)."""
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class SentenceGenerator:
    """Distinct random sentences in one language, deterministic for a seed.

    A sentence is ``num_words`` words drawn (with replacement) from the locale's Faker word list,
    the first capitalised, joined by the locale's connector (Japanese: a space, see below) and
    ended with the locale's sentence punctuation, like Faker's ``sentence()``. Words with
    characters other than letters, combining marks, apostrophes, hyphens, spaces and the
    zero-width non-joiner are left out (the Polish list holds digits and brackets, the Arabic
    list digits). Every sentence is new within this generator and never one of ``exclude``.

    Japanese words are separated by spaces (as in kana-only texts for children): espeak-ng 1.51
    cuts a long kana run into pieces and reads some of them as "Japanese letter".
    """

    def __init__(self, language: Language, seed: int, exclude: set[str] | None = None) -> None:
        self.language = language
        from faker import Faker  # here, not at the top: only corpus synthesis needs Faker

        self._faker = Faker(language.faker_locale)
        self._faker.seed_instance(stable_seed("faker", language.code, seed))
        lorem = _lorem_provider(self._faker, language)
        self._connector = (
            language.word_connector
            if language.word_connector is not None
            else (lorem.word_connector)
        )
        self._punctuation = lorem.sentence_punctuation
        self._words = _word_list(self._faker, language)
        self._seen: set[str] = set(exclude or ())

    def sentence(self, num_words: int, max_tries: int = 100) -> str:
        """A new sentence of ``num_words`` words."""
        if num_words < 1:
            raise ValueError(f"num_words must be >= 1, got {num_words}")
        for _ in range(max_tries):
            words = self._faker.words(nb=num_words, ext_word_list=self._words)
            words[0] = words[0][:1].upper() + words[0][1:]
            text = normalize_text(self._connector.join(words) + self._punctuation)
            if text not in self._seen:
                self._seen.add(text)
                return text
        raise RuntimeError(
            f"Faker locale {self.language.faker_locale} gave no new {num_words}-word sentence "
            f"in {max_tries} tries; lower the corpus size or raise min_words"
        )


def normalize_text(text: str) -> str:
    """Text as espeak-ng should get it: NFC, the modifier apostrophe (U+02BC, Faker's Ukrainian)
    as ASCII ``'`` (espeak-ng 1.51 reads U+02BC as the English word "adjective")."""
    return unicodedata.normalize("NFC", text).replace("\u02bc", "'").strip()


def _lorem_provider(faker: Any, language: Language) -> Any:
    for provider in faker.get_providers():
        if type(provider).__module__.startswith("faker.providers.lorem"):
            return provider
    raise RuntimeError(f"Faker locale {language.faker_locale} has no lorem provider")


def _usable_word(word: str) -> bool:
    return bool(word.strip()) and all(
        unicodedata.category(c)[0] in "LM" or c in _WORD_EXTRA for c in word
    )


def _word_list(faker: Any, language: Language) -> list[str]:
    """The locale's usable words, filtered by ``language.word_pattern``, in Faker's order."""
    pattern = re.compile(language.word_pattern) if language.word_pattern else None
    words = [
        w
        for w in faker.get_words_list()
        if _usable_word(w) and (pattern is None or pattern.fullmatch(w))
    ]
    if len(words) < 20:
        raise RuntimeError(
            f"Faker locale {language.faker_locale} has only {len(words)} usable words "
            f"(pattern {language.word_pattern!r}); expected at least 20"
        )
    return words


@dataclass(frozen=True, kw_only=True)
class ParallelSentence:
    """One sentence in every language. text: language code -> sentence."""

    sentence_id: str
    text: dict[str, str]

    @property
    def text_en(self) -> str:
        return self.text["en"]


def parallel_sentences_path() -> Path:
    """Where the shipped parallel sentences live (package data)."""
    return Path(str(resources.files("colld.data") / "sentences" / PARALLEL_SENTENCES_FILE))


def load_parallel_sentences(path: str | Path | None = None) -> list[ParallelSentence]:
    """Read and check the parallel sentences (default: the shipped file).

    Every sentence must have a unique id and a non-empty text for every registered language;
    errors name the file, the sentence id and the language.
    """
    path = Path(path) if path is not None else parallel_sentences_path()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read parallel sentences from {path}: {err}") from err
    rows = data.get("sentences") if isinstance(data, dict) else None
    if not isinstance(rows, list) or not rows:
        raise ValueError(f"{path}: expected an object with a non-empty list 'sentences'")
    sentences: list[ParallelSentence] = []
    seen: set[str] = set()
    for index, row in enumerate(rows):
        sentence_id = row.get("id") if isinstance(row, dict) else None
        if not isinstance(sentence_id, str) or not sentence_id or sentence_id in seen:
            raise ValueError(f"{path}: sentence #{index} has a missing or duplicate 'id'")
        seen.add(sentence_id)
        for code in LANGUAGES:
            value = row.get(code)
            if not isinstance(value, str) or not value.strip():
                raise ValueError(
                    f"{path}: sentence {sentence_id!r} lacks a text for language {code!r}"
                )
        sentences.append(
            ParallelSentence(
                sentence_id=sentence_id,
                text={code: normalize_text(row[code]) for code in LANGUAGES},
            )
        )
    return sentences
