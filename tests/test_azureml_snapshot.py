"""The code snapshot sent to Azure ML: the project's runnable parts, never a secret."""
from __future__ import annotations

import shutil
from pathlib import Path

from nlpwf import PROJECT_ROOT
from nlpwf.azureml import snapshot


def make_project(root: Path) -> Path:
    """A copy of this project's runnable parts, with what a real checkout accumulates planted in it."""
    for part in ("nlpwf", "conf", "launchers"):
        shutil.copytree(PROJECT_ROOT / part, root / part, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy2(PROJECT_ROOT / name, root / name)
    planted = {
        "config.json": '{"subscription_id": "planted-subscription"}',
        "conf/config.json": '{"subscription_id": "planted-subscription"}',
        ".env": "AZURE_CLIENT_SECRET=planted-secret",
        "nlpwf/.env.local": "TOKEN=planted-secret",
        "conf/deploy.pem": "-----BEGIN PRIVATE KEY----- planted-secret",
        "launchers/signing.key": "planted-secret",
        "nlpwf/__pycache__/x.cpython-311.pyc": "cache",
        ".git/config": "[core]",
        "outputs/2026-01-01/metrics.json": "{}",
        "multirun/2026-01-01/0/metrics.json": "{}",
        "conf/outputs/stray.txt": "run output",
        ".venv/pyvenv.cfg": "home = /usr",
        "nlpwf/resources/.venv2/pyvenv.cfg": "home = /usr",
    }
    for rel, text in planted.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    (root / "conf" / "weights.bin").write_bytes(b"\0" * (2 * 2**20))  # over the 1 MB limit used below
    return root


def test_snapshot_keeps_code_and_drops_secrets_caches_outputs_and_large_files(tmp_path):
    project = make_project(tmp_path / "project")
    snap = snapshot.build(tmp_path / "snap", root=project, max_file_mb=1)
    files = snapshot.files(snap)

    assert {"nlpwf/cli.py", "nlpwf/azureml/job.py", "conf/config.yaml", "conf/compute/d32_v5.yaml", "setup.cfg",
            "pyproject.toml", "launchers/setup.cfg",
            "launchers/hydra_plugins/nlpwf_azureml_launcher/config.py", ".amlignore"} <= set(files)
    assert not [f for f in files if f.endswith(("config.json", ".pem", ".key", ".pyc", "pyvenv.cfg", "weights.bin"))]
    assert not [f for f in files if Path(f).name.startswith(".env")]
    assert not [f for f in files if f.split("/")[0] in (".git", "outputs", "multirun", ".venv")]
    assert "conf/outputs/stray.txt" not in files
    for f in files:
        assert "planted-secret" not in (snap / f).read_text(errors="ignore")
        assert "planted-subscription" not in (snap / f).read_text(errors="ignore")


def test_amlignore_repeats_the_rules_for_azures_upload(tmp_path):
    snap = snapshot.build(tmp_path / "snap", root=make_project(tmp_path / "project"))
    rules = (snap / ".amlignore").read_text().splitlines()
    for rule in ("config.json", ".env", "*.pem", "*.key", ".git/", "outputs/", "multirun/", "__pycache__/"):
        assert rule in rules


def test_snapshot_of_this_project_is_small_and_has_no_workspace_config():
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        snap = snapshot.build(Path(d) / "snap")
        files = snapshot.files(snap)
        assert "nlpwf/__main__.py" in files and not any(f.endswith("config.json") for f in files)
        assert sum((snap / f).stat().st_size for f in files) < 20 * 2**20
