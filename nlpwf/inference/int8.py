"""INT8 models: quantize a `SequenceLogits` model, save it to a folder, load it back.

Backends:
- `inc_static`, `inc_dynamic`: Intel Neural Compressor 3.x on its PT2E path (torch.export,
  then prepare / calibrate / convert). Both need the calibration pass: INC's prepared graph
  holds observers that set the scales, and its convert() does not check that they saw any
  data; uncalibrated, the observers keep their initial values and the model outputs a constant.
  `calibrate` therefore refuses to hand on a model whose observers saw nothing.
- `torch_dynamic`: PyTorch's own dynamic INT8 of every nn.Linear (fbgemm/x86 kernels), which
  needs no graph capture or calibration.
- `auto` (stage=quantize only): one of the above, chosen for this CPU by `choose_backend`.

A quantized folder holds the model's config.json and tokenizer (so it serves like a model/
folder), `nlpwf_quantized.json` (the backend and where the model came from) and the weights
in the backend's own format.
"""
from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Callable, Sequence

import torch

from nlpwf import models
from nlpwf.data.tasks import TEXT_FIELDS
from nlpwf.errors import UserError
from nlpwf.inference.classifier import Classifier, SequenceLogits
from nlpwf.runtime.isa import Isa

log = logging.getLogger(__name__)

BACKENDS = ("inc_static", "inc_dynamic", "torch_dynamic")
AUTO = "auto"
MANIFEST = models.QUANTIZED_MANIFEST
TORCH_WEIGHTS = "quantized_state_dict.pt"
INC_DIR = "inc"

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def check_backend(backend: str, auto: bool = False) -> None:
    """`auto` is a choice a stage resolves before quantizing (`choose_backend`), not a backend:
    accepted only where `auto=True`."""
    known = ((AUTO,) if auto else ()) + BACKENDS
    if backend not in known:
        raise UserError(f"INT8 backend {backend!r} is unknown: use one of {', '.join(known)}")


def choose_backend(isa: Isa) -> tuple[str, str]:
    """The INT8 backend `auto` means on a CPU with this ISA, and why (one line for the log).

    - AMX-INT8, AVX512-VNNI or AVX-VNNI: `inc_static`. INC's static graph, compiled by inductor,
      runs its matmuls as oneDNN INT8 kernels built on the dot-product instructions (VPDPBUSD,
      or AMX tiles), with activation scales fixed at calibration, so nothing is quantized per
      call. Measured on AMD EPYC (Zen 4: AVX512-VNNI, AVX512-BF16, no AMX), MiniLM-L6, pairs
      padded to 128, stage=benchmark (docs/serving.md, "Which INT8 backend"): at 1 thread under
      load from other work, inc_static 2.89x fp32 at batch 1 and 3.05x at batch 16,
      torch_dynamic 2.46x / 2.63x, inc_dynamic 1.01x / 0.97x; on the quiet machine at 2 threads
      (benchmarks/results/quantize.md) 3.37x / 3.96x against 2.54x / 3.02x, and inc_static was
      the one INT8 backend within 1 point of fp32's MRPC accuracy.
    - None of them (AVX2 or plain AVX-512): `torch_dynamic`, with a warning. Without VNNI an
      INT8 dot product takes VPMADDUBSW + VPMADDWD, whose 16-bit intermediate saturates on full-
      range u8 x s8 inputs (oneDNN's "Nuances of int8 computations"); PyTorch's dynamic Linear
      quantizes activations to 7 bits (reduce_range) for exactly that reason, while INC's static
      graph uses the full range. Untested here (this CPU has VNNI): there INT8 may not beat fp32
      at all, and stage=benchmark on that machine settles it.
    """
    if isa.amx_int8 or isa.avx512_vnni or isa.avx_vnni:
        found = "AMX-INT8" if isa.amx_int8 else "AVX512-VNNI" if isa.avx512_vnni else "AVX-VNNI"
        return "inc_static", f"{found} present: INT8 matmuls run on dot-product instructions, where INC static INT8 was fastest"
    return "torch_dynamic", ("no VNNI or AMX-INT8: INT8 dot products are emulated, where PyTorch's 7-bit dynamic INT8 "
                             "cannot saturate; INT8 may not beat fp32 here, run stage=benchmark on this machine to check")


