"""search: Optuna studies over the trainer, tracked in MLflow, inspected in optuna-dashboard.

It drives the trainer's engine through its per-epoch results (and a stop rule for signals) and
never reaches into the training loop. One folder per concern; a module imports only from its
own folder or the layers below it (tests/test_structure.py checks this):

    cli/       the `search` command: flags and one `cmd_*` per subcommand
    launch/    where workers run: one Launcher class each (local processes, Slurm arrays), plugins
    worker/    one worker: its share of trials, the loop that keeps P in flight, pack sizing
    ui/        the progress bar and trial lines, the table and the HTML report
    study/     storage, a study's life and parent run, a trial attempt, checkpoints, recovery
    tracking/  MLflow runs, datasets, logged models, the runs table's view
    inputs/    spaces, study files, objectives, constraints, samplers and pruners, settings
    optuna_seam/  every private name of Optuna's and optuna-dashboard's, and the pack operations
    errors, defaults, logs   one-line failures and exit codes, every default, stderr messages
"""
