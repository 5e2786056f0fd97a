#!/usr/bin/env python
"""Turn jsonl (or the sample corpus) into a Megatron indexed dataset: see `--help`."""

import sys

from retro_dask.stages.preprocess import preprocess_main

if __name__ == "__main__":
    sys.exit(preprocess_main())
