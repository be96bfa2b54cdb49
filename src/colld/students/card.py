"""The model card (README.md, Hugging Face model-card format) of an exported student.

``export_student`` writes it from the provenance (``colld.json``'s content) and the student
itself; ``colld evaluate`` later rewrites only the two marked sections, efficiency and scores,
from its result (``update_card``). Layout::

    ---                              YAML front matter: library_name, license, tags,
    ...                              base_model (a hub id only), pipeline_tag
    ---
    # title
    ## Model                         family, class, layers x width, parameters, compression
    ## How it was made               objective settings, layer map, data and hours, steps,
                                     batch seconds, seed, the command that produced it
    <!-- colld:efficiency -->        replaced by ``update_card``
    ## Efficiency
    <!-- /colld:efficiency -->
    <!-- colld:scores -->            replaced by ``update_card``
    ## Scores
    <!-- /colld:scores -->
    ## How to load
    ## Limitations

Everything here reads plain dicts (provenance, an evaluation result of schema colld-eval/2):
students import nothing from eval; ``colld.eval.evaluate`` computes the aggregate score and
passes it in as a ``CardScore``.
"""

from __future__ import annotations

import logging
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from colld.encoders.base import SpeechEncoder
from colld.fsutil import write_text_atomic
from colld.students.build import count_encoder_parameters
from colld.teachers.embedded import EMBEDDED

log = logging.getLogger(__name__)

CARD_FILE = "README.md"
SECTIONS = ("efficiency", "scores")
NOT_MEASURED = "Not measured yet: run `colld evaluate DIR` on this directory."
DEMO_MAX_STEPS = 20_000
"""Below this many updates the card calls the model a distillation demo (CoLLD's students are
trained for hundreds of thousands of updates on thousands of hours)."""
EMBEDDED_HUB_IDS = {
    "whisper-base": "openai/whisper-base",
    "whisper-tiny.en": "openai/whisper-tiny.en",
}
"""The hub models the embedded teachers are conversions of (``base_model`` must be a hub id)."""
LOSS_NAMES = {
    "contrastive": "contrastive loss (CoLLD's InfoNCE)",
    "l1cos": "L1 - log sigmoid(cosine) loss (DistilHuBERT)",
    "mse": "mean squared error",
}
INIT_NAMES = {
    "prune": "structured pruning of the teacher by activation importance",
    "teacher": "weight selection from the teacher (first units of every axis)",
    "random": "random (the model class's own initialisation)",
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True, kw_only=True)
class StudentFacts:
    """What the card says about the exported network itself."""

    family: str
    model_class: str
    num_layers: int
    hidden_dim: int
    parameters: int
    frame_rate: float


def student_facts(student: SpeechEncoder) -> StudentFacts:
    return StudentFacts(
        family=student.family,
        model_class=type(student.model).__name__,
        num_layers=student.num_layers,
        hidden_dim=student.hidden_dim,
        parameters=count_encoder_parameters(student),
        frame_rate=float(student.frame_rate),
    )


@dataclass(kw_only=True)
class CardScore:
    """The aggregate score of one student (see ``colld.eval.score``), as the card shows it.

    value: 0 = fbank features, 1000 = ``teacher`` (None when every task was left out).
    per_task: task -> normalised score; flagged: task -> why it was left out.
    """

    value: float | None
    teacher: str
    per_task: dict[str, float] = field(default_factory=dict)
    flagged: dict[str, str] = field(default_factory=dict)


# ----------------------------------------------------------------------------- teacher facts


def teacher_licence(spec: str | None) -> tuple[str | None, str]:
    """(licence id for the front matter or None, where it comes from / why it is unknown)."""
    if spec is None:
        return None, "the teacher is not recorded (no colld.json provenance)"
    if spec in EMBEDDED:
        return EMBEDDED[spec].licence.lower(), f"the embedded teacher {spec}'s licence"
    readme = _teacher_readme(spec)
    if readme is not None:
        licence = (_front_matter(readme.read_text(encoding="utf-8")) or {}).get("license")
        if licence and licence != "unknown":
            return str(licence), f"the licence in {readme}"
        return None, f"{readme} names no licence"
    return None, f"no model card of '{spec}' was found here to read it from"


