"""Pretraining sample maps against brute force."""

from __future__ import annotations

import numpy as np
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from retro_dask.plan.samples import build_blend, build_doc_idx, build_sample_idx, epoch_samples


def brute_force_samples(sizes_in_order, n_samples, seq_length):
    """Walk the concatenated token stream token by token."""
    owner = np.concatenate([np.full(s, i) for i, s in enumerate(sizes_in_order)] or [np.zeros(0, int)])
    offset = np.concatenate([np.arange(s) for s in sizes_in_order] or [np.zeros(0, int)])
    out = []
    for i in range(n_samples + 1):
        t = i * seq_length
        out.append((owner[t], offset[t]))
    return np.array(out)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 50), min_size=1, max_size=30), st.integers(1, 40), st.data())
def test_sample_idx_equals_brute_force(sizes, seq_length, data):
    total = sum(sizes)
    max_samples = epoch_samples(total, seq_length)
    assume(max_samples > 0)
    n = data.draw(st.integers(1, max_samples))
    got = build_sample_idx(np.array(sizes), n, seq_length)
    np.testing.assert_array_equal(got, brute_force_samples(sizes, n, seq_length))


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 50), min_size=1, max_size=30), st.integers(1, 40), st.integers(0, 2**31))
def test_sample_tokens_are_the_concatenated_documents(sizes, seq_length, seed):
    """Each sample is seq_length + 1 consecutive tokens of the shuffled stream; consecutive samples share one."""
    rng = np.random.default_rng(seed)
    docs = [rng.integers(0, 1000, s) for s in sizes]
    order = build_doc_idx(len(sizes), 3, rng)
    stream = np.concatenate([docs[d] for d in order] or [np.zeros(0, int)])
    n = epoch_samples(len(stream), seq_length)
    idx = build_sample_idx(np.array([sizes[d] for d in order]), n, seq_length)
    for i in range(n):
        (p0, o0), (p1, o1) = idx[i], idx[i + 1]
        pieces = [docs[order[p]][(o0 if p == p0 else 0):(o1 + 1 if p == p1 else None)] for p in range(p0, p1 + 1)]
        np.testing.assert_array_equal(np.concatenate(pieces), stream[i * seq_length : i * seq_length + seq_length + 1])


def test_doc_idx_shuffles_each_epoch():
    rng = np.random.default_rng(1)
    order = build_doc_idx(100, 3, rng)
    epochs = order.reshape(3, 100)
    assert all(sorted(e) == list(range(100)) for e in epochs)
    assert not np.array_equal(epochs[0], epochs[1])


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 2000), st.lists(st.floats(0.01, 10.0), min_size=1, max_size=5))
def test_blend_follows_the_weights(n, weights):
    which, number = build_blend(n, weights)
    assert len(which) == n
    w = np.array(weights) / sum(weights)
    for k in range(len(weights)):
        mine = number[which == k]
        np.testing.assert_array_equal(mine, np.arange(len(mine)))  # each dataset's samples in order
        # Every prefix holds each dataset in proportion, to within the bound the docstring derives.
        counts = np.cumsum(which == k)
        expected = np.arange(1, n + 1) * w[k]
        assert np.all(np.abs(counts - expected) <= 0.5 + len(w) * w[k] / 2 + 1e-9)


def test_samples_of_a_workdir_match_their_documents(tmp_path, small_corpus_prefix, second_corpus_prefix):
    """End to end through the cached maps: tokens are the sample's documents, in order."""
    from retro_dask.config import BuildConfig, ChunkConfig, DataBlend, QueryConfig
    from retro_dask.formats.indexed_dataset import IndexedDataset
    from retro_dask.formats.sample_maps import Samples, prepare_samples

    config = BuildConfig(ChunkConfig(DataBlend((2.0, 1.0), (small_corpus_prefix, second_corpus_prefix)),
                                     split=(0.8, 0.2, 0.0)),
                         query=QueryConfig(seq_length=256, train_samples=150))
    for split in ("train", "valid"):
        prepare_samples(str(tmp_path), config, split)
        samples = Samples(tmp_path, split)
        if split == "train":
            assert len(samples) == 150
            assert abs(int((samples.dataset_index[:] == 0).sum()) - 100) <= 1
        datasets = [IndexedDataset(p) for p in config.chunk.data.prefixes]
        for i in range(len(samples)):
            k, docs = samples.documents(i)
            k, p0, o0, p1, o1 = samples.locate(i)
            stream = np.concatenate([np.asarray(datasets[k][d]) for d in docs])
            tokens = samples.tokens(i)
            assert len(tokens) == 257
            np.testing.assert_array_equal(tokens, stream[o0 : o0 + 257])
    # Cached: a second prepare keeps the files.
    before = (tmp_path / "query" / "train" / "samples" / "doc_idx_0.npy").stat().st_mtime_ns
    prepare_samples(str(tmp_path), config, "train")
    assert (tmp_path / "query" / "train" / "samples" / "doc_idx_0.npy").stat().st_mtime_ns == before
