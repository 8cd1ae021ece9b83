"""The `search` command line. Each subcommand's module holds its flags and its `cmd_*`:
`run` (run, worker), `inspect` (validate, status, export, table, report, dashboard,
storage-proxy), `retrain`, `train`, `clean`, `data` (fetch-data); `args` the flag types they
share. Every expected failure ends as one line on stderr and a non-zero exit, never a traceback."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from search.cli.args import Parser
from search.errors import EXIT_OK, EXIT_USAGE, UserError
from trainer.errors import ConfigError, DataError


def build_parser() -> Parser:
    from search.cli import clean, data, inspect, retrain, run, train

    parser = Parser(prog="search", description="Hyperparameter search for PyTorch training: "
                    "Optuna studies, MLflow tracking, optuna-dashboard.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    train.add_parser(sub)
    run.add_parsers(sub)
    inspect.add_parsers(sub)
    retrain.add_parser(sub)
    clean.add_parser(sub)
    data.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args) or EXIT_OK
    except (UserError, ConfigError, DataError) as exc:
        print(f"search {args.command}: error: {exc}", file=sys.stderr)
        return getattr(exc, "exit_code", EXIT_USAGE)
    except KeyboardInterrupt:
        from search.study.recovery import STOP

        print(f"search {args.command}: interrupted", file=sys.stderr)
        return STOP.exit_code  # 130 for SIGINT / Ctrl-C, 143 for SIGTERM


if __name__ == "__main__":
    sys.exit(main())