def _teacher_readme(spec: str) -> Path | None:
    """The teacher's own README.md: in its directory, or in the local hub cache (offline)."""
    path = Path(spec)
    if path.is_dir():
        return path / CARD_FILE if (path / CARD_FILE).is_file() else None
    if not _HUB_ID.match(spec):
        return None
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(spec, CARD_FILE)
    return Path(cached) if isinstance(cached, str) else None


def base_model(spec: str | None) -> str | None:
    """The hub id the student derives from: the teacher's id, or the embedded teacher's
    upstream; None for local directories (a path means nothing on the hub)."""
    if spec is None:
        return None
    if spec in EMBEDDED_HUB_IDS:
        return EMBEDDED_HUB_IDS[spec]
    return spec if _HUB_ID.match(spec) and not Path(spec).exists() else None


# ----------------------------------------------------------------------------- rendering


def render_card(
    facts: StudentFacts,
    provenance: dict[str, Any] | None,
    *,
    name: str = "student",
    result: dict[str, Any] | None = None,
    score: CardScore | None = None,
) -> str:
    """The whole README.md. ``name``: the directory's name (used in the loading example)."""
    prov = provenance or {}
    teacher = (prov.get("teacher") or {}).get("spec")
    licence, licence_source = teacher_licence(teacher)
    meta: dict[str, Any] = {
        "library_name": "transformers",
        "license": licence or "unknown",
        "tags": ["colld", "knowledge-distillation", "speech", "audio", facts.family],
    }
    if base_model(teacher):
        meta["base_model"] = base_model(teacher)
    meta["pipeline_tag"] = "feature-extraction"
    front = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True)
    title = f"colld student of {teacher}" if teacher else "colld student"
    parts = [
        f"---\n{front}---\n\n# {title}\n",
        _model_section(facts, prov, licence, licence_source),
        _made_section(prov),
        _marked("efficiency", efficiency_section(result)),
        _marked("scores", scores_section(result, score)),
        _load_section(facts, name),
        _limitations_section(prov),
    ]
    return "\n".join(parts)


def _model_section(
    facts: StudentFacts, prov: dict[str, Any], licence: str | None, licence_source: str
) -> str:
    teacher = prov.get("teacher") or {}
    lines = [
        "## Model",
        "",
        f"A {facts.family} speech encoder (transformers `{facts.model_class}`): "
        f"{facts.num_layers} layers x {facts.hidden_dim} wide, {_count(facts.parameters)} "
        f"parameters, {facts.frame_rate:g} frames per second of audio.",
    ]
    if teacher.get("spec"):
        size = f"{prov.get('num_teacher_layers', '?')} layers x {prov.get('teacher_dim', '?')}"
        t_params = teacher.get("parameters")
        if t_params:
            size += f", {_count(t_params)} parameters"
        lines += [
            "",
            f"Distilled from the teacher `{teacher['spec']}` ({size}; weights fingerprint "
            f"`{str(teacher.get('fingerprint', '?'))[:16]}`) by colld "
            f"{prov.get('colld_version', '?')}."
            + (f" It has {t_params / facts.parameters:.2f}x fewer parameters." if t_params else ""),
        ]
    else:
        lines += ["", "No provenance (colld.json) was recorded: the teacher is unknown."]
    if licence:
        lines += ["", f"Licence: `{licence}`, {licence_source} (the student is derived from it)."]
    else:
        lines += ["", f"Licence: unknown ({licence_source}); check the teacher's before sharing."]
    return "\n".join(lines) + "\n"


