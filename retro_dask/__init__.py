"""retro-dask: the RETRO retrieval database and pretraining neighbours, built out of core on Dask."""

__version__ = "0.1.0"
