"""`rmflow bench packing`: padded batch-of-8 vs length-bucketed vs packed, one random-init decoder,
real hh-rlhf lengths, the same run.

- padded-batch-of-8: TRL's way: 8 pairs a step, chosen and rejected padded to the longest of the
  16, batches in data order.
- bucketed: rmflow's loop with `--packing off`: whole prompt groups, length-bucketed steps, forward
  chunks of at most `--max-tokens` padded tokens.
- packed: rmflow's loop with `--packing on`: the same steps and forwards, shorter sequences moved into
  the padding of other rows (see `rmcore.batching.pack_chunks`).

The decoder is Qwen2-shaped with random weights (`--size`: tiny for CPU; 0.5b, 1.5b for a GPU) over
the MiniLM tokenizer's ids. Reported per system: pairs/s, useful (non-pad) tokens/s, the padding
fraction of what was computed and, on CUDA, MFU on useful tokens: 6 · non-embedding params ·
useful tokens / s / the bf16 matmul peak measured here. One JSON line per system; the last line
holds them all.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from rmcore.batching import EncodedGroup, Encoder, encode_groups
from rmcore.config import RunConfig
from rmcore.model import RewardModel, load_tokenizer, resolve_backbone
from rmcore.train import split_rows, train_reward_model
from rmflow.bench.train_vs_trl import emit, prepare

SIZES = {  # hidden, layers, heads, kv heads, intermediate (Qwen2-0.5B and -1.5B shapes; tiny for CPU)
    "tiny": (256, 4, 4, 2, 1024),
    "0.5b": (896, 24, 14, 2, 4864),
    "1.5b": (1536, 28, 12, 2, 8960),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="tiny", choices=list(SIZES))
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--shared", type=Path, default=Path(__file__).resolve().parents[1].parent / "shared" / "data")
    p.add_argument("--tokenizer", default="minilm", help="The decoder's tokenizer: `minilm` or a folder of its files.")
    p.add_argument("--limit", type=int, default=None, help="Use only the first N hh-rlhf records.")
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--pairs-per-step", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=None, help="Tokens per forward (default 16384 on CUDA, 4096 on CPU).")
    p.add_argument("--baseline-steps", type=int, default=20, help="Timed steps of the padded batch-of-8 loop.")
    p.add_argument("--systems", default="padded-batch-of-8,bucketed,packed")
    args = p.parse_args(argv)
    args.max_tokens = args.max_tokens or (16384 if args.device == "cuda" else 4096)
    args.systems = args.systems.split(",")
    unknown = set(args.systems) - {"padded-batch-of-8", "bucketed", "packed"}
    if unknown:
        p.error(f"unknown systems: {', '.join(sorted(unknown))}")
    return args


def random_decoder(size: str, out: Path, device: str, tokenizer: str = "minilm") -> int:
    """Saves a random Qwen2-shaped decoder (with the MiniLM tokenizer, or the one in the folder
    `tokenizer`) to `out`; returns its non-embedding parameter count."""
    from transformers import Qwen2Config, Qwen2Model

    hidden, layers, heads, kv, inter = SIZES[size]
    tok = load_tokenizer(resolve_backbone(tokenizer))
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv, intermediate_size=inter, max_position_embeddings=4096,
                      pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2Model(cfg)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return sum(p.numel() for n, p in model.named_parameters() if "embed" not in n)


def measured_peak_tflops() -> float:
    """bf16 matmul throughput of this GPU (8192³, 20 reps), the MFU denominator."""
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start, reps = time.perf_counter(), 20
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize()
    return 2 * 8192**3 * reps / (time.perf_counter() - start) / 1e12


def padded_batch_of_8(cfg: RunConfig, groups: list[EncodedGroup], steps: int, pad_id: int, device: torch.device) -> dict[str, float]:
    """TRL-style steps: 8 pairs, chosen and rejected padded to the longest, no bucketing."""
    model = RewardModel.from_backbone(cfg.model, pad_id).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr)
    seqs = [s for g in groups for s in g.seqs[:2]]
    useful = computed = 0
    start = 0.0
    for step in range(steps + 2):  # two warm-up steps
        if step == 2:
            _sync(device)
            start, useful, computed = time.perf_counter(), 0, 0
        at = (step * 16) % max(1, len(seqs) - 16)
        batch = seqs[at:at + 16]
        width = max(len(s) for s in batch)
        ids = torch.full((len(batch), width), pad_id, device=device)
        mask = torch.zeros_like(ids)
        for i, s in enumerate(batch):
            ids[i, :len(s)] = torch.tensor(s, device=device)
            mask[i, :len(s)] = 1
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            r = model(ids, mask)
        (-torch.nn.functional.logsigmoid(r[0::2] - r[1::2]).mean()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        useful += int(mask.sum())
        computed += mask.numel()
    _sync(device)
    seconds = time.perf_counter() - start
    return {"pairs_per_s": 8 * steps / seconds, "useful_tokens": useful, "computed_tokens": computed, "seconds": seconds}


def rmflow_loop(cfg: RunConfig, data: Path, groups: list[EncodedGroup], packing: bool) -> dict[str, float]:
    """One epoch of rmflow's own training loop (in-process), padded-bucketed or packed."""
    from rmcore.batching import collate, pack_chunks, pad_chunks, plan_batches

    run = cfg.model_copy(update={"optim": cfg.optim.model_copy(update={"packing": "on" if packing else "off"})})
    summary = train_reward_model(run, data, None)
    useful = sum(g.tokens for g in groups)
    # what the forwards computed, pad included, over the loop's own step plan (one worker, one epoch)
    chunks = pack_chunks if packing else pad_chunks
    steps = plan_batches(groups, cfg.optim.pairs_per_step, cfg.optim.seed, 0)
    computed = sum(c[1].numel() for b in steps for c in chunks(collate([groups[i] for i in b]).seqs, 0, cfg.optim.max_tokens_per_forward))
    return {"pairs_per_s": summary["pairs_per_s"], "useful_tokens": useful, "computed_tokens": computed,
            "seconds": summary["train_s"]}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = torch.device(args.device)
    peak = measured_peak_tflops() if device.type == "cuda" else None
    rows = []
    with tempfile.TemporaryDirectory() as work:
        data = prepare("hh-rlhf", args.shared, Path(work), args.limit)
        backbone = Path(work) / "decoder"
        params = random_decoder(args.size, backbone, args.device, args.tokenizer)
        cfg = RunConfig.model_validate({
            "model": {"backbone": str(backbone), "max_length": args.max_length, "head": "scalar", "dtype": "bfloat16"},
            "optim": {"pairs_per_step": args.pairs_per_step, "max_tokens_per_forward": args.max_tokens, "lr": 1e-5},
            "device": args.device})
        tok = load_tokenizer(str(backbone))
        groups = encode_groups(split_rows(data, "train"), Encoder(tok, args.max_length))
        for system in args.systems:
            if system == "padded-batch-of-8":
                m = padded_batch_of_8(cfg, groups, args.baseline_steps, tok.pad_token_id, device)
            else:
                m = rmflow_loop(cfg, data, groups, packing=system == "packed")
            row = {"bench": "packing", "system": system, "size": args.size, "device": args.device,
                   "params_non_embedding": params, "pairs_per_s": round(m["pairs_per_s"], 2),
                   "useful_tokens_per_s": round(m["useful_tokens"] / m["seconds"], 1),
                   "padding": round(1 - m["useful_tokens"] / m["computed_tokens"], 3),
                   "mfu": round(6 * params * m["useful_tokens"] / m["seconds"] / (peak * 1e12), 4) if peak else None,
                   "peak_tflops": round(peak, 1) if peak else None}
            rows.append(row)
            emit(row)
    base = {r["system"]: r["pairs_per_s"] for r in rows}
    for r in rows:
        r["vs_padded8"] = round(r["pairs_per_s"] / base["padded-batch-of-8"], 2) if "padded-batch-of-8" in base else None
        r["vs_bucketed"] = round(r["pairs_per_s"] / base["bucketed"], 3) if "bucketed" in base else None
    _table(rows)
    result = {"bench": "packing", "rows": rows}
    print(json.dumps(result), flush=True)
    return result


def _table(rows: list[dict[str, Any]]) -> None:
    print("| system | size | device | pairs/s | useful tok/s | padding | MFU | vs padded-8 | vs bucketed |", file=sys.stderr)
    print("|---|---|---|---:|---:|---:|---:|---:|---:|", file=sys.stderr)
    for r in rows:
        print(f"| {r['system']} | {r['size']} | {r['device']} | {r['pairs_per_s']} | {r['useful_tokens_per_s']} | {r['padding']} "
              f"| {r['mfu'] if r['mfu'] is not None else '–'} | {r['vs_padded8']} | {r['vs_bucketed']} |", file=sys.stderr)


if __name__ == "__main__":
    main()
