"""What the pipeline's stages hand each other: small typed records of URIs (files, dataset and
model folders, registry versions) and counts, never live objects, so every stage can be retried,
cached or run on another machine. Prefect shows them as task results."""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from rmcore.config import RunConfig
from rmcore.watermark import Watermark


class LabelSnapshot(BaseModel):
    """One pull of a Label Studio project: every task with its annotations, in one JSON file
    (fetched whole, or only what changed since the previous snapshot and merged into it)."""

    project: str
    snapshot: str = Field(description="Path of the snapshot file (named by its content hash).")
    tasks: int
    annotations: int
    fetched: int = Field(0, description="Tasks fetched from Label Studio by this pull (all of them on a full pull).")
    deleted: int = Field(0, description="Tasks of the previous snapshot that Label Studio no longer has.")
    incremental: bool = Field(False, description="Merged into the previous snapshot rather than pulled whole.")
    cursor: str | None = Field(None, description="When the pull started on Label Studio's clock, less a look-back: everything "
                               "updated before it is in the snapshot; the next pull re-reads from here.")


class LabelDataset(BaseModel):
    """The dataset version built from a snapshot, and what changed since the watermark."""

    dataset: str | None = Field(description="Dataset version folder; None when no usable ranking exists yet.")
    version: str | None
    watermark: Watermark = Field(description="What the snapshot holds, as a watermark (advance to it after success).")
    previous_watermark: Watermark
    new_rankings: int
    total_rankings: int
    quarantined: int
    cancelled: int
    superseded: int
    relabelled: int
    unchanged_presented_order: int
    quarantine_reasons: list[str]
    agreement: float
    kendall_tau: float
    multi_annotated_tasks: int


class StrengthDataset(BaseModel):
    """The strength-annotated dataset version an ensemble produced, and the run config to train on
    it with (a margin strategy turns the loss's adaptive margin on)."""

    dataset: str
    label_dataset: str = Field(description="The dataset version the strengths were computed on.")
    run: RunConfig
    summary: dict[str, Any]


class TrainedModel(BaseModel):
    model_dir: str
    dataset: str = Field(description="The dataset version it trained on.")
    run: RunConfig = Field(description="The config it trained with.")
    summary: dict[str, Any] = Field(description="Training metrics (JSON-able), history included.")
    strength_report: str | None = None


class RegisteredModel(BaseModel):
    name: str
    version: str
    created: bool = Field(description="False when the same model bytes were already registered.")
    run_id: str
    status: str = Field(description="validation_status tag: pending until the gate ran, then passed or failed.")


class EvaluationResult(BaseModel):
    """The challenger's evaluation, and the champion's on the same pairs when there is one."""

    name: str
    version: str
    eval_dir: str = Field(description="Report files (markdown, plots, metrics).")
    evaluation_file: str = Field(description="JSON with the metrics and per-pair correctness of both models, for the gate.")
    metrics: dict[str, Any]
    champion_version: str | None


class PromotionResult(BaseModel):
    name: str
    version: str
    passed: bool
    reasons: list[str]
    champion_version: str | None
    metrics: dict[str, Any]
    gate: list[dict[str, Any]]
    run_id: str | None = None
