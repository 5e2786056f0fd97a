"""The pipeline stages, each a lazy Dask array stored by the executor: preprocess, db, embed, index, query, verify."""
