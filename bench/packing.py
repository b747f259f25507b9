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
useful tokens / s over the GPU's datasheet bf16 dense peak (`DATASHEET_BF16_DENSE_TFLOPS`, by device
name; an unknown GPU gets `mfu` null and `mfu_basis` saying so), with the bf16 matmul peak measured
here and the MFU against it beside it. Every system is timed the same way: `WARMUP` untimed steps,
then the timed steps, the GPU synchronised before the clock starts and before it stops. One JSON line
per system; the last line holds them all.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from rmcore.batching import EncodedGroup, Encoder, encode_groups
from rmcore.config import RunConfig
from rmcore.model import RewardModel, load_tokenizer, resolve_backbone
from rmcore.train import split_rows
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


# bf16 dense tensor-core peak, TFLOP/s, from NVIDIA's datasheets (no sparsity); the first name found in
# torch.cuda.get_device_name() wins, so the variants come before the plain names
DATASHEET_BF16_DENSE_TFLOPS = (("H200 NVL", 835.0), ("H200", 989.0), ("H100 NVL", 835.0), ("H100 PCIe", 756.0), ("H100", 989.0),
                               ("A100", 312.0), ("L40S", 362.0))
WARMUP = 2  # untimed steps of every system


def datasheet_peak_tflops(device_name: str) -> float | None:
    return next((tf for key, tf in DATASHEET_BF16_DENSE_TFLOPS if key in device_name), None)


def timed(step: Callable[[int], tuple[int, int, int]], steps: int, device: torch.device) -> dict[str, float]:
    """`step(i)` → (pairs, useful tokens, computed tokens), WARMUP untimed steps then `steps` timed ones."""
    for i in range(WARMUP):
        step(i)
    _sync(device)
    start = time.perf_counter()
    pairs = useful = computed = 0
    for i in range(WARMUP, WARMUP + steps):
        p, u, c = step(i)
        pairs, useful, computed = pairs + p, useful + u, computed + c
    _sync(device)
    seconds = time.perf_counter() - start
    return {"pairs_per_s": pairs / seconds, "useful_tokens": useful, "computed_tokens": computed, "seconds": seconds}


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

    def step(i: int) -> tuple[int, int, int]:
        at = (i * 16) % max(1, len(seqs) - 16)
        batch = seqs[at:at + 16]
        width = max(len(s) for s in batch)
        ids = torch.full((len(batch), width), pad_id, device=device)
        mask = torch.zeros_like(ids)
        for row, s in enumerate(batch):
            ids[row, :len(s)] = torch.tensor(s, device=device)
            mask[row, :len(s)] = 1
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            r = model(ids, mask)
        (-torch.nn.functional.logsigmoid(r[0::2] - r[1::2]).mean()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return len(batch) // 2, sum(len(s) for s in batch), ids.numel()

    return timed(step, steps, device)


def rmflow_loop(cfg: RunConfig, data: Path, groups: list[EncodedGroup], packing: bool, device: torch.device) -> dict[str, float]:
    """rmflow's own training step (`TrainLoop.step`: token-capped micro-batches, forward and backward,
    optimiser step) over epoch 0's batch plan, padded-bucketed or packed; WARMUP batches untimed."""
    from rmcore.batching import collate, group_micro_batches, pack_chunks, pad_chunks
    from rmcore.train import TrainLoop, WorkerContext

    run = cfg.model_copy(update={"optim": cfg.optim.model_copy(update={"packing": "on" if packing else "off"})})
    pad_id = load_tokenizer(cfg.model.backbone).pad_token_id
    model = RewardModel.from_backbone(run.model, pad_id).to(device)
    loop = TrainLoop(run, model, model, groups, (split_rows(data, "validation"), []), pad_id,
                     WorkerContext(device=device, show_progress=False), packing)
    batches = [b for b, _ in loop.plan.steps(0)]
    chunks = pack_chunks if packing else pad_chunks

    def step(i: int) -> tuple[int, int, int]:
        batch = [groups[g] for g in batches[i % len(batches)]]
        loop.step([batches[i % len(batches)]])
        computed = sum(c[1].numel() for part in group_micro_batches(batch, cfg.optim.max_tokens_per_forward)
                       for c in chunks(collate([batch[g] for g in part]).seqs, 0, 0))
        return sum(g.num_pairs for g in batch), sum(g.tokens for g in batch), computed

    return timed(step, max(1, len(batches) - WARMUP), device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = torch.device(args.device)
    peak = measured_peak_tflops() if device.type == "cuda" else None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    datasheet = datasheet_peak_tflops(name) if peak else None
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
                m = rmflow_loop(cfg, data, groups, system == "packed", device)
            row = {"bench": "packing", "system": system, "size": args.size, "device": args.device,
                   "params_non_embedding": params, "pairs_per_s": round(m["pairs_per_s"], 2),
                   "useful_tokens_per_s": round(m["useful_tokens"] / m["seconds"], 1),
                   "padding": round(1 - m["useful_tokens"] / m["computed_tokens"], 3),
                   "mfu": round(6 * params * m["useful_tokens"] / m["seconds"] / (datasheet * 1e12), 4) if datasheet else None,
                   "mfu_measured_peak": round(6 * params * m["useful_tokens"] / m["seconds"] / (peak * 1e12), 4) if peak else None,
                   "peak_tflops_datasheet": datasheet, "peak_tflops_measured": round(peak, 1) if peak else None,
                   "mfu_basis": (f"datasheet bf16 dense peak of {name}" if datasheet else
                                 f"{name} is not in the datasheet table: MFU against the measured matmul peak only" if peak else None),
                   "device_name": name, "timing": f"{WARMUP} warm-up steps untimed, synchronised before and after"}
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
