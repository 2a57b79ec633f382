"""`python benchmarks/train_speed.py [flags]`: runs the train_speed package beside this file
(benchmarks/train_speed/; what it measures is in its __init__.py, the flags in its __main__.py).
`import train_speed` from a script here finds the package, not this file: a directory with an
__init__.py comes before a module of the same name."""
if __name__ == "__main__":  # spawned workers re-run this file under another name: they must not start a run
    from train_speed.__main__ import main

    main()
