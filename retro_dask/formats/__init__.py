"""File formats and the workdir layout: Megatron indexed datasets, Zarr blocks, Faiss lists, ledgers."""
