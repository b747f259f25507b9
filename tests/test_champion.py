"""The champion as RLHF consumes it: chat-template encoding shared by training and serving, the
Hugging Face export (logits = rmflow's rewards), reward normalisation, and TRL loading the export."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from rmcore.batching import Encoder, encode_groups, to_messages
from rmcore.config import ModelConfig
from rmcore.export import ExportUnavailable, export_hf
from rmcore.model import RewardModel, load_tokenizer, read_meta, write_reward_stats
from rmcore.scoring import RewardScorer
from rmcore.synthetic import synthetic_items

DIALOGUE = ("\n\nHuman: Question 3: what should I know about tea?\n\nAssistant: Steep tea for three minutes."
            "\n\nHuman: And what about bread?\n\nAssistant:")


def chat_ids(tok, messages) -> list[int]:
    out = tok.apply_chat_template(messages, tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def saved_decoder(path: Path, backbone: Path, bias: float = 0.0, stats=(0.5, 2.0)) -> Path:
    torch.manual_seed(1)
    model = RewardModel.from_backbone(ModelConfig(backbone=str(backbone), max_length=128))
    with torch.no_grad():
        model.head.bias.fill_(bias)
    model.save_pretrained(path, load_tokenizer(str(backbone)))
    write_reward_stats(path, *stats, n=10)
    return path


def test_a_conversation_is_encoded_as_its_chat_template_renders_it(tiny_qwen2):
    tok = load_tokenizer(str(tiny_qwen2))
    enc = Encoder(tok, 512, chat=True)
    messages = to_messages(DIALOGUE)
    assert [m["role"] for m in messages] == ["user", "assistant", "user"]
    ids, cut = enc.encode_chat(DIALOGUE, "Bake bread until it sounds hollow.")
    assert not cut
    assert ids == chat_ids(tok, messages + [{"role": "assistant", "content": "Bake bread until it sounds hollow."}])
    plain, _ = enc.encode_chat("What about tea?", "Steep it.")
    assert plain == chat_ids(tok, [{"role": "user", "content": "What about tea?"}, {"role": "assistant", "content": "Steep it."}])


def test_a_long_conversation_loses_whole_early_turns_first(tiny_qwen2):
    tok = load_tokenizer(str(tiny_qwen2))
    full = len(Encoder(tok, 4096, chat=True).encode_chat(DIALOGUE, "Bake bread.")[0])
    last_two = [{"role": "user", "content": "And what about bread?"}, {"role": "assistant", "content": "Bake bread."}]
    enc = Encoder(tok, full - 1, chat=True)
    ids, cut = enc.encode_chat(DIALOGUE, "Bake bread.")
    assert cut and ids == chat_ids(tok, last_two)  # the first user turn and its answer went, whole


def test_training_and_serving_score_a_conversation_alike(tiny_qwen2, tmp_path):
    model_dir = saved_decoder(tmp_path / "rm", tiny_qwen2)
    scorer = RewardScorer(model_dir)
    assert scorer.input_format == "chat_template" and read_meta(model_dir)["input_format"] == "chat_template"
    row = {"prompt": DIALOGUE, "completions": ["Bake it.", "No idea."], "pairs": [[0, 1]], "margins": [1.0], "blocks": [0, 1], "ties": []}
    group = encode_groups([row], scorer.encoder)[0]
    trained_view = scorer.score_ids(group.seqs)
    served = scorer.score([DIALOGUE, DIALOGUE], ["Bake it.", "No idea."])
    np.testing.assert_allclose(trained_view, served, atol=1e-6)


def test_without_a_template_or_with_it_off_the_pair_encoding_stays(tiny_qwen2, tiny_bert):
    tok = load_tokenizer(str(tiny_qwen2))
    enc = Encoder(tok, 128, chat=False)
    ids, _ = enc.encode(["Hi"], ["Hello"])[0]
    assert ids == enc.tokenize(["Hi"])[0] + enc.tokenize(["Hello"])[0] + [tok.eos_token_id]
    bert = load_tokenizer(str(tiny_bert))
    from rmcore.batching import uses_chat_template

    assert not uses_chat_template("auto", bert) and not uses_chat_template("off", tok) and uses_chat_template("auto", tok)


@pytest.mark.parametrize("bias", [0.0, 0.37])
def test_decoder_export_logits_equal_rmflow_rewards(tiny_qwen2, tmp_path, bias):
    model_dir = saved_decoder(tmp_path / "rm", tiny_qwen2, bias=bias)
    written = export_hf(model_dir, tmp_path / "hf")
    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf", num_labels=1).eval()
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert hf.config.num_labels == 1 and tok.pad_token_id != tok.eos_token_id == load_tokenizer(str(tiny_qwen2)).eos_token_id
    scorer = RewardScorer(model_dir)
    items = synthetic_items(6, 4, seed=4)
    prompts = [i.prompt for i in items for _ in i.responses]
    responses = [r for i in items for r in i.responses]
    seqs = scorer.encode(prompts, responses)
    expected = scorer.score_ids(seqs)
    for side in ("right", "left"):
        batch = tok.pad({"input_ids": seqs}, padding=True, padding_side=side, return_tensors="pt")
        with torch.no_grad():
            logits = hf(**batch).logits[:, 0].numpy()
        assert np.abs(logits + bias - expected).max() <= 1e-4, side
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["mean"] == pytest.approx(0.5 - bias) and config["std"] == pytest.approx(2.0)
    assert written["reward_bias"] == pytest.approx(bias)


def test_encoder_scalar_head_is_not_exported_and_says_why(tiny_bert, tmp_path):
    model = RewardModel.from_backbone(ModelConfig(backbone=str(tiny_bert), head="scalar"))
    model.save_pretrained(tmp_path / "rm", load_tokenizer(str(tiny_bert)))
    with pytest.raises(ExportUnavailable, match="model.head=seqcls"):
        export_hf(tmp_path / "rm", tmp_path / "hf")


def test_seqcls_export_is_the_trained_classifier(tiny_bert, tmp_path):
    model = RewardModel.from_backbone(ModelConfig(backbone=str(tiny_bert), head="seqcls")).eval()
    model.save_pretrained(tmp_path / "rm", load_tokenizer(str(tiny_bert)))
    export_hf(tmp_path / "rm", tmp_path / "hf")
    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf").eval()
    scorer = RewardScorer(tmp_path / "rm")
    seqs = scorer.encode(["Question 1: tea?"] * 2, ["Steep it.", "No."])
    batch = AutoTokenizer.from_pretrained(tmp_path / "hf").pad({"input_ids": seqs}, padding=True, return_tensors="pt")
    with torch.no_grad():
        np.testing.assert_allclose(hf(**batch).logits[:, 0].numpy(), scorer.score_ids(seqs), atol=1e-4)


def test_normalised_rewards_on_held_out_data_have_mean_0_and_std_1(tiny_bert, synthetic_dataset, tmp_path):
    from rmcore.config import RunConfig
    from rmcore.dataset import load_groups
    from rmflow.tasks.train import train_model

    cfg = RunConfig.model_validate({"model": {"backbone": str(tiny_bert), "max_length": 96}, "optim": {"lr": 3e-3, "epochs": 1}})
    trained = train_model(cfg, synthetic_dataset, tmp_path / "rm")
    stats = read_meta(trained.model_dir)["reward_stats"]
    assert trained.summary["reward_std"] == pytest.approx(stats["std"]) and stats["std"] > 0
    scorer = RewardScorer(trained.model_dir)
    held_out = [(r["prompt"], c) for split in ("validation", "test") for r in load_groups(synthetic_dataset)[split] for c in r["completions"]]
    z = scorer.score([p for p, _ in held_out], [c for _, c in held_out], normalize=True)
    raw = scorer.score([p for p, _ in held_out], [c for _, c in held_out])
    assert abs(z.mean()) < 0.2 and 0.8 < z.std() < 1.25, (z.mean(), z.std())
    np.testing.assert_allclose(z, (raw - stats["mean"]) / stats["std"], atol=1e-5)


def test_normalize_without_statistics_is_an_error_not_a_no_op(tiny_bert, tmp_path):
    model = RewardModel.from_backbone(ModelConfig(backbone=str(tiny_bert)))
    model.save_pretrained(tmp_path / "rm", load_tokenizer(str(tiny_bert)))
    with pytest.raises(ValueError, match="no reward statistics"):
        RewardScorer(tmp_path / "rm").score(["a"], ["b"], normalize=True)


@pytest.mark.slow
def test_trl_grpo_loads_the_export_as_its_reward_model_and_scores_like_rmflow(tiny_qwen2, tmp_path):
    """TRL's GRPOTrainer takes the export folder as a reward function (it loads it with
    AutoModelForSequenceClassification, num_labels=1) and, on conversational data, formats with the
    chat template exactly as rmflow does: same rewards."""
    from datasets import Dataset
    from transformers import Qwen2Config, Qwen2ForCausalLM
    from trl import GRPOConfig, GRPOTrainer

    model_dir = saved_decoder(tmp_path / "rm", tiny_qwen2)
    export_hf(model_dir, tmp_path / "hf")
    tok = load_tokenizer(str(tiny_qwen2))
    policy_cfg = Qwen2Config.from_pretrained(tiny_qwen2)
    policy = Qwen2ForCausalLM(policy_cfg)
    policy.save_pretrained(tmp_path / "policy")
    tok.save_pretrained(tmp_path / "policy")
    prompts = [[{"role": "user", "content": i.prompt}] for i in synthetic_items(4, 4, seed=5)]
    args = GRPOConfig(output_dir=str(tmp_path / "grpo"), per_device_train_batch_size=2, num_generations=2, max_steps=1,
                      max_completion_length=4, report_to=[], use_cpu=True, logging_steps=1, bf16=False)
    trainer = GRPOTrainer(model=str(tmp_path / "policy"), reward_funcs=[str(tmp_path / "hf")], args=args,
                          train_dataset=Dataset.from_list([{"prompt": p} for p in prompts]), processing_class=tok)
    assert isinstance(trainer.reward_funcs[0], torch.nn.Module)
    completions = [[{"role": "assistant", "content": r}] for r in ("Steep tea for three minutes.", "I am not sure.")]
    inputs = [{"prompt": prompts[0], "completion": c} for c in completions]
    rewards = trainer._calculate_rewards(inputs, [prompts[0]] * 2, completions, [[0], [0]])
    expected = RewardScorer(model_dir).score([prompts[0][0]["content"]] * 2, [c[0]["content"] for c in completions])
    np.testing.assert_allclose(rewards[:, 0].cpu().numpy(), expected, atol=1e-4)
