"""Retrieval you can trust: nprobe tuned to a recall target, and evaluation leakage measured and masked."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import run_build, write_corpus

EOD = 50256


def brute_share(chunk, neighbor, n=13, pad=EOD) -> float:
    """The share of the chunk's n-grams (those without ``pad``) found among the neighbour's, with sets."""
    mine = [tuple(chunk[i : i + n]) for i in range(len(chunk) - n + 1) if pad not in chunk[i : i + n]]
    theirs = {tuple(neighbor[i : i + n]) for i in range(len(neighbor) - n + 1) if pad not in neighbor[i : i + n]}
    return sum(g in theirs for g in mine) / len(mine) if mine else 0.0


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_overlap_shares_equal_brute_force(data):
    from retro_dask.plan.ngrams import overlap_shares

    vocab = data.draw(st.integers(2, 6))  # a small vocabulary: n-grams repeat and match often
    rows, k = data.draw(st.integers(1, 4)), data.draw(st.integers(1, 3))
    tokens = st.lists(st.sampled_from(list(range(vocab)) + [EOD]), min_size=16, max_size=16)
    chunks = np.array([data.draw(tokens) for _ in range(rows)])
    neighbors = np.array([[data.draw(tokens) + data.draw(tokens) for _ in range(k)] for _ in range(rows)])
    got = overlap_shares(chunks, neighbors, EOD, n=3)
    want = [[brute_share(chunks[r].tolist(), neighbors[r, j].tolist(), 3) for j in range(k)] for r in range(rows)]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("nlist, hnsw, expected", [
    (16, False, [(1, None), (2, None), (4, None), (8, None), (16, None)]),   # powers of two up to nlist
    (12, False, [(1, None), (2, None), (4, None), (8, None), (12, None)]),   # nlist itself last
    (0, False, [(1, None)]),                                                 # Flat: nothing to probe
    (2, True, [(1, 16), (1, 32), (1, 64), (1, 128), (1, 256), (2, 16), (2, 32), (2, 64), (2, 128), (2, 256)]),
])
def test_grid_points(nlist, hnsw, expected):
    from retro_dask.stages.tune import grid_points

    assert grid_points(nlist, hnsw) == expected


def test_the_choice_is_the_smallest_nprobe_that_reaches_the_target():
    from retro_dask.stages.tune import choose

    points = [{"nprobe": p, "ef_search": None, "recall_at_10": r, "search_chunks_per_s": 1000 / p}
              for p, r in ((1, 0.5), (2, 0.8), (4, 0.96), (8, 0.99))]
    assert choose(points, 0.95) == (points[2], True)
    assert choose(points, 0.995) == (points[3], False)  # none reaches it: the best recall, said so
    hnsw = [{"nprobe": 4, "ef_search": ef, "recall_at_10": r, "search_chunks_per_s": s}
            for ef, r, s in ((16, 0.90, 900), (32, 0.96, 800), (64, 0.97, 600))]
    assert choose(hnsw, 0.95)[0]["ef_search"] == 32  # with HNSW: the fastest point that reaches it


# ---------------------------------------------------------------- planted copies


@pytest.fixture(scope="module")
def planted_workdir(tmp_path_factory, sample_texts, gpt):
    """270 training documents, then modified copies of 15 of the 30 valid documents (one word changed in
    the first sentence) as training documents, then the 30 valid documents; the real model."""
    tmp = tmp_path_factory.mktemp("planted")
    train, valid = sample_texts[2000:2270], sample_texts[2270:2300]
    copies = []
    for text in valid[:15]:
        first, rest = text.split(" ", 1) if " " in text else (text, "")
        copies.append(f"Indeed {rest}")
    prefix = write_corpus(tmp / "planted", train + copies + valid, gpt)
    w = tmp / "w"
    run_build(["--workdir", w, "--tasks", "build", "--data-path", "1", prefix, "--seq-length", "256",
               "--split", "285,30,0", "--block-size", "256", "--cluster", "synchronous"])
    return w, copies


def test_planted_copies_show_as_leakage_and_the_rest_does_not(planted_workdir, gpt):
    """Valid chunks whose 13-grams the copies hold (brute force over the corpus) measure >= 0.8; chunks
    that no copy holds measure low."""
    from retro_dask.formats.sample_maps import Samples

    w, copies = planted_workdir
    copy_tokens = [gpt.encode(c) for c in copies]
    samples = Samples(w, "valid")
    cps, cl = samples.chunks_per_sample, samples.chunk_length
    brute = []
    for s in range(len(samples)):
        tokens = samples.tokens(s)[: cps * cl].reshape(cps, cl)
        for chunk in tokens.tolist():
            brute.append(max(brute_share(chunk, t) for t in copy_tokens))
    brute = np.array(brute)
    stats = json.loads((w / "stats" / "leakage.json").read_text())["splits"]["valid"]
    counts = np.array(stats["histogram"]["counts"])
    edges = np.array(stats["histogram"]["edges"])
    n = stats["n_chunks"]
    assert n == len(brute) and (brute >= 0.95).sum() >= 5 and (brute == 0).sum() >= 5, brute
    above_08 = round(stats["share_above_0.8"] * n)
    assert above_08 >= (brute >= 0.95).sum(), (above_08, np.sort(brute))   # every copied chunk found
    assert above_08 <= (brute >= 0.5).sum()                              # and nothing else that high
    low = counts[edges[:-1] < 0.2].sum()
    assert low >= (brute == 0).sum()                                     # the others low


def test_max_overlap_masks_exactly_the_neighbours_above_it(planted_workdir):
    from retro_dask import RetroDataset

    w, _ = planted_workdir
    plain = RetroDataset(w, "valid", num_neighbors=4, num_retrieved_chunks=2)
    filtered = RetroDataset(w, "valid", num_neighbors=4, num_retrieved_chunks=2, max_overlap=0.5)
    masked = kept = 0
    for i in range(len(plain)):
        a, b = plain[i], filtered[i]
        text = a["text"].numpy()
        for c in range(a["neighbor_mask"].shape[0]):
            chunk = text[c * 64 : (c + 1) * 64].tolist()
            for k in range(a["neighbor_mask"].shape[1]):
                if not a["neighbor_mask"][c, k]:
                    assert not b["neighbor_mask"][c, k]
                    continue
                above = brute_share(chunk, a["neighbor_tokens"][c, k].tolist()) > 0.5
                assert bool(b["neighbor_mask"][c, k]) == (not above), (i, c, k)
                if above:
                    masked += 1
                    assert (b["neighbor_tokens"][c, k] == EOD).all() and (b["neighbor_chunks"][c, k] == -1).all()
                else:
                    kept += 1
                    assert np.array_equal(b["neighbor_tokens"][c, k], a["neighbor_tokens"][c, k])
    assert masked > 0 and kept > 0


# ---------------------------------------------------------------- nprobe auto on the sample corpus


def test_auto_nprobe_reaches_the_target_on_the_sample_corpus(tmp_path, sample_corpus_prefix, tiny_bert):
    """--query-nprobe auto (the default) picks the smallest nprobe whose recall@10 reaches the target on
    the tune's query chunks; other query chunks, drawn independently, confirm the saved neighbours' recall."""
    from retro_dask.build import recorded_config
    from retro_dask.formats.sample_maps import Samples
    from retro_dask.stages.recall import _neighbor_recall

    w = tmp_path / "w"
    target = 0.95
    run_build(["--workdir", w, "--tasks", "build", "--data-path", "1", sample_corpus_prefix, "--bert-model", tiny_bert,
               "--target-recall", str(target), "--valid-samples", "20", "--cluster", "synchronous"])
    tune = json.loads((w / "stats" / "tune.json").read_text())
    chosen = tune["chosen"]
    assert tune["reached"] and chosen["recall_at_10"] >= target
    smaller = [p for p in tune["points"] if p["nprobe"] < chosen["nprobe"]]
    assert smaller and all(p["recall_at_10"] < target for p in smaller)  # the smallest that reaches it
    query = json.loads((w / "stats" / "query-neighbors.json").read_text())
    assert query["nprobe"] == chosen["nprobe"] < int(tune["factory"].split("IVF")[1].split(",")[0])
    config_json = json.loads((w / "config.json").read_text())
    assert config_json["tuned"]["nprobe"] == chosen["nprobe"] and config_json["query"]["nprobe"] == "auto"
    assert (w / "stats" / "tune.png").stat().st_size > 10_000
    # Independent check: 600 other query chunks of the train split, exact search with the same filter.
    config = recorded_config(w)
    samples = Samples(w, "train")
    rows = np.random.default_rng(99).choice(len(samples) * samples.chunks_per_sample, size=600, replace=False)
    recall = _neighbor_recall(str(w), config, [("train", int(r)) for r in np.sort(rows)], {"train": samples.meta["hash"]})
    assert recall >= target - 0.03, recall
    # The tune cost little: it embedded its own queries once, and query-neighbors reused them.
    train_stats = json.loads((w / "stats" / "query-train.json").read_text())
    assert train_stats["n_reused_total"] > 0
