from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaModel

from rmcore.batching import Encoder, collate, encode_groups, plan_batches
from rmcore.config import LossConfig, ModelConfig
from rmcore.inference import score_sequences
from rmcore.losses import compute_loss
from rmcore.model import RewardModel, load_tokenizer, pool


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_llama")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0)
    LlamaModel(cfg).save_pretrained(path)
    return path


def padded(seqs, side):
    width = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        sl = slice(0, len(s)) if side == "right" else slice(width - len(s), width)
        ids[i, sl], mask[i, sl] = torch.tensor(s), 1
    return ids, mask


@pytest.mark.parametrize("pooling", ["last", "mean", "first"])
def test_pooling_is_the_same_under_left_and_right_padding(tiny_llama, pooling):
    model = RewardModel.from_backbone(ModelConfig(backbone=str(tiny_llama), pooling=pooling)).eval()
    seqs = [[5, 6, 7, 8, 9, 10], [11, 12, 13], [14, 15, 16, 17]]
    with torch.no_grad():
        right = model(*padded(seqs, "right"))
        left = model(*padded(seqs, "left"))
        alone = torch.cat([model(*padded([s], "right")) for s in seqs])
    assert torch.allclose(right, left, atol=1e-5)
    assert torch.allclose(right, alone, atol=1e-5)


def test_last_token_pool_picks_last_real_token():
    hidden = torch.arange(12.0).view(2, 3, 2)
    mask = torch.tensor([[1, 1, 0], [0, 1, 1]])
    assert pool(hidden, mask, "last").tolist() == [[2.0, 3.0], [10.0, 11.0]]
    assert pool(hidden, mask, "first").tolist() == [[0.0, 1.0], [8.0, 9.0]]


def test_save_and_reload_gives_identical_scores(tiny_bert, tmp_path):
    tok = load_tokenizer(str(tiny_bert))
    model = RewardModel.from_backbone(ModelConfig(backbone=str(tiny_bert))).eval()
    ids, mask = padded([[101, 2000, 2001, 102], [101, 2003, 102]], "right")
    before = model(ids, mask)
    model.save_pretrained(tmp_path / "m", tok)
    assert (tmp_path / "m" / "backbone" / "model.safetensors").is_file()
    loaded, _ = RewardModel.load(tmp_path / "m")
    assert torch.equal(before, loaded(ids, mask))


def test_auto_head_is_seqcls_for_encoders_and_scalar_for_decoders(tiny_bert, tiny_llama):
    # the encoder's own classifier exports as it is; a decoder's scalar head maps onto its `score` layer
    assert RewardModel.from_backbone(ModelConfig(backbone=str(tiny_bert))).kind == "seqcls"
    assert RewardModel.from_backbone(ModelConfig(backbone=str(tiny_llama))).kind == "scalar"
    assert RewardModel.from_backbone(ModelConfig(backbone=str(tiny_bert), head="scalar")).kind == "scalar"


@pytest.mark.parametrize("head", ["scalar", "seqcls"])
def test_lora_trains_head_in_full_and_saves_merged(tiny_bert, tmp_path, head):
    model = RewardModel.from_backbone(ModelConfig(backbone=str(tiny_bert), lora_r=4, head=head))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    if head == "scalar":
        assert {"head.weight", "head.bias"} <= trainable
    else:  # peft keeps BERT's classifier as a full copy (modules_to_save)
        assert {n for n in trainable if "classifier" in n and "lora_" not in n} >= {
            "backbone.base_model.model.classifier.modules_to_save.default.weight",
            "backbone.base_model.model.classifier.modules_to_save.default.bias"}
    assert any("lora_" in n for n in trainable)
    assert not any("lora_" not in n and "classifier" not in n and n.startswith("backbone") for n in trainable)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.add_(0.1)  # make the adapter matter, as training would
    model.eval()
    ids, mask = padded([[101, 2000, 2001, 102]], "right")
    before = model(ids, mask)
    model.save_pretrained(tmp_path / "m", load_tokenizer(str(tiny_bert)))
    loaded, _ = RewardModel.load(tmp_path / "m")
    assert torch.allclose(before, loaded(ids, mask), atol=1e-5)


