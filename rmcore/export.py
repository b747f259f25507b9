"""A saved rmflow reward model as a standard Hugging Face reward model: a folder that
`AutoModelForSequenceClassification.from_pretrained(DIR)` loads with `num_labels=1` and its
tokenizer — what TRL's PPO/GRPO reward functions, OpenRLHF's remote RM, vLLM's reward task and
RewardBench expect.

- `seqcls` head (what `model.head=auto` gives encoders such as the default MiniLM, so the default
  champion exports): the trained model already is one; it is written as it was trained. rmflow
  feeds encoders no `token_type_ids`, so they are all 0: score the response as part of one sequence,
  not as a tokenizer's second segment (`rmflow_input` says so).
- decoder + scalar head (last-token pooling): the base model goes into its `*ForSequenceClassification`
  class and rmflow's linear head becomes its `score` layer, so the logits equal rmflow's rewards.
  HF pools at the last token that is not `pad_token_id`; when pad == eos (most decoders) that would
  skip the eos rmflow pools at, so the export gets a pad token of its own. HF's `score` has no
  bias: a non-zero head bias (pairwise losses never move it from its initial 0) is recorded as
  `rmflow_reward_bias` and the logits are the rewards minus it.
- encoder + scalar head (only when asked for: `model.head=scalar`): no exact mapping. HF's encoder
  classifiers read the [CLS] vector through a pooler (dense + tanh) that rmflow's head does not
  have, and rmflow pools the last token by default. Such a model raises `ExportUnavailable`; train
  with the default head for an exportable encoder, or serve it through the pyfunc or `rmflow serve-rm`.

`config.json` carries `mean`/`std` of the rewards over the training completions (OpenRLHF's
`normalize_reward` reads these names; the bias is folded into `mean`), and `rmflow_input`: how
rmflow formatted (prompt, response) into the ids the model saw.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForSequenceClassification

from rmcore.model import RewardModel, read_meta, scalar_head_exportable

PAD_TOKEN = "<|rmflow_pad|>"


class ExportUnavailable(ValueError):
    pass


def export_hf(model_dir: str | Path, out_dir: str | Path) -> dict[str, Any]:
    """Writes the Hugging Face reward model of `model_dir` to `out_dir`; returns what it wrote."""
    model, tok = RewardModel.load(model_dir)
    meta = read_meta(model_dir)
    out = Path(out_dir)
    bias = 0.0
    if model.kind == "seqcls":
        hf = model.backbone
    else:
        config = model.backbone.config
        if not scalar_head_exportable(config) or model.cfg.pooling != "last":
            raise ExportUnavailable(
                f"{type(model.backbone).__name__} with rmflow's scalar head ({model.cfg.pooling} pooling) has no exact "
                "AutoModelForSequenceClassification equivalent (encoder classifiers pool [CLS] through dense+tanh); "
                "train with model.head=seqcls (model.head=auto's choice for encoders) for an exportable encoder, "
                "or use the pyfunc / rmflow serve-rm")
        fields = {k: v for k, v in config.to_dict().items() if k not in ("id2label", "label2id")}
        hf = AutoModelForSequenceClassification.from_config(config.__class__.from_dict({**fields, "num_labels": 1}))
        getattr(hf, hf.base_model_prefix).load_state_dict(model.backbone.state_dict())
        with torch.no_grad():
            hf.score.weight.copy_(model.head.weight)
        bias = float(model.head.bias.item())
        if tok.pad_token_id is None or tok.pad_token_id in (tok.eos_token_id, tok.bos_token_id):
            # HF pools at the last id != pad_token_id: the eos rmflow pools at must not be the pad
            tok.add_special_tokens({"pad_token": PAD_TOKEN})
            hf.resize_token_embeddings(len(tok), mean_resizing=False)  # the pad row is never read
        hf.config.pad_token_id = tok.pad_token_id
    hf.config.num_labels = 1
    hf.config.architectures = [type(hf).__name__]
    stats = meta.get("reward_stats")
    if stats:
        hf.config.mean, hf.config.std = stats["mean"] - bias, stats["std"]
    hf.config.rmflow_reward_bias = bias
    hf.config.rmflow_input = input_format(tok)
    out.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    written = {"kind": model.kind, "architecture": type(hf).__name__, "pad_token_id": tok.pad_token_id,
               "reward_bias": bias, "mean": getattr(hf.config, "mean", None), "std": getattr(hf.config, "std", None)}
    (out / "rmflow_export.json").write_text(json.dumps({**written, "source": meta.get("source")}, indent=2))
    return written


def input_format(tok: Any) -> str:
    """How rmflow turns (prompt, response) into ids for this tokenizer, for the export's users."""
    if tok.sep_token is not None:
        segments = " (token_type_ids all 0)" if "token_type_ids" in tok.model_input_names else ""
        return f"{tok.cls_token or ''} prompt {tok.sep_token} response {tok.sep_token}".strip() + segments
    return f"{tok.bos_token or ''}prompt + response{tok.eos_token or ''} (no separator; the reward is read at the final eos)"
