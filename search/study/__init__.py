"""A study and its trials on the storage: the storage itself (a journal file or a database,
opened to ride out outages: `storage`), a study's life (create or resume, its parent MLflow run, the
last command closing it: `lifecycle`; what it measures, so a command cannot mix another
dataset, epochs or network into it: `measures`), one trial attempt (report, prune, fence, end:
`session`), per-attempt checkpoints (`checkpoints`) and dead workers' trials retried, signals
(`recovery`)."""
