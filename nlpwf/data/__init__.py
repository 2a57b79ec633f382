"""Data in: GLUE folders, the Hugging Face Hub, the shipped sample, and tokenisation."""
