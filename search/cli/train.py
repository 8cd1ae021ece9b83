"""`search train`: one training run with the given settings, no study; its defaults are
`trainer.TrainConfig`'s (the notes' baseline)."""

from __future__ import annotations

import argparse
import json
import sys

from search.cli.args import MODEL_HELP, dataset_name, model_spec
from search.errors import EXIT_FAILED
from search.inputs.values import positive_float, positive_int
from trainer.config import AUGMENTS, LR_SCALINGS, OPTIMIZERS, PRECISIONS, SCHEDULES, TrainConfig

# (flag, TrainConfig field, argparse keywords); each default is the field's own
FLAGS = (
    ("--optimizer", "optimizer", {"choices": OPTIMIZERS}),
    ("--lr", "lr", {"type": positive_float, "help": "base lr (default: per optimiser)"}),
    ("--batch-size", "batch_size", {"type": positive_int}),
    ("--momentum", "momentum", {"type": float, "help": "momentum / beta1"}),
    ("--weight-decay", "weight_decay", {"type": float}),
    ("--t-max", "t_max", {"type": positive_int, "help": "cosine period in epochs (default epochs)"}),
    ("--warmup-epochs", "warmup_epochs", {"type": int}),
    ("--lr-scaling", "lr_scaling", {"choices": LR_SCALINGS}),
    ("--schedule", "schedule", {"choices": SCHEDULES}),
    ("--trust-coefficient", "trust_coefficient", {"type": positive_float}),
    ("--epochs", "epochs", {"type": positive_int}),
    ("--augment", "augment", {"choices": AUGMENTS}),
    ("--dataset", "dataset", {"type": dataset_name, "help": "or folder:PATH"}),
    ("--data-root", "data_root", {"help": "folder holding cifar-100-python/ ($SEARCH_DATA_ROOT)"}),
    ("--model", "model", {"type": model_spec, "help": MODEL_HELP}),
    ("--seed", "seed", {"type": int}),
    ("--device", "device", {}),
    ("--precision", "precision", {"choices": PRECISIONS}),
    ("--local-workers", "local_workers", {"type": positive_int,
                                          "help": "K simulated workers (local SGD)"}),
    ("--local-steps", "local_steps", {"type": positive_int,
                                      "help": "H local steps between parameter averages"}),
    ("--slowmo-beta", "slowmo_beta", {"type": float}),
    ("--slowmo-lr", "slowmo_lr", {"type": positive_float}),
)


def check_network(config: TrainConfig) -> None:
    """The network built and its output checked on the CPU: a bad one is one line (exit 2)."""
    from trainer.catalogue import dataset_sizes
    from trainer.networks import check

    check(config.model, config.model_args, dataset_sizes(config.dataset)[2])


def model_arg(text: str) -> tuple[str, object]:
    """argparse type of --model-arg: NAME=VALUE, the value read as YAML (16, 0.5, true, text)."""
    import yaml

    name, sep, value = text.partition("=")
    if not sep or not name.isidentifier():
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    try:
        return name, yaml.safe_load(value)
    except yaml.YAMLError:
        raise argparse.ArgumentTypeError(f"{name}: cannot read {value!r} as a value") from None


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="one training run with the given settings")
    for flag, field, kwargs in FLAGS:
        p.add_argument(flag, dest=field, default=getattr(TrainConfig, field), **kwargs)
    p.add_argument("--model-arg", action="append", default=[], metavar="NAME=VALUE",
                   type=model_arg, help="an argument of the --model factory (YAML value; repeat "
                   "for more)")
    p.add_argument("--test", action="store_true",
                   help="train on train+val and report test accuracy (final evaluation)")
    p.add_argument("--json", action="store_true", help="print one JSON result as the last line")
    p.set_defaults(func=cmd_train)


def cmd_train(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from trainer import Diverged, train
    from trainer.data import ensure_available
    from trainer.runtime import check_device

    config = TrainConfig(**{field: getattr(args, field) for _, field, _ in FLAGS},
                         model_args=dict(args.model_arg))
    check_network(config)
    check_device(config.device)
    ensure_available(config.dataset, config.data_root)  # CIFAR-100 fetched here if absent
    bar = tqdm(total=config.epochs, desc="train", unit="epoch", file=sys.stderr)

    def on_epoch(m: dict) -> None:
        bar.update(1)
        bar.set_postfix(loss=f"{m['train_loss']:.3f}", val_acc=f"{m['val_acc']:.4f}",
                        img_s=f"{m['images_per_s']:.0f}")

    try:
        result = train(config, on_epoch, holdout="test" if args.test else "val")
    except Diverged as exc:
        bar.close()
        print(f"search train: {exc}", file=sys.stderr)
        if args.json:
            print(json.dumps({"diverged": True, "epoch": exc.epoch}))
        return EXIT_FAILED
    bar.close()
    out = result.to_dict()
    # with --test the held-out split is the test set: its accuracy is the test accuracy
    out["test_acc"] = result.val_acc if args.test else None
    out["config"] = config.to_dict()
    if args.json:
        print(json.dumps(out))
    else:
        label = "test_acc" if args.test else "val_acc"
        print(f"{label} {result.val_acc:.4f} after {result.epochs} epochs "
              f"(best val {result.best_val_acc:.4f})")
    return 0
