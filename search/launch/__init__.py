"""Launchers: where a study's workers run. Each is one `base.Launcher` class that says how
workers start, are watched and stop, and brings its own flags, study-file block, task identity
(a task's share kept over requeues), status fields and files; the rest of a run's life is
shared (`base`: the settings file its workers read, leaving the parent run; `task`: `search
worker`, one worker started elsewhere, for every launcher).

    base     the Launcher class, the settings file, leaving the parent run
    plugins  which launchers exist: these, and any registered under the entry-point group
             `search.launchers` (a third launcher is one file in its own package)
    local    supervised worker processes on this machine (replacement, signals)
    slurm    one Slurm job array: checks, job script, `sbatch`, task states, self-requeue
    task     `search worker --spec FILE`: one task's share, its requeue, the last one's leave
"""
