"""Pure planning arithmetic against brute force (no disk, no Dask)."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from retro_dask.plan.index import auto_core, default_nprobe, plan_index, training_problem
from retro_dask.plan.chunks import (
    apportion,
    candidate_block,
    count_tokens,
    plan_candidate_blocks,
    plan_compaction,
    rebatch,
    sample_row_blocks,
    sample_rows,
    split_document_ranges,
)


def brute_candidates(datasets, chunk_length):
    """Every candidate chunk, walking documents one by one."""
    out = []
    for d, (sizes, a, b) in enumerate(datasets):
        for doc in range(a, b):
            for start in range(0, int(sizes[doc]), chunk_length):
                out.append((d, doc, start, min(start + chunk_length, int(sizes[doc]))))
    return np.array(out, dtype=np.int64).reshape(-1, 4)


sizes_lists = st.lists(st.integers(0, 300), min_size=0, max_size=40)


@st.composite
def corpora(draw):
    n = draw(st.integers(1, 3))
    out = []
    for _ in range(n):
        sizes = np.array(draw(sizes_lists), dtype=np.int32)
        a = draw(st.integers(0, len(sizes)))
        b = draw(st.integers(a, len(sizes)))
        out.append((sizes, a, b))
    return out


@settings(max_examples=200, deadline=None)
@given(corpora(), st.integers(1, 80), st.integers(1, 50))
def test_candidate_blocks_equal_brute_force(datasets, chunk_length, block_size):
    expected = brute_candidates(datasets, chunk_length)
    plan = plan_candidate_blocks(datasets, chunk_length, block_size)
    assert plan.n_candidates == len(expected)
    assert sum(plan.candidates_per_dataset) == len(expected)
    got = [candidate_block([s for s, _, _ in datasets], [(a, b) for _, a, b in datasets], plan.starts[blk],
                           plan.block_rows(blk)[1] - plan.block_rows(blk)[0], chunk_length)
           for blk in range(plan.n_blocks)]
    got = np.concatenate(got) if got else np.zeros((0, 4), np.int64)
    np.testing.assert_array_equal(got, expected)


def test_candidate_plan_scans_sizes_in_windows(monkeypatch):
    # A corpus larger than the scan window plans the same as with one window.
    import retro_dask.plan.chunks as plan_mod

    rng = np.random.default_rng(0)
    sizes = rng.integers(0, 500, size=5000).astype(np.int32)
    whole = plan_candidate_blocks([(sizes, 0, 5000)], 64, 100)
    monkeypatch.setattr(plan_mod, "SIZE_WINDOW", 7)
    windowed = plan_candidate_blocks([(sizes, 0, 5000)], 64, 100)
    assert whole == windowed


@pytest.mark.parametrize("n_docs, split, expected", [
    (100, (0.98, 0.02, 0.0), [(0, 98), (98, 100), (100, 100)]),  # Megatron's default shape
    (10, (1 / 3, 1 / 3, 1 / 3), [(0, 4), (4, 7), (7, 10)]),      # Megatron: the rounding shortfall shifts every boundary
    (0, (0.5, 0.5, 0.0), [(0, 0), (0, 0), (0, 0)]),               # empty dataset
    (7, (1.0, 0.0, 0.0), [(0, 7), (7, 7), (7, 7)]),               # everything in train
])
def test_split_document_ranges(n_docs, split, expected):
    assert split_document_ranges(n_docs, split) == expected


@given(st.integers(0, 10**6), st.lists(st.floats(0.0, 100.0), min_size=3, max_size=3).filter(lambda s: sum(s) > 0))
def test_split_ranges_cover_documents(n_docs, split):
    r = split_document_ranges(n_docs, split)
    assert r[0][0] == 0 and r[-1][1] == n_docs
    assert all(r[i][1] == r[i + 1][0] for i in range(2))
    assert all(a <= b for a, b in r)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 30), max_size=30), st.integers(1, 40))
def test_compaction_plan(valid_per_block, block_size):
    # Ranks of valid rows, brute force: (block, index within the block's valid rows).
    ranks = [(b, i) for b, n in enumerate(valid_per_block) for i in range(n)]
    plan = plan_compaction(valid_per_block, block_size)
    flat = [(s.block, i) for out in plan for s in out for i in range(s.start, s.stop)]
    assert flat == ranks
    assert all(sum(s.stop - s.start for s in out) == block_size for out in plan[:-1])


@pytest.mark.parametrize("total, weights, caps, expected", [
    (10, [1, 1], [100, 100], [5, 5]),      # even split
    (10, [3, 1], [100, 100], [8, 2]),      # largest remainder: 7.5 -> 8, 2.5 -> 2
    (10, [1, 1], [2, 100], [2, 8]),        # a capped dataset's share goes to the other
    (10, [1, 1], [2, 3], [2, 3]),          # fewer rows than asked: everything
    (0, [1, 1], [5, 5], [0, 0]),           # nothing asked
])
def test_apportion(total, weights, caps, expected):
    assert apportion(total, weights, caps) == expected


@given(st.integers(0, 5000), st.integers(0, 5000), st.integers(0, 2**32 - 1))
def test_sample_rows_is_a_sorted_uniform_subset(n_rows, n_sample, seed):
    rows = sample_rows(n_rows, n_sample, np.random.default_rng(seed))
    assert len(rows) == min(n_rows, n_sample)
    assert np.all(np.diff(rows) > 0)
    assert len(rows) == 0 or (rows[0] >= 0 and rows[-1] < n_rows)


def test_sample_rows_is_uniform_and_memory_follows_the_sample():
    """Every row equally likely (chi-square over 20 bins), and no O(n_rows) array for a large range."""
    import tracemalloc

    counts = np.zeros(20)
    for seed in range(200):
        counts += np.bincount(sample_rows(100_000, 2_000, np.random.default_rng(seed)) // 5_000, minlength=20)
    expected = counts.sum() / 20
    assert ((counts - expected) ** 2 / expected).sum() < 43.8  # chi-square, 19 degrees of freedom, p = 0.001
    tracemalloc.start()
    rows = sample_rows(80_000_000, 5_000_000, np.random.default_rng(0))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert len(np.unique(rows)) == 5_000_000
    assert peak < 300e6, peak  # numpy's sampler would hold the range: 640 MB


@given(st.integers(0, 3000), st.integers(0, 3000), st.integers(1, 700), st.integers(0, 2**32 - 1))
def test_sample_row_blocks_are_a_sorted_subset_block_by_block(n_rows, n_sample, block, seed):
    parts = list(sample_row_blocks(n_rows, n_sample, np.random.default_rng(seed), block))
    assert len(parts) == -(-n_rows // block)
    for b, part in enumerate(parts):
        assert np.all((part >= b * block) & (part < min((b + 1) * block, n_rows)))
    rows = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    assert len(rows) == min(n_rows, n_sample)
    assert np.all(np.diff(rows) > 0)


def test_sample_row_blocks_are_uniform_and_memory_follows_the_block():
    """Bins that straddle blocks are equally likely, and no process holds the whole sample."""
    import tracemalloc

    counts = np.zeros(20)
    for seed in range(200):
        rows = np.concatenate(list(sample_row_blocks(100_000, 2_000, np.random.default_rng(seed), 3_000)))
        counts += np.bincount(rows // 5_000, minlength=20)
    expected = counts.sum() / 20
    assert ((counts - expected) ** 2 / expected).sum() < 43.8  # chi-square, 19 degrees of freedom, p = 0.001
    tracemalloc.start()
    n = 0
    for part in sample_row_blocks(80_000_000, 5_000_000, np.random.default_rng(0), 100_000):
        n += len(part)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert n == 5_000_000
    assert peak < 5e6, peak  # the sample alone is 40 MB


@given(st.lists(st.integers(0, 20)), st.integers(1, 7))
def test_rebatch_cuts_the_concatenation_into_equal_arrays(lengths, size):
    parts = [np.arange(n) + 100 * i for i, n in enumerate(lengths)]
    out = list(rebatch(iter(parts), size))
    joined = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    assert np.array_equal(np.concatenate(out) if out else np.zeros(0, np.int64), joined)
    assert all(len(o) == size for o in out[:-1]) and all(0 < len(o) <= size for o in out)


@given(st.lists(st.integers(0, 300), max_size=60), st.data())
def test_count_tokens_sums_by_windows(sizes, data):
    from retro_dask.plan import chunks as plan

    a = data.draw(st.integers(0, len(sizes)))
    b = data.draw(st.integers(a, len(sizes)))
    old, plan.SIZE_WINDOW = plan.SIZE_WINDOW, 7  # windows that split the range
    try:
        assert count_tokens(np.array(sizes, np.int32), a, b) == sum(sizes[a:b])
    finally:
        plan.SIZE_WINDOW = old


def test_sample_is_not_a_prefix():
    rows = sample_rows(100_000, 1000, np.random.default_rng(1234))
    assert rows[-1] > 90_000 and rows[0] < 10_000  # spread over the whole range


@pytest.mark.parametrize("n, dim, memory, expected", [
    (100, 384, 10**9, "Flat"),                                  # too few to cluster
    (20_601, 384, 8 * 10**9, "IVF512,Flat"),                    # the sample corpus
    (5_000_000, 384, 8 * 10**9, "IVF8192,Flat"),                # raw vectors still fit 8 GB
    (5_413_527, 384, 8 * 10**9, "OPQ64_256,IVF8192_HNSW32,PQ64"),  # just over 8 GB raw: OPQ+HNSW+PQ
    (100_000_000, 384, 8 * 10**9, "OPQ64_256,IVF32768_HNSW32,PQ64"),  # nlist ~ 4 sqrt(n)
    (100_000_000, 384, 2 * 10**9, "OPQ8_32,IVF32768_HNSW32,PQ8"),  # tight budget: 8-byte codes
    (200_000, 384, 10**8, "OPQ64_256,IVF2048_HNSW32,PQ64"),  # at least 1024 lists
])
def test_auto_index(n, dim, memory, expected):
    assert auto_core(n, dim, memory) == expected


@given(st.integers(1, 10**9), st.sampled_from([64, 384, 768, 1024]), st.integers(10**8, 10**11))
def test_auto_index_always_trainable(n, dim, memory):
    plan = plan_index("auto", "cosine", n, dim, memory, None)
    assert training_problem(plan, n) is None
    assert plan.factory.startswith("L2norm,")


def test_too_many_lists_is_refused_with_numbers():
    plan = plan_index("IVF1024,Flat", "l2", 20_000, 384, 10**9, None)
    problem = training_problem(plan, 20_000)
    assert "1024 inverted lists" in problem and "39 x 1024 = 39936" in problem and "20000" in problem
    assert "IVF512" in problem


def test_default_nprobe():
    assert default_nprobe(512) == 64 and default_nprobe(32) == 16 and default_nprobe(8) == 8
    assert default_nprobe(0) == 1


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 300), max_size=300), st.integers(1, 64), st.floats(0, 500),
       st.sampled_from([None, 300, 2000]))
def test_length_batches_cover_every_item_once(lengths, max_batch, cost, max_tokens):
    from retro_dask.plan.batches import length_batches

    batches = length_batches(np.array(lengths, dtype=np.int64), max_batch, cost, max_tokens)
    flat = np.concatenate(batches) if batches else np.zeros(0, np.int64)
    assert sorted(flat.tolist()) == list(range(len(lengths)))
    assert all(1 <= len(b) <= max_batch for b in batches)
    if max_tokens:  # a single item longer than the cap still gets a batch of its own
        assert all(len(b) == 1 or len(b) * max(lengths[i] for i in b) <= max_tokens for b in batches)
    # Batches come in length order, so each holds a contiguous run of the sorted lengths.
    maxima = [max(lengths[i] for i in b) for b in batches]
    minima = [min(lengths[i] for i in b) for b in batches]
    assert all(maxima[k] <= minima[k + 1] for k in range(len(batches) - 1))


def test_length_batches_beat_fixed_batches():
    from retro_dask.plan.batches import length_batches

    rng = np.random.default_rng(0)
    # Most chunks are full (about 65 wordpieces); document ends give a long tail of short ones.
    lengths = np.concatenate([rng.integers(60, 72, 900), rng.integers(3, 60, 124)])
    cost = lambda bs: sum(lengths[b].max() * len(b) + 190 for b in bs)  # noqa: E731
    order = np.argsort(lengths)
    fixed = [order[i : i + 64] for i in range(0, len(order), 64)]
    assert cost(length_batches(lengths, 128, 190)) < 0.99 * cost(fixed)
