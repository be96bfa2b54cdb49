"""HFSpeechEncoder: hidden states, early stop, masking, lengths and FFN outputs per family."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    Wav2Vec2Config,
    Wav2Vec2ForCTC,
)

from colld.encoders import wrap_encoder
from colld.encoders.hf import HFSpeechEncoder
from colld.testing import TINY_CONV, tiny_model

NUM_LAYERS = 3
_SIZES = dict(
    hidden_size=32, num_hidden_layers=NUM_LAYERS, num_attention_heads=2, intermediate_size=64
)


def _tiny(family: str, **overrides) -> torch.nn.Module:
    """A tiny random base model of ``family`` in eval mode (dropout inactive)."""
    return tiny_model(family, num_layers=NUM_LAYERS, hidden=32, heads=2, ffn=64, **overrides).eval()


FAMILIES = ["wav2vec2", "wav2vec2-stable", "hubert", "wavlm", "data2vec-audio", "wav2vec2-bert"]


def _inputs(encoder: HFSpeechEncoder, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A padded batch of two: full length and a shorter one."""
    gen = torch.Generator().manual_seed(seed)
    if encoder.is_spectral:
        features = torch.randn(2, 30, 160, generator=gen)
        lengths = torch.tensor([30, 21])
    else:
        features = torch.randn(2, 960, generator=gen)
        lengths = torch.tensor([960, 700])
    features[1, lengths[1] :] = 0.0
    return features, lengths


def _count_layer_calls(encoder: HFSpeechEncoder) -> list[int]:
    calls = [0] * encoder.num_layers
    for i, layer in enumerate(encoder.layers):
        layer.register_forward_hook(lambda *_a, i=i: calls.__setitem__(i, calls[i] + 1))
    return calls


@pytest.mark.parametrize("family", FAMILIES)
def test_hidden_states_equal_full_model(family: str) -> None:
    torch.manual_seed(0)
    model = _tiny(family)
    encoder = wrap_encoder(model)
    assert isinstance(encoder, HFSpeechEncoder)
    features, lengths = _inputs(encoder)
    attention_mask = (torch.arange(features.shape[1])[None] < lengths[:, None]).long()
    with torch.no_grad():
        reference = model(features, attention_mask=attention_mask, output_hidden_states=True)
        out = encoder(features, lengths)
    if family == "data2vec-audio":
        # HF's padded short row is off (module docstring, "Padding"): compare with it alone.
        short = int(lengths[1])
        with torch.no_grad():
            alone = model(features[1:, :short], output_hidden_states=True)
        valid = int(out.lengths[1])
        for j in range(NUM_LAYERS):  # HF's states 0..L-1 (its last one is before any final LN)
            ours, theirs = out.hidden_states[j][1, :valid], alone.hidden_states[j][0]
            torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
        features, lengths = features[:1], lengths[:1]  # the full row: no padding
        reference = model(features, output_hidden_states=True)
        out = encoder(features, lengths)
    assert sorted(out.hidden_states) == list(range(NUM_LAYERS + 1))
    for j in range(NUM_LAYERS):
        torch.testing.assert_close(out.hidden_states[j], reference.hidden_states[j], rtol=0, atol=0)
    # State L is last_hidden_state (after the final layer norm where there is one).
    torch.testing.assert_close(
        out.hidden_states[NUM_LAYERS], reference.last_hidden_state, rtol=0, atol=0
    )
    if family == "wav2vec2-stable":  # HF's own last state is before that layer norm
        assert not torch.allclose(reference.hidden_states[-1], reference.last_hidden_state)
    assert out.lengths.tolist() == encoder.output_lengths(lengths).tolist()
    assert out.hidden_states[0].shape[1] == int(out.lengths.max())
    assert out.ffn_outputs == {}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("layers", [[0], [1], [0, 2], [1, 3]])
