"""Serving a saved model: the classifier (one text or a pair; classes or a score), INT8 backends, and text files streamed in chunks."""
