#!/usr/bin/env bash
# The inference server's own environment beside the project, .venv-serve: exactly the packages of
# the inference image (requirements.lock, installed with --no-deps, then pip check), so that a
# package the endpoint's image lacks is missing here too. stage=serve, stage=deploy's emulation
# and benchmarks/serve.py run the server with its python; nlpwf itself comes from the project
# folder (the server puts its app root on sys.path, as Azure does with the deployment's code).
# About 70 s on 2 cores with torch's wheel already on disk.
set -euo pipefail
cd "$(dirname "$0")/../.."
python3 -m venv .venv-serve
.venv-serve/bin/python -m pip install -q -U pip
.venv-serve/bin/python -m pip install -q --no-deps -r docker/inference/requirements.lock
.venv-serve/bin/python -m pip check
