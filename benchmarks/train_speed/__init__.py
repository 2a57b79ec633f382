"""Training speed on this machine: the seed recipe and the plain transformers Trainer against
nlpwf's fast settings, in one run.

    python benchmarks/train_speed.py            # throughput and all-reduce: about 30 minutes on 2 cores
    python benchmarks/train_speed.py --quick    # a smoke run, a few minutes
    python benchmarks/train_speed.py --sections throughput,tta,parity,allreduce   # + accuracy: about 1h15

Each nlpwf variant trains in its own worker process through nlpwf's real training path
(`nlpwf.stages.train.train`); the plain-Trainer variants train with transformers' Trainer alone
(same data, model, seed, flags and batch order; dynamic padding; no nlpwf add-on). The workers
take turns (scheduler.py, worker.py): one trains for a few seconds of its own time while the
others wait, so a burst of load from other users of the machine hits every variant alike. A
worker's clock runs only during its turns. Sections, one module each:

1. peak matmul FLOP/s of this machine (large GEMM, fp32 and bf16), measured between turns (flops.py);
2. training throughput (samples/s, tokens/s, MFU) of seed, plain Trainer and fast variants for
   minilm_l6 and the bert_base_uncased architecture (random init), and the per-step loss traces
   of variants that compute the same maths (fast against plain, unpadded against padded) (throughput.py);
3. time-to-accuracy on MRPC dev for minilm_l6: seed recipe against `experiment=mrpc_minilm` (tta.py);
4. parity: both recipes on minilm_l6 trained their full 3 epochs, taking turns: dev accuracy at
   each epoch end and the training throughput ratio over the whole run (parity.py);
5. gloo all-reduce time for each model's gradients, 2 processes on loopback, and the
   analytic multi-node model of benchmarks/README.md (allreduce.py).

Sections not run are carried over from the previous results file (with their own date).
Writes benchmarks/results/train_speed.{md,json} (report.py) and throughput.png,
accuracy_time.png (plots.py). What runs is in variants.py; the command line in __main__.py.

The names below are what the other benchmark scripts (compile_speed.py, step_profile.py,
malloc_reuse.py) use: `import train_speed as ts` finds this package.
"""
from .flops import train_flops
from .report import machine
from .scheduler import start_workers, take_turns
from .throughput import throughput_stats
from .variants import COMMON, DEFAULT_DATA, MODEL_ARGS, OFFLINE_ENV, RESULTS, VARIANTS

__all__ = ["COMMON", "DEFAULT_DATA", "MODEL_ARGS", "OFFLINE_ENV", "RESULTS", "VARIANTS", "machine", "start_workers",
           "take_turns", "throughput_stats", "train_flops"]
