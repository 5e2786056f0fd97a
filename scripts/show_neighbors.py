#!/usr/bin/env python
"""Print one pretraining chunk of a built workdir with the texts of its neighbours."""

import argparse
import sys

from retro_dask import inspect as retro
from retro_dask.errors import RetroError


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--workdir", required=True)
    p.add_argument("--split", default="train")
    p.add_argument("--sample", type=int, default=0)
    p.add_argument("--chunk", type=int, default=0)
    p.add_argument("--num-neighbors", type=int, default=2)
    args = p.parse_args()
    try:
        retro.init(args.workdir, quiet=True)
        retro.print_neighbor_texts(args.split, args.sample, args.chunk, args.num_neighbors)
    except RetroError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
