"""Moved: `python -m nlpwf.training.cpu` (what this machine offers a training process) is now
`python -m nlpwf.runtime.process`. This module only says so, for one release."""
import sys

if __name__ == "__main__":
    print("nlpwf: error: python -m nlpwf.training.cpu has moved: run python -m nlpwf.runtime.process", file=sys.stderr)
    sys.exit(2)
