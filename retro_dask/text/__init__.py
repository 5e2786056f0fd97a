"""Tokenizers, WordPiece counts, the BERT encoder and the embedder."""
