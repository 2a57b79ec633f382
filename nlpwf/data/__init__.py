"""Data in: a task (one text or a pair; a class or a score) and its splits, from GLUE folders,
your own files, the Hugging Face Hub or the shipped samples, and tokenisation."""
