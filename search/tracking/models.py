"""Logged models: a retrained trial's weights as an MLflow PyTorch model (uint8 images in,
logits out) with its signature and an input example."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

from search.tracking.client import Tracker


@contextlib.contextmanager
def _tracking_uri(uri: str) -> Iterator[None]:
    """`mlflow.pytorch.log_model` logs through MLflow's global tracking URI: point it at ours for
    the call only, then put back what was there (and $MLFLOW_TRACKING_URI, which MLflow's
    `set_tracking_uri` writes)."""
    import mlflow

    env = os.environ.get("MLFLOW_TRACKING_URI")
    previous = mlflow.get_tracking_uri() if mlflow.is_tracking_uri_set() else None
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)
        if env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = env


def log_model(tracker: Tracker, run_id: str, state: dict[str, Any], config: Any,
              name: str = "model") -> Any:
    """The retrained weights as an MLflow PyTorch model named `name` on run `run_id`; returns
    MLflow's ModelInfo (`model_uri`, `model_id`)."""
    import mlflow
    import numpy as np
    import torch
    from mlflow.models import infer_signature

    from trainer.data import load_dataset
    from trainer.networks import from_checkpoint

    data = load_dataset(config.dataset, config.data_root)
    model = from_checkpoint(state, data.num_classes, config.model, config.model_args)
    example = np.ascontiguousarray(data.test.x[:2])
    with torch.no_grad():
        logits = model(torch.from_numpy(example)).numpy()
    code = user_code(config.model)
    with _tracking_uri(tracker.uri), mlflow.start_run(run_id=run_id):
        return mlflow.pytorch.log_model(
            model, name=name, signature=infer_signature(example, logits),
            input_example=example, pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
            code_paths=code or None)


def user_code(spec: str) -> list[str]:
    """A `PATH.py:FUNCTION` network's file: its classes pickled by value with the model (a fresh
    process loads it without the file on its path), and the file carried as the model's code."""
    import cloudpickle

    from trainer.networks import user_module

    module = user_module(spec)
    if module is None:
        return []
    cloudpickle.register_pickle_by_value(module)
    return [module.__file__]