def test_sequence_classification_checkpoints_use_their_own_head(tmp_path, tiny_bert):
    cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, num_labels=1)
    BertForSequenceClassification(cfg).save_pretrained(tmp_path / "seqcls")
    load_tokenizer(str(tiny_bert)).save_pretrained(tmp_path / "seqcls")
    model = RewardModel.from_backbone(ModelConfig(backbone=str(tmp_path / "seqcls")))
    assert model.kind == "seqcls"
    model.eval()
    ids, mask = padded([[101, 2000, 102]], "right")
    model.save_pretrained(tmp_path / "saved", load_tokenizer(str(tiny_bert)))
    loaded, _ = RewardModel.load(tmp_path / "saved")
    assert torch.equal(model(ids, mask), loaded(ids, mask))


def test_truncation_keeps_the_response_and_cuts_the_prompt_from_the_left(tiny_bert):
    enc = Encoder(load_tokenizer(str(tiny_bert)), max_length=16)
    prompt, response = list(range(1000, 1020)), [7, 8, 9]
    ids, truncated = enc.join(prompt, response)
    assert truncated and len(ids) == 16
    assert ids[-4:-1] == response  # [CLS] prompt-tail [SEP] response [SEP]
    assert ids[1:-5] == prompt[-(16 - enc.n_special - 3):]
    ids, truncated = enc.join([1, 2], [3])
    assert not truncated and len(ids) == 3 + enc.n_special


def kwise_rows(k: int, n: int):
    from itertools import combinations

    return [{"prompt": f"prompt {g}", "completions": [f"answer {g}-{i}" for i in range(k)], "blocks": list(range(k)),
             "pairs": [list(p) for p in combinations(range(k), 2)], "margins": [1.0] * (k * (k - 1) // 2), "ties": []}
            for g in range(n)]


def test_kwise_step_encodes_each_completion_once(tiny_bert):
    tok = load_tokenizer(str(tiny_bert))
    groups = encode_groups(kwise_rows(4, 3), Encoder(tok, 64))
    model = RewardModel.from_backbone(ModelConfig(backbone=str(tiny_bert)))
    rows_seen = []
    model.backbone.register_forward_hook(lambda m, args, kwargs, out: rows_seen.append(kwargs["input_ids"].shape[0]), with_kwargs=True)
    batch = collate(groups)
    rewards = score_sequences(model, batch.seqs, tok.pad_token_id, torch.device("cpu"), max_tokens=0)
    compute_loss(rewards, batch.index, LossConfig(name="kwise")).backward()
    assert batch.num_pairs == 3 * 6
    assert sum(rows_seen) == 3 * 4  # K sequences per prompt, not 2·C(K,2) = 12


def test_identical_completion_texts_share_one_sequence(tiny_bert):
    rows = kwise_rows(3, 1)
    rows[0]["completions"][2] = rows[0]["completions"][0]
    (group,) = encode_groups(rows, Encoder(load_tokenizer(str(tiny_bert)), 64))
    assert len(group.seqs) == 2 and group.num_pairs == 3


def test_batches_keep_groups_whole_and_cover_each_group_once(tiny_bert):
    groups = encode_groups(kwise_rows(4, 50) + kwise_rows(2, 50), Encoder(load_tokenizer(str(tiny_bert)), 64))
    batches = plan_batches(groups, pairs_per_step=16, seed=0, epoch=0)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(100))
    assert sum(1 for b in batches if sum(groups[i].num_pairs for i in b) < 16) <= 1  # one window, one remainder
    assert plan_batches(groups, 16, 0, 0) == batches and plan_batches(groups, 16, 0, 1) != batches
