"""Useful-token MFU on one GPU: a random-init decoder (~0.5B or ~1.5B, Qwen2-like shapes), bf16,
real hh-rlhf lengths, rmflow's loop (length-bucketed, unique sequences) vs a padded batch-of-8 loop.

MFU = 6 · params · non-pad tokens / seconds / measured bf16 peak (a large matmul timed here).
Run on the device machine: `python -m rmflow.bench.gpu_mfu --size 0.5b` (add `--workers 1` to go
through Ray Train with one GPU worker).
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from rmcore.batching import Encoder, encode_groups
from rmcore.config import RunConfig
from rmcore.model import load_tokenizer, resolve_backbone
from rmcore.train import split_rows
from rmflow.bench.train_vs_trl import prepare

SIZES = {  # hidden, layers, heads, kv heads, intermediate
    "0.5b": (896, 24, 14, 2, 4864),
    "1.5b": (1536, 28, 12, 2, 8960),
}


def measured_peak_tflops(device: str) -> float:
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start, reps = time.perf_counter(), 20
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize()
    return 2 * 8192**3 * reps / (time.perf_counter() - start) / 1e12


def random_decoder(size: str, vocab: int, out: Path) -> int:
    from transformers import LlamaConfig, LlamaModel

    hidden, layers, heads, kv, inter = SIZES[size]
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv, intermediate_size=inter, max_position_embeddings=4096, torch_dtype="bfloat16")
    with torch.device("cuda"):
        model = LlamaModel(cfg)
    model.save_pretrained(out)
    load_tokenizer(resolve_backbone("minilm")).save_pretrained(out)  # real token ids, random weights
    return sum(p.numel() for n, p in model.named_parameters() if "embed" not in n)


def padded_baseline(model, groups, steps: int, pad_id: int, max_length: int) -> tuple[float, int]:
    """TRL-style: 8 pairs a step, chosen and rejected padded to the longest, no bucketing."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    seqs = [s for g in groups for s in g.seqs[:2]]
    tokens, start = 0, None
    for step in range(steps + 2):
        if step == 2:
            torch.cuda.synchronize()
            start, tokens = time.perf_counter(), 0
        batch = seqs[(step * 16) % len(seqs):(step * 16) % len(seqs) + 16]
        width = max(len(s) for s in batch)
        ids = torch.full((len(batch), width), pad_id, device="cuda")
        mask = torch.zeros_like(ids)
        for i, s in enumerate(batch):
            ids[i, :len(s)] = torch.tensor(s, device="cuda")
            mask[i, :len(s)] = 1
        with torch.autocast("cuda", dtype=torch.bfloat16):
            r = model(ids, mask)
        (-torch.nn.functional.logsigmoid(r[0::2] - r[1::2]).mean()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens += int(mask.sum())
    torch.cuda.synchronize()
    return time.perf_counter() - start, tokens


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--size", default="0.5b", choices=list(SIZES))
    p.add_argument("--shared", type=Path, default=Path(__file__).resolve().parents[1].parent / "shared" / "data")
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--pairs-per-step", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=32768)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--baseline-steps", type=int, default=20)
    args = p.parse_args(argv)
    peak = measured_peak_tflops("cuda")
    with tempfile.TemporaryDirectory() as work:
        data = prepare("hh-rlhf", args.shared, Path(work), None)
        backbone = Path(work) / "decoder"
        params = random_decoder(args.size, 30522, backbone)
        cfg = RunConfig.model_validate({
            "model": {"backbone": str(backbone), "max_length": args.max_length, "head": "scalar", "dtype": "bfloat16"},
            "optim": {"pairs_per_step": args.pairs_per_step, "max_tokens_per_forward": args.max_tokens, "lr": 1e-5},
            "scale": {"workers": args.workers, "use_gpu": args.workers > 0}, "device": "cuda"})
        from rmflow.infra.ray_train import fit

        summary = fit(cfg, data, Path(work) / "model")
        groups = encode_groups(split_rows(data, "train"), Encoder(load_tokenizer(str(backbone)), args.max_length))
        useful = sum(g.tokens for g in groups)
        ours_mfu = 6 * params * useful / summary["train_s"] / (peak * 1e12)
        print(json.dumps({"system": "rmflow", "size": args.size, "params_non_embedding": params, "pairs_per_s": summary["pairs_per_s"],
                          "useful_tokens": useful, "train_s": summary["train_s"], "peak_tflops": round(peak, 1),
                          "mfu": round(ours_mfu, 4)}), flush=True)
        from rmcore.model import RewardModel

        model = RewardModel.from_backbone(cfg.model, 0).cuda()
        seconds, tokens = padded_baseline(model, groups, args.baseline_steps, 0, args.max_length)
        print(json.dumps({"system": "padded-batch-of-8", "size": args.size, "pairs_per_s": round(8 * args.baseline_steps / seconds, 2),
                          "mfu": round(6 * params * tokens / seconds / (peak * 1e12), 4)}), flush=True)


if __name__ == "__main__":
    main()