# ---------------------------------------------------------------- Neural Compressor (PT2E)

def _inc_config(backend: str, tuning: bool = False):
    from neural_compressor.torch.quantization import DynamicQuantConfig, StaticQuantConfig

    cls = StaticQuantConfig if backend == "inc_static" else DynamicQuantConfig
    if tuning:
        return cls.get_config_set_for_tuning()
    return cls()


def _dynamic_shapes(max_positions: int) -> dict:
    # Batch size and sequence length vary in serving (up to the model's position table).
    from torch.export import Dim

    batch, seq = Dim("batch", min=1, max=4096), Dim("seq", min=2, max=max_positions)
    return {name: {0: batch, 1: seq} for name in ("input_ids", "attention_mask", "token_type_ids")}


def export(model: torch.nn.Module, example: Batch):
    """The model as an ATen graph with dynamic batch and sequence dims, as INC's PT2E path needs."""
    from neural_compressor.torch.export import export as inc_export

    example = _exportable(example)
    config = getattr(getattr(model, "model", None), "config", None)
    max_positions = int(getattr(config, "max_position_embeddings", 512))
    return inc_export(model.eval(), example, dynamic_shapes=_dynamic_shapes(max_positions))


def _exportable(example: Batch) -> Batch:
    # torch.export specialises a dim that is 1 in the example to a constant: use 2 rows at least.
    if example[0].shape[0] >= 2:
        return example
    return tuple(t[:1].repeat(2, 1) for t in example)


