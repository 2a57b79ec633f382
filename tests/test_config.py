"""Every config option composes, presets say what they promise, and overrides behave."""
from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from nlpwf import CONF_DIR

from conftest import compose

# conf/GROUP/OPTION.yaml for the groups a job composes (hydra's own groups excluded); files
# starting with "_" are bases other options extend, not options.
OPTIONS = sorted((p.parent.name, p.stem) for p in CONF_DIR.glob("*/*.yaml") if not p.stem.startswith("_"))


def test_every_group_has_options():
    groups = {g for g, _ in OPTIONS}
    assert {"model", "dataset", "precision", "compute", "launcher", "logger", "experiment", "hparams_search", "stage"} <= groups


@pytest.mark.parametrize("group,option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_option_composes_and_resolves(group, option):
    cfg = compose(f"{group}={option}")
    container = OmegaConf.to_container(cfg, resolve=True)
    assert container["nodes"] >= 1
    # An option of a non-global group lands in its own node.
    if group in ("model", "dataset", "precision", "compute", "logger", "stage"):
        assert cfg[group].name == option or group == "compute"


def test_default_is_the_offline_quickstart():
    cfg = compose()
    assert (cfg.model.name, cfg.dataset.name, cfg.precision.name, cfg.compute.name) == ("minilm_l6", "paraphrase_sample", "auto", "local")
    assert cfg.model.source.startswith("package:")
    assert cfg.stage.name == "train" and cfg.nodes == 1


def test_mrpc_seed_is_the_seed_recipe():
    cfg = compose("experiment=mrpc_seed")
    t = cfg.training
    assert cfg.model.name == "bert_base_uncased" and cfg.model.config.num_hidden_layers == 12
    assert cfg.model.config.hidden_size == 768 and cfg.model.config.max_position_embeddings == 512
    assert cfg.dataset.name == "mrpc" and cfg.dataset.eval_split == "test"
    assert cfg.dataset.max_seq_length == 128 and cfg.dataset.pad_to_max_length is True
    assert cfg.precision.name == "fp32"
    assert cfg.nodes * cfg.compute.processes_per_node * t.per_device_train_batch_size == 16
    assert (t.learning_rate, t.num_train_epochs, t.weight_decay, t.warmup_steps, t.seed) == (5e-5, 3, 0.0, 0, 42)
    assert t.lr_scheduler_type == "linear" and t.optim == "adamw_torch" and t.train_sampling_strategy == "random"


def test_command_line_beats_experiment_preset():
    cfg = compose("experiment=mrpc_seed", "model=minilm_l6", "training.learning_rate=3e-5", "nodes=1")
    assert cfg.model.name == "minilm_l6" and cfg.training.learning_rate == 3e-5 and cfg.nodes == 1


def test_training_keys_are_training_arguments_names():
    import dataclasses

    from transformers import TrainingArguments

    fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    for preset in sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml")):
        training = compose(f"experiment={preset}").training
        assert set(training) - {"resume"} <= fields, preset


def test_any_training_argument_can_be_added():
    assert compose("+training.max_grad_norm=0.5").training.max_grad_norm == 0.5


def test_local_launcher_is_the_hydra_launcher():
    cfg = compose(return_hydra_config=True)
    assert cfg.hydra.launcher._target_.endswith("NlpwfLocalLauncher")


def test_optuna_search_maximises_the_objective():
    cfg = compose("hparams_search=optuna", return_hydra_config=True)
    assert cfg.hydra.sweeper._target_.endswith("OptunaSweeper")
    assert cfg.hydra.sweeper.direction == "maximize" and cfg.objective == "eval_accuracy"
    assert "training.learning_rate" in cfg.hydra.sweeper.params


def _leaves(node, prefix=""):
    """(dotted key, value) of every leaf of a plain dict."""
    for key, value in node.items():
        if isinstance(value, dict):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


@pytest.mark.parametrize("preset", sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml")))
def test_presets_list_only_what_they_change(preset):
    """Every value a preset sets differs from what the config would be without it (with the
    preset's own group choices, under some compute option), so a preset reads as its difference
    from the defaults. (mrpc_seed's 1 process per node is the local default, not d32_v5's.)"""
    raw = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "experiment" / f"{preset}.yaml"))
    groups = [f"{k.replace('override /', '')}={v}" for d in raw.pop("defaults", []) for k, v in d.items()]
    computes = sorted(p.stem for p in (CONF_DIR / "compute").glob("*.yaml"))
    bases = [compose(*groups, f"compute={c}") for c in computes]
    for key, value in _leaves(raw):
        assert any(OmegaConf.select(b, key) != value for b in bases), f"{preset} sets {key}={value}, already the default"
    with_preset = compose(f"experiment={preset}")
    for key, value in _leaves(raw):
        assert OmegaConf.select(with_preset, key) == value


@pytest.mark.parametrize("option, vm_size, cluster", [("d32s_v6", "Standard_D32s_v6", "cpu-d32s-v6"),
                                                     ("d32as_v6", "Standard_D32as_v6", "cpu-d32as-v6")])
def test_v6_sizes_are_d32_v5_on_another_vm_and_cluster(option, vm_size, cluster):
    v5, v6 = compose("compute=d32_v5").compute, compose(f"compute={option}").compute
    assert (v6.vm_size, v6.cluster.name) == (vm_size, cluster)
    same = ("vcpus", "cores", "memory_gb", "processes_per_node", "threads_per_process")
    assert [v6[k] for k in same] == [v5[k] for k in same]
    assert {k: v for k, v in v6.cluster.items() if k != "name"} == {k: v for k, v in v5.cluster.items() if k != "name"}
    hydra_cfg = compose(f"compute={option}", return_hydra_config=True).hydra
    assert hydra_cfg.launcher._target_.endswith("NlpwfAzureMLLauncher") and str(hydra_cfg.mode) == "RunMode.MULTIRUN"


@pytest.mark.parametrize("stage", ["evaluate", "predict", "quantize", "benchmark"])
def test_serving_stages_share_one_base(stage):
    cfg = compose(f"stage={stage}", "stage.model_path=/m", "stage.batch_size=7").stage
    assert (cfg.name, cfg.model_path, cfg.batch_size, cfg.max_length, cfg.compile) == (stage, "/m", 7, 128, True)
