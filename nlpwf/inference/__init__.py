"""Serving a saved model: the pair classifier, INT8 backends, and pair files streamed in chunks."""
