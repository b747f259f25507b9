"""Deployments that `rmflow serve` registers and runs: the pipeline (concurrency limit 1, so two
trainings never overlap), the label sensor on an interval schedule, and active labelling (run
from the UI with a strength dataset folder)."""
from __future__ import annotations

from prefect import serve

from rmflow.flows.pipeline import PipelineParams, request_reannotation, reward_pipeline
from rmflow.flows.sensor import label_sensor


def serve_deployments(params: PipelineParams, min_new_labels: int = 20, interval_s: int = 300) -> None:
    pipeline = reward_pipeline.to_deployment(name="reward-pipeline", parameters={"params": params.model_dump(mode="json")},
                                             concurrency_limit=1, tags=["rmflow"])
    sensor = label_sensor.to_deployment(name="label-sensor", interval=interval_s, tags=["rmflow"],
                                        parameters={"params": params.model_dump(mode="json"), "min_new_labels": min_new_labels})
    reannotation = request_reannotation.to_deployment(name="request-reannotation", tags=["rmflow"],
                                                      parameters={"project": params.project, "max_tasks": params.reannotate_max})
    serve(pipeline, sensor, reannotation)
