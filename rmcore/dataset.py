"""Rankings → a versioned preference dataset on disk.

Layout of a dataset folder:
  pairs/       DatasetDict (train/validation/test): one row per strict human preference
  groups/      DatasetDict: one row per (prompt, annotator) ranking, the K-wise view
  rankings.jsonl   the de-duplicated `Ranking` records (lineage; re-conversion)
  quarantine.jsonl every record that could not be used, with the reason
  manifest.json    counts, sources + sha256, options, and `version`

`version` is a content hash of the rankings, the conversion options and the source files, so the
same inputs and options give the same version and any change gives a new one. Splits are by a hash
of the prompt text: deterministic, and no prompt lands in two splits.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import datasets

from rmcore.converters.common import ConversionResult, group_from_ranking, is_intransitive, judgements_of, pairs_from_group
from rmcore.records import RankedGroup, content_hash

SPLITS = ("train", "validation", "test")
FORMAT = 1

PAIR_FEATURES = datasets.Features(
    {
        "prompt_id": datasets.Value("string"),
        "prompt": datasets.Value("string"),
        "chosen": datasets.Value("string"),
        "rejected": datasets.Value("string"),
        "margin": datasets.Value("float32"),
        "weight": datasets.Value("float32"),
        "group_id": datasets.Value("string"),
        "annotator": datasets.Value("string"),
    }
)
GROUP_FEATURES = datasets.Features(
    {
        "group_id": datasets.Value("string"),
        "prompt_id": datasets.Value("string"),
        "prompt": datasets.Value("string"),
        "completions": datasets.Sequence(datasets.Value("string")),
        "blocks": datasets.Sequence(datasets.Value("int32")),
        "pairs": datasets.Sequence(datasets.Sequence(datasets.Value("int32"), length=2)),
        "margins": datasets.Sequence(datasets.Value("float32")),
        "ties": datasets.Sequence(datasets.Sequence(datasets.Value("int32"), length=2)),
        "annotator": datasets.Value("string"),
    }
)


STRENGTH_FEATURES = datasets.Features({
    **GROUP_FEATURES,
    "strengths": datasets.Sequence(datasets.Value("float32")),
    "strength_std": datasets.Sequence(datasets.Value("float32")),
    "smoothing": datasets.Sequence(datasets.Value("float32")),
})


def parse_fractions(spec: str) -> tuple[float, float, float]:
    """"0.8,0.1,0.1" → train, validation, test fractions (non-negative, summing to 1)."""
    try:
        parts = tuple(float(x) for x in spec.split(","))
    except ValueError:
        raise ValueError(f"--split must be three numbers, got {spec!r}") from None
    if len(parts) != 3 or abs(sum(parts) - 1) > 1e-6 or min(parts) < 0:
        raise ValueError(f"--split must be three non-negative fractions summing to 1, got {spec!r}")
    return parts  # type: ignore[return-value]


def unit_hash(text: str) -> float:
    """A deterministic number in [0, 1) from a text's hash."""
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") / 2**64


def split_of(prompt: str, fractions: tuple[float, float, float]) -> str:
    """Deterministic split from the prompt text's hash."""
    u = unit_hash(prompt)
    if u < fractions[0]:
        return "train"
    return "validation" if u < fractions[0] + fractions[1] else "test"


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _atomic_replace(tmp: Path, final: Path) -> None:
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)


