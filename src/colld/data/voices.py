"""espeak-ng as the corpus' speakers: voices (variant + pitch + rate), synthesis and IPA.

A voice is one espeak-ng variant (``espeak-ng --voices=variant``, used as ``-v LANG+VARIANT``)
with a fixed pitch (``-p``, 0-99) and rate (``-s``, words per minute). The same voice speaks
every language of the corpus, like a multilingual speaker.

Phonemes: ``espeak-ng --ipa --sep=_`` prints one line per clause, words separated by spaces and
phonemes by ``_`` (affricates and diphthongs stay one phoneme, e.g. ``tʃ``, ``aɪ``).
``tokenize_ipa`` splits there and
- removes the stress marks ``ˈ`` and ``ˌ`` (the inventory would triple otherwise);
- keeps length (``ː``), nasalisation and other diacritics on their phoneme;
- keeps tone marks as espeak-ng 1.51 writes them, attached to the vowel (``o2``, ``ɑu5``; its
  IPA writer renders some tone digits as letters, e.g. Vietnamese tone 3 as ``ɜ``);
- drops language-switch markers such as ``(en)``;
- drops word boundaries: the manifest's ``phonemes`` is one space-separated phoneme sequence.
"""

from __future__ import annotations

import logging
import random
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

ESPEAK_SAMPLE_RATE = 22050
ESPEAK_TIMEOUT_S = 60.0
PHONEME_SEPARATOR = "_"

# Variant file names (the last column of `espeak-ng --voices=variant`). Left out because they
# sound exactly like another one (identical audio in espeak-ng 1.51): Mr, fast, serious
# (= the default voice), caleb and klatt6 (= klatt).
VARIANTS: tuple[str, ...] = (
    "Alex", "Alicia", "Andrea", "Andy", "Annie", "AnxiousAndy", "Demonic", "Denis", "Diogo",
    "Gene", "Gene2", "Henrique", "Hugo", "Jacky", "Lee", "Marco", "Mario", "Michael", "Mike",
    "Nguyen", "RicishayMax", "RicishayMax2", "RicishayMax3", "Storm", "Tweaky", "UniRobot",
    "adam", "anika", "anikaRobot", "announcer", "antonio", "aunty", "belinda", "benjamin",
    "boris", "croak", "david", "ed", "edward", "edward2", "f1", "f2", "f3", "f4", "f5",
    "grandma", "grandpa", "gustave", "iven", "iven2", "iven3", "iven4", "john", "kaukovalta",
    "klatt", "klatt2", "klatt3", "klatt4", "klatt5", "linda", "m1", "m2", "m3", "m4", "m5",
    "m6", "m7", "m8", "marcelo", "max", "michel", "miguel", "norbert", "pablo", "paul",
    "pedro", "quincy", "rob", "robert", "robosoft", "robosoft2", "robosoft3", "robosoft4",
    "robosoft5", "robosoft6", "robosoft7", "robosoft8", "sandro", "shelby", "steph", "steph2",
    "steph3", "travis", "victor", "whisper", "whisperf", "zac",
)  # fmt: skip

_STRESS = str.maketrans("", "", "ˈˌ")
_LANGUAGE_SWITCH = re.compile(r"\([A-Za-z][A-Za-z-]*\)")


class EspeakError(RuntimeError):
    """espeak-ng failed or is unusable; the message says what was run and what came back."""


class EspeakNotFoundError(EspeakError):
    """espeak-ng is not installed."""


def find_espeak() -> str:
    """Path of the espeak-ng binary, or an error that says how to install it."""
    binary = shutil.which("espeak-ng")
    if binary is None:
        raise EspeakNotFoundError(
            "espeak-ng was not found on PATH; the synthetic corpus needs it: install it with "
            "`apt-get install espeak-ng` (Debian/Ubuntu) or `brew install espeak-ng` (macOS)"
        )
    return binary


def espeak_version(binary: str) -> str:
    """The version number printed by ``espeak-ng --version`` (e.g. "1.51")."""
    out = _run([binary, "--version"]).stdout
    match = re.search(r"text-to-speech:\s*(\S+)", out)
    if match is None:
        raise EspeakError(f"cannot parse the version from `{binary} --version`: {out!r}")
    return match.group(1)


