"""What a job leaves behind: files written atomically, metrics, plots, the sweep summary."""
