"""Converters from external preference formats to `Ranking` records, by KIND name."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from rmcore.converters.common import ConversionResult, InvalidRecord, StrictModeError, rankings_from_records
from rmcore.converters.hh_rlhf import ranking_from_hh_record
from rmcore.converters.label_studio import rankings_from_label_studio
from rmcore.converters.qa_feedback import ranking_from_qa_record
from rmcore.converters.trl_format import ranking_from_trl_record

RECORD_PARSERS = {
    "hh-rlhf": ranking_from_hh_record,
    "qa-feedback": ranking_from_qa_record,
    "trl": ranking_from_trl_record,
}
KINDS = ("label-studio", *RECORD_PARSERS)


def convert_file(kind: str, path: Path, strict: bool = False, **label_studio_options: Any) -> ConversionResult:
    """Reads one file of the given KIND. Label Studio options: prompt_field, items_field, label_config."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"input file not found: {path}")
    if kind == "label-studio":
        return rankings_from_label_studio(path, strict=strict, **label_studio_options)
    if kind not in RECORD_PARSERS:
        raise ValueError(f"unknown format {kind!r}; expected one of {', '.join(KINDS)}")
    return rankings_from_records(path, RECORD_PARSERS[kind], strict)


def convert_to_dataset(kind: str, path: Path, out: Path, strict: bool = False, split: str = "0.8,0.1,0.1",
                       prompt_field: str | None = None, items_field: str | None = None,
                       label_config: Path | None = None) -> dict[str, Any]:
    """Converts one file into a versioned dataset folder; returns its manifest. The options that
    change the result (Label Studio fields, the split) are part of the version hash."""
    from rmcore.dataset import parse_fractions, write_preference_dataset

    fractions = parse_fractions(split)
    ls_options: dict[str, Any] = {}
    if kind == "label-studio":
        ls_options = {"prompt_field": prompt_field, "items_field": items_field,
                      "label_config": Path(label_config).read_text() if label_config else None}
    result = convert_file(kind, path, strict=strict, **ls_options)
    options = {"kind": kind, **{k: v for k, v in ls_options.items() if v}}
    return write_preference_dataset(result, Path(out), options, fractions)


__all__ = ["KINDS", "ConversionResult", "InvalidRecord", "StrictModeError", "convert_file", "convert_to_dataset"]