def _made_section(prov: dict[str, Any]) -> str:
    if not prov:
        return "## How it was made\n\nNot recorded (the export carried no provenance).\n"
    obj, config = prov.get("objective") or {}, prov.get("config") or {}
    data, train = config.get("data") or {}, config.get("train") or {}
    lines = ["## How it was made", ""]
    loss = f"{LOSS_NAMES.get(obj.get('loss'), obj.get('loss'))}, {obj.get('mode')}"
    if obj.get("loss") == "contrastive":
        loss += f", tau {obj.get('tau')}, K = {obj.get('num_negatives')} negatives per frame"
        loss += " (plus batch negatives)" if obj.get("batch_negatives") else ""
    lines.append(f"- Objective: {loss}; loss on {obj.get('loss_frames')} frames.")
    if obj.get("mask"):
        lines.append(
            f"- Masking: spans of {obj.get('mask_span')} frames, mask_prob "
            f"{obj.get('mask_prob')}, at least {obj.get('mask_min_spans')} spans."
        )
    else:
        lines.append("- Masking: off.")
    lines.append(
        f"- Targets: teacher {obj.get('target')} states, normalised by {obj.get('target_norm')}."
    )
    init = prov.get("student_init") or {}
    if init:
        what = INIT_NAMES.get(init.get("init"), init.get("init"))
        layers = init.get("from_layers")
        lines.append(
            f"- Initialisation: {what}" + (f", from teacher layers {layers}." if layers else ".")
        )
    pairs = ", ".join(f"s{i}->t{j}" for i, j in prov.get("pairs") or [])
    lines.append(f"- Layer map (student layer -> teacher layer): {pairs or 'not recorded'}.")
    lines.append(f"- Data: {_data_line(prov.get('data') or {}, data)}")
    hours = prov.get("audio_hours_seen")
    seen = f", {hours:.2f} h of audio seen" if hours is not None else ""
    lines.append(
        f"- Training: {prov.get('steps', '?')} updates{seen}; batches of "
        f"{data.get('batch_seconds', '?')} s of audio x {train.get('grad_accum', 1)} accumulated; "
        f"lr {train.get('lr', '?')}, seed {train.get('seed', '?')}."
    )
    command = _command(prov.get("argv"))
    lines += [
        "",
        "Produced by (the command line of the process that trained it):"
        if command
        else "The command was not recorded.",
    ]
    if command:
        lines += ["", "```sh", command, "```"]
    lines += ["", "The full run config is in `colld.json` beside this file."]
    return "\n".join(lines) + "\n"


def _data_line(data: dict[str, Any], data_config: dict[str, Any]) -> str:
    if data.get("source") == "embedded":
        return (
            f"the embedded synthetic corpus `{data.get('corpus_dir')}` (espeak-ng "
            f"{data.get('espeak_ng_version', '?')}, {len(data.get('languages') or [])} languages), "
            f"train split {data.get('train_hours', 0):.2f} h in {data.get('train_utterances')} "
            "utterances."
        )
    if data:
        return (
            f"`{data.get('train')}`, {data.get('train_hours', 0):.2f} h in "
            f"{data.get('train_utterances')} utterances."
        )
    return f"`{data_config.get('train') or data_config.get('corpus_dir', '?')}`."


def _command(argv: list[str] | None) -> str | None:
    if not argv:
        return None
    program = Path(argv[0])
    if program.name == "colld" or (
        program.name == "__main__.py" and program.parent.name == "colld"
    ):
        return shlex.join(["colld", *argv[1:]])
    return shlex.join(argv)


