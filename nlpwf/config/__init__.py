"""Config checks: types and job shape before anything starts, StartCheck before Hydra writes,
storage errors worded when they happen."""
