#!/usr/bin/env python
"""Build the RETRO retrieval database, index and neighbours: see `python scripts/build.py --help`."""

import sys

from retro_dask.cli import build_main

if __name__ == "__main__":
    sys.exit(build_main())
