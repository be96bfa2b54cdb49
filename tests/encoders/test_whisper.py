"""WhisperSpeechEncoder: faithful to HF on 30 s, unpadded clips, masks, early stop, FFN hooks."""

from __future__ import annotations

import re
import runpy
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import WhisperConfig, WhisperFeatureExtractor
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from colld.encoders import wrap_encoder
from colld.encoders.whisper import WhisperSpeechEncoder

DOC = Path(__file__).resolve().parents[2] / "docs" / "whisper-encoder-without-colld.md"
ATTENTION = ["eager", "sdpa"]


def tiny_encoder(
    attn: str = "sdpa",
    *,
    num_mel_bins: int = 8,
    max_source_positions: int = 1500,
    dropout: float = 0.0,
    seed: int = 0,
) -> WhisperEncoder:
    torch.manual_seed(seed)
    config = WhisperConfig(
        num_mel_bins=num_mel_bins,
        d_model=16,
        encoder_layers=3,
        encoder_attention_heads=2,
        encoder_ffn_dim=32,
        decoder_layers=1,
        decoder_attention_heads=2,
        decoder_ffn_dim=32,
        max_source_positions=max_source_positions,
        dropout=dropout,
        attention_dropout=dropout,
        activation_dropout=dropout,
        attn_implementation=attn,
    )
    return WhisperEncoder(config).eval()


def layer_call_counter(model: WhisperEncoder) -> list[int]:
    calls = [0] * len(model.layers)
    for index, layer in enumerate(model.layers):
        layer.register_forward_hook(lambda *_a, i=index: calls.__setitem__(i, calls[i] + 1))
    return calls


@pytest.mark.parametrize("attn", ATTENTION)
def test_matches_hf_encoder_on_30_seconds(attn: str) -> None:
    model = tiny_encoder(attn)
    encoder = WhisperSpeechEncoder(model).eval()
    features = torch.randn(2, 3000, 8)  # (B, F, C)
    with torch.no_grad():
        reference = model(features.transpose(1, 2), output_hidden_states=True).hidden_states
        ours = encoder(features, torch.tensor([3000, 3000]))
    assert len(reference) == encoder.num_layers + 1 == len(ours.hidden_states)
    for j, state in enumerate(reference):
        torch.testing.assert_close(ours.hidden_states[j], state, rtol=0, atol=1e-5)
    assert ours.lengths.tolist() == [1500, 1500]
    assert ours.frame_rate == 50.0


@pytest.mark.parametrize("attn", ATTENTION)
def test_padded_batch_equals_clips_alone(attn: str) -> None:
    encoder = WhisperSpeechEncoder(tiny_encoder(attn)).eval()
    feature_lengths = [81, 37, 60]  # odd and even: conv2's last window reaches past odd F
    clips = [torch.randn(n, 8) for n in feature_lengths]
    batch = torch.zeros(3, max(feature_lengths), 8)
    for b, clip in enumerate(clips):
        batch[b, : len(clip)] = clip
    batch[1, 37:] = 5.0  # garbage beyond a clip must not leak in
    with torch.no_grad():
        together = encoder(batch, torch.tensor(feature_lengths), return_ffn=True)
        for b, clip in enumerate(clips):
            alone = encoder(clip[None], torch.tensor([len(clip)]), return_ffn=True)
            num_frames = int(together.lengths[b])
            assert num_frames == alone.hidden_states[0].shape[1] == (len(clip) - 1) // 2 + 1
            for j in range(encoder.num_layers + 1):
                torch.testing.assert_close(
                    together.hidden_states[j][b, :num_frames],
                    alone.hidden_states[j][0],
                    rtol=0,
                    atol=2e-6,
                )
            for j in range(1, encoder.num_layers + 1):
                torch.testing.assert_close(
                    together.ffn_outputs[j][b, :num_frames],
                    alone.ffn_outputs[j][0],
                    rtol=0,
                    atol=2e-6,
                )


