"""Launchers: where a study's workers run. Each takes the run's settings and starts the same
worker (`search.worker.run.run_worker`) `--workers` times: `local` as supervised processes on
this machine, `slurm` as the tasks of one Slurm job array. `base.Launcher` is what a third one
(Ray, Kubernetes) implements: one new file here, and one line in `search.cli.run`."""
