"""MLflow: one experiment per study, a parent run per study, a nested child run per trial
(`client`: runs, metrics, outages ridden out by queueing); what a run shows beside its metrics
(`datasets`: the training data, user, source, commit); a retrained trial's logged model
(`models`); the runs table's saved view and best-run marks (`views`). Nothing here reads or
writes the Optuna storage."""

# a trial's and a study's run, as Optuna user attributes; here so that reading them (`search
# status`, `search --help`) does not import MLflow
PARENT_ATTR = "mlflow_parent_run_id"
RUN_ATTR = "mlflow_run_id"
VIEW_PARAM, VIEW_KEY = "viewStateShareKey", "search-trials"  # the runs table's saved view (`views`)


def run_link(uri: str, experiment_id: str, run_id: str | None = None) -> str | None:
    """A run's (or the experiment's, opened on the study's view) page in the MLflow UI, when
    the tracking URI is a server. `workflowType=machine_learning`: MLflow 3's UI opens in its
    GenAI view unless the link says otherwise (its experimentKind tag is not enough in 3.17)."""
    if not uri.startswith(("http://", "https://")):
        return None
    page = f"/runs/{run_id}?" if run_id else f"/runs?{VIEW_PARAM}={VIEW_KEY}&"
    return f"{uri.rstrip('/')}/#/experiments/{experiment_id}{page}workflowType=machine_learning"
