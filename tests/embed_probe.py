"""Scripts that embed random batches in a fresh process and print its memory (the kernel-cache tests)."""

_HEAD = r"""
import json, os
import numpy as np
from retro_dask.config import EmbedConfig
from retro_dask.text.embedder import Embedder

def rss_mb():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024

"""

_BATCH = r"""
rng = np.random.default_rng(0)
def batch(width, rows):
    return [[101] + rng.integers(1000, 20000, width - 2).tolist() + [102] for _ in range(rows)]
"""


def probe_script(embed_config: str, body: str) -> str:
    """A script with ``e`` (an Embedder of ``EmbedConfig(<embed_config>)`` on one CPU thread), ``batch(width,
    rows)`` (random WordPiece ids) and ``rss_mb()``, then ``body``."""
    return _HEAD + f'e = Embedder(EmbedConfig({embed_config}), "cpu", threads=1)' + _BATCH + body
