"""`python -m rmflow.bench.storage`: training from the team's bucket vs from local disk, and
checkpoint write/read times, in the same process.

- epoch: one in-process training epoch (`infra.ray_train.fit`, one worker) on a dataset folder vs the
  same dataset version in the bucket (s3://…, copied into a temp folder as every worker does).
  Alternating runs, `--repeats` each; the ratio is of medians.
- checkpoint: a Ray Train-shaped checkpoint (the model's and AdamW's state in one state.pt) written
  and read through pyarrow's filesystems (what Ray Train uses for storage_path): local disk vs bucket.

The bucket: RMFLOW_STORAGE_URL + AWS_* + MLFLOW_S3_ENDPOINT_URL when set, else a local SeaweedFS
started here under a temporary RMFLOW_HOME (and stopped). One JSON line per measurement; the last
line holds them all.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any


def _median_time(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=400, help="Synthetic prompts (K=4) in the dataset.")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--backbone", default="minilm", help="Backbone for the epoch and the checkpoint's size.")
    args = parser.parse_args(argv)

    import torch
    from transformers import AutoModel

    from rmcore.config import RunConfig
    from rmcore.converters.common import ConversionResult
    from rmcore.dataset import write_preference_dataset
    from rmcore.model import resolve_backbone
    from rmcore.synthetic import synthetic_items, synthetic_rankings
    from rmflow.infra import objectstore, team
    from rmflow.infra.ray_train import fit

    work = Path(tempfile.mkdtemp(prefix="rmflow-bench-storage-"))
    started = False
    try:
        if team.settings().storage_url:
            store = team.storage_for(team.settings().storage_url)
        else:
            os.environ["RMFLOW_HOME"] = str(work / "home")
            store, _ = objectstore.up()
            started = True
        os.environ.update(store.env())
        data = work / "ds"
        rankings = synthetic_rankings(synthetic_items(args.prompts, k=4, seed=1), annotators=1, noise=0.3, seed=2)
        write_preference_dataset(ConversionResult(rankings=rankings), data, {"kind": "synthetic"})
        uri = team.publish_dataset(data, store.uri("bench", "datasets", "v1"))
        cfg = RunConfig.model_validate({"model": {"backbone": args.backbone, "max_length": 128}, "optim": {"epochs": 1}})
        rows: list[dict[str, Any]] = []
        times: dict[str, list[float]] = {"disk": [], "bucket": []}
        for i in range(args.repeats):  # alternating, so drift on a shared machine hits both alike
            for name, source in (("disk", data), ("bucket", uri)):
                out = work / f"model-{name}-{i}"
                start = time.perf_counter()
                fit(cfg, source, out)
                times[name].append(time.perf_counter() - start)
                shutil.rmtree(out)
        epoch = {"measure": "epoch", "disk_s": round(statistics.median(times["disk"]), 2),
                 "bucket_s": round(statistics.median(times["bucket"]), 2),
                 "bucket_over_disk": round(statistics.median(times["bucket"]) / statistics.median(times["disk"]), 3),
                 "runs": times, "prompts": args.prompts, "backbone": args.backbone}
        rows.append(epoch)
        print(json.dumps(epoch), flush=True)

        # what rank 0's state.pt holds: the weights and AdamW's two moments per weight
        model = AutoModel.from_pretrained(resolve_backbone(args.backbone))
        optim = torch.optim.AdamW(model.parameters())
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        optim.step()
        state = work / "state.pt"
        torch.save({"model": model.state_dict(), "optim": optim.state_dict()}, state)
        blob = state.read_bytes()
        from pyarrow import fs

        targets = {"disk": (fs.LocalFileSystem(), str(work / "ckpt")), "bucket": (store.pyarrow_fs(), f"{store.bucket}/bench/ckpt")}
        for name, (filesystem, root) in targets.items():
            filesystem.create_dir(root)
            path = f"{root}/state.pt"

            def write(filesystem=filesystem, path=path) -> None:
                with filesystem.open_output_stream(path) as f:
                    f.write(blob)

            def read(filesystem=filesystem, path=path) -> None:
                with filesystem.open_input_stream(path) as f:
                    assert len(f.read()) == len(blob)

            w, r = _median_time(write, args.repeats), _median_time(read, args.repeats)
            row = {"measure": "checkpoint", "target": name, "mb": round(len(blob) / 2**20, 1),
                   "write_s": round(statistics.median(w), 3), "read_s": round(statistics.median(r), 3)}
            rows.append(row)
            print(json.dumps(row), flush=True)
        result = {"storage": rows, "endpoint": store.endpoint_url}
        print(json.dumps(result))
        return result
    finally:
        if started:
            objectstore.down()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
