"""MLflow: one experiment per study, a parent run per study, a nested child run per trial
(`client`: runs, metrics, outages ridden out by queueing); what a run shows beside its metrics
(`datasets`: the training data, user, source, commit); a retrained trial's logged model
(`models`); the runs table's saved view and best-run marks (`views`). Nothing here reads or
writes the Optuna storage."""

# a trial's and a study's run, as Optuna user attributes; here so that reading them (`search
# status`, `search --help`) does not import MLflow
PARENT_ATTR = "mlflow_parent_run_id"
RUN_ATTR = "mlflow_run_id"
