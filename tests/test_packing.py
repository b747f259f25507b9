"""Padding-free packing against the padded forward on tiny random decoders (fp32, CPU, SDPA)."""
from __future__ import annotations

from itertools import combinations

import pytest
import torch
from transformers import LlamaConfig, LlamaModel, Qwen2Config, Qwen2ForSequenceClassification

from rmcore.batching import Encoder, collate, encode_groups, pack_chunks, pad_chunks
from rmcore.config import LossConfig, ModelConfig
from rmcore.inference import score_sequences
from rmcore.losses import compute_loss
from rmcore.model import RewardModel, load_tokenizer
from rmcore.train import resolve_packing

CPU = torch.device("cpu")
SEQS = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], [15], [16, 17, 18, 19, 20], [21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31], [32, 33]]


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_llama_packing")
    torch.manual_seed(0)
    LlamaModel(LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0)).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_qwen2_seqcls(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_qwen2_seqcls")
    torch.manual_seed(1)
    Qwen2ForSequenceClassification(Qwen2Config(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                               pad_token_id=0, num_labels=1)).save_pretrained(path)
    return path


def test_pack_chunks_fill_padding_and_restart_positions():
    (members, ids, positions, last), = pack_chunks(SEQS, 0, max_tokens=0)
    # lengths 7 3 1 5 11 2, padded to 11 in one chunk: 1 and 2 go into 7's padding, 3 into 5's:
    # rows [7 1 2], [5 3], [11]: 33 tokens for 29, not 6 x 11
    assert ids.shape == (3, 11) and sorted(members) == list(range(len(SEQS)))
    flat_ids, flat_pos = ids.flatten(), positions.flatten()
    rows = {}
    for i, at in zip(members, last.tolist()):
        n = len(SEQS[i])
        assert flat_ids[at - n + 1:at + 1].tolist() == SEQS[i]
        assert flat_pos[at - n + 1:at + 1].tolist() == list(range(n))  # positions restart per sequence
        rows.setdefault(at // 11, []).append(n)
    assert sorted(map(sorted, rows.values())) == [[1, 2, 7], [3, 5], [11]]
    assert (ids == 0).sum() == 4
    # under a 12-token budget the padded chunks are [1 2 3] x 3, [5], [7], [11]: 1 fills 2's padding
    chunks = pack_chunks(SEQS, 0, max_tokens=12)
    assert [tuple(c[1].shape) for c in chunks] == [(2, 3), (1, 5), (1, 7), (1, 11)]


@pytest.mark.parametrize("budget", [0, 64, 300])
def test_packing_never_computes_more_than_padding(budget):
    """Random lengths: every sequence exactly once, each chunk within the budget, and never more
    tokens or forwards than the padded layout."""
    import random

    rng = random.Random(budget)
    for _ in range(50):
        seqs = [[1] * rng.randint(1, 60) for _ in range(rng.randint(1, 40))]
        packed, padded = pack_chunks(seqs, 0, budget), pad_chunks(seqs, 0, budget)
        assert sorted(i for c in packed for i in c[0]) == list(range(len(seqs)))
        assert all(c[1].numel() <= budget or c[1].shape[0] == 1 for c in packed) if budget else len(packed) == 1
        assert sum(c[1].numel() for c in packed) <= sum(c[1].numel() for c in padded)
        assert len(packed) <= len(padded)


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("backbone,attn", [("tiny_llama", "auto"), ("tiny_llama", "eager"), ("tiny_qwen2", "auto"),
                                           ("tiny_qwen2_seqcls", "auto")])
@pytest.mark.parametrize("budget", [0, 12])
def test_packed_rewards_and_gradients_equal_padded(backbone, attn, budget, request):
    model = RewardModel.from_backbone(ModelConfig(backbone=str(request.getfixturevalue(backbone)), attn_implementation=attn), 0)
    assert model.backbone.config._attn_implementation == ("sdpa" if attn == "auto" else attn)
    assert model.packing_unsupported() is None
    out = {}
    for packing in (False, True):
        model.zero_grad()
        rewards = score_sequences(model, SEQS, 0, CPU, budget, packing=packing)
        (rewards * torch.arange(1.0, len(SEQS) + 1)).sum().backward()  # a different weight per sequence
        out[packing] = rewards.detach(), _grads(model)
    (padded, g_pad), (packed, g_pack) = out[False], out[True]
    assert (padded - packed).abs().max() <= 1e-4
    assert g_pad.keys() == g_pack.keys() and len(g_pad) > 5
    worst = max(((g_pad[n] - g_pack[n]).abs().max() / g_pad[n].abs().max().clamp_min(1e-6)).item() for n in g_pad)
    assert worst <= 1e-4


def test_a_packed_row_attends_only_inside_each_sequence(tiny_llama):
    """Changing one sequence's tokens moves only that sequence's reward."""
    model = RewardModel.from_backbone(ModelConfig(backbone=str(tiny_llama)), 0).eval()
    with torch.no_grad():
        before = score_sequences(model, SEQS, 0, CPU, 0, packing=True)
        changed = [list(s) for s in SEQS]
        changed[0] = [40 + t for t in changed[0]]
        after = score_sequences(model, changed, 0, CPU, 0, packing=True)
    assert (after[0] - before[0]).abs() > 1e-3
    assert torch.allclose(after[1:], before[1:], atol=1e-6)


def test_kwise_group_is_encoded_once_when_packed(tiny_qwen2):
    """A K=4 ranking: 4 sequences' tokens in one packed forward (not 2·C(4,2) = 12), and the kwise loss on
    them equals the padded one."""
    tok = load_tokenizer(str(tiny_qwen2))
    groups = encode_groups([{"prompt": "which answer is best", "completions": ["one", "two two", "three three three", "four"],
                             "blocks": [0, 1, 2, 3], "pairs": [list(p) for p in combinations(range(4), 2)], "margins": [1.0] * 6,
                             "ties": []}], Encoder(tok, 64))
    batch = collate(groups)
    assert len(batch.seqs) == 4 and batch.num_pairs == 6
    model = RewardModel.from_backbone(ModelConfig(backbone=str(tiny_qwen2)), tok.pad_token_id)
    seen: list[tuple[int, ...]] = []
    model.backbone.register_forward_hook(lambda mod, args, kwargs, out: seen.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True)
    loss_cfg = LossConfig(name="kwise")
    packed = compute_loss(score_sequences(model, batch.seqs, tok.pad_token_id, CPU, 0, packing=True), batch.index, loss_cfg)
    assert len(seen) == 1 and seen[0][0] * seen[0][1] <= 4 * max(map(len, batch.seqs))  # 4 sequences' room, not 12
    padded = compute_loss(score_sequences(model, batch.seqs, tok.pad_token_id, CPU, 0), batch.index, loss_cfg)
    assert abs(packed.item() - padded.item()) <= 1e-5


def test_packing_auto_is_off_on_cpu_and_on_refuses_encoders(tiny_llama, tiny_bert):
    decoder = RewardModel.from_backbone(ModelConfig(backbone=str(tiny_llama)), 0)
    assert resolve_packing("auto", decoder, CPU) is False
    assert resolve_packing("auto", decoder, torch.device("cuda")) is True
    assert resolve_packing("on", decoder, CPU) is True
    encoder = RewardModel.from_backbone(ModelConfig(backbone=str(tiny_bert)), 0)
    assert "not a decoder-only" in encoder.packing_unsupported()
    assert resolve_packing("auto", encoder, torch.device("cuda")) is False
    with pytest.raises(ValueError, match="packing=on: bert is not a decoder-only"):
        resolve_packing("on", encoder, CPU)
    mean_pooled = RewardModel.from_backbone(ModelConfig(backbone=str(tiny_llama), pooling="mean"), 0)
    assert "pooling=mean" in mean_pooled.packing_unsupported()


def test_training_packed_reaches_the_padded_result(tiny_qwen2, synthetic_dataset):
    """One epoch through the real loop, packing on vs off: the same model to float tolerance."""
    from rmcore.config import RunConfig
    from rmcore.train import train_reward_model

    def run(packing: str) -> dict:
        cfg = RunConfig.model_validate({"model": {"backbone": str(tiny_qwen2), "max_length": 96},
                                        "optim": {"packing": packing, "lr": 1e-3, "max_tokens_per_forward": 512}, "device": "cpu"})
        return train_reward_model(cfg, synthetic_dataset, None)

    padded, packed = run("off"), run("on")
    assert (padded["packing"], packed["packing"]) == (False, True)
    assert packed["pairs_trained"] == padded["pairs_trained"] > 0
    assert abs(packed["val_margin_mean"] - padded["val_margin_mean"]) <= 1e-4 * abs(padded["val_margin_mean"]) and padded["val_margin_mean"] > 0.1
    assert packed["val_accuracy"] == pytest.approx(padded["val_accuracy"], abs=0.01)


def test_packing_is_refused_on_torch_or_transformers_without_packed_sequence_masks(tiny_llama, monkeypatch):
    from rmcore import inference

    assert inference.packing_version_problem() is None  # the installed versions
    assert inference.packing_version_problem("2.13.0+cpu", "4.53.2") == "transformers 4.53.2 < 4.54: packed rows would attend across sequences"
    assert "torch 2.5.1 < 2.6" in inference.packing_version_problem("2.5.1", "4.57.0")
    assert inference.packing_version_problem("2.6.0", "4.54.0") is None
    monkeypatch.setattr(inference, "packing_version_problem", lambda: "transformers 4.46.0 < 4.54: packed rows would attend across sequences")
    model = RewardModel.from_backbone(ModelConfig(backbone=str(tiny_llama), head="scalar"), 0)
    with pytest.raises(ValueError, match="transformers 4.46.0 < 4.54"):
        resolve_packing("on", model, CPU)
    assert resolve_packing("auto", model, torch.device("cuda")) is False
