"""What MLflow's runs table shows of a study: the saved view its link opens (the trials flat,
ranked, with their state, objectives and params as columns) and which runs are the best.

MLflow's runs table shows no metric column by default, nests every trial under the study's run
and shows complete and pruned trials alike as Finished. A saved view fixes the first two (an
experiment tag, `mlflow.sharedViewState.KEY`, opened by `?viewStateShareKey=KEY` and listed in
the page's Views menu); the `state` tag (`Tracker.end_trial`, `mark_best`) the third.
"""

from __future__ import annotations

import json
import time

from mlflow.tracking import MlflowClient

from search.logs import say
from search.tracking import VIEW_KEY

VIEW_TAG = "mlflow.sharedViewState."


def set_view(client: MlflowClient, experiment_id: str, objectives: list[str],
             minimize: list[bool], params: list[str]) -> None:
    """The study's view: its trials only (the study's run filtered out, so they are not nested
    under it), ranked by the first objective, with state, objectives, val_acc, test_acc and the
    searched params as columns."""
    metrics = (["objective"] if len(objectives) == 1
               else [f"objective_{n}" for n in objectives])
    columns = (["tags.`state`"] + [f"metrics.`{m}`" for m in metrics]
               + [f"metrics.`{m}`" for m in ("val_acc", "test_acc")]
               + [f"params.`{p}`" for p in params])
    view = {"searchFilter": "tags.trial_number LIKE '%'", "orderByKey": f"metrics.`{metrics[0]}`",
            "orderByAsc": minimize[0], "startTime": "ALL", "lifecycleFilter": "Active",
            "modelVersionFilter": "All Runs", "datasetsFilter": [],
            "selectedColumns": columns, "columnOrder": columns,
            "columnWidths": {"tags.`state`": 190}, "runListHidden": False,
            "viewMaximized": False}
    now = int(time.time() * 1000)  # MLflow 3.17's saved-view envelope (its Views menu)
    envelope = {"name": f"search: trials by {objectives[0]}", "createdAt": now,
                "updatedAt": now, "state": json.dumps(view)}
    client.set_experiment_tag(experiment_id, VIEW_TAG + VIEW_KEY, json.dumps(envelope))


def mark_best(client: MlflowClient, experiment_id: str, run_ids: list[str], word: str) -> None:
    """The study's best runs say so in the `state` column (`complete · Pareto`, `complete ·
    best`); runs that no longer are go back to `complete`."""
    try:
        marked = client.search_runs([experiment_id], "tags.state LIKE 'complete · %'",
                                    max_results=5000)
        for run in marked:
            if run.info.run_id not in run_ids:
                client.set_tag(run.info.run_id, "state", "complete")
        for rid in run_ids:
            client.set_tag(rid, "state", f"complete · {word}")
    except Exception as exc:  # a convenience (the Optuna storage holds the front): never fatal
        say(f"MLflow: the best runs' state column not updated: {str(exc).splitlines()[0]}")
