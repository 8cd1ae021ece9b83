"""The `search` command line: train, run, validate, status, export, dashboard, table, report,
retrain. Each subcommand parses its flags here and hands off to the module that owns the work;
every expected failure ends as one line on stderr and a non-zero exit."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from search.commands import positive_float, positive_int
from search.errors import UserError
from trainer.config import AUGMENTS, DATASETS, OPTIMIZERS, PRECISIONS, ConfigError


class Parser(argparse.ArgumentParser):
    """argparse that reports a bad flag or value as one line (no usage block), exit 2."""

    def error(self, message: str):  # noqa: D102
        self.exit(2, f"{self.prog}: error: {message}\n")


def add_train_parser(sub) -> None:
    p = sub.add_parser("train", help="one training run with the given settings")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="adamw")
    p.add_argument("--lr", type=positive_float, help="base lr (default: per optimiser)")
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument("--momentum", type=float, default=0.9, help="momentum / beta1")
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--t-max", type=positive_int, help="cosine period in epochs (default epochs)")
    p.add_argument("--warmup-epochs", type=int, default=0)
    p.add_argument("--lr-scaling", choices=("none", "linear", "sqrt"), default="none")
    p.add_argument("--schedule", choices=("cosine", "constant"), default="cosine")
    p.add_argument("--trust-coefficient", type=positive_float, default=0.001)
    p.add_argument("--epochs", type=positive_int, default=150)
    p.add_argument("--augment", choices=AUGMENTS, default="final")
    p.add_argument("--dataset", choices=DATASETS, default="cifar100")
    p.add_argument("--data-root", help="folder holding cifar-100-python/ ($SEARCH_DATA_ROOT)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", choices=PRECISIONS, default="auto")
    p.add_argument("--local-workers", type=positive_int, default=1,
                   help="K simulated workers (local SGD)")
    p.add_argument("--local-steps", type=positive_int, default=1,
                   help="H local steps between parameter averages")
    p.add_argument("--slowmo-beta", type=float, default=0.0)
    p.add_argument("--slowmo-lr", type=positive_float, default=1.0)
    p.add_argument("--test", action="store_true",
                   help="train on train+val and report test accuracy (final evaluation)")
    p.add_argument("--json", action="store_true", help="print one JSON result as the last line")
    p.set_defaults(func=cmd_train)


def cmd_train(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from trainer import Diverged, TrainConfig, train

    config = TrainConfig(
        optimizer=args.optimizer, lr=args.lr, batch_size=args.batch_size,
        momentum=args.momentum, weight_decay=args.weight_decay, t_max=args.t_max,
        warmup_epochs=args.warmup_epochs, lr_scaling=args.lr_scaling, schedule=args.schedule,
        trust_coefficient=args.trust_coefficient, epochs=args.epochs, augment=args.augment,
        dataset=args.dataset, data_root=args.data_root, seed=args.seed, device=args.device,
        precision=args.precision, local_workers=args.local_workers,
        local_steps=args.local_steps, slowmo_beta=args.slowmo_beta, slowmo_lr=args.slowmo_lr,
    )
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
        return 1
    bar.close()
    out = result.to_dict()
    if args.test:
        out["test_acc"] = result.val_acc
    out["config"] = config.to_dict()
    if args.json:
        print(json.dumps(out))
    else:
        label = "test_acc" if args.test else "val_acc"
        print(f"{label} {result.val_acc:.4f} after {result.epochs} epochs "
              f"(best val {result.best_val_acc:.4f})")
    return 0


def build_parser() -> Parser:
    parser = Parser(prog="search", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_train_parser(sub)
    from search import commands

    commands.add_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from trainer.data import DataError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args) or 0
    except (UserError, ConfigError, DataError) as exc:
        print(f"search {args.command}: error: {exc}", file=sys.stderr)
        return getattr(exc, "exit_code", 2)
    except KeyboardInterrupt:
        from search.recovery import STOP

        print(f"search {args.command}: interrupted", file=sys.stderr)
        return STOP.exit_code  # 130 for SIGINT / Ctrl-C, 143 for SIGTERM


if __name__ == "__main__":
    sys.exit(main())
