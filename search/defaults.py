"""Every default a user can change, once: the settings (`inputs.settings.RunSettings`), the
flags' help, the storage, the launchers and the worker loop read them here."""

TRIALS = 20  # a study's total with neither --n-trials nor --timeout
RAMP = 10  # never more in flight than this or the trials heard from (TPE and GP sample their first 10 at random anyway)
SAMPLER, PRUNER = "tpe", "median"
PRUNER_STARTUP_TRIALS = 5  # the median pruner: trials finished before pruning starts
PRUNER_WARMUP_EPOCHS = 0  # the median pruner: epochs of a trial before it can be pruned
HEARTBEAT = 10  # seconds between trial heartbeats on a database; a trial silent for 3x this is stale
STORAGE_PATIENCE = 600.0  # seconds a database may be silent before the command stops
STOP_WITHIN = 20.0  # seconds a signalled worker may take to stop (a mid-epoch checkpoint)
MAX_RETRY = 3  # times a trial whose worker died or was stopped is re-queued
MAX_RESTARTS = 3  # a dead local worker is replaced until it dies this often in a row
