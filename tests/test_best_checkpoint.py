"""Best-state selection and early stopping (rmcore.train._Best): the model saved is the best
evaluated one (by validation accuracy, or by loss with `optim.select_by=loss`), and a run whose
selected metric stops improving stops."""
from __future__ import annotations

import pytest

from rmcore.config import RunConfig
from rmcore.evaluate import evaluate_saved_model
from rmcore.train import _Best, train_reward_model


def cfg_of(backbone, **optim) -> RunConfig:
    return RunConfig.model_validate({"model": {"backbone": str(backbone), "max_length": 64},
                                     "optim": {"lr": 3e-3, "epochs": 1, "pairs_per_step": 32, **optim}})


def test_early_stopping_stops_a_run_that_stops_improving(tiny_bert, synthetic_dataset):
    # lr far below float32's resolution of the weights: every evaluation scores exactly the first one's
    summary = train_reward_model(cfg_of(tiny_bert, lr=1e-12, eval_every=3, early_stopping_patience=2), synthetic_dataset, None)
    assert summary["stopped_early_at"] == 9, summary  # first evaluation at 3, none better at 6 and 9
    assert summary["steps_run"] == 9 < summary["steps"]
    assert summary["best_step"] == 3 and [h["step"] for h in summary["history"]] == [3, 6, 9]
    assert sum(summary["group_train_counts"]) < len(summary["group_train_counts"])  # not every group trained


def test_saved_model_is_the_best_evaluated_state_not_the_last(tiny_bert, synthetic_dataset, tmp_path):
    # a constant, too-high learning rate: validation accuracy peaks early and then falls
    optim = {"lr": 2e-2, "schedule": "constant", "warmup_ratio": 0.0, "eval_every": 2, "early_stopping_patience": 0}
    best = train_reward_model(cfg_of(tiny_bert, **optim), synthetic_dataset, tmp_path / "best")
    last = train_reward_model(cfg_of(tiny_bert, **optim, select_best=False), synthetic_dataset, tmp_path / "last")
    curve = [h["val_accuracy"] for h in best["history"]]
    assert [h["val_accuracy"] for h in last["history"]] == curve  # same training; only the saved state differs
    assert best["best_step"] < best["steps"] and best["stopped_early_at"] is None
    assert best["best_val_accuracy"] == max(curve) > last["val_accuracy"], (curve, last["val_accuracy"])
    saved_best = evaluate_saved_model(tmp_path / "best", synthetic_dataset, "validation", device="cpu").metrics
    saved_last = evaluate_saved_model(tmp_path / "last", synthetic_dataset, "validation", device="cpu").metrics
    assert saved_best["accuracy"] == pytest.approx(max(curve)) and best["val_accuracy"] == pytest.approx(max(curve))
    assert saved_last["accuracy"] == pytest.approx(last["val_accuracy"])
    assert saved_last["accuracy"] < saved_best["accuracy"]


@pytest.mark.parametrize("by, best_step, stopped_at", [("accuracy", 2, 6), ("loss", 4, 8)])
def test_select_by_ranks_states_by_accuracy_or_by_loss(by, best_step, stopped_at):
    # step 2 is the most accurate state, step 4 the one with the lowest loss (one pair fewer right,
    # better calibrated); patience 2 stops the run at the second evaluation in a row without a better state
    curve = {2: (0.70, 0.66), 4: (0.68, 0.60), 6: (0.66, 0.63), 8: (0.60, 0.69)}
    best = _Best(RunConfig.model_validate({"optim": {"select_by": by, "early_stopping_patience": 2}}), 10, True)
    for step, (accuracy, loss) in curve.items():
        if best.stopped_at is None:
            best.consider(step, {"accuracy": accuracy, "loss": loss}, dict)
    assert (best.step, best.stopped_at) == (best_step, stopped_at)
    assert (best.metrics["accuracy"], best.metrics["loss"]) == curve[best_step]
