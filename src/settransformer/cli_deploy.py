"""The ``predict`` and ``export`` subcommands: use a trained run on new sets, or export its model."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path
from typing import Any

import torch

from .cli_common import THREADS_HELP, log, positive_int
from .data.set_files import read_inputs
from .export import DEFAULT_OPSET, export_onnx, export_torchscript
from .inference import (
    check_forward,
    check_output_path,
    input_dim,
    jsonl_lines,
    per_element_output,
    predict,
    write_outputs,
)
from .runs import RunError, load_run

__all__ = ["add_export_parser", "add_predict_parser"]


def _add_which(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--which",
        choices=("last", "best"),
        default="last",
        help="for a run folder: its checkpoint.pt (last, default) or best.pt (best)",
    )


def _cmd_predict(args: argparse.Namespace) -> int:
    # Everything about the output is checked before any work, so a refused run costs nothing.
    out = None
    if args.output is not None:
        if Path(args.output).exists() and not args.overwrite:
            raise RunError(f"--output {args.output}: already exists; pass --overwrite to replace it")
        try:
            out = check_output_path(args.output, overwrite=args.overwrite)
        except ValueError as e:
            raise RunError(f"--output {e}") from None
    missing = [p for p in args.input if not Path(p).is_file()]
    if missing:
        raise RunError(f"--input {missing[0]}: no such file")
    task, model, state = load_run(args.run, which=args.which, device=args.device)
    try:
        check_forward(model)
        dim = input_dim(model)
        sets, ids = read_inputs(args.input, dim_input=dim, set_column=args.set_column)
        per_element = per_element_output(model, dim if dim is not None else int(sets[0].shape[1]))
        sizes = {len(s) for s in sets}
        if out is not None and out.suffix.lower() == ".npy" and per_element and len(sizes) > 1:
            raise RunError(
                f"--output {out}: the model gives one output per element and the sets differ in size, "
                "so the outputs do not stack into one array; write .csv or .jsonl"
            )
        outputs = predict(
            model, sets, batch_size=args.batch_size, chunk_size=args.chunk_size, progress=args.progress
        )
    except ValueError as e:  # a bad input file, or a model predict cannot run
        raise RunError(str(e)) from None
    if out is None:
        for line in jsonl_lines(ids, outputs):
            print(line)
    else:
        write_outputs(out, ids, outputs, per_element=per_element, overwrite=args.overwrite)
    where = f"written to {out}" if out is not None else "written to stdout"
    log(f"{task.name}/{state.get('model_name')} (step {state.get('step')}): {len(outputs)} sets {where}")
    return 0


_PREDICT_DOC = (
    "Run a trained model over sets read from files and write its raw outputs, one per set (e.g. "
    "(num_outputs, dim_output) for a Set Transformer: logits, mixture parameters, the regressed "
    "value; no post-processing). Inputs: .npy (one set (N, D) or a batch (S, N, D)); .npz/.h5 with "
    "'x' (or 'sets') and an optional bool 'mask', or ragged 'values' (total, D) + 'offsets' (S+1,), "
    "and optional 'ids'; .csv with one element per row (one set per file, or many with "
    "--set-column). Sets of different sizes are batched with masks; outputs keep the input order."
)


def add_predict_parser(sub: Any) -> None:
    p = sub.add_parser("predict", help="run a trained model over sets from files", description=_PREDICT_DOC)
    p.add_argument(
        "run", metavar="RUN", help="a run folder written by `settransformer train` (or a checkpoint)"
    )
    p.add_argument(
        "--input",
        metavar="FILE",
        nargs="+",
        action="extend",
        required=True,
        help="input file(s): .npy, .npz, .h5/.hdf5 or .csv (repeatable; several files are read in order)",
    )
    p.add_argument(
        "--set-column",
        metavar="NAME",
        help="CSV inputs: the header column holding set ids; rows with the same id form one set",
    )
    p.add_argument(
        "--output",
        metavar="FILE",
        help="where to write: .npy (an array (S, ...), rows in input order), .csv (a set column, one "
        'column per output value) or .jsonl ({"set": id, "output": [...]} per line); '
        "default: JSON lines on stdout",
    )
    p.add_argument("--overwrite", action="store_true", help="replace --output if it exists (default: refuse)")
    _add_which(p)
    p.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="where to run (default auto: CUDA when available)",
    )
    p.add_argument(
        "--batch-size", type=positive_int, default=64, metavar="B", help="sets per forward pass (default 64)"
    )
    p.add_argument(
        "--chunk-size",
        type=positive_int,
        metavar="C",
        help="evaluate C elements at a time with bounded memory (huge sets; Set Transformers with ISAB "
        "or rFF encoders, and DeepSets); a set larger than C is evaluated alone",
    )
    p.add_argument("--threads", type=positive_int, metavar="N", help=THREADS_HELP)
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.set_defaults(func=_cmd_predict)


_EXPORT_DOC = (
    "Export a run's model for inference without this package: an ONNX graph (ONNX Runtime; needs "
    "pip install 'settransformer[onnx]') or a TorchScript file (torch.jit.load). Both take x (B, N, D) "
    "float32, the padded sets, and mask (B, N) bool, True for real elements (an all-False row is an "
    "empty set), with any batch size B >= 1 and set size N >= 1, and return the model's output (ONNX "
    "names: x, mask, output). The file is checked against PyTorch on padded batches of other sizes "
    "(1e-4) before it is written."
)


def _default_export_path(run: Path, fmt: str, which: str) -> Path:
    """``RUN/model[-best].onnx|pt`` for a run folder, ``<stem>-model.onnx|pt`` beside a checkpoint."""
    suffix = ".onnx" if fmt == "onnx" else ".pt"
    if run.is_dir():
        return run / f"model{'-best' if which == 'best' else ''}{suffix}"
    return run.with_name(f"{run.stem}-model{suffix}")


def _cmd_export(args: argparse.Namespace) -> int:
    run = Path(args.run)
    output = Path(args.output) if args.output else _default_export_path(run, args.format, args.which)
    # Everything about the output is checked before loading the model, so a refused export is quick.
    if output.is_dir():
        raise RunError(f"--output {output}: is a folder; expected a file name")
    if output.exists() and not args.overwrite:
        raise RunError(f"--output {output}: already exists; pass --overwrite to replace it")
    if args.opset is not None and args.format != "onnx":
        raise RunError("--opset: only for --format onnx")
    task, model, state = load_run(run, which=args.which, device="cpu")
    name = f"{task.name}/{state.get('model_name')}"
    dim = input_dim(model)
    if dim is None:  # a model that does not say: the task's own batches do
        dim = int(task.sample_batch(2, torch.Generator().manual_seed(0)).x.shape[-1])
    try:
        if args.format == "onnx":
            export_onnx(model, output, dim_input=dim, opset=args.opset, overwrite=args.overwrite)
        else:
            export_torchscript(model, output, dim_input=dim, overwrite=args.overwrite)
    except (ImportError, TypeError, ValueError, FileExistsError) as e:  # ExportError is a ValueError
        raise RunError(f"{name}: cannot export: {e}") from None
    source = f"{args.which} checkpoint" if run.is_dir() else str(run)
    kind = f"ONNX (opset {args.opset or DEFAULT_OPSET})" if args.format == "onnx" else "TorchScript"
    print(f"exported {name} ({source}, step {state.get('step')}) as {kind}: {output}")
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    print(f"  inputs: x {dtype} (batch, set, {dim}), mask bool (batch, set), True for real elements")
    if args.format == "onnx" and importlib.util.find_spec("onnxruntime") is None:
        log("warning: onnxruntime is not installed, so the file was checked but not run")
    return 0


def add_export_parser(sub: Any) -> None:
    p = sub.add_parser("export", help="export a run's model to ONNX or TorchScript", description=_EXPORT_DOC)
    p.add_argument(
        "run", metavar="RUN", help="a run folder written by `settransformer train`, or a checkpoint"
    )
    p.add_argument(
        "--format",
        choices=("onnx", "torchscript"),
        required=True,
        help="onnx: a .onnx graph for ONNX Runtime; torchscript: a traced module for torch.jit.load",
    )
    p.add_argument(
        "--output",
        metavar="FILE",
        help="the file to write (default: model.onnx or model.pt in the run folder, model-best.* with "
        "--which best; <name>-model.onnx|pt beside a checkpoint file)",
    )
    _add_which(p)
    p.add_argument(
        "--opset",
        type=positive_int,
        metavar="N",
        help=f"ONNX opset version, 14 to 20 (default {DEFAULT_OPSET}); --format onnx only",
    )
    p.add_argument("--overwrite", action="store_true", help="replace --output if it exists (default: refuse)")
    p.set_defaults(func=_cmd_export)
