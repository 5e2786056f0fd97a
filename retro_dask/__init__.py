"""retro-dask: the RETRO retrieval database and pretraining neighbours, built out of core on Dask.

``retro_dask.open_workdir(W)`` gives a built workdir's arrays as lazy Dask
arrays and ``retro_dask.embed(...)`` embeds chunks or texts lazily;
``from retro_dask import RetroDataset`` gives the PyTorch dataset of samples
and neighbours; ``from retro_dask import inspect as retro`` the notebook API.
"""

__version__ = "0.2.0"

__all__ = ["RetroDataset", "Workdir", "embed", "open_workdir", "__version__"]


def __getattr__(name):
    # Imported on first use: ``import retro_dask`` loads neither torch nor dask.
    if name == "RetroDataset":
        from .read.dataset import RetroDataset

        return RetroDataset
    if name in ("open_workdir", "embed", "Workdir"):
        from .read import lazy

        return getattr(lazy, name)
    if name == "inspect":
        from .read import inspect

        return inspect
    raise AttributeError(f"module 'retro_dask' has no attribute {name!r}")
