"""What MLflow shows beside a run's metrics: its training data (the Datasets column) and who ran
what from which commit (the User, Source and commit columns)."""

from __future__ import annotations

import functools
import getpass
import hashlib
import json
import os
import subprocess
from pathlib import Path
from typing import Any

from mlflow.entities import Dataset, DatasetInput, InputTag
from mlflow.utils.mlflow_tags import MLFLOW_GIT_COMMIT, MLFLOW_SOURCE_NAME, MLFLOW_SOURCE_TYPE, MLFLOW_USER

from trainer.catalogue import dataset_sizes, dataset_source, train_split_size


def dataset_input(config: dict[str, Any], retrain: bool = False,
                  test: bool = False) -> DatasetInput:
    """The run's training data as MLflow's Datasets column shows it: name, digest, source and
    the split sizes (the digest names the split: dataset, sizes, split seed). A retrain trains
    on train+val (`DIGITS train+val`) and tests on the test split (`test=True`: `DIGITS test`,
    context "testing", the dataset its `test_acc` names)."""
    name = config["dataset"]
    n_train, n_test, classes = dataset_sizes(name)
    train = train_split_size(name, config["val_fraction"])
    profile = {"train": train, "val": n_train - train, "test": n_test,
               "split_seed": config["split_seed"], "classes": classes}
    if retrain:
        profile = {"train+val": n_train, "test": n_test, "classes": classes}
    if test:
        profile = {"test": n_test, "classes": classes}
    digest = hashlib.sha256(json.dumps([name, profile], sort_keys=True).encode()).hexdigest()[:8]
    kind, where = dataset_source(name)
    source = json.dumps({"url": where} if kind == "url" else {"uri": where} if kind == "local"
                        else {"code": where})
    schema = json.dumps({"mlflow_tensorspec": {"features": json.dumps(
        [{"type": "tensor", "tensor-spec": {"dtype": "uint8", "shape": [-1, 3, 32, 32]}}]),
        "targets": json.dumps([{"type": "tensor", "tensor-spec": {"dtype": "int64",
                                                                 "shape": [-1]}}])}})
    shown = f"{name} test" if test else f"{name} train+val" if retrain else name
    return DatasetInput(Dataset(shown, digest, kind, source, schema, json.dumps(profile)),
                        tags=[InputTag("mlflow.data.context", "testing" if test else "training")])


def system_tags(command: str | None) -> dict[str, str]:
    """MLflow's own source/user/commit tags, so the UI's Source, User and commit columns fill."""
    # the UI shows a source name after its last "/": a short name, the full line as a tag
    tags = {MLFLOW_USER: _user(), MLFLOW_SOURCE_TYPE: "LOCAL", MLFLOW_SOURCE_NAME: "search run"}
    if command:
        tags["command"] = command[:5000]
    if git_commit():
        tags[MLFLOW_GIT_COMMIT] = git_commit()
    return tags


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no passwd entry (containers)
        return str(os.getuid())


@functools.cache
def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


