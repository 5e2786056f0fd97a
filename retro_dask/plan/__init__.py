"""Pure planning: block ranges, sample maps, index choices. No Zarr, Faiss or torch here."""