def _observers(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    # torchao's and torch.ao's min/max and histogram observers all keep min_val / max_val.
    return [(name, m) for name, m in model.named_modules() if hasattr(m, "min_val") and hasattr(m, "max_val")]


def uncalibrated_observers(prepared: torch.nn.Module) -> list[str]:
    """Observers that never saw a tensor: their min_val is still empty or +inf."""
    return [name for name, m in _observers(prepared)
            if m.min_val.numel() == 0 or bool(torch.isinf(m.min_val).any())]


def calibration_batches(classifier: Classifier, split, samples: int, batch_size: int) -> list[Batch]:
    """A seeded sample of a prepared split (the train split), as model inputs. Random rather
    than the first rows: files are often sorted, and the scales should see the spread of real
    inputs."""
    sample = split.shuffle(seed=0).select(range(min(samples, len(split))))
    texts = [sample[name] for name in TEXT_FIELDS if name in sample.column_names]
    return [inputs for _, inputs in classifier.batches(*texts, batch_size=batch_size)]


def calibrate(prepared: torch.nn.Module, batches: Sequence[Batch]) -> None:
    """Run calibration pairs through a prepared model; refuse if an observer saw nothing."""
    if not batches:
        raise UserError("INT8 quantization needs calibration pairs: set stage.calibration_samples to 1 or more (256 is plenty)")
    with torch.no_grad():
        for batch in batches:
            prepared(*batch)
    missing = uncalibrated_observers(prepared)
    if missing:
        raise RuntimeError(f"calibration left {len(missing)} observer(s) without data (e.g. {missing[0]}): "
                           "the INT8 model would output constants")


def inc_quantize(model: torch.nn.Module, backend: str, calibration: Sequence[Batch], config=None):
    """INC prepare -> calibrate -> convert on the exported graph (qdq form)."""
    from neural_compressor.torch.quantization import convert, prepare

    prepared = prepare(export(model, calibration[0] if calibration else _empty_example()), config or _inc_config(backend))
    calibrate(prepared, calibration)
    return convert(prepared)


def _empty_example() -> Batch:
    ones = torch.ones(2, 8, dtype=torch.long)
    return ones, ones, torch.zeros_like(ones)


def inc_tune(model: torch.nn.Module, backend: str, calibration: Sequence[Batch],
             accuracy: Callable[[Callable], float], tolerable_loss: float, max_trials: int):
    """INC's accuracy-aware tuning: its config set for the backend, tried in turn until one keeps
    `accuracy` within `tolerable_loss` (relative, as INC defines it) of the fp32 graph's."""
    from neural_compressor.torch.quantization import TuningConfig, autotune

    if not calibration:
        calibrate(model, calibration)  # raises the one-line error
    # A list, even of one config: INC's autotune iterates config_set before expanding it.
    tune_config = TuningConfig(config_set=[_inc_config(backend, tuning=True)], tolerable_loss=tolerable_loss, max_trials=max_trials)
    return autotune(export(model, calibration[0]), tune_config, eval_fn=accuracy,
                    run_fn=lambda prepared: calibrate(prepared, calibration))


def compile_graph(graph: torch.nn.Module) -> Callable:
    """Inductor lowers INC's quantize/dequantize pairs around matmuls to INT8 oneDNN kernels;
    freezing lets it pre-pack the INT8 weights. Compilation happens on the first calls."""
    import torch._inductor.config as inductor_config

    inductor_config.freezing = True
    return torch.compile(graph, dynamic=True)


# ---------------------------------------------------------------- PyTorch dynamic INT8

def torch_dynamic(model: torch.nn.Module) -> torch.nn.Module:
    """Every nn.Linear to INT8 weights with activations quantized per call (no calibration)."""
    import warnings

    from torch.ao.quantization import quantize_dynamic

    with warnings.catch_warnings():
        # torch.ao's eager quantization warns that it will move to torchao; it still ships and works.
        warnings.simplefilter("ignore")
        return quantize_dynamic(copy.deepcopy(model).eval(), {torch.nn.Linear}, dtype=torch.qint8)


# ---------------------------------------------------------------- one entry, save, load

def quantize(model: torch.nn.Module, backend: str, calibration: Sequence[Batch]):
    check_backend(backend)
    if backend == "torch_dynamic":
        return torch_dynamic(model)
    return inc_quantize(model, backend, calibration)


def save(qmodel, backend: str, folder: Path, example: Batch, source: Path, tokenizer, info: dict) -> None:
    """Write a quantized model to `folder` (which must exist and be empty: a staging dir)."""
    folder = Path(folder)
    models.load_saved_config(source).save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    if backend == "torch_dynamic":
        torch.save(qmodel.state_dict(), folder / TORCH_WEIGHTS)
    else:
        # INC re-exports the converted graph; its saved program keeps the dynamic dims.
        qmodel.save(example_inputs=_exportable(example), output_dir=str(folder / INC_DIR))
    manifest = {"backend": backend, "source_model": str(source), "torch": torch.__version__, **info}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def manifest(folder: Path) -> dict:
    return json.loads((Path(folder) / MANIFEST).read_text())


def load(folder: Path, compile: bool = True) -> tuple[Callable, str]:
    """A saved INT8 folder -> (callable on the three input tensors, backend name)."""
    folder = Path(folder)
    backend = manifest(folder).get("backend")
    check_backend(backend)
    if backend == "torch_dynamic":
        return _load_torch_dynamic(folder), backend
    from neural_compressor.torch.quantization import load as inc_load

    if not (folder / INC_DIR / "qconfig.json").is_file():
        raise UserError(f"{folder} says it holds an {backend} model but {INC_DIR}/qconfig.json is missing: quantize it again")
    graph = inc_load(str(folder / INC_DIR))
    return (compile_graph(graph) if compile else graph), backend


def _load_torch_dynamic(folder: Path) -> torch.nn.Module:
    from transformers import AutoModelForSequenceClassification

    # The quantized modules must exist before their packed weights can be loaded into them.
    config = models.load_saved_config(folder)
    skeleton = torch_dynamic(SequenceLogits(AutoModelForSequenceClassification.from_config(config)))
    skeleton.load_state_dict(torch.load(folder / TORCH_WEIGHTS, weights_only=False))
    return skeleton.eval()


def relative_tolerance(points: float, baseline: float) -> float:
    """INC's tolerable_loss is relative to the baseline; nlpwf's tolerance is in points (hundredths)
    of the task's metric: accuracy points, or hundredths of a correlation."""
    return (points / 100.0) / max(baseline, 1e-9)