def test_runs_only_as_deep_as_needed(family: str, layers: list[int]) -> None:
    torch.manual_seed(0)
    encoder = wrap_encoder(_tiny(family))
    features, lengths = _inputs(encoder)
    with torch.no_grad():
        full = encoder(features, lengths)
    calls = _count_layer_calls(encoder)
    with torch.no_grad():
        out = encoder(features, lengths, layers=layers)
    deepest = max(layers)
    assert calls == [1] * deepest + [0] * (NUM_LAYERS - deepest)
    assert sorted(out.hidden_states) == layers
    for j in layers:
        assert torch.equal(out.hidden_states[j], full.hidden_states[j])


@pytest.mark.parametrize("family", FAMILIES)
def test_mask_replaces_frames_before_positions(family: str) -> None:
    torch.manual_seed(0)
    model = _tiny(family)
    encoder = wrap_encoder(model)
    features, lengths = _inputs(encoder)
    encoder_inputs: list[torch.Tensor] = []
    model.encoder.register_forward_pre_hook(
        lambda _m, args, kwargs: encoder_inputs.append(
            (args[0] if args else kwargs["hidden_states"]).clone()
        ),
        with_kwargs=True,
    )
    num_frames = int(encoder.output_lengths(torch.tensor([features.shape[1]]))[0])
    mask = torch.zeros(2, num_frames, dtype=torch.bool)
    mask[0, 2:6] = True
    mask[1, 0:3] = True
    with torch.no_grad():
        plain = encoder(features, lengths)
        masked = encoder(features, lengths, mask=mask)
    unmasked_in, masked_in = encoder_inputs
    embed = encoder.mask_parameters()[0]
    assert embed is model.masked_spec_embed
    # The encoder (which adds positions) receives the mask embedding on masked frames only.
    assert torch.equal(masked_in[mask], embed.expand(int(mask.sum()), -1))
    assert torch.equal(masked_in[~mask], unmasked_in[~mask])
    assert not torch.allclose(masked.hidden_states[NUM_LAYERS], plain.hidden_states[NUM_LAYERS])


@pytest.mark.parametrize("family", ["wav2vec2", "wav2vec2-bert"])
def test_no_random_masking_in_train_mode(family: str) -> None:
    """With mask=None HF would draw its own mask in train mode; colld must prevent that."""
    torch.manual_seed(0)
    model = _tiny(family, mask_time_prob=0.9, mask_time_length=2, layerdrop=0.0)
    for module in model.modules():  # no dropout, so train and eval outputs are comparable
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    encoder = wrap_encoder(model)
    features, lengths = _inputs(encoder)
    with torch.no_grad():
        expected = encoder(features, lengths, layers=[0]).hidden_states[0]
        encoder.train()
        got = encoder(features, lengths, layers=[0]).hidden_states[0]
    torch.testing.assert_close(got, expected)


def test_training_refuses_layerdrop_and_feature_masking() -> None:
    encoder = wrap_encoder(_tiny("wav2vec2", layerdrop=0.1)).train()
    features, lengths = _inputs(encoder)
    with pytest.raises(ValueError, match="layerdrop=0.1"):
        encoder(features, lengths)
    encoder = wrap_encoder(_tiny("hubert", layerdrop=0.0, mask_feature_prob=0.2)).train()
    with pytest.raises(ValueError, match="mask_feature_prob=0.2"):
        encoder(features, lengths)
    encoder.eval()  # eval mode (frozen teachers) ignores both
    encoder(features, lengths, layers=[1])


def test_mask_errors() -> None:
    encoder = wrap_encoder(_tiny("wavlm", mask_time_prob=0.0))
    assert encoder.mask_parameters() == []
    features, lengths = _inputs(encoder)
    num_frames = int(encoder.output_lengths(torch.tensor([features.shape[1]]))[0])
    with pytest.raises(ValueError, match="no masked_spec_embed"):
        encoder(features, lengths, mask=torch.ones(2, num_frames, dtype=torch.bool))
    encoder(features, lengths, mask=torch.zeros(2, num_frames, dtype=torch.bool))  # no-op is fine
    with pytest.raises(ValueError, match=r"expected \(B, T\)"):
        encoder(features, lengths, mask=torch.zeros(2, num_frames + 1, dtype=torch.bool))


