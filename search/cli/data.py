"""`search fetch-data`: CIFAR-100 fetched once, on a machine with internet, into the folder
the workers read (`--data-root`), and verified against torchvision's checksums. Workers never
download: a compute node without internet says this command instead."""

from __future__ import annotations

import argparse
from pathlib import Path

from search.errors import UserError


def add_parser(sub) -> None:
    p = sub.add_parser("fetch-data", help="download CIFAR-100 into --data-root and verify it "
                       "(for clusters whose compute nodes have no internet)")
    p.add_argument("--data-root", help="the folder that holds (or will hold) cifar-100-python/ "
                   "(default $SEARCH_DATA_ROOT, else ~/.cache/search/data)")
    p.set_defaults(func=cmd_fetch_data)


def cmd_fetch_data(args: argparse.Namespace) -> int:
    from trainer.catalogue import default_data_root
    from trainer.data import CIFAR_FOLDER, DataError, fetch_cifar100, verify_cifar100

    root = Path(args.data_root) if args.data_root else default_data_root()
    folder = root / CIFAR_FOLDER
    if folder.is_dir() and any(folder.iterdir()):
        bad = verify_cifar100(root)
        if bad is not None:  # never overwrite what someone put there
            raise UserError(f"{folder / bad}: missing or not the official file (torchvision's "
                            f"checksum differs); move {folder} aside and run this again")
        print(f"CIFAR-100 at {folder}: present, verified against torchvision's checksums")
        return 0
    print(f"downloading CIFAR-100 (169 MB) into {root} ...", flush=True)
    try:
        fetch_cifar100(root)
    except DataError as exc:
        raise UserError(f"CIFAR-100 into {root}: {exc}; run this where there is internet and "
                        f"copy {folder} to the same --data-root on the cluster") from None
    bad = verify_cifar100(root)
    if bad is not None:
        raise UserError(f"{folder / bad}: the download does not match torchvision's checksum")
    print(f"CIFAR-100 at {folder}: downloaded and verified; point workers at it with "
          f"--data-root {root}")
    return 0