def installed_variants(binary: str) -> set[str]:
    """Variant file names this espeak-ng installation has."""
    out = _run([binary, "--voices=variant"]).stdout
    names = set()
    for line in out.splitlines()[1:]:
        # columns: Pty Language Age/Gender VoiceName File [Other languages]
        files = [c for c in line.split() if c.startswith("!v/")]
        if files:
            names.add(files[0].removeprefix("!v/"))
    return names


def installed_languages(binary: str) -> set[str]:
    """Voice names of the installed languages (first column of ``espeak-ng --voices``)."""
    out = _run([binary, "--voices"]).stdout
    return {line.split()[1] for line in out.splitlines()[1:] if len(line.split()) > 1}


@dataclass(frozen=True, kw_only=True)
class Voice:
    """One synthetic speaker: an espeak-ng variant with a fixed pitch and rate."""

    variant: str
    pitch: int
    rate: int

    @property
    def id(self) -> str:
        """The manifest's ``voice``, e.g. ``klatt3-p62-s150``."""
        return f"{self.variant}-p{self.pitch}-s{self.rate}"

    def espeak_args(self, espeak_voice: str) -> list[str]:
        """Command-line options that make espeak-ng speak ``espeak_voice`` in this voice."""
        return ["-v", f"{espeak_voice}+{self.variant}", "-p", str(self.pitch), "-s", str(self.rate)]


def make_voices(
    variants: list[str],
    num_voices: int,
    rng: random.Random,
    pitch_range: tuple[int, int],
    rate_range: tuple[int, int],
) -> list[Voice]:
    """``num_voices`` distinct voices drawn from ``variants``.

    Each variant is used once before any is used twice (when more voices than variants are
    asked for); pitch is uniform in ``pitch_range``, rate log-uniform in ``rate_range``.
    """
    if not variants:
        raise ValueError("make_voices needs at least one variant")
    order: list[str] = []
    while len(order) < num_voices:
        batch = list(variants)
        rng.shuffle(batch)
        order.extend(batch)
    voices: list[Voice] = []
    seen: set[str] = set()
    for variant in order[:num_voices]:
        while True:
            pitch = rng.randint(*pitch_range)
            rate = round(rate_range[0] * (rate_range[1] / rate_range[0]) ** rng.random())
            voice = Voice(variant=variant, pitch=pitch, rate=rate)
            if voice.id not in seen:
                break
        seen.add(voice.id)
        voices.append(voice)
    return voices


def synthesize(binary: str, text: str, espeak_voice: str, voice: Voice, wav_path: Path) -> str:
    """Speak ``text`` into ``wav_path`` (22050 Hz mono 16-bit WAV); returns espeak-ng's IPA.

    The text goes through stdin so that no text is mistaken for an option.
    """
    cmd = [binary, *voice.espeak_args(espeak_voice), "--ipa", f"--sep={PHONEME_SEPARATOR}"]
    cmd += ["-w", str(wav_path), "--stdin"]
    return _run(cmd, text).stdout


def phonemize(binary: str, text: str, espeak_voice: str, voice: Voice) -> str:
    """espeak-ng's IPA for ``text`` without synthesising audio (the same as ``synthesize``)."""
    cmd = [binary, *voice.espeak_args(espeak_voice), "-q", "--ipa", f"--sep={PHONEME_SEPARATOR}"]
    return _run([*cmd, "--stdin"], text).stdout


def tokenize_ipa(raw: str) -> list[str]:
    """Phonemes from espeak-ng's ``--ipa --sep=_`` output (see the module docstring)."""
    raw = _LANGUAGE_SWITCH.sub(PHONEME_SEPARATOR, raw).translate(_STRESS)
    return [token for token in re.split(rf"[\s{PHONEME_SEPARATOR}]+", raw) if token]


def _run(cmd: list[str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    try:
        result = subprocess.run(
            cmd,
            input=stdin,
            capture_output=True,
            text=True,
            encoding="utf-8",
            timeout=ESPEAK_TIMEOUT_S,
            check=False,
        )
    except FileNotFoundError as err:
        raise EspeakNotFoundError(
            f"cannot run {cmd[0]}: {err}; install espeak-ng with `apt-get install espeak-ng`"
        ) from err
    except subprocess.TimeoutExpired as err:
        raise EspeakError(f"`{' '.join(cmd)}` ran longer than {ESPEAK_TIMEOUT_S} s") from err
    if result.returncode != 0:
        raise EspeakError(
            f"`{' '.join(cmd)}` exited with {result.returncode}: {result.stderr.strip()!r}"
        )
    return result
