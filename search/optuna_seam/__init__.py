"""Every use of Optuna's (and optuna-dashboard's) private internals, in this one package, each
with the reason it is needed; nothing outside it names one (`tests/test_structure.py`).

Optuna's public API has no way to do these few things; a release may rename any of them, so
they live here and `tests/test_optuna_seam.py` fails (naming the one that moved) when the
installed Optuna no longer has them, instead of a worker breaking somewhere unexpected.

    pack       what a worker does to its pack: ask it, fence it, write its epoch's reports
    reads      trial ids, reads, asks and tells, heartbeats, the optimize-loop protocol,
               samplers' and pruners' per-trial work done once
    writes     a trial's start or end, a refill's new trials, a pack's reports: one write each
    rdb        those writes as SQL on RDBStorage's models
    resilient  the database storage that rides out outages (RDBStorage, private calls too)
    dashboard  optuna-dashboard served with Optuna's own choice of best trials
"""

from search.optuna_seam.pack import ask_pack, fence, running, write_pack_reports
from search.optuna_seam.reads import (
    ask_waiting,
    drawn_ahead,
    fail_if_running,
    frozen,
    get_trial,
    group_space_once_per_trial,
    heartbeat_thread,
    optimize_loop,
    percentiles_once,
    reported,
    start_trial,
    stop_requested,
    storage_of,
    tell,
    trial_id,
)
from search.optuna_seam.resilient import StorageBusy, no_waiting
from search.optuna_seam.writes import one_write

__all__ = ["StorageBusy", "ask_pack", "ask_waiting", "drawn_ahead", "fail_if_running", "fence", "frozen",
           "get_trial", "group_space_once_per_trial", "heartbeat_thread", "no_waiting", "one_write",
           "optimize_loop", "percentiles_once", "reported", "running", "start_trial", "stop_requested",
           "storage_of", "tell", "trial_id", "write_pack_reports"]