def write_preference_dataset(
    result: ConversionResult,
    out_dir: Path,
    options: dict[str, Any],
    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
) -> dict[str, Any]:
    """Writes the dataset folder and returns its manifest (the conversion summary)."""
    seen: set[str] = set()
    rankings = []
    for r in result.rankings:
        fp = r.fingerprint()
        if fp not in seen:
            seen.add(fp)
            rankings.append(r)
    groups = [group_from_ranking(r) for r in rankings]
    by_split: dict[str, list[RankedGroup]] = {s: [] for s in SPLITS}
    for g in groups:
        by_split[split_of(g.prompt, fractions)].append(g)

    sources = [{"path": str(p), "sha256": file_sha256(p)} for p in result.sources if Path(p).is_file()]
    version = content_hash(
        {
            "format": FORMAT,
            "rankings": sorted(seen),
            "options": options,
            "fractions": fractions,
            "sources": sorted(s["sha256"] for s in sources),
        }
    )[:16]
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out_dir, prefix=".staging-"))
    pairs_dd = datasets.DatasetDict(
        {s: _table([asdict(p) for g in gs for p in pairs_from_group(g)], PAIR_FEATURES) for s, gs in by_split.items()}
    )
    groups_dd = datasets.DatasetDict({s: _table([asdict(g) for g in gs], GROUP_FEATURES) for s, gs in by_split.items()})
    pairs_dd.save_to_disk(str(staging / "pairs"))
    groups_dd.save_to_disk(str(staging / "groups"))
    for name in ("pairs", "groups"):
        _atomic_replace(staging / name, out_dir / name)
    shutil.rmtree(staging)

    _write_jsonl(out_dir / "rankings.jsonl", (r.to_dict() for r in rankings))
    _write_jsonl(out_dir / "quarantine.jsonl", (asdict(q) for q in result.quarantined))
    manifest = {
        "version": version,
        "prompts": len({g.prompt_id for g in groups}),
        "pairs": sum(len(g.pairs) for g in groups),
        "ties": sum(len(g.ties) for g in groups),
        "groups": len(groups),
        "quarantined": len(result.quarantined),
        "cancelled": result.cancelled,
        "superseded": result.superseded,
        "relabelled": result.relabelled,
        "duplicates": len(result.rankings) - len(rankings),
        "intransitive": sum(1 for r in rankings if is_intransitive(judgements_of(r))),
        "splits": {s: pairs_dd[s].num_rows for s in SPLITS},
        "split_groups": {s: len(by_split[s]) for s in SPLITS},
        "sources": sources,
        "options": options,
        "fractions": list(fractions),
        "created_at": datetime.now(timezone.utc).isoformat(),
    }
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest


def _table(rows: list[dict[str, Any]], features: datasets.Features) -> datasets.Dataset:
    """Column-wise, so an empty split keeps its schema."""
    return datasets.Dataset.from_dict({k: [r[k] for r in rows] for k in features}, features=features)


def _write_jsonl(path: Path, rows: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")


def read_manifest(data_dir: Path) -> dict[str, Any]:
    path = Path(data_dir) / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"{data_dir} is not an rmflow dataset (no manifest.json); run `rmflow convert` first")
    return json.loads(path.read_text())


def load_pairs(data_dir: Path) -> datasets.DatasetDict:
    return _load_splits(Path(data_dir), "pairs", PAIR_FEATURES)


def load_groups(data_dir: Path) -> datasets.DatasetDict:
    return _load_splits(Path(data_dir), "groups", GROUP_FEATURES)


def write_derived_dataset(data_dir: Path, out_dir: Path, split_rows: dict[str, list[dict[str, Any]]], derivation: dict[str, Any]) -> dict[str, Any]:
    """A new dataset version from `data_dir` whose groups are replaced split by split with
    `split_rows` (which may carry per-pair strength columns); splits not given are kept as they are.
    The version hashes the parent version, the derivation and the new rows."""
    parent = read_manifest(data_dir)
    groups = load_groups(data_dir)
    fill = {"strengths": [], "strength_std": [], "smoothing": []}
    rows = {s: [{**fill, **r} for r in split_rows.get(s, groups[s].to_list())] for s in SPLITS}
    version = content_hash({"parent": parent["version"], "derivation": derivation, "rows": split_rows})[:16]
    out_dir.mkdir(parents=True, exist_ok=True)
    datasets.DatasetDict({s: _table(r, STRENGTH_FEATURES) for s, r in rows.items()}).save_to_disk(str(out_dir / "groups"))
    pairs = {s: [{"prompt_id": g["prompt_id"], "prompt": g["prompt"], "chosen": g["completions"][w], "rejected": g["completions"][l],
                  "margin": m, "weight": 1.0, "group_id": g["group_id"], "annotator": g["annotator"]}
                 for g in r for (w, l), m in zip(g["pairs"], g["margins"])] for s, r in rows.items()}
    datasets.DatasetDict({s: _table(p, PAIR_FEATURES) for s, p in pairs.items()}).save_to_disk(str(out_dir / "pairs"))
    manifest = {**parent, "version": version, "parent_version": parent["version"], "derivation": derivation,
                "splits": {s: len(p) for s, p in pairs.items()}, "split_groups": {s: len(r) for s, r in rows.items()},
                "created_at": datetime.now(timezone.utc).isoformat()}
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest


def _load_splits(data_dir: Path, view: str, features: datasets.Features) -> datasets.DatasetDict:
    """Split by split: `datasets` cannot load back a split saved with zero rows, so an empty one is
    rebuilt from the schema."""
    manifest = read_manifest(data_dir)
    out = {}
    for split in SPLITS:
        if manifest["splits" if view == "pairs" else "split_groups"][split] == 0:
            out[split] = _table([], features)
        else:
            out[split] = datasets.load_from_disk(str(data_dir / view / split))
    return datasets.DatasetDict(out)
