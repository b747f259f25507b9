"""The registered model's code, logged as a file (MLflow models-from-code) with the `rmcore`
package beside it (`code_paths`): loading the champion needs only the model's own pinned
requirements — never rmflow, its services or a pickle of rmflow's classes.

`predict(DataFrame[prompt, response], params={"normalize": bool}) -> DataFrame[reward]`; with
`normalize`, rewards are (r - mean) / std over the training completions.
"""
from __future__ import annotations

import mlflow
import numpy as np
import pandas as pd
from mlflow.pyfunc import PythonModel

from rmcore.names import MODEL_ARTIFACT


class RewardModelPyfunc(PythonModel):
    def load_context(self, context) -> None:
        from rmcore.scoring import RewardScorer

        self.scorer = RewardScorer(context.artifacts[MODEL_ARTIFACT])

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        missing = {"prompt", "response"} - set(model_input.columns)
        if missing:
            raise ValueError(f"input needs columns prompt and response; missing {sorted(missing)}")
        rewards = self.scorer.score(model_input["prompt"].astype(str).tolist(), model_input["response"].astype(str).tolist(),
                                    normalize=bool((params or {}).get("normalize", False)))
        return pd.DataFrame({"reward": rewards.astype(np.float64)})


mlflow.models.set_model(RewardModelPyfunc())
