"""Scoring (prompt, response) pairs with a saved reward model folder — the consumer-side API.

    from rmcore.scoring import RewardScorer
    scorer = RewardScorer("path/to/model")
    rewards = scorer.score(["How do I brew tea?"], ["Steep it for three minutes."])

Registry URIs (`models:/NAME@champion`) are resolved by `rmflow.infra.model_uri.load_scorer`:
rmcore does no service I/O.
"""
from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from rmcore.batching import Encoder, uses_chat_template
from rmcore.inference import resolve_device, score_sequences
from rmcore.model import RewardModel, read_meta


class RewardScorer:
    def __init__(self, model_dir: str | Path, device: str = "auto", dtype: str = "auto") -> None:
        """`dtype`: auto = bfloat16 autocast on GPU, float32 on CPU; bfloat16 = autocast on CPU too
        (about 1.5-2x faster on CPUs with AVX512-BF16, rewards off by ~1e-2); float32 = exact everywhere."""
        if dtype not in ("auto", "float32", "bfloat16"):
            raise ValueError(f"dtype must be auto, float32 or bfloat16, got {dtype!r}")
        self.dtype = dtype
        self.model, self.tokenizer = RewardModel.load(model_dir)
        self.stats = read_meta(model_dir).get("reward_stats")  # mean/std over the training completions
        self.device = resolve_device(device)
        self.model.to(self.device).eval()
        # the same encoding as in training: the model's config and its saved tokenizer decide
        self.encoder = Encoder(self.tokenizer, self.model.cfg.max_length,
                               chat=uses_chat_template(self.model.cfg.chat_template, self.tokenizer))

    @property
    def input_format(self) -> str:
        return "chat_template" if self.encoder.chat else "pair"

    def encode(self, prompts: list[str], responses: list[str]) -> list[list[int]]:
        return [ids for ids, _ in self.encoder.encode(prompts, responses)]

    @torch.no_grad()
    def score_ids(self, seqs: list[list[int]], batch_size: int = 64, max_tokens: int = 0) -> np.ndarray:
        """Rewards of `seqs`: forward chunks of `batch_size` sequences, or, with `max_tokens`, of at
        most that many padded tokens each (length-sorted: short texts are not padded to a long one)."""
        dtype = "float32" if self.dtype == "float32" else "auto"  # score_sequences: bfloat16 autocast on GPU under auto
        cpu_bf16 = self.dtype == "bfloat16" and self.device.type == "cpu"
        with torch.autocast("cpu", dtype=torch.bfloat16) if cpu_bf16 else nullcontext():
            if max_tokens:
                return score_sequences(self.model, seqs, self.tokenizer.pad_token_id, self.device, max_tokens, dtype).float().cpu().numpy()
            out = [score_sequences(self.model, seqs[i:i + batch_size], self.tokenizer.pad_token_id, self.device, 0, dtype).cpu().numpy()
                   for i in range(0, len(seqs), batch_size)]
        return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)

    def score(self, prompts: list[str], responses: list[str], batch_size: int = 64, normalize: bool = False) -> np.ndarray:
        rewards = self.score_ids(self.encode(prompts, responses), batch_size)
        return self.normalize(rewards) if normalize else rewards

    def normalize(self, rewards: np.ndarray) -> np.ndarray:
        """(r - mean) / std with the training completions' statistics; an error, never a silent
        no-op, when the model has none."""
        if not self.stats:
            raise ValueError("this model has no reward statistics (trained before rmflow recorded them): cannot normalize")
        return ((np.asarray(rewards, dtype=np.float64) - self.stats["mean"]) / max(self.stats["std"], 1e-8)).astype(np.float32)

    def prefix_rewards(self, prompt: str, response: str, max_tokens: int = 64) -> tuple[list[str], np.ndarray]:
        """Per-token reward probe: the reward of every prefix of `response` (first `max_tokens`
        tokens), to see on which tokens the reward moves."""
        r_ids = self.encoder.tokenize([response])[0][:max_tokens]
        if self.encoder.chat:  # the template wraps text: each prefix is rendered as the assistant's turn
            prefixes = [self.tokenizer.decode(r_ids[:t]) for t in range(1, len(r_ids) + 1)]
            seqs = self.encode([prompt] * len(prefixes), prefixes)
        else:
            p_ids = self.encoder.tokenize([prompt])[0]
            seqs = [self.encoder.join(p_ids, r_ids[:t])[0] for t in range(1, len(r_ids) + 1)]
        return self.tokenizer.convert_ids_to_tokens(r_ids), self.score_ids(seqs)


def reward_stats(scorer: RewardScorer, group_rows: list[dict], max_completions: int = 4096) -> dict[str, float]:
    """Mean and std of the rewards of the (prompt, completion) pairs in `group_rows` (each unique
    pair once; an evenly spaced subset of `max_completions` when there are more)."""
    pairs = list(dict.fromkeys((r["prompt"], c) for r in group_rows for c in r["completions"]))
    if not pairs:
        raise ValueError("no completions to measure reward statistics on")
    step = max(1, len(pairs) // max_completions)
    pairs = pairs[::step][:max_completions]
    rewards = scorer.score([p for p, _ in pairs], [c for _, c in pairs]).astype(np.float64)
    return {"mean": float(rewards.mean()), "std": float(rewards.std()), "n": len(pairs)}
