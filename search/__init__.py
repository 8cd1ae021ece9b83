"""search: Optuna studies over the trainer, tracked in MLflow, inspected in optuna-dashboard.

Owns the CLI (`search ...`), YAML search spaces (schema, validation, sampling), study building
(storage, sampler, pruner, objective), MLflow tracking, worker processes and reports. It drives
`trainer.train` through its per-epoch callback and never reaches into the training loop.
"""
