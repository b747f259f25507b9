"""Scoring (prompt, response) pairs with a saved reward model — the consumer-side API.

    from rmcore.scoring import load_scorer
    scorer = load_scorer("models:/rmflow-reward@champion")
    rewards = scorer.score(["How do I brew tea?"], ["Steep it for three minutes."])
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from rmcore.batching import Encoder
from rmcore.model import META_FILE, RewardModel
from rmcore.train import resolve_device, score_sequences


class RewardScorer:
    def __init__(self, model_dir: str | Path, device: str = "auto") -> None:
        self.model, self.tokenizer = RewardModel.load(model_dir)
        self.device = resolve_device(device)
        self.model.to(self.device).eval()
        self.encoder = Encoder(self.tokenizer, self.model.cfg.max_length)

    def encode(self, prompts: list[str], responses: list[str]) -> list[list[int]]:
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        p_ids, r_ids = self.encoder.tokenize(list(prompts)), self.encoder.tokenize(list(responses))
        return [self.encoder.join(p, r)[0] for p, r in zip(p_ids, r_ids)]

    @torch.no_grad()
    def score_ids(self, seqs: list[list[int]], batch_size: int = 64) -> np.ndarray:
        out = [score_sequences(self.model, seqs[i:i + batch_size], self.tokenizer.pad_token_id, self.device, 0).cpu().numpy()
               for i in range(0, len(seqs), batch_size)]
        return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)

    def score(self, prompts: list[str], responses: list[str], batch_size: int = 64) -> np.ndarray:
        return self.score_ids(self.encode(prompts, responses), batch_size)

    def prefix_rewards(self, prompt: str, response: str, max_tokens: int = 64) -> tuple[list[str], np.ndarray]:
        """Per-token reward probe: the reward of every prefix of `response` (first `max_tokens`
        tokens), to see on which tokens the reward moves."""
        p_ids = self.encoder.tokenize([prompt])[0]
        r_ids = self.encoder.tokenize([response])[0][:max_tokens]
        seqs = [self.encoder.join(p_ids, r_ids[:t])[0] for t in range(1, len(r_ids) + 1)]
        return self.tokenizer.convert_ids_to_tokens(r_ids), self.score_ids(seqs)


def resolve_model_uri(uri: str | Path) -> Path:
    """A local model folder, or an MLflow URI (`models:/NAME@alias`, `models:/NAME/3`, `runs:/…`)
    downloaded from the tracking server / registry named by MLFLOW_TRACKING_URI."""
    text = str(uri)
    if "://" not in text and ":/" not in text:
        return Path(text)
    import mlflow

    from rmcore.paths import mlflow_tracking_uri

    mlflow.set_tracking_uri(mlflow_tracking_uri())
    local = Path(mlflow.artifacts.download_artifacts(text))
    # a pyfunc logged by rmflow keeps the saved reward model folder under artifacts/
    found = sorted(local.rglob(META_FILE))
    return found[0].parent if found else local


def load_scorer(uri: str | Path, device: str = "auto") -> RewardScorer:
    return RewardScorer(resolve_model_uri(uri), device)
