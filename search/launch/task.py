"""`search worker --spec FILE`: one worker a launcher started elsewhere (a Slurm array task, a
process on another machine), the same for every such launcher. It runs its share of the study
-- what its earlier runs left, after a requeue or a restart of its task -- and on SIGTERM
(preemption, a time limit) stops after the epoch with its trials re-queued in Optuna, then asks
its launcher to run it again. The last worker to leave closes the study's parent MLflow run."""

from __future__ import annotations

import signal

from search.inputs.settings import RunSettings
from search.launch.base import leave, read_spec
from search.launch.plugins import by_name
from search.logs import quiet_libraries, say
from search.study.recovery import HOST, STOP
from search.tracking import PARENT_ATTR
from search.tracking.client import Tracker
from search.worker.run import finished_by, run_worker, shares


def run_task(spec_path: str) -> int:
    quiet_libraries()
    data = read_spec(spec_path)
    settings, workers = RunSettings(**data["spec"]), data["workers"]
    launcher = by_name(data.get("launcher", "slurm"))  # a spec written before launchers had names
    task, index, threads = launcher.task() or (None, 0, None)
    marks = {launcher.task_attr: task} if task is not None and launcher.task_attr else None
    share = shares(settings.n_trials, workers)[index]
    say(f"task {task or index} of study {settings.study_name} (share "
        f"{share if share is not None else 'until the timeout'}) on {HOST}", "search worker")
    try:
        study = run_worker(settings, index, share, threads, signals=(signal.SIGTERM, signal.SIGINT),
                           task=marks)
    except KeyboardInterrupt:
        # a requeue may have the launcher signal this very task again: nothing is left to stop
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        again = launcher.requeue()
        say(f"stopped by {signal.Signals(STOP.signum or 15).name} after its "
            f"epoch; its trials are re-queued" + (f"; task {task} requeued" if again else ""), "search worker")
        return 0 if again else STOP.exit_code
    tracker = Tracker(settings.mlflow_uri, settings.study_name, settings.command)
    others = launcher.others_running(study)
    done = finished_by(study)
    parent = study.user_attrs.get(PARENT_ATTR)
    # tasks ending together each see the other still listed: the study's count decides too
    total = settings.study_total
    if parent and (others <= 0 or (total is not None and done >= total)):
        leave(study, tracker, parent, None, "FINISHED")
    return 0
