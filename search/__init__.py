"""search: Optuna studies over the trainer, tracked in MLflow, inspected in optuna-dashboard.

Owns the CLI (`search ...`), YAML search spaces (schema, validation, sampling), study building
(storage, sampler, pruner, objectives, constraints), MLflow tracking, the worker and its two
launchers (local supervised processes, Slurm job arrays), the faults a cluster has (fenced
trial attempts, storage outages, unreadable or unwritable checkpoints) and reports. It drives
the trainer's engine through its per-epoch results (and a stop rule for signals) and never
reaches into the training loop.
"""