def efficiency_section(result: dict[str, Any] | None) -> str:
    eff = (result or {}).get("efficiency")
    if not eff:
        return f"## Efficiency\n\n{NOT_MEASURED}\n"
    rows = [("parameters", f"{eff['parameters']:,} ({_count(eff['parameters'])})")]
    rows.append(("FLOPs per audio second", _si(eff["flops_per_audio_second"])))
    rtf1 = eff["rtf_batch1"]
    rows.append(
        ("real-time factor, batch 1", f"{rtf1:.4f} ({1 / rtf1:.0f}x faster than real time)")
    )
    batch = f", batch {eff['batch_size']}" if "batch_size" in eff else ", batched"
    rows.append((f"real-time factor{batch}", f"{eff['rtf_batched']:.4f}"))
    clip = f" per {eff['clip_seconds']:g} s clip" if "clip_seconds" in eff else ""
    rows.append(("latency, batch 1", f"{eff['latency_batch1_s']:.3f} s{clip}"))
    if eff.get("peak_memory_mb") is not None:
        rows.append(("peak memory (RSS)", f"{eff['peak_memory_mb']:.0f} MB"))
    machine = (result or {}).get("machine") or {}
    where = eff.get("device") or f"cpu ({machine.get('processor', '?')})"
    threads = eff.get("threads", machine.get("threads"))
    where += f", threads: {threads}" if threads is not None else ""
    lines = ["## Efficiency", "", "| measure | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in rows]
    lines += [
        "",
        f"Measured by `colld evaluate` ({(result or {}).get('created', '?')}) on {where}, "
        f"torch {eff.get('torch_version', machine.get('torch', '?'))}.",
    ]
    return "\n".join(lines) + "\n"


def scores_section(result: dict[str, Any] | None, score: CardScore | None = None) -> str:
    probes = (result or {}).get("probes")
    if not probes:
        return f"## Scores\n\n{NOT_MEASURED}\n"
    lines = ["## Scores", "", "| task | metric | mean ± std over probe seeds |", "|---|---|---|"]
    for task, summary in probes.items():
        if summary.get("skipped") or summary.get("mean") is None:
            lines.append(
                f"| {task} | {summary.get('metric', '?')} | skipped: {summary.get('skipped')} |"
            )
            continue
        cell = f"{summary['mean']:.3f} ± {summary.get('std') or 0.0:.3f}"
        lines.append(f"| {task} | {summary['metric']} | {cell} |")
    settings, corpus = result.get("settings") or {}, result.get("corpus") or {}
    lines += [
        "",
        f"Probes on frozen features (weighted sum of hidden states), corpus "
        f"`{corpus.get('dir', '?')}`, probe seeds {settings.get('seeds', '?')}, "
        f"evaluated {result.get('created', '?')}.",
    ]
    per_language = _per_language_table(probes)
    if per_language:
        lines += ["", "Per language (mean over probe seeds):", "", per_language]
    lines += ["", _score_line(score)]
    return "\n".join(lines) + "\n"


def _per_language_table(probes: dict[str, Any]) -> str | None:
    columns = {t: s.get("per_language") or {} for t, s in probes.items() if not s.get("skipped")}
    columns = {t: per for t, per in columns.items() if per}
    languages = sorted({lang for per in columns.values() for lang in per})
    if not languages:
        return None
    lines = ["| language | " + " | ".join(columns) + " |", "|" + "---|" * (len(columns) + 1)]
    for lang in languages:
        cells = [f"{per[lang]:.3f}" if lang in per else "—" for per in columns.values()]
        lines.append(f"| {lang} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _score_line(score: CardScore | None) -> str:
    if score is None:
        return (
            "Aggregate score: not computed (it needs the teacher's and the fbank baseline's "
            "results in the same `colld evaluate --out` folder)."
        )
    if score.value is None:
        head = f"Aggregate score: none, every task was left out (teacher `{score.teacher}`)."
    else:
        tasks = ", ".join(f"{t} {v:.0f}" for t, v in score.per_task.items())
        head = (
            f"Aggregate score: **{score.value:.0f}** (0 = fbank features, 1000 = the teacher "
            f"`{score.teacher}`; per task: {tasks})."
        )
    flagged = [f"- `{task}` left out: {why}" for task, why in sorted(score.flagged.items())]
    return "\n".join([head, *([""] + flagged if flagged else [])])


def _load_section(facts: StudentFacts, name: str) -> str:
    if facts.family == "whisper":
        code = [
            "from transformers import WhisperFeatureExtractor",
            "from transformers.models.whisper.modeling_whisper import WhisperEncoder",
            "",
            f'encoder = WhisperEncoder.from_pretrained("{name}")  # an encoder only, no decoder',
            f'extractor = WhisperFeatureExtractor.from_pretrained("{name}")',
            'inputs = extractor(audio, sampling_rate=16000, return_tensors="pt")  # pads to 30 s',
            "states = encoder(inputs.input_features, output_hidden_states=True).hidden_states",
        ]
        note = (
            "`AutoModel` would build a whole `WhisperModel`: use `WhisperEncoder`. HF's encoder "
            "wants 30 s of mel frames; colld's `load_student` runs any length up to 30 s."
        )
    else:
        code = [
            "from transformers import AutoFeatureExtractor, AutoModel",
            "",
            f'model = AutoModel.from_pretrained("{name}")  # {facts.model_class}',
            f'extractor = AutoFeatureExtractor.from_pretrained("{name}")',
            'inputs = extractor(audio, sampling_rate=16000, return_tensors="pt")',
            "states = model(**inputs, output_hidden_states=True).hidden_states",
        ]
        note = "With colld: `colld.students.export.load_student(DIR)`."
    return "\n".join(["## How to load", "", "```python", *code, "```", "", note]) + "\n"


def _limitations_section(prov: dict[str, Any]) -> str:
    lines = ["## Limitations", ""]
    data = prov.get("data") or {}
    if data.get("source") == "embedded":
        lines.append(
            f"- Trained on {data.get('train_hours', 0):.2f} hours of synthetic espeak-ng speech "
            f"({len(data.get('languages') or [])} languages, robotic voices): it has not heard "
            "natural speech, noise or real microphones, and its features may not transfer to them."
        )
    elif data:
        lines.append(
            f"- Trained on {data.get('train_hours', 0):.2f} hours of `{data.get('train')}` only: "
            "its languages, speakers and recording conditions bound what it represents."
        )
    steps = prov.get("steps")
    if steps == 0:
        lines.append("- Untrained: this is the student's initialisation, a baseline, not a model.")
    elif steps is not None and steps < DEMO_MAX_STEPS:
        lines.append(
            f"- This is a distillation demo, not a production model: {steps} updates (CoLLD's "
            "students train for hundreds of thousands on thousands of hours)."
        )
    lines.append(
        "- An encoder only: it gives hidden states for probes and fine-tuning; it does not "
        "transcribe or translate by itself."
    )
    return "\n".join(lines) + "\n"


def _count(n: float) -> str:
    return f"{n / 1e6:.2f} M"


def _si(value: float) -> str:
    """3 significant digits with a k / M / G / T prefix: 2.05e9 -> "2.05 G"."""
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:#.3g}".rstrip(".") + f" {prefix}"
    return f"{value:#.3g}".rstrip(".")


# ----------------------------------------------------------------------------- sections


def _marked(name: str, body: str) -> str:
    return f"<!-- colld:{name} -->\n{body}<!-- /colld:{name} -->\n"


def replace_sections(text: str, bodies: dict[str, str]) -> str | None:
    """``text`` with each named marked section's body replaced; None when a marker is missing."""
    for name, body in bodies.items():
        pattern = re.compile(rf"<!-- colld:{name} -->\n.*?<!-- /colld:{name} -->\n", re.DOTALL)
        match = pattern.search(text)
        if match is None:
            return None
        text = text[: match.start()] + _marked(name, body) + text[match.end() :]
    return text


def update_card(
    model_dir: str | Path, result: dict[str, Any], score: CardScore | None = None
) -> bool:
    """Rewrite the efficiency and scores sections of ``model_dir/README.md`` from an evaluation
    ``result``, atomically, leaving the rest as it is. Returns whether the file changed. A
    missing card, a card without colld's section markers or a directory that cannot be
    written is logged as a warning, never raised: the evaluation itself stands."""
    path = Path(model_dir) / CARD_FILE
    if not path.is_file():
        log.warning(
            "%s has no %s: its evaluation is not added to a model card", model_dir, CARD_FILE
        )
        return False
    text = path.read_text(encoding="utf-8")
    bodies = {"efficiency": efficiency_section(result), "scores": scores_section(result, score)}
    new = replace_sections(text, bodies)
    if new is None:
        log.warning(
            "%s lacks colld's section markers (<!-- colld:efficiency --> ...): left as it is",
            path,
        )
        return False
    if new == text:
        return False
    try:
        write_text_atomic(path, new)
    except OSError as err:
        log.warning("could not update %s (%s): the model card keeps its old numbers", path, err)
        return False
    log.info("updated the model card %s", path)
    return True


def _front_matter(text: str) -> dict[str, Any] | None:
    """The YAML front matter of a model card (None when it has none or it does not parse)."""
    match = re.match(r"---\n(.*?)\n---\n", text, re.DOTALL)
    if not match:
        return None
    try:
        data = yaml.safe_load(match.group(1))
    except yaml.YAMLError:
        return None
    return data if isinstance(data, dict) else None
