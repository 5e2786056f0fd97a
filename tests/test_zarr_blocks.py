"""Zarr blocks: chunk files written here are Zarr's own bytes, checksummed, and reopened with care."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from retro_dask.engine.targets import ZarrTarget
from retro_dask.formats import zarr_blocks


def test_reopened_arrays_follow_their_zarr_json(tmp_path):
    """A process reuses its opened arrays, but never one whose zarr.json was replaced."""
    path = tmp_path / "a.zarr"
    zarr_blocks.create(path, (10, 2), np.int64, 4)
    assert zarr_blocks.open_read(path) is zarr_blocks.open_read(path)  # reused while unchanged
    assert zarr_blocks.open_read(path).shape == (10, 2)
    zarr_blocks.create(path, (20, 2), np.int64, 8)  # another layout: created anew
    assert zarr_blocks.open_read(path).shape == (20, 2) and zarr_blocks.open_read(path).chunks == (8, 2)
    assert zarr_blocks.open_format(path).n_blocks == 3
    ZarrTarget.open(str(tmp_path), "t", path).write_block(1, np.ones((8, 2), np.int64))
    assert zarr_blocks.open_read(path)[8:16].tolist() == [[1, 1]] * 8


def test_block_files_are_the_bytes_zarr_writes(tmp_path):
    """The target encodes chunk files itself: the same bytes as Zarr's own write (crc32c included), the
    edge chunk too; read_rows decodes them (and unwritten chunks as the fill value) as Zarr reads them."""
    rng = np.random.default_rng(0)
    for dtype, compressed in ((np.int64, True), (np.float32, False), (np.float16, False)):
        ours, theirs = tmp_path / f"ours-{dtype.__name__}.zarr", tmp_path / f"zarr-{dtype.__name__}.zarr"
        n, rows = 10, 4
        data = (rng.standard_normal((n, 3)) * 1000).astype(dtype)
        target = ZarrTarget.create(str(tmp_path), "t", ours, (n, 3), dtype, rows, compressed=compressed, fill_value=7)
        reference = zarr_blocks.create(theirs, (n, 3), dtype, rows, compressed=compressed, fill_value=7)
        reference = zarr.open_array(str(theirs), mode="r+")
        for block in (0, 2):  # block 2 is the edge chunk (2 of 4 rows); block 1 stays unwritten
            lo, hi = block * rows, min(n, block * rows + rows)
            target.write_block(block, data[lo:hi])
            reference[lo:hi] = data[lo:hi]
            assert (ours / "c" / str(block) / "0").read_bytes() == (theirs / "c" / str(block) / "0").read_bytes()
        expected = zarr.open_array(str(theirs))[:]
        assert np.array_equal(zarr.open_array(str(ours))[:], expected)
        for lo, hi in ((0, n), (3, 9), (4, 8), (9, 10)):
            got = zarr_blocks.read_rows(ours, lo, hi)
            assert got.dtype == np.dtype(dtype) and np.array_equal(got, expected[lo:hi])
            assert got.flags.writeable  # as Zarr's reads are


@pytest.mark.parametrize("compressed, where", [
    (True, 3),     # a byte of a compressed integer block
    (False, 40),   # a byte of raw floats
    (False, -1),   # a byte of the checksum itself
])
def test_a_changed_byte_fails_its_checksum_everywhere(tmp_path, compressed, where):
    """One byte changed in place, same size: our reader, Zarr and the checksum scan all refuse the block."""
    path = tmp_path / "a.zarr"
    target = ZarrTarget.create(str(tmp_path), "t", path, (8, 4), np.float32 if not compressed else np.int64, 4,
                               compressed=compressed)
    for block in range(2):
        target.write_block(block, np.arange(16).reshape(4, 4) + 16 * block)
    file = zarr_blocks.chunk_file(path, 1)
    data = bytearray(file.read_bytes())
    data[where] ^= 0x01
    file.write_bytes(bytes(data))
    assert zarr_blocks.block_checksum_problems(path, [0, 1]).keys() == {1}
    with pytest.raises(zarr_blocks.ChunkChecksumError, match="c/1/0"):
        zarr_blocks.read_rows(path, 0, 8)
    with pytest.raises(ValueError, match="checksum"):
        zarr.open_array(str(path), mode="r")[:]
    np.testing.assert_array_equal(zarr_blocks.read_rows(path, 0, 4), np.arange(16).reshape(4, 4))


def test_a_truncated_or_missing_block_is_named(tmp_path):
    path = tmp_path / "a.zarr"
    target = ZarrTarget.create(str(tmp_path), "t", path, (8, 2), np.int64, 4)
    target.write_block(0, np.ones((4, 2), np.int64))
    target.write_block(1, np.ones((4, 2), np.int64))
    file = zarr_blocks.chunk_file(path, 0)
    file.write_bytes(file.read_bytes()[:2])
    zarr_blocks.chunk_file(path, 1).unlink()
    problems = zarr_blocks.block_checksum_problems(path, [0, 1])
    assert "truncated" in problems[0] and "missing" in problems[1]


def test_a_target_writes_whole_blocks_only(tmp_path):
    target = ZarrTarget.create(str(tmp_path), "t", tmp_path / "a.zarr", (10, 2), np.int64, 4)
    with pytest.raises(ValueError, match="not whole blocks of 4 rows"):
        target[target.region(2, 6)] = np.zeros((4, 2), np.int64)
    target[target.region(8, 10)] = np.zeros((2, 2), np.int64)  # the edge block
    assert zarr_blocks.chunk_file(tmp_path / "a.zarr", 2).exists()