def test_without_key_padding_mask_the_batch_would_differ() -> None:
    """Guards the test above: padding really changes valid frames unless it is masked."""
    encoder = WhisperSpeechEncoder(tiny_encoder("eager")).eval()
    clip = torch.randn(37, 8)
    batch = torch.zeros(1, 81, 8)
    batch[0, :37] = clip
    with torch.no_grad():
        masked = encoder(batch, torch.tensor([37])).hidden_states[3][0, :19]
        unmasked = encoder(batch, torch.tensor([81])).hidden_states[3][0, :19]
    assert (masked - unmasked).abs().max() > 1e-3


def test_runs_only_as_deep_as_the_deepest_requested_layer() -> None:
    model = tiny_encoder()
    encoder = WhisperSpeechEncoder(model)
    calls = layer_call_counter(model)
    norm_calls = [0]
    model.layer_norm.register_forward_hook(lambda *_a: norm_calls.__setitem__(0, norm_calls[0] + 1))
    features = torch.randn(1, 40, 8)
    out = encoder(features, torch.tensor([40]), layers=[0, 2])
    assert calls == [1, 1, 0] and norm_calls == [0]
    assert sorted(out.hidden_states) == [0, 2]
    encoder(features, torch.tensor([40]), layers=[0])
    assert calls == [1, 1, 0]
    full = encoder(features, torch.tensor([40]), layers=[3])
    assert calls == [2, 2, 1] and norm_calls == [1]
    assert sorted(full.hidden_states) == [3]


def test_mask_embedding_replaces_frames_before_positions() -> None:
    model = tiny_encoder()
    encoder = WhisperSpeechEncoder(model)
    features = torch.randn(1, 40, 8)
    mask = torch.zeros(1, 20, dtype=torch.bool)
    mask[0, 5:12] = True
    with torch.no_grad():
        plain = encoder(features, torch.tensor([40]), layers=[0]).hidden_states[0]
        masked = encoder(features, torch.tensor([40]), layers=[0], mask=mask).hidden_states[0]
    positions = model.embed_positions.weight[:20]
    expected = encoder.mask_embedding + positions[5:12]
    torch.testing.assert_close(masked[0, 5:12], expected)
    torch.testing.assert_close(masked[0, ~mask[0]], plain[0, ~mask[0]])
    # masked frames keep their position: no two of them are equal
    assert torch.cdist(masked[0, 5:12], masked[0, 5:12]).add(torch.eye(7)).min() > 1e-3
    assert encoder.mask_parameters() == [encoder.mask_embedding]
    init = encoder.mask_embedding.detach()
    assert 0.0 <= float(init.min()) and float(init.max()) < 1.0


def test_ffn_outputs_are_the_feed_forward_branch() -> None:
    model = tiny_encoder()
    encoder = WhisperSpeechEncoder(model)
    features = torch.randn(1, 50, 8)
    with torch.no_grad():
        out = encoder(features, torch.tensor([50]), layers=[1, 2], return_ffn=True)
        h = out.hidden_states[1]
        layer = model.layers[1]
        after_attention = h + layer.self_attn(layer.self_attn_layer_norm(h))[0]
        ffn = layer.fc2(layer.activation_fn(layer.fc1(layer.final_layer_norm(after_attention))))
    assert sorted(out.ffn_outputs) == [1, 2]
    torch.testing.assert_close(out.ffn_outputs[2], ffn)
    torch.testing.assert_close(out.hidden_states[2], after_attention + ffn)
    assert all(not layer.fc2._forward_hooks for layer in model.layers)
    assert encoder(features, torch.tensor([50]), layers=[1]).ffn_outputs == {}


def test_training_mode_gradients_and_dropout() -> None:
    encoder = WhisperSpeechEncoder(tiny_encoder(dropout=0.3)).train()
    features = torch.randn(2, 40, 8)
    lengths = torch.tensor([40, 31])
    mask = torch.zeros(2, 20, dtype=torch.bool)
    mask[:, 3:9] = True
    first = encoder(features, lengths, mask=mask).hidden_states[3]
    second = encoder(features, lengths, mask=mask).hidden_states[3]
    assert not torch.allclose(first, second)  # dropout active
    first[:, :16].sum().backward()
    assert encoder.mask_embedding.grad is not None and encoder.mask_embedding.grad.abs().sum() > 0
    assert encoder.model.conv1.weight.grad.abs().sum() > 0
    assert encoder.model.layers[0].fc1.weight.grad.abs().sum() > 0
    encoder.eval()
    with torch.no_grad():
        a = encoder(features, lengths).hidden_states[3]
        b = encoder(features, lengths).hidden_states[3]
    assert torch.equal(a, b)


