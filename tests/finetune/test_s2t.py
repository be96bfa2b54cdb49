"""``colld finetune --task s2t``: the frozen Whisper decoder (masked cross-attention, batched
greedy decoding), the adapter's init and checks, the labels, the 30 s window padding, and the
CLI end to end with the export round trip, on a tiny random Whisper that carries Whisper's
real tokenizer."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import WhisperFeatureExtractor, WhisperForConditionalGeneration

from colld.audio import FrontEnd
from colld.cli import main
from colld.config import ConfigError
from colld.data.manifest import Utterance
from colld.finetune.config import load_finetune_config
from colld.finetune.decoder import DecoderSpecError, load_text_decoder
from colld.finetune.s2t import (
    ADAPTER_FILE,
    S2T_FILE,
    SCORES_FILE,
    load_s2t_model,
    transcription_scores,
    translation_scores,
)
from colld.finetune.s2t_model import (
    IncompatibleAdapterError,
    S2TModel,
    check_compatible,
    fit_adapter,
    label_s2t_split,
    pad_log_mel_to_window,
    set_identity,
    teacher_forced_loss,
)
from colld.teachers import load_teacher
from colld.testing import (
    harmonic_tone,
    tiny_teacher_dir,
    tiny_whisper_s2t_dir,
    whisper_tokenizer_file,
)

pytestmark = pytest.mark.skipif(
    whisper_tokenizer_file() is None, reason="Whisper's tokenizer needs colld[embedded]"
)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_whisper_s2t_dir(tmp_path_factory.mktemp("s2t") / "tiny-whisper")


# ---------------------------------------------------------------- decoder
def test_teacher_forced_logits_equal_hf_whisper(tiny_dir: Path) -> None:
    decoder = load_text_decoder(str(tiny_dir))
    hf = WhisperForConditionalGeneration.from_pretrained(tiny_dir).eval()
    states = torch.randn(2, 9, decoder.width)
    ids = torch.tensor(
        [decoder.prompt("de", "transcribe") + decoder.encode_text("Guten Tag")[:3]] * 2
    )
    with torch.no_grad():
        ours = decoder(states, torch.tensor([9, 9]), ids)
        theirs = hf(encoder_outputs=(states,), decoder_input_ids=ids).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_padded_frames_are_invisible_and_batch_decodes_as_alone(tiny_dir: Path) -> None:
    decoder = load_text_decoder(str(tiny_dir))
    torch.manual_seed(0)
    states = torch.randn(2, 12, decoder.width)
    prompts = [decoder.prompt("en", "transcribe"), decoder.prompt("fr", "translate")]
    alone = [
        decoder.greedy(states[i : i + 1, :n], torch.tensor([n]), [prompts[i]], max_new_tokens=6)[0]
        for i, n in enumerate((7, 12))
    ]
    garbage = states.clone()
    garbage[0, 7:] = 100.0  # padding of the shorter clip: must not matter
    batched = decoder.greedy(garbage, torch.tensor([7, 12]), prompts, max_new_tokens=6)
    assert batched == alone
    assert all(len(row) <= 6 for row in batched)
    ids = torch.tensor([prompts[0] + [220, 221]])
    full = decoder(states[:1, :7], torch.tensor([7]), ids)
    masked = decoder(garbage[:1], torch.tensor([7]), ids)
    torch.testing.assert_close(full, masked)
    limited = decoder.greedy(states, torch.tensor([12, 12]), prompts, max_new_tokens=[2, 5])
    assert len(limited[0]) <= 2 and len(limited[1]) <= 5


def test_decoder_never_emits_control_tokens(tiny_dir: Path) -> None:
    decoder = load_text_decoder(str(tiny_dir))
    with torch.no_grad():  # push every logit towards a timestamp token; it stays banned
        decoder.proj_out.weight[decoder.special.end + 500] *= 0
        decoder.proj_out.weight[decoder.special.end + 500] += 50
    rows = decoder.greedy(
        torch.ones(1, 5, decoder.width), torch.tensor([5]), [decoder.prompt("en", "transcribe")],
        max_new_tokens=5,
    )  # fmt: skip
    assert all(token < decoder.special.end for token in rows[0])


def test_prompts_and_language_errors(tiny_dir: Path) -> None:
    decoder = load_text_decoder(str(tiny_dir))
    sp = decoder.special
    assert decoder.prompt("de", "translate") == [
        sp.start, sp.languages["de"], sp.tasks["translate"], sp.no_timestamps,
    ]  # fmt: skip
    with pytest.raises(DecoderSpecError, match="'xx' has no token"):
        decoder.prompt("xx", "transcribe")
    assert decoder.decode_text(decoder.encode_text("Hallo Welt.")) == "Hallo Welt."


def test_decoder_spec_that_is_no_whisper_is_named(tmp_path: Path) -> None:
    with pytest.raises(DecoderSpecError, match="expected an embedded Whisper name"):
        load_text_decoder(str(tmp_path / "nothing-here"))


# ---------------------------------------------------------------- adapter and labels
def test_lstsq_init_recovers_a_linear_map() -> None:
    torch.manual_seed(0)
    x = torch.randn(500, 6)
    w, b = torch.randn(6, 4), torch.randn(4)
    adapter = torch.nn.Linear(6, 4)
    r2 = fit_adapter(adapter, x, x @ w + b, ridge=0.0)
    assert r2 > 0.9999
    torch.testing.assert_close(adapter(x), x @ w + b, atol=1e-4, rtol=1e-4)


def test_incompatible_widths_and_frame_rates_are_named(tmp_path: Path) -> None:
    with pytest.raises(IncompatibleAdapterError, match=r"width \(8\).*\(16\)"):
        set_identity(torch.nn.Linear(8, 16))
    whisper = load_teacher(str(tiny_teacher_dir("whisper", tmp_path / "w", num_layers=2)))
    wav2vec2 = load_teacher(str(tiny_teacher_dir("wav2vec2", tmp_path / "v", num_layers=2)))
    with pytest.raises(IncompatibleAdapterError, match="1600 frames/s.*50 frames/s"):
        check_compatible(wav2vec2.encoder, whisper.encoder, "tiny wav2vec2 -> whisper")
    check_compatible(whisper.encoder, whisper.encoder, "same")


def test_labels_count_what_they_leave_out(tiny_dir: Path) -> None:
    decoder = load_text_decoder(str(tiny_dir))
    utts = [
        Utterance(id="a", path="a.wav", duration=1.0, language="de", text="Hallo", text_en="Hello"),
        Utterance(id="b", path="b.wav", duration=1.0, language="en", text="Hi", text_en="Hi"),
        Utterance(id="c", path="c.wav", duration=1.0, language="xx", text="Blah"),
        Utterance(id="d", path="d.wav", duration=1.0, language="de"),
        Utterance(id="e", path="e.wav", duration=9.0, language="de", text="Lang"),
        Utterance(id="f", path="f.wav", duration=1.0, text="no language"),
    ]
    split = label_s2t_split("t", utts, decoder, ["transcribe", "translate"], max_duration=5.0)
    assert [u.id for u in split.utterances] == ["a", "b"]
    assert [s.task for s in split.sequences["a"]] == ["transcribe", "translate"]
    assert [s.task for s in split.sequences["b"]] == ["transcribe"]  # en is not translated
    assert split.sequences["a"][1].reference == "Hello"
    assert split.summary()["skipped"] == {
        "language 'xx' unknown to the decoder": 1,
        "no text": 1,
        "longer than 5 s": 1,
        "no language": 1,
    }
    only = label_s2t_split("t", utts[:1], decoder, ["translate"], max_duration=5.0)
    assert [s.task for s in only.sequences["a"]] == ["translate"]


def test_loss_reads_targets_not_prompts(tiny_dir: Path) -> None:
    decoder = load_text_decoder(str(tiny_dir))
    utts = [
        Utterance(id="a", path="a.wav", duration=1.0, language="de", text="Hallo", text_en="Hi")
    ]
    split = label_s2t_split("t", utts, decoder, ["transcribe", "translate"], max_duration=5.0)
    seqs = split.sequences["a"]
    from colld.finetune.s2t_model import AdaptedStates

    states = AdaptedStates(torch.randn(1, 6, decoder.width, requires_grad=True), torch.tensor([6]))
    loss = teacher_forced_loss(decoder, states, [0, 0], seqs)
    loss.backward()
    assert torch.isfinite(loss) and states.states.grad is not None
    # only the targets count: the loss equals the mean CE over text + <|endoftext|> tokens
    total, count = 0.0, 0
    for seq in seqs:
        ids = torch.tensor([seq.tokens[:-1]])
        logits = decoder(states.states.detach(), torch.tensor([6]), ids)[0]
        target = torch.tensor(seq.tokens[1:])
        ce = torch.nn.functional.cross_entropy(logits, target, reduction="none")
        total += float(ce[seq.prompt_length - 1 :].sum())
        count += len(seq.tokens) - seq.prompt_length
    assert float(loss.detach()) == pytest.approx(total / count, rel=1e-5)


def test_window_padding_matches_whisper_30s_features() -> None:
    rng = np.random.default_rng(0)
    clip = harmonic_tone(1.3, rng)
    extractor = WhisperFeatureExtractor(feature_size=80)
    ours = torch.as_tensor(FrontEnd(extractor)(clip))[None]  # (1, F, 80)
    padded, lengths = pad_log_mel_to_window(ours, torch.tensor([ours.shape[1]]))
    reference = extractor(clip, sampling_rate=16000, return_tensors="pt").input_features
    reference = reference.transpose(1, 2)  # (1, 3000, 80)
    assert padded.shape == reference.shape and int(lengths[0]) == 3000
    # the clip's frames and the silence after it (one boundary frame sees both)
    boundary = ours.shape[1]
    torch.testing.assert_close(padded[:, :boundary], reference[:, :boundary], atol=1e-4, rtol=0)
    torch.testing.assert_close(
        padded[:, boundary + 2 :], reference[:, boundary + 2 :], atol=1e-4, rtol=0
    )


def test_window_padding_refuses_other_families(tmp_path: Path) -> None:
    loaded = load_teacher(str(tiny_teacher_dir("wav2vec2", tmp_path / "v", num_layers=2)))
    with pytest.raises(IncompatibleAdapterError, match="needs a Whisper encoder"):
        S2TModel(loaded.encoder, 32, pad_to_window=True)


def test_scores_pool_words_and_use_cer_without_spaces() -> None:
    tr = transcription_scores(
        {"de": [("Guten Tag", "guten tag!"), ("Hallo", "hallo welt")], "zh": [("你好", "你")]}
    )
    assert tr["per_language"]["de"]["wer"] == pytest.approx(1 / 3)
    assert tr["per_language"]["zh"]["wer"] == tr["per_language"]["zh"]["cer"] == 0.5
    assert tr["wer"] == pytest.approx(1 / 3)  # zh is not pooled
    tl = translation_scores({"de": [("The train leaves.", "The train leaves.")], "fr": []})
    assert tl["per_language"]["de"]["bleu"] == pytest.approx(100.0)
    assert "fr" not in tl["per_language"]


def test_task_mismatch_between_yaml_and_cli_is_named(tmp_path: Path) -> None:
    yaml = tmp_path / "c.yaml"
    yaml.write_text("task: ctc\n")
    with pytest.raises(ConfigError, match="task='ctc' but --task is 's2t'"):
        load_finetune_config(yaml, task="s2t")
    with pytest.raises(ConfigError, match="s2t.tasks"):
        load_finetune_config(None, ["s2t.tasks=[summarise]"], task="s2t")


# ---------------------------------------------------------------- end to end
def _parallel_manifests(root: Path, writer: Callable[..., Path]) -> dict[str, Path]:
    """Train / dev / test manifests of German tones with German text and English text_en."""
    out = {}
    for seed, name in enumerate(("train", "dev", "test")):
        path = writer(root, name, ["ab ba", "cab dab", "bad ca", "dab ab"][: 4 if name == "train" else 2],
                      seed=seed, language="de")  # fmt: skip
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        with path.open("w", encoding="utf-8") as f:
            for row in rows:
                row["text_en"] = row["text"].upper()
                f.write(json.dumps(row) + "\n")
        out[name] = path
    return out


S2T_TINY = (
    "train.max_steps=3",
    "train.warmup_steps=1",
    "train.eval_every=2",
    "train.ckpt_every=2",
    "train.device=cpu",
    "data.batch_seconds=1.2",
    "data.max_duration=0.6",
    "data.num_workers=0",
    "s2t.max_new_tokens=5",
    "s2t.lstsq_utterances=3",
)


@pytest.mark.parametrize("student_family", ["whisper", "tiny-s2t"])
def test_cli_trains_scores_exports_and_reloads(
    tmp_path: Path,
    tiny_dir: Path,
    manifest_writer: Callable[..., Path],
    student_family: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    data = _parallel_manifests(tmp_path / "data", manifest_writer)
    model = (
        tiny_dir
        if student_family == "tiny-s2t"
        else tiny_teacher_dir("whisper", tmp_path / "student", num_layers=2, hidden=16, heads=2)
    )
    out = tmp_path / "run"
    argv = [
        "finetune", str(model), "--task", "s2t", "--data", str(data["train"]), "--out", str(out),
        f"data.dev={data['dev']}", f"data.test={data['test']}", f"s2t.decoder={tiny_dir}",
        *S2T_TINY,
    ]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "pooled WER" in printed and "X->en" in printed
    model_dir = out / "model"
    report = json.loads((model_dir / SCORES_FILE).read_text())
    init = "identity" if student_family == "tiny-s2t" else "lstsq"
    assert report["adapter"]["init"] == init and report["steps"] == 3
    assert report["test"]["transcribe"]["per_language"]["de"]["utterances"] == 2
    assert report["test"]["translate"]["all"]["utterances"] == 2
    assert (model_dir / ADAPTER_FILE).is_file() and (model_dir / S2T_FILE).is_file()

    loaded = load_s2t_model(model_dir)
    assert loaded.model.adapter.in_features == (32 if student_family == "tiny-s2t" else 16)
    # the reloaded adapter is the trained one (not its init)
    from safetensors.torch import load_file

    saved = load_file(str(model_dir / ADAPTER_FILE))
    torch.testing.assert_close(loaded.model.adapter.weight, saved["weight"])


def test_cli_without_training_scores_the_initialised_adapter(
    tmp_path: Path, tiny_dir: Path, manifest_writer: Callable[..., Path]
) -> None:
    data = _parallel_manifests(tmp_path / "data", manifest_writer)
    out = tmp_path / "run"
    argv = [
        "finetune", str(tiny_dir), "--task", "s2t", "--data", str(data["train"]), "--out", str(out),
        f"data.dev={data['dev']}", f"data.test={data['test']}", f"s2t.decoder={tiny_dir}",
        "s2t.pad_to_window=true", "s2t.train_adapter=false", *S2T_TINY,
    ]  # fmt: skip
    assert main(argv) == 0
    report = json.loads((out / "model" / SCORES_FILE).read_text())
    assert report["trained"] == "nothing" and report["steps"] == 0
    assert report["adapter"]["init"] == "identity" and report["pad_to_window"] is True
    assert not (out / "checkpoints").exists()


def test_cli_refuses_an_encoder_of_another_frame_rate(
    tmp_path: Path,
    tiny_dir: Path,
    manifest_writer: Callable[..., Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    data = _parallel_manifests(tmp_path / "data", manifest_writer)
    wav2vec2 = tiny_teacher_dir("wav2vec2", tmp_path / "w2v", num_layers=2)
    argv = [
        "finetune", str(wav2vec2), "--task", "s2t", "--data", str(data["train"]),
        "--out", str(tmp_path / "run"), f"s2t.decoder={tiny_dir}", *S2T_TINY,
    ]  # fmt: skip
    assert main(argv) == 2
    assert (
        "gives 1600 frames/s but the decoder was trained on 50 frames/s" in capsys.readouterr().err
    )


def test_reloading_an_adapter_of_the_wrong_width_is_named(
    tmp_path: Path, tiny_dir: Path, manifest_writer: Callable[..., Path]
) -> None:
    data = _parallel_manifests(tmp_path / "data", manifest_writer)
    out = tmp_path / "run"
    argv = [
        "finetune", str(tiny_dir), "--task", "s2t", "--data", str(data["train"]), "--out", str(out),
        f"s2t.decoder={tiny_dir}", "s2t.train_adapter=false", *S2T_TINY,
    ]  # fmt: skip
    assert main(argv) == 0
    info_file = out / "model" / S2T_FILE
    info = json.loads(info_file.read_text())
    other = tiny_teacher_dir("whisper", tmp_path / "narrow", num_layers=2, hidden=16, heads=2)
    info["encoder"] = str(other)
    info_file.write_text(json.dumps(info))
    with pytest.raises(IncompatibleAdapterError, match="adapter maps width 32 -> 32.*width 16"):
        load_s2t_model(out / "model")


@pytest.mark.slow
def test_greedy_equals_generate_on_whisper_base() -> None:
    """On full 30 s windows (what ``generate`` assumes) colld's decoding of the real Whisper
    base gives ``generate``'s tokens, for every clip of a mixed-language batch."""
    from transformers.modeling_outputs import BaseModelOutput

    from colld.teachers.ctranslate2 import ct2_to_hf_whisper
    from colld.teachers.embedded import embedded_model_dir

    directory = embedded_model_dir("whisper-base")
    hf = ct2_to_hf_whisper(directory, encoder_only=False)
    decoder = load_text_decoder("whisper-base")
    rng = np.random.default_rng(0)
    clips = [harmonic_tone(seconds, rng) for seconds in (1.0, 2.5, 1.7)]
    extractor = WhisperFeatureExtractor(feature_size=80)
    features = extractor(clips, sampling_rate=16000, return_tensors="pt").input_features
    languages = ["en", "de", "fr"]
    with torch.inference_mode():
        states = hf.model.encoder(features).last_hidden_state  # (3, 1500, 512)
        ours = decoder.greedy(
            states, torch.full((3,), states.shape[1]),
            [decoder.prompt(lang, "transcribe") for lang in languages], max_new_tokens=20,
        )  # fmt: skip
        for i, lang in enumerate(languages):
            generated = hf.generate(
                encoder_outputs=BaseModelOutput(last_hidden_state=states[i : i + 1]),
                language=lang, task="transcribe", max_new_tokens=20,
            )[0].tolist()  # fmt: skip
            text = [t for t in generated if t < decoder.special.end]  # drop prompt and eot
            # the same tokens; generate's budget may count one forced token differently
            assert ours[i] == text[: len(ours[i])] and len(ours[i]) >= min(len(text), 20) - 1
