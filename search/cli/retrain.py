"""`search retrain`: a trial (the best, or one chosen) trained again on train+val and tested
once on the test split; its run, test accuracy and logged model in MLflow."""

from __future__ import annotations

import argparse
import json

import optuna

from search.cli.args import MODEL_HELP, dataset_name, model_spec, storage_flag
from search.cli.inspect import load_existing_study
from search.errors import UserError
from search.inputs.objectives import pareto_numbers, primary, study_objectives
from search.inputs.settings import trial_config
from search.inputs.values import positive_int
from search.logs import quiet_libraries
from search.study.lineage import MEMBER_ATTR, SCHEDULE_ATTR, segments

State = optuna.trial.TrialState


def add_parser(sub) -> None:
    p = sub.add_parser("retrain", help="retrain the best trial on train+val, test once")
    p.add_argument("--study", required=True, help="the study's name")
    storage_flag(p)
    p.add_argument("--epochs", type=positive_int, help="override the trial's epochs")
    p.add_argument("--model", type=model_spec, help=MODEL_HELP + "; over the trial's")
    p.add_argument("--trial", type=int, help="retrain this trial instead of the best one "
                   "(a multi-objective study: one of its Pareto front)")
    p.add_argument("--dataset", type=dataset_name,
                   help="data to retrain and test on (default: the trial's own dataset)")
    p.add_argument("--data-root", help="folder holding cifar-100-python/ (default: the "
                   "trial's, else $SEARCH_DATA_ROOT)")
    p.add_argument("--mlflow-uri", help="MLflow tracking URI for the retrain run (default "
                   "$MLFLOW_TRACKING_URI, else MLflow's default ./mlflow.db)")
    p.set_defaults(func=cmd_retrain)


def chosen_trial(study: optuna.Study, number: int | None) -> optuna.trial.FrozenTrial:
    """Complete trial `number`, else the best one; a multi-objective study must name one."""
    if number is not None:
        best = next((t for t in study.get_trials(deepcopy=False, states=(State.COMPLETE,))
                     if t.number == number), None)
        if best is None:
            raise UserError(f"--trial {number}: no complete trial {number} in study "
                            f"{study.study_name!r}")
        return best
    if len(study.directions) > 1:
        raise UserError(f"study {study.study_name!r} trades {', '.join(study_objectives(study))}: "
                        f"pick a trial of its Pareto front {sorted(pareto_numbers(study))} "
                        "with --trial N")
    try:
        return study.best_trial
    except ValueError:
        raise UserError(f"study {study.study_name!r} has no complete trial to retrain") from None


def cmd_retrain(args: argparse.Namespace) -> int:
    from search.tracking import PARENT_ATTR, RUN_ATTR
    from search.tracking.client import Tracker
    from search.tracking.datasets import dataset_input
    from search.tracking.models import log_model
    from trainer import TrainConfig, replay, train
    from trainer.data import ensure_available
    from trainer.runtime import check_device

    quiet_libraries()
    study = load_existing_study(args.study, args.storage)
    best = chosen_trial(study, args.trial)
    flags = {k: v for k, v in {"epochs": args.epochs, "dataset": args.dataset,
                               "data_root": args.data_root, "model": args.model}.items()
             if v is not None}
    config = TrainConfig.from_dict({**trial_config(best), **flags})
    check_device(config.device)
    ensure_available(config.dataset, config.data_root)  # CIFAR-100 fetched here if absent
    # a PBT member: its whole schedule, replayed from scratch (each segment's settings)
    schedule = (segments(study.get_trials(deepcopy=False), best.number)
                if MEMBER_ATTR in best.user_attrs else [])
    if len(schedule) > 1 and "epochs" in flags:
        raise UserError("--epochs: a PBT trial is retrained through its schedule's epochs "
                        f"(1-{schedule[-1]['last']}); drop --epochs")
    recorded = str((study.user_attrs.get("mlflow") or {}).get("uri", ""))
    uri = args.mlflow_uri or (recorded if recorded and "***" not in recorded else None)
    tracker = Tracker(uri, study.study_name)
    # told apart from the trials: its own name and kind, train+val as its data, no val_acc
    # (its held-out split is the test set: that number is test_acc, logged once at the end)
    run_id = tracker.start_trial(study.user_attrs.get(PARENT_ATTR, ""), best.number,
                                 config.to_dict(), {"kind": "retrain",
                                                    "retrain_of_trial": str(best.number)}, "",
                                 run_name=f"retrain · trial-{best.number}", retrain=True)
    final: dict = {}

    def on_epoch(m: dict) -> None:
        tracker.log_epoch(run_id, {k: v for k, v in m.items() if not k.startswith("val_")})

    try:
        keep = lambda state: final.update(state=state)  # noqa: E731
        if len(schedule) > 1:
            steps = [(TrainConfig.from_dict({**config.to_dict(), **s["params"]}), s["last"])
                     for s in schedule]
            steps[-1] = (steps[-1][0], config.epochs)
            tracker.tag(run_id, SCHEDULE_ATTR, json.dumps(schedule))
            result = replay(steps, on_epoch, holdout="test", on_checkpoint=keep)
        else:
            result = train(config, on_epoch, holdout="test", on_checkpoint=keep)
    except BaseException as exc:
        tracker.end_trial(run_id, "FAIL", str(exc) or type(exc).__name__)
        raise
    test_acc = result.val_acc  # with holdout="test" the held-out split is the test set
    model = log_model(tracker, run_id, final["state"], config,
                      name=f"{study.study_name}-trial-{best.number}")
    # measured on the test split (a dataset input of its own, so the run's Datasets column and
    # the model's Metrics name it), after training on train+val
    tested = dataset_input(config.to_dict(), test=True)
    tracker.client.log_inputs(run_id, datasets=[tested])
    data = tested.dataset
    tracker.client.log_metric(run_id, "test_acc", test_acc, step=result.epochs,
                              model_id=model.model_id, dataset_name=data.name,
                              dataset_digest=data.digest)
    tracker.end_trial(run_id, "COMPLETE", state="retrain (test split)")
    tracker.flush()
    study.set_user_attr("retrain", {"trial": best.number, "test_acc": test_acc,
                                    "epochs": result.epochs, RUN_ATTR: run_id,
                                    "dataset": config.dataset, "model_uri": model.model_uri})
    epochs = f"{result.epochs} epoch{'s' if result.epochs != 1 else ''}"
    how = f" through its PBT schedule ({len(schedule)} segments)" if len(schedule) > 1 else ""
    print(f"study {study.study_name}: trial {best.number} (val {primary(best):.4f}) retrained on "
          f"train+val{how} for {epochs}: test accuracy {test_acc:.4f}; model {model.model_uri}"
          + (f"; run {tracker.run_url(run_id)}" if tracker.run_url() else
             f"; MLflow run {run_id} in {tracker.uri}"))
    return 0


