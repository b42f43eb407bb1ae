#!/usr/bin/env python
"""Download and verify the datasets minilae uses (MNIST, FashionMNIST).

Files land in ``<root>/<Name>/raw/`` (torchvision's layout) and are checked against the
SHA-256 sums in :mod:`minilae.data`. Uses torchvision when installed, else plain HTTP
from the public mirrors. Examples::

    python datasets.py --root ~/data                      # both datasets
    python datasets.py --root ~/data --dataset mnist
    python datasets.py --root /shared/data --verify-only  # no network, just check
"""
from __future__ import annotations

import argparse
import sys

from minilae.data import (
    DATASETS,
    DEFAULT_DATA_ROOT,
    ENV_DATA,
    DataError,
    data_root,
    download,
    raw_dir,
    verify_files,
)


def build_parser() -> argparse.ArgumentParser:
    """Command-line interface of this script."""
    parser = argparse.ArgumentParser(
        description="Download MNIST / FashionMNIST into ROOT/<Name>/raw/ and verify their SHA-256 sums.",
    )
    parser.add_argument(
        "--root",
        default=None,
        help=f"data root folder (default: ${ENV_DATA} if set, else {DEFAULT_DATA_ROOT}); "
        f"point ${ENV_DATA} at it afterwards so minilae finds the files",
    )
    parser.add_argument(
        "--dataset",
        nargs="+",
        type=str.lower,
        choices=sorted(DATASETS),
        default=sorted(DATASETS),
        metavar="NAME",
        help=f"which datasets, any of: {' '.join(sorted(DATASETS))} (default: all)",
    )
    parser.add_argument(
        "--verify-only",
        action="store_true",
        help="do not download; only check that the files exist and match their checksums",
    )
    return parser


def main(argv=None) -> int:
    """Download (or only verify) each requested dataset; exit status 1 if any failed."""
    args = build_parser().parse_args(argv)
    root = data_root(args.root)
    failed = False
    for name in args.dataset:
        try:
            if args.verify_only:
                verify_files(name, root)
                print(f"{DATASETS[name]}: OK ({raw_dir(name, root)})")
            else:
                download(name, root)
        except DataError as err:
            print(f"error: {err}", file=sys.stderr)
            failed = True
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