def test_output_lengths_and_frame_rate() -> None:
    encoder = WhisperSpeechEncoder(tiny_encoder())
    for num in [1, 2, 3, 99, 100, 3000]:
        out = encoder(torch.randn(1, num, 8), torch.tensor([num]), layers=[0])
        assert out.hidden_states[0].shape[1] == int(encoder.output_lengths(torch.tensor([num]))[0])
        assert int(out.lengths[0]) == (num - 1) // 2 + 1
    extractor = WhisperFeatureExtractor()
    assert encoder.frame_rate == extractor.sampling_rate / extractor.hop_length / 2 == 50.0
    assert wrap_encoder(tiny_encoder()).family == "whisper"


def test_errors_name_the_problem() -> None:
    encoder = WhisperSpeechEncoder(tiny_encoder(max_source_positions=50))
    with pytest.raises(ValueError, match=r"T=51 .*30 s limit"):
        encoder(torch.randn(1, 101, 8), torch.tensor([101]))
    encoder(torch.randn(1, 100, 8), torch.tensor([100]), layers=[0])  # T = 50 fits
    with pytest.raises(ValueError, match=r"\(B, F, 8\), found \(1, 10, 80\)"):
        encoder(torch.randn(1, 10, 80), torch.tensor([10]))
    with pytest.raises(ValueError, match=r"1\.\.10.*\[11\]"):
        encoder(torch.randn(1, 10, 8), torch.tensor([11]))
    with pytest.raises(ValueError, match=r"Shape \(2,\)"):
        encoder(torch.randn(2, 10, 8), torch.tensor([10]))
    with pytest.raises(ValueError, match="layers is empty"):
        encoder(torch.randn(1, 10, 8), torch.tensor([10]), layers=[])
    with pytest.raises(ValueError, match="requested hidden state 4"):
        encoder(torch.randn(1, 10, 8), torch.tensor([10]), layers=[4])
    with pytest.raises(ValueError, match=r"mask should be bool of Shape \(1, 5\)"):
        encoder(
            torch.randn(1, 10, 8), torch.tensor([10]), mask=torch.zeros(1, 10, dtype=torch.bool)
        )
    with pytest.raises(TypeError, match="get_encoder"):
        WhisperSpeechEncoder(torch.nn.Linear(2, 2))  # type: ignore[arg-type]


def _doc_python_block() -> str:
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), flags=re.S)
    assert blocks, f"no python block in {DOC}"
    return blocks[0]


def test_doc_recipe_matches_adapter(tmp_path: Path) -> None:
    model = tiny_encoder(num_mel_bins=80)
    model_dir = tmp_path / "student"
    model.save_pretrained(model_dir)
    script = tmp_path / "recipe.py"
    script.write_text(_doc_python_block(), encoding="utf-8")
    recipe = runpy.run_path(str(script))

    rng = np.random.default_rng(0)
    num_samples = 16000 + 37  # 37 % 160 < n_fft // 2: longest-padding would differ here
    waveform = (0.1 * rng.standard_normal(num_samples)).astype(np.float32)
    loaded = recipe["WhisperEncoder"].from_pretrained(model_dir).eval()
    features = recipe["log_mel"](waveform, 80)  # (F, C)
    states = recipe["hidden_states"](loaded, features)

    extractor = WhisperFeatureExtractor()
    padded = extractor(waveform, sampling_rate=16000, return_tensors="pt").input_features[0]
    assert features.shape == (num_samples // 160, 80)
    torch.testing.assert_close(features, padded[:, : num_samples // 160].T, rtol=0, atol=1e-5)

    encoder = WhisperSpeechEncoder(model).eval()
    with torch.no_grad():
        ours = encoder(features[None], torch.tensor([features.shape[0]]))
    assert len(states) == len(ours.hidden_states) == 4
    for j, state in enumerate(states):
        torch.testing.assert_close(state, ours.hidden_states[j][0], rtol=0, atol=1e-5)
