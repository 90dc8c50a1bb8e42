"""The MLflow pyfunc model of an export, defined as code (MLflow "models from code": nothing pickled).

`mlflow.pyfunc.load_model("models:/<name>/<version>").predict(frame)` takes a DataFrame holding the
task's input columns and returns the answers, run on the local GGUF model the export names.
"""

import os
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # offline by design: no usage pings

import dspy
import mlflow
import pandas as pd


class ChainoptProgram(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        from optimize.llm.engine import build_lm
        from optimize.export import load_export

        # The GGUF is found by its spec and checked by sha256, unless the model carries its own copy.
        self.exported = load_export(Path(context.artifacts["export"]), model_spec=context.artifacts.get("gguf"))
        self.lm = build_lm(self.exported.model)

    def predict(self, context, model_input: pd.DataFrame, params=None) -> list:
        from optimize.trial import adapter

        fields = self.exported.task.input_fields
        answers = []
        with dspy.context(lm=self.lm, adapter=adapter()):
            for row in model_input.to_dict(orient="records"):
                pred = self.exported.program(**{f: row[f] for f in fields})
                answers.append(pred.get(self.exported.task.answer_field))
        return answers


mlflow.models.set_model(ChainoptProgram())
