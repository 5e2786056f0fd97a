"""retro-dask: the RETRO retrieval database and pretraining neighbours, built out of core on Dask.

``from retro_dask import RetroDataset`` gives the PyTorch dataset of samples
and neighbours; ``from retro_dask import inspect as retro`` the notebook API.
"""

__version__ = "0.1.0"

__all__ = ["RetroDataset", "__version__"]


def __getattr__(name):
    # torch is imported only when the dataset is asked for.
    if name == "RetroDataset":
        from .dataset import RetroDataset

        return RetroDataset
    raise AttributeError(f"module 'retro_dask' has no attribute {name!r}")
