"""Evaluating a saved reward model on a dataset folder's split or on a raw file."""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rmcore.batching import EncodedGroup, Encoder, encode_groups
from rmcore.converters import convert_file
from rmcore.converters.common import group_from_ranking
from rmcore.dataset import load_groups
from rmcore.model import RewardModel
from rmcore.train import evaluate_groups, resolve_device


def group_rows(data: Path, split: str = "test", kind: str | None = None) -> list[dict[str, Any]]:
    """Rows of the groups view: a dataset folder's split, or a whole raw file read through the
    converter of `kind` (malformed records are skipped, as `rmflow convert` quarantines them)."""
    data = Path(data)
    if data.is_dir():
        return load_groups(data)[split].to_list()
    if kind is None:
        raise ValueError(f"{data} is a file: say its format with --format (label-studio, hh-rlhf, qa-feedback, trl)")
    return [asdict(group_from_ranking(r)) for r in convert_file(kind, data).rankings]


def encode_for_model(rows: list[dict[str, Any]], tokenizer, max_length: int) -> list[EncodedGroup]:
    return encode_groups(rows, Encoder(tokenizer, max_length))


def evaluate_saved_model(
    model_dir: Path, data: Path, split: str = "test", kind: str | None = None, device: str = "auto"
) -> tuple[dict[str, float], np.ndarray]:
    model, tokenizer = RewardModel.load(model_dir)
    dev = resolve_device(device)
    model.to(dev)
    groups = encode_for_model(group_rows(data, split, kind), tokenizer, model.cfg.max_length)
    with torch.no_grad():
        return evaluate_groups(model, groups, tokenizer.pad_token_id, dev, max_tokens=4096)