@pytest.mark.parametrize("family", FAMILIES)
def test_ffn_outputs(family: str) -> None:
    """return_ffn gives the FFN output before the residual add (Conformer: the second FFN)."""
    torch.manual_seed(0)
    model = _tiny(family)
    encoder = wrap_encoder(model)
    features, lengths = _inputs(encoder)
    layer = encoder.layers[1]
    ffn_module = layer.ffn2 if family == "wav2vec2-bert" else layer.feed_forward
    ffn_inputs: list[torch.Tensor] = []
    ffn_module.register_forward_pre_hook(lambda _m, args: ffn_inputs.append(args[0]))
    with torch.no_grad():
        out = encoder(features, lengths, layers=[0, 2], return_ffn=True)
        expected = ffn_module(ffn_inputs[0])
    assert sorted(out.ffn_outputs) == [2]
    assert torch.equal(out.ffn_outputs[2], expected)
    assert out.ffn_outputs[2].shape == out.hidden_states[2].shape


def test_sizes_frame_rate_and_lengths() -> None:
    w2v = wrap_encoder(_tiny("wav2vec2"))
    assert (w2v.family, w2v.num_layers, w2v.hidden_dim) == ("wav2vec2", NUM_LAYERS, 32)
    assert w2v.frame_rate == 1600.0  # 16 kHz / (5 * 2)
    # (960 - 10) // 5 + 1 = 191 conv1 frames, (191 - 3) // 2 + 1 = 95
    assert w2v.output_lengths(torch.tensor([960, 700])).tolist() == [95, 69]
    bert = wrap_encoder(_tiny("wav2vec2-bert"))
    assert bert.frame_rate == 50.0
    assert bert.output_lengths(torch.tensor([30, 21])).tolist() == [30, 21]
    with pytest.raises(ValueError, match="at least one encoder frame"):
        w2v(torch.zeros(1, 960), torch.tensor([5]))
    with pytest.raises(ValueError, match=r"waveforms of Shape \(B, S\), found \(1, 960, 1\)"):
        w2v(torch.zeros(1, 960, 1), torch.tensor([960]))
    with pytest.raises(ValueError, match=r"Shape \(B, F, 160\)"):
        bert(torch.zeros(1, 30, 80), torch.tensor([30]))
    with pytest.raises(ValueError, match="requested hidden state 4"):
        w2v(torch.zeros(1, 960), torch.tensor([960]), layers=[4])


# Not the families whose first conv is group-normed over time (wav2vec2, hubert, wavlm tiny
# configs): there padding changes every frame, in HF too; colld evaluate runs them clip by clip.
@pytest.mark.parametrize("family", ["wav2vec2-stable", "data2vec-audio", "wav2vec2-bert"])
def test_padding_does_not_change_valid_frames(family: str) -> None:
    """With the attention mask, a padded utterance gives the same valid frames as alone, in
    every state (data2vec-audio thanks to the adapter's own fix, see the module docstring)."""
    torch.manual_seed(0)
    encoder = wrap_encoder(_tiny(family))
    features, lengths = _inputs(encoder)
    short = int(lengths[1])
    with torch.no_grad():
        batch = encoder(features, lengths)
        alone = encoder(features[1:, :short], lengths[1:])
    valid = int(alone.lengths[0])
    assert int(batch.lengths[1]) == valid
    for j, state in alone.hidden_states.items():
        torch.testing.assert_close(
            batch.hidden_states[j][1, :valid], state[0], atol=1e-5, rtol=1e-5
        )


def test_model_with_head_is_unwrapped_and_unknown_rejected() -> None:
    torch.manual_seed(0)
    ctc = Wav2Vec2ForCTC(Wav2Vec2Config(**_SIZES, **TINY_CONV, vocab_size=10)).eval()
    encoder = HFSpeechEncoder(ctc)
    assert encoder.model is ctc.wav2vec2
    from transformers import BertConfig, BertModel

    with pytest.raises(ValueError, match="unsupported encoder model_type 'bert'"):
        wrap_encoder(
            BertModel(
                BertConfig(
                    hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16
                )
            )
        )
