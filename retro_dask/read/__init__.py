"""Reading a built workdir: lazy arrays for notebooks, RetroDataset for training, the inspect API."""
