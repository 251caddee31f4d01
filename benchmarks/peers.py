"""Peer benchmark: our Set Transformer against the official code and PyTorch Geometric.

    .venv/bin/python benchmarks/peers.py --official ../set_transformer      # full table (~45 min, 2 cores)
    .venv/bin/python benchmarks/peers.py --quick                            # smoke test (< 2 minutes)
    python benchmarks/peers.py --device cuda --dtype bfloat16 --official DIR  # GPU table

Columns (one model per cell, every cell in its own worker process on CPU):

- ``ours (same fn)``: our model computing what the official code computes. Where the official
  ``models.SetTransformer`` layout applies (ISAB encoders) its weights go through
  `settransformer.compat.load_official`, and the output difference is checked; SAB-encoder
  rows and blocks use our blocks with `settransformer.compat.official_options`.
- ``ours (same fn, compiled)``: the same model under ``torch.compile(model, dynamic=True)``
  (inductor), in the task rows and the modes of ``--compiled`` (default: inference). It compiles
  on the full pass before the memory baseline and timing, and a recompile while timed is an error.
- ``ours (default)``: our default block layout (``W^O``, its residual and scale) with ``norm=None``,
  the official code's (and its checkpoints') default of no LayerNorm.
- ``official``: the official code (``modules.py``) imported from ``--official DIR`` (a clone of
  github.com/juho-lee/set_transformer), assembled into each row's structure; skipped when absent.
- ``PyG``: ``torch_geometric.nn.aggr.utils`` blocks (``layer_norm=False``) in the same structure,
  with a ``Linear(dim_input, width)`` in front (its blocks keep one width); skipped when not
  installed (``pip install settransformer[bench]``). Its MAB adds ``W^O`` and an rFF before PMA.

Rows: a training step (forward, backward, Adam: ``torch.optim.Adam`` in every column, or with
``--optimizer own`` each project's own, ours the fused Adam of our training loop) and an inference
forward (``eval``, ``no_grad``)
at the shape of each task's default model (the set model only: the image encoders of counting
and anomaly are left out, and sets are at their padded size without a mask, since the official
code takes none; the MoG row is the official ``run.py``'s model, ISAB(32) x 2 + PMA_4 + SAB x 2;
the point clouds' dropout is left out), then ISAB and SAB blocks (B=1, width 128, 4 heads, 32
inducing points) at N = 1k .. 1M, a point skipped when its time or memory, extrapolated from the
previous N, exceeds ``--max-call-s`` / ``--mem-limit-gb``; and the SetTransformer at 1e6 elements chunked
(``model(x, chunk_size=...)``) against unchunked.

Each cell: time per call (ms; per process the best of several passes over the same inputs, the
table the median over ``--repeats`` processes run interleaved A B C D A B C D ...), speed against
the fastest peer (official / PyG: ``t_peer / t``, above 1 = faster), peak memory of one pass above
the process's baseline after imports, model and data (MB; on CPU ``ru_maxrss`` in a probe process
per peer and cell, run before the timed ones with glibc's mmap threshold fixed at 128 KiB, so the
peak follows the live tensors rather than what the heap kept; the CUDA allocator's peak on GPU;
the buffers our ISABs keep between inference calls are freed before the pass, so it counts them;
``benchmarks/memory.py`` counts the same rows' peaks exactly, through PyTorch's allocator),
and the achieved FLOP rate (matrix products counted by torch's ``FlopCounterMode``) as a share of
a plain ``(rows, width) @ (width, width)`` product timed in the same process.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils import flop_counter
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))

from blocks import _peak_mb, _register_cpu_sdpa_flops, _rss_mb

from settransformer import ISAB, MAB, PMA, SAB, SetTransformer
from settransformer.compat import load_official, official_options
from settransformer.heap import keep_freed_memory
from settransformer.nn.streaming import DEFAULT_CHUNK_SIZE
from settransformer.nn.workspace import clear_kept_buffers
from settransformer.training.config import TrainConfig
from settransformer.training.optim import make_optimizer

IMPLS = ("same", "compiled", "default", "official", "pyg")
TITLES = {
    "same": "ours (same fn)",
    "compiled": "ours (same fn, compiled)",
    "default": "ours (default)",
    "official": "official",
    "pyg": "PyG",
}
PEERS = ("official", "pyg")
HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Shape:
    """One task row: a set model ``(B, N, dim_input) -> (B, seeds, dim_output)`` (or element scores).

    ``inducing``: ISAB(m) encoder layers, ``None``: SAB layers. ``anomaly``: the set-anomaly scorer
    (encoder, PMA summary, MAB from every element to the summary, Linear(1) per element).
    """

    name: str
    batch: int
    sizes: tuple[int, int]  # N per step, uniform over lo..hi (shared by the batch)
    dim_input: int
    width: int
    heads: int
    inducing: int | None
    seeds: int
    dec_sabs: int
    dim_output: int
    anomaly: bool = False


TASKS = [
    Shape("MoG clustering (official run.py)", 10, (300, 599), 2, 128, 4, 32, 4, 2, 5),
    Shape("max regression", 128, (10, 10), 1, 64, 4, None, 1, 0, 1),
    Shape("digits clustering", 10, (100, 300), 16, 128, 4, 16, 4, 1, 33),
    Shape("point cloud, 100 points", 64, (100, 100), 3, 256, 4, 16, 1, 0, 40),
    Shape("point cloud, 1,000 points", 32, (1000, 1000), 3, 256, 4, 16, 1, 0, 40),
    Shape("counting (set model)", 32, (10, 10), 64, 64, 4, None, 1, 0, 1),
    Shape("anomaly (set model)", 32, (8, 8), 64, 64, 4, None, 4, 0, 1, anomaly=True),
]
BLOCK_DIM, BLOCK_HEADS, BLOCK_INDUCING = 128, 4, 32
BLOCK_SIZES = {
    "isab": [1_000, 10_000, 100_000, 1_000_000],
    "sab": [1_000, 10_000, 16_384, 100_000, 1_000_000],
}
FWDBWD_MAX_N = 100_000  # the 1M points are inference only
CHUNK_N = 1_000_000


# -- models ---------------------------------------------------------------------------------------
class Stack(nn.Module):
    """A set model assembled from one peer's blocks.

    Attribute names follow the official ``models.SetTransformer`` (``enc``, ``dec``: PMA, SABs,
    Linear), so an official stack's ``state_dict`` loads through ``compat.load_official``.
    ``x: (B, N, D)`` -> ``(B, seeds, dim_output)``, or ``(B, N)`` scores with ``cross``/``head``.
    """

    def __init__(
        self,
        enc: Sequence[nn.Module],
        dec: Sequence[nn.Module],
        proj: nn.Module | None = None,
        cross: nn.Module | None = None,
        head: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.proj = proj
        self.enc = nn.Sequential(*enc)
        self.dec = nn.Sequential(*dec)
        self.cross, self.head = cross, head

    def forward(self, x: Tensor) -> Tensor:
        h = self.enc(x if self.proj is None else self.proj(x))
        if self.cross is None or self.head is None:
            return self.dec(h)
        return self.head(self.cross(h, self.dec(h))).squeeze(-1)


def _official_modules(official: str | None) -> Any:
    if not official:
        return None
    sys.path.insert(0, official)
    import modules  # the official code's modules.py

    return modules


def _stack(shape: Shape, isab: Callable, sab: Callable, pma: Callable, mab: Callable, proj: bool) -> Stack:
    """``shape``'s structure from one peer's block constructors ``isab(din, m)``, ``sab(din)``,
    ``pma(k)``, ``mab()`` (width and heads bound by the caller)."""
    din = shape.width if proj else shape.dim_input
    enc = [
        isab(din if i == 0 else shape.width, shape.inducing)
        if shape.inducing
        else sab(din if i == 0 else shape.width)
        for i in range(2)
    ]
    lin = nn.Linear(shape.dim_input, shape.width) if proj else None
    if shape.anomaly:
        head = nn.Linear(shape.width, shape.dim_output)
        return Stack(enc, [pma(shape.seeds)], proj=lin, cross=mab(), head=head)
    dec = [pma(shape.seeds)] + [sab(shape.width) for _ in range(shape.dec_sabs)]
    return Stack(enc, [*dec, nn.Linear(shape.width, shape.dim_output)], proj=lin)


def _ours_stack(shape: Shape, options: dict[str, Any]) -> nn.Module:
    w, h = shape.width, shape.heads
    if not shape.anomaly:
        return SetTransformer(
            shape.dim_input, shape.seeds, shape.dim_output, dim_hidden=w, num_heads=h,
            num_inducing=shape.inducing, num_encoder_layers=2, num_decoder_layers=shape.dec_sabs, **options,
        )  # fmt: skip
    return _stack(
        shape,
        lambda din, m: ISAB(din, w, h, m, **options),
        lambda din: SAB(din, w, h, **options),
        lambda k: PMA(w, h, k, **options),
        lambda: MAB(w, w, w, h, **options),
        proj=False,
    )


def build_task(shape: Shape, impl: str, official: str | None) -> tuple[nn.Module, str]:
    """The model of ``impl`` for ``shape`` and a note (the output check of the same-function model)."""
    w, h = shape.width, shape.heads
    if impl == "pyg":
        from torch_geometric.nn.aggr import utils as pyg

        return _stack(
            shape,
            lambda din, m: pyg.InducedSetAttentionBlock(w, m, h, layer_norm=False),
            lambda din: pyg.SetAttentionBlock(w, h, layer_norm=False),
            lambda k: pyg.PoolingByMultiheadAttention(w, k, h, layer_norm=False),
            lambda: pyg.MultiheadAttentionBlock(w, h, layer_norm=False),
            proj=shape.dim_input != w,
        ), ""
    if impl == "default":
        return _ours_stack(shape, {"norm": None}), ""
    mods = _official_modules(official)
    if impl == "official" or (impl == "same" and mods is not None and shape.inducing and not shape.anomaly):
        if mods is None:
            raise RuntimeError("official: --official DIR not given")
        torch.manual_seed(0)
        theirs = _stack(
            shape,
            lambda din, m: mods.ISAB(din, w, h, m),
            lambda din: mods.SAB(din, w, h),
            lambda k: mods.PMA(w, h, k),
            lambda: mods.MAB(w, w, w, h),
            proj=False,
        )
        if impl == "official":
            return theirs, ""
        ours = load_official(
            theirs.state_dict(), shape.dim_input, shape.seeds, shape.dim_output, shape.inducing, w, h
        )
        x = torch.randn(2, shape.sizes[0], shape.dim_input)
        with torch.no_grad():
            diff = (ours(x) - theirs(x)).abs().max().item()
        return ours, f"compat.load_official: max |ours - official| = {diff:.1e}"
    return _ours_stack(shape, official_options(w)), "official_options"


def build_block(block: str, impl: str, official: str | None) -> nn.Module:
    d, h, m = BLOCK_DIM, BLOCK_HEADS, BLOCK_INDUCING
    if impl == "pyg":
        from torch_geometric.nn.aggr import utils as pyg

        if block == "isab":
            return pyg.InducedSetAttentionBlock(d, m, h, layer_norm=False)
        return pyg.SetAttentionBlock(d, h, layer_norm=False)
    if impl == "official":
        mods = _official_modules(official)
        if mods is None:
            raise RuntimeError("official: --official DIR not given")
        return mods.ISAB(d, d, h, m) if block == "isab" else mods.SAB(d, d, h)
    options = official_options(d) if impl == "same" else {"norm": None}
    return ISAB(d, d, h, m, **options) if block == "isab" else SAB(d, d, h, **options)


def build_chunk_model(impl: str, official: str | None) -> nn.Module:
    """SetTransformer(3 -> 1 x 1, width 128, ISAB(32) x 2, PMA_1, SAB x 2), as in ``scale.py``."""
    if impl == "official":
        mods = _official_modules(official)
        if mods is None:
            raise RuntimeError("official: --official DIR not given")
        import models  # the official code's models.py

        return models.SetTransformer(3, 1, 1, BLOCK_INDUCING, BLOCK_DIM, BLOCK_HEADS)
    return SetTransformer(
        3, 1, 1, dim_hidden=BLOCK_DIM, num_heads=BLOCK_HEADS, num_inducing=BLOCK_INDUCING, norm=None
    )


# -- measurement ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Cell:
    """One measurement: ``kind`` task / block / chunk, its row key and the modes it times."""

    kind: str
    key: str  # task name, "isab:N"/"sab:N", or "chunk:N"
    modes: tuple[str, ...]  # "infer", "train"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _mem_start(device: torch.device) -> float:
    """Reset the peak and return the memory in use now (MB)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated() / 2**20
    with contextlib.suppress(OSError):  # resets the peak resident size (VmHWM, hence ru_maxrss) (Linux)
        Path("/proc/self/clear_refs").write_text("5")
    return _rss_mb()


def _mem_peak(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else _peak_mb()


def _passes(run: Callable[[], None], device: torch.device, budget: float, max_passes: int = 100) -> float:
    """Best wall time of ``run`` over at least 2 passes (1 when a pass exceeds ``budget``).

    Cheap passes repeat until ``budget`` is spent: the first calls of a fresh process (page faults,
    the allocator's pools and thresholds settling, thread-pool start: up to about half a second at
    the small task rows) would otherwise decide a millisecond row. On a CPU each pass after the
    first starts from a shifted heap (a few blocks of seeded random sizes left allocated): where the
    allocator places a small model's activations can slow every call of a process by up to half, so
    the best pass is the best of several placements rather than one placement's luck. The blocks
    take heap space, so the memory of a cell is measured before (`measure`)."""
    times: list[float] = []
    shifts: list[Tensor] = []
    rng = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    while len(times) < max_passes:
        _sync(device)
        t = time.perf_counter()
        run()
        _sync(device)
        times.append(time.perf_counter() - t)
        if times[0] > budget or (len(times) >= 2 and time.perf_counter() - start > budget):
            break
        if device.type == "cpu":
            sizes = torch.randint(1 << 10, 1 << 18, (4,), generator=rng).tolist()
            shifts += [torch.empty(n, dtype=torch.uint8) for n in sizes]
    return min(times)


def _register_native_mha_flops() -> None:
    """Teach the counter ``nn.MultiheadAttention``'s fused inference kernel (PyG's blocks take it
    under ``eval`` and ``no_grad``): projections, both attention products and the output projection."""
    op = torch.ops.aten._native_multi_head_attention
    if op in flop_counter.flop_registry:
        return

    @flop_counter.register_flop_formula(op)
    def _mha(q_shape, k_shape, v_shape, embed_dim, *args, out_shape=None, **kwargs) -> int:  # type: ignore[no-untyped-def]
        b, nq, nk = q_shape[0], q_shape[-2], k_shape[-2]
        # q and the output projection over the queries, k and v over the keys; scores and weights @ v
        return 2 * b * embed_dim * (2 * nq * embed_dim + 2 * nk * embed_dim + 2 * nq * nk)


class _FlopCount(TorchDispatchMode):
    """FLOPs of the matrix products run inside it (torch's formulas, without ``FlopCounterMode``'s
    module tracker, which fails under ``no_grad``)."""

    def __init__(self) -> None:
        super().__init__()
        _register_cpu_sdpa_flops()
        _register_native_mha_flops()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        registry = flop_counter.flop_registry
        if func._overloadpacket not in registry:
            with self:
                r = func.decompose(*args, **kwargs)
                if r is not NotImplemented:
                    return r
        out = func(*args, **kwargs)
        if func._overloadpacket in registry:
            self.total += registry[func._overloadpacket](*args, **kwargs, out_val=out)
        return out


def _count_flops(run: Callable[[], object]) -> float:
    with _FlopCount() as counter:
        run()
    return float(counter.total)


def _gemm_gflops(rows: int, width: int, device: torch.device, dtype: torch.dtype) -> float:
    a = torch.randn(rows, width, device=device, dtype=dtype)
    w = torch.randn(width, width, device=device, dtype=dtype)
    out = torch.empty(rows, width, device=device, dtype=dtype)

    def run() -> None:
        for _ in range(10):
            torch.mm(a, w, out=out)

    run()
    return 10 * 2 * rows * width * width / _passes(run, device, 0.5) / 1e9


def _inputs(
    cell: Cell, steps: int, device: torch.device, dtype: torch.dtype
) -> tuple[list[Tensor], int, int]:
    """The inputs of one pass (the same for every peer), the elements per call, the width."""
    g = torch.Generator().manual_seed(1)
    if cell.kind == "task":
        shape = SHAPES[cell.key]
        lo, hi = shape.sizes
        sizes = torch.randint(lo, hi + 1, (steps,), generator=g).tolist()
        xs = [torch.randn(shape.batch, n, shape.dim_input, generator=g) for n in sizes]
        per_call, width = shape.batch * sum(sizes) // steps, shape.width
    else:
        n = int(cell.key.split(":")[1])
        dim = BLOCK_DIM if cell.kind == "block" else 3
        xs, per_call, width = [torch.randn(1, n, dim, generator=g)], n, BLOCK_DIM
    return [x.to(device=device, dtype=dtype) for x in xs], per_call, width


def _build(cell: Cell, impl: str, official: str | None) -> tuple[nn.Module, str]:
    torch.manual_seed(0)
    if cell.kind == "task":
        return build_task(SHAPES[cell.key], impl, official)
    if cell.kind == "block":
        return build_block(cell.key.split(":")[0], impl, official), ""
    return build_chunk_model("default" if impl == "chunked" else impl, official), ""


def _optimizer(model: nn.Module, impl: str, which: str) -> torch.optim.Optimizer:
    """The training rows' Adam (lr 1e-4): ``torch.optim.Adam`` for every column (``which="adam"``), or
    each project's own (``"own"``): our columns the one our training loop builds
    ([`make_optimizer`][settransformer.training.optim.make_optimizer], PyTorch's fused kernel where
    there is one), the official code ``torch.optim.Adam`` as its ``run.py`` does, PyG (no training loop
    of its own) ``torch.optim.Adam``."""
    if which == "own" and impl not in PEERS:
        return make_optimizer(model, TrainConfig(optimizer="adam", lr=1e-4, weight_decay=0.0))
    return torch.optim.Adam(model.parameters(), lr=1e-4)


def measure(cell: Cell, impl: str, args: argparse.Namespace) -> dict[str, Any]:
    """Time and memory of ``impl`` on ``cell`` in this process (``args``: device, dtype, budget, ...)."""
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    model, note = _build(cell, impl, args.official)
    model = model.to(device=device, dtype=dtype)
    eager = model
    if impl == "compiled":
        model = torch.compile(model, dynamic=True)
    steps = args.steps if cell.kind == "task" else 1
    xs, per_call, width = _inputs(cell, steps, device, dtype)
    small = [x[:, : min(x.shape[1], 1000)] for x in xs[:1]]
    out: dict[str, Any] = {"note": note}
    chunk = {"chunk_size": args.chunk_size} if impl == "chunked" else {}
    for mode in cell.modes:
        if mode == "infer":
            model.eval()

            def run(inputs: list[Tensor] = xs) -> None:
                with torch.no_grad():
                    for x in inputs:
                        model(x, **chunk)

        else:
            model.train()
            opt = _optimizer(model, impl, args.optimizer)

            def run(inputs: list[Tensor] = xs, opt: torch.optim.Optimizer = opt) -> None:
                for x in inputs:
                    loss = model(x).float().square().mean()
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()

        # kernels and thread pools before the memory baseline; a compiled model compiles here
        run(xs if impl == "compiled" else small)
        clear_kept_buffers()  # buffers our ISABs keep between calls count in the pass that makes them
        base = _mem_start(device)
        run()  # the peak of one full pass (and the full shapes' warm-up), before _passes shifts the heap
        mem = _mem_peak(device) - base
        # torch._dynamo imported only by the compiled column: the eager columns run as a user's eager model
        with (
            torch._dynamo.config.patch(error_on_recompile=True)
            if impl == "compiled"
            else contextlib.nullcontext()
        ):
            best = _passes(run, device, args.budget)
        res = {"time_ms": 1e3 * best / len(xs), "mem_mb": mem}
        if args.flops:
            if mode == "infer":
                with torch.no_grad():
                    flops = sum(_count_flops(lambda x=x: eager(x, **chunk)) for x in xs)
            else:
                flops = sum(_count_flops(lambda x=x: eager(x).float().square().mean().backward()) for x in xs)
                eager.zero_grad(set_to_none=True)
            res["gflop"] = flops / len(xs) / 1e9
        out[mode] = res
    if args.flops:
        out["gemm_gflops"] = _gemm_gflops(min(max(per_call, 4096), 1 << 20), width, device, dtype)
    return out


def plan(
    cell: Cell, done: dict[tuple[str, str], dict[str, Any]], args: argparse.Namespace, strict: bool = True
) -> dict[str, str]:
    """The modes of a block point to skip (with the reason): its time or memory, extrapolated from
    the previous N's result in ``done`` (``(key, mode) -> result`` of the same impl), is over the
    limits, or (``strict``) the previous N has no result."""
    if cell.kind != "block":
        return {}
    block, n = cell.key.split(":")
    previous = [m for m in BLOCK_SIZES[block] if m < int(n)]
    skip = {}
    for mode in cell.modes:
        if not previous:
            continue
        n0 = previous[-1]
        c = done.get((f"{block}:{n0}", mode))
        if c is None:
            if strict:
                skip[mode] = "skipped (the smaller N did not run)"
            continue
        grow = int(n) / n0
        t = c["time_ms"] / 1e3 * grow ** (2 if block == "sab" else 1)
        # the official SAB holds the (N, N) attention matrix of every head; the others stay linear
        mem = c["mem_mb"] * grow ** (2 if block == "sab" and c.get("quadratic_memory") else 1)
        if t > args.max_call_s:
            skip[mode] = f"skipped: ~{t:.0f} s estimated"
        elif mem > args.mem_limit_gb * 1024:
            skip[mode] = f"skipped: ~{mem / 1024:.0f} GB estimated"
    return skip


def worker(spec: dict[str, Any], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Measure ``spec["cells"]`` for ``spec["impl"]`` in this process (one cell on CPU, all on CUDA)."""
    impl, results, done = spec["impl"], [], {}
    keys = [c["key"] for c in spec["cells"]]
    for raw in spec["cells"]:
        cell = Cell(raw["kind"], raw["key"], tuple(raw["modes"]))
        # strict when a smaller N of the same block runs in this process (all cells of an impl on GPU)
        block, _, n = cell.key.partition(":")
        smaller = [
            k for k in keys if n and k.partition(":")[0] == block and int(k.partition(":")[2]) < int(n)
        ]
        skip = plan(cell, done, args, strict=bool(smaller))
        todo = Cell(cell.kind, cell.key, tuple(m for m in cell.modes if m not in skip))
        try:
            res = measure(todo, impl, args) if todo.modes else {}
        except torch.OutOfMemoryError as e:  # a GPU cell too large: the others still run
            res = {"error": f"out of memory ({str(e).splitlines()[0][:60]})"}
            torch.cuda.empty_cache()
        res["skipped"] = skip
        for mode in todo.modes:
            if mode in res:
                res[mode]["quadratic_memory"] = impl == "official"
                done[(cell.key, mode)] = res[mode]
        results.append(res)
    return results


# -- driver ---------------------------------------------------------------------------------------
SHAPES = {s.name: s for s in TASKS}


#: glibc's mmap threshold in a CPU probe worker: fixed (so no longer raised by each free), every
#: block above it is mapped on allocation and unmapped on free, and the resident peak follows the
#: tensors alive at once instead of what the heap kept from earlier blocks.
PROBE_MMAP_THRESHOLD = 128 * 1024


def worker_env() -> dict[str, str]:
    """This process's environment with the checkout's ``src`` first on ``PYTHONPATH``: a worker
    process imports the library under test, installed or not."""
    src = str(HERE.parent / "src")
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p)}


def _run_worker(
    impl: str, cells: list[Cell], args: argparse.Namespace, flops: bool, probe: bool = False
) -> list[dict] | None:
    """``impl``'s results on ``cells`` from a fresh worker process. ``probe``: the CPU memory and
    FLOP worker (one pass, under `PROBE_MMAP_THRESHOLD`; its times are not used)."""
    spec = {"impl": impl, "cells": [asdict(c) for c in cells]}
    cmd = [sys.executable, __file__, "--worker", json.dumps(spec), *args.passthrough]
    if flops:
        cmd.append("--flops")
    env = worker_env()
    if args.omp_wait_policy != "default":
        env["OMP_WAIT_POLICY"] = args.omp_wait_policy
    if impl == "compiled":  # inductor compiles in this process: no pool of compile workers left running
        env["TORCHINDUCTOR_COMPILE_THREADS"] = "1"
    if probe:
        cmd += ["--budget", "1e-9", "--heap", "system"]  # the last flag wins: one pass, its own heap
        env["MALLOC_MMAP_THRESHOLD_"] = str(PROBE_MMAP_THRESHOLD)
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        print(f"worker {impl} {[c.key for c in cells]} failed:\n{out.stderr[-1500:]}", file=sys.stderr)
        return None
    results = json.loads(out.stdout.strip().splitlines()[-1])
    return [{**r, "probe": True} for r in results] if probe else results


def _median(results: list[dict[str, Any]], mode: str) -> dict[str, Any] | None:
    """One cell from its workers' results: the median time of the timing workers and the median
    memory of the probe workers (of all workers where there is no probe, as on CUDA)."""
    probes = [r[mode] for r in results if mode in r and r.get("probe")]
    runs = [r[mode] for r in results if mode in r and not r.get("probe")]
    if not runs:
        return None
    first = next((r for r in probes + runs if "gflop" in r), {})
    gemm = next((r["gemm_gflops"] for r in results if "gemm_gflops" in r), None)
    return {
        "time_ms": statistics.median(r["time_ms"] for r in runs),
        "mem_mb": statistics.median(r["mem_mb"] for r in probes or runs),
        "gflop": first.get("gflop"),
        "gemm_gflops": gemm,
        "quadratic_memory": runs[0].get("quadratic_memory", False),
        "runs": [round(r["time_ms"], 3) for r in runs],
    }


class Table:
    """Results by (row label, impl) and their markdown."""

    def __init__(self, impls: list[str]) -> None:
        self.impls = impls
        self.rows: dict[str, dict[str, dict[str, Any] | str]] = {}
        self.notes: set[str] = set()

    def cell(self, label: str, impl: str) -> dict[str, Any] | str | None:
        return self.rows.get(label, {}).get(impl)

    def fastest_peer(self, label: str) -> float | None:
        times = [c["time_ms"] for i in PEERS if isinstance(c := self.cell(label, i), dict)]
        return min(times) if times else None

    def fill(self, cell: Cell, impl: str, results: list[dict[str, Any]]) -> None:
        for mode in cell.modes:
            m = _median([r for r in results if "error" not in r], mode)
            reasons = [r["skipped"][mode] for r in results if mode in r.get("skipped", {})]
            reasons += [r["error"] for r in results if "error" in r]
            self.rows.setdefault(_label(cell, mode), {})[impl] = m or (reasons[0] if reasons else "failed")
        self.notes |= {f"{cell.key}, {TITLES[impl]}: {r['note']}" for r in results if r.get("note")}

    def done(self, impl: str) -> dict[tuple[str, str], dict[str, Any]]:
        """``(cell key, mode) -> result`` of ``impl``'s measured block points (for `plan`)."""
        out = {}
        for label, row in self.rows.items():
            if isinstance(row.get(impl), dict) and label in _BLOCK_LABELS:
                out[_BLOCK_LABELS[label]] = row[impl]
        return out  # type: ignore[return-value]

    def render(self, labels: list[str] | None = None) -> str:
        lines = [
            "| row | " + " | ".join(TITLES[i] for i in self.impls) + " |",
            "|---|" + "---|" * len(self.impls),
        ]
        for label in self.rows if labels is None else labels:
            fastest = self.fastest_peer(label)
            cells = []
            for impl in self.impls:
                c = self.cell(label, impl)
                if isinstance(c, dict):
                    text = f"{c['time_ms']:.3g} ms"
                    if fastest:
                        text += f" · **{fastest / c['time_ms']:.2f}x**"
                    text += f" · {c['mem_mb']:.0f} MB"
                    if c.get("gflop") and c.get("gemm_gflops"):
                        text += f" · {c['gflop'] / c['time_ms'] * 1e3 / c['gemm_gflops']:.0%}"
                    cells.append(text)
                else:
                    cells.append(c or "-")
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def render_flops(self) -> list[str]:
        """Each row's counted matrix-product GFLOP per call by column, and the fewest any peer
        counts over ours (the speed-up ours would have at the peer's FLOP rate); empty without counts."""
        gflop: dict[str, dict[str, float]] = {}
        for label in self.rows:
            cells = {i: self.cell(label, i) for i in self.impls}
            gflop[label] = {i: c["gflop"] for i, c in cells.items() if isinstance(c, dict) and c.get("gflop")}
        impls = [i for i in self.impls if i != "compiled" and any(i in row for row in gflop.values())]
        if not any(gflop.values()) or "same" not in impls:
            return []
        lines = [
            "| row | " + " | ".join(TITLES[i] for i in impls) + " | leanest peer / ours (same fn) |",
            "|---|" + "---|" * (len(impls) + 1),
        ]
        for label, row in gflop.items():
            peers = [row[i] for i in PEERS if i in row]
            ratio = f"{min(peers) / row['same']:.2f}x" if peers and row.get("same") else "-"
            cells = [f"{row[i]:.4g}" if i in row else "-" for i in impls]
            lines.append(f"| {label} | " + " | ".join(cells) + f" | {ratio} |")
        return lines

    def geomean(self, impl: str, labels: list[str]) -> tuple[float, int] | None:
        ratios = []
        for label in labels:
            c, fastest = self.cell(label, impl), self.fastest_peer(label)
            if isinstance(c, dict) and fastest:
                ratios.append(fastest / c["time_ms"])
        if not ratios:
            return None
        return math.exp(sum(map(math.log, ratios)) / len(ratios)), len(ratios)


_BLOCK_LABELS: dict[str, tuple[str, str]] = {}


def _label(cell: Cell, mode: str) -> str:
    if cell.kind == "task":
        what = {"infer": "inference", "train": "training step"}[mode]
        s = SHAPES[cell.key]
        n = f"{s.sizes[0]}" if s.sizes[0] == s.sizes[1] else f"U{{{s.sizes[0]}..{s.sizes[1]}}}"
        return f"{cell.key}: {what} (B={s.batch}, N={n}, D={s.dim_input}, width {s.width})"
    block, n = cell.key.split(":")
    what = {"infer": "fwd", "train": "fwd+bwd"}[mode]
    label = f"{block.upper()} {what}, N={int(n):,}"
    _BLOCK_LABELS[label] = (cell.key, mode)
    return label


def _modes(cell: Cell, impl: str, args: argparse.Namespace) -> Cell:
    """``cell`` with the modes ``impl`` runs: the compiled model only the task rows' ``--compiled``."""
    if impl != "compiled":
        return cell
    modes = args.compiled if cell.kind == "task" else ()
    return Cell(cell.kind, cell.key, tuple(m for m in cell.modes if m in modes))


def _collect(table: Table, cells: list[Cell], impls: list[str], args: argparse.Namespace) -> None:
    """Run ``cells`` for ``impls`` over ``args.repeats`` interleaved rounds and fill ``table``."""
    if args.device == "cuda":  # one process per impl and round: the allocator's peak is per cell
        results: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for r in range(args.repeats):
            for impl in impls:
                mine = [c for c in (_modes(c, impl, args) for c in cells) if c.modes]
                got = (_run_worker(impl, mine, args, flops=r == 0) or []) if mine else []
                for c, res in zip(mine, got):
                    results.setdefault((c.key, impl), []).append(res)
        for c in cells:
            for impl in impls:
                if (runs := _modes(c, impl, args)).modes:
                    table.fill(runs, impl, results.get((c.key, impl), []))
        return
    for cell in cells:
        skips = {impl: plan(cell, table.done(impl), args) for impl in impls}
        todo = {
            impl: Cell(
                cell.kind, cell.key, tuple(m for m in _modes(cell, impl, args).modes if m not in skips[impl])
            )
            for impl in impls
        }
        found: dict[str, list[dict[str, Any]]] = {impl: [] for impl in impls}
        for r in range(1 + (args.repeats if cell.kind == "task" else args.block_repeats)):
            for impl in impls:
                if todo[impl].modes:
                    got = _run_worker(impl, [todo[impl]], args, flops=r == 0, probe=r == 0)
                    found[impl] += got or []
        for impl in impls:
            if (runs := _modes(cell, impl, args)).modes:
                table.fill(runs, impl, [*found[impl], {"skipped": skips[impl]}])
        if args.progress:
            for mode in cell.modes:
                print(table.render([_label(cell, mode)]).splitlines()[-1], flush=True)


def results_head(title: str, started: float, header: str) -> list[str]:
    """The first lines of a results file: ``title``, the command that wrote it (this script and its
    arguments) with the minutes since ``started`` (a ``time.perf_counter()``), and ``header``."""
    command = f"python benchmarks/{Path(sys.argv[0]).name} " + " ".join(sys.argv[1:])
    minutes = (time.perf_counter() - started) / 60
    return [f"# {title}", "", f"`{command}` ({minutes:.1f} min)", "", header, ""]


def missing_peers(official: str | None) -> dict[str, str]:
    """The peer columns that cannot run here, each with a note saying why (empty: both run)."""
    missing = {}
    if not official or not (Path(official) / "modules.py").is_file():
        missing["official"] = (
            "official: skipped (pass --official DIR, a clone of github.com/juho-lee/set_transformer)"
            if not official
            else f"official: skipped ({official}/modules.py not found)"
        )
    # found, not imported: importing it sets TORCHINDUCTOR_CACHE_DIR, which the workers would inherit
    # (and with it about 80 MB more resident memory in their first forward)
    if importlib.util.find_spec("torch_geometric") is None:
        missing["pyg"] = "PyG: skipped (torch_geometric not installed: pip install 'settransformer[bench]')"
    return missing


def _available(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    impls, notes = list(IMPLS), []
    if args.compiled:
        notes.append(
            f"{TITLES['compiled']}: torch.compile(model, dynamic=True), inductor; timed in the task rows' "
            f"{' and '.join(args.compiled)} (`--compiled`), compiled before its memory baseline and timing; "
            "the peers run eager"
        )
    else:
        impls.remove("compiled")
    missing = missing_peers(args.official)
    impls = [i for i in impls if i not in missing]
    notes += missing.values()
    if "pyg" not in missing:
        notes.append(
            "PyG: its MAB is nn.MultiheadAttention (W^O, the raw query as the residual) plus an rFF before "
            "PMA; in inference its fused fast path runs products FlopCounterMode does not see, so its "
            "FLOP share is understated there"
        )
    return impls, notes


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--official", help="directory of the official code (models.py, modules.py)")
    parser.add_argument("--quick", action="store_true", help="a few rows, small N, one round (< 2 minutes)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=2, help="torch threads per worker (default 2)")
    parser.add_argument(
        "--repeats", type=int, default=None, help="interleaved rounds of a task row (default 5 CPU, 2 CUDA)"
    )
    parser.add_argument(
        "--block-repeats", type=int, default=None, help="rounds of a block or chunked row on CPU (default 3)"
    )
    parser.add_argument(
        "--budget", type=float, default=None, help="seconds of passes per mode and process (default 1.2)"
    )
    parser.add_argument(
        "--steps", type=int, default=None, help="inputs (batches) per pass of a task row (default 8)"
    )
    parser.add_argument("--rows", default="tasks,isab,sab,chunk", help="row groups (comma-separated)")
    parser.add_argument("--tasks", help="only these task rows (comma-separated prefixes of their names)")
    parser.add_argument(
        "--max-n", type=float, default=None, help="largest block N (default 1e6; --quick 1e3)"
    )
    parser.add_argument(
        "--max-call-s", type=float, default=20.0, help="skip block points extrapolated above this"
    )
    parser.add_argument(
        "--mem-limit-gb", type=float, default=10.0, help="skip block points extrapolated above this"
    )
    parser.add_argument(
        "--chunk-size", type=int, default=None, help="chunk_size of the chunked row (library default)"
    )
    parser.add_argument(
        "--omp-wait-policy",
        choices=["auto", "passive", "active", "default"],
        default="auto",
        help="OMP_WAIT_POLICY of the workers; 'auto' (default): passive when the load average exceeds the "
        "CPU count at start (spinning threads on a busy machine make timings erratic), else unchanged",
    )
    parser.add_argument(
        "--compiled",
        default=None,
        help="modes of the compiled column, comma-separated among infer, train, or 'none' "
        "(default: infer; none with --quick)",
    )
    parser.add_argument(
        "--heap",
        choices=["system", "keep"],
        default="system",
        help="the C heap of every timed worker, each column alike: 'system' (default) glibc's defaults, "
        "'keep' settransformer.heap.keep_freed_memory() (large tensors reuse the heap's pages)",
    )
    parser.add_argument(
        "--optimizer",
        choices=["adam", "own"],
        default="adam",
        help="the training rows' Adam: 'adam' (default) torch.optim.Adam in every column; 'own' each "
        "project's: ours the fused Adam our training loop builds (make_optimizer), the official code "
        "torch.optim.Adam as its run.py does, PyG torch.optim.Adam",
    )
    parser.add_argument("--output", help="markdown file (default benchmarks/results/peers[-cuda].md)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--flops", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device")
    torch.set_num_threads(args.threads)
    args.chunk_size = args.chunk_size or DEFAULT_CHUNK_SIZE
    cuda = args.device == "cuda"
    args.repeats = args.repeats or (1 if args.quick else 2 if cuda else 5)
    args.block_repeats = args.block_repeats or (1 if args.quick else 3)
    args.budget = args.budget or (0.4 if args.quick else 1.2)
    args.steps = args.steps or (4 if args.quick else 8)
    args.compiled = args.compiled or ("none" if args.quick else "infer")
    args.compiled = () if args.compiled == "none" else tuple(args.compiled.split(","))
    if not set(args.compiled) <= {"infer", "train"}:
        parser.error("--compiled: infer, train (comma-separated) or none")
    if args.worker:
        if args.heap == "keep":
            keep_freed_memory()
        print(json.dumps(worker(json.loads(args.worker), args)))
        return
    args.passthrough = ["--device", args.device, "--dtype", args.dtype, "--threads", str(args.threads)]
    args.passthrough += [
        "--budget",
        str(args.budget),
        "--steps",
        str(args.steps),
        "--chunk-size",
        str(args.chunk_size),
    ]
    args.passthrough += ["--max-call-s", str(args.max_call_s), "--mem-limit-gb", str(args.mem_limit_gb)]
    args.passthrough += ["--heap", args.heap, "--optimizer", args.optimizer]
    if args.official:
        args.passthrough += ["--official", str(Path(args.official).resolve())]

    if args.omp_wait_policy == "auto":
        args.omp_wait_policy = "passive" if os.getloadavg()[0] > (os.cpu_count() or 1) else "default"
    impls, notes = _available(args)
    groups = args.rows.split(",")
    max_n = int(args.max_n or (1e3 if args.quick else 1e6))
    tasks = TASKS[:2] if args.quick else TASKS
    if args.tasks:
        tasks = [s for s in TASKS if any(s.name.startswith(p) for p in args.tasks.split(","))]
    started = time.perf_counter()
    load = os.getloadavg()[0]
    header = (
        f"torch {torch.__version__}, device {args.device}"
        + (
            f" ({torch.cuda.get_device_name()})"
            if cuda
            else f", {args.threads} threads, {os.cpu_count()} CPUs "
            f"(capability {torch.backends.cpu.get_cpu_capability()})"
        )
        + f", {args.dtype}, {args.repeats} interleaved rounds ({args.block_repeats} for blocks)"
        + f", OMP_WAIT_POLICY {args.omp_wait_policy}"
        + (", heap kept (settransformer.heap.keep_freed_memory, every column)" if args.heap == "keep" else "")
        + (", each project's own optimizer (ours fused Adam)" if args.optimizer == "own" else "")
        + f", load {load:.1f} at start"
    )
    print(header, flush=True)
    table = Table(impls)
    cells = []
    if "tasks" in groups:
        cells += [Cell("task", s.name, ("infer", "train")) for s in tasks]
    for block in ("isab", "sab"):
        if block in groups:
            for n in (m for m in BLOCK_SIZES[block] if m <= max_n):
                cells.append(
                    Cell("block", f"{block}:{n}", ("infer", "train") if n <= FWDBWD_MAX_N else ("infer",))
                )
    print(table.render([]), flush=True)
    args.progress = True
    _collect(table, cells, impls, args)
    args.progress = False

    chunk_lines: list[str] = []
    if "chunk" in groups:
        n = min(CHUNK_N, max_n * 10)
        chunk_impls = ["chunked", "default"] + (["official"] if "official" in impls else [])
        chunk_table = Table(chunk_impls)
        TITLES["chunked"] = f"ours, chunk_size={args.chunk_size}"
        _collect(chunk_table, [Cell("chunk", f"chunk:{n}", ("infer",))], chunk_impls, args)
        label = _label(Cell("chunk", f"chunk:{n}", ("infer",)), "infer")
        ch, un = chunk_table.cell(label, "chunked"), chunk_table.cell(label, "default")
        chunk_lines = [
            f"SetTransformer (3 -> 1, width 128, ISAB(32) x 2, PMA_1, SAB x 2, norm=None), inference, "
            f"B=1, N={n:,}:",
            "",
            "| impl | time (ms) | peak above baseline (MB) | share of GEMM rate |",
            "|---|---|---|---|",
        ]
        for impl in chunk_impls:
            c = chunk_table.cell(label, impl)
            if isinstance(c, dict):
                share = c["gflop"] / c["time_ms"] * 1e3 / c["gemm_gflops"] if c.get("gflop") else float("nan")
                chunk_lines.append(
                    f"| {TITLES[impl]} | {c['time_ms']:.0f} | {c['mem_mb']:.0f} | {share:.0%} |"
                )
            else:
                chunk_lines.append(f"| {TITLES[impl]} | {c} | | |")
        if isinstance(ch, dict) and isinstance(un, dict):
            chunk_lines += [
                "",
                f"chunked throughput: {un['time_ms'] / ch['time_ms']:.2f}x the unchunked path",
            ]
        for line in chunk_lines:
            print(line)

    task_labels = [_label(Cell("task", s.name, ()), m) for s in tasks for m in ("train", "infer")]
    summary = []
    for impl in ("same", "compiled", "default"):
        g = table.geomean(impl, [x for x in task_labels if x in table.rows])
        if g:
            summary.append(
                f"{TITLES[impl]}: geometric mean over {g[1]} task rows {g[0]:.2f}x the fastest peer"
            )
    text = [
        *results_head("Peer benchmark", started, header),
        "Each cell: time per call (median over rounds of each process's best pass) · speed against",
        "the fastest peer (official or PyG; above 1 = faster) · peak memory above the process's",
        "baseline · achieved FLOP rate as a share of a plain (rows, width) @ (width, width) product",
        "in the same process (above 100% where the model's products are larger, so faster, than that",
        "reference). Memory: the peak of one pass; on CPU `ru_maxrss` after resetting it",
        "(`/proc/self/clear_refs`) in a probe process per peer and cell (run first, its time unused)",
        "with `MALLOC_MMAP_THRESHOLD_=131072`, so freed blocks go back to the system and the peak",
        "follows the live tensors; `torch.cuda.max_memory_allocated` on GPU. Adam's moments, made in",
        "the warm-up pass, are in the baseline; the buffers our ISABs keep between inference calls are",
        "freed before the pass, so it counts them. `benchmarks/memory.py` counts the same peaks through",
        "PyTorch's allocator, repeatable run to run.",
        "",
        *([table.render(), "", *summary, ""] if cells else []),
        *(
            [
                "Matrix-product GFLOP per call, counted (torch's FLOP formulas; the fused attention",
                "kernels counted as their products): the work each column does for the same row.",
                "",
                *flops,
                "",
            ]
            if (flops := table.render_flops())
            else []
        ),
        *chunk_lines,
        "",
        "Notes:",
        "",
        *[f"- {n}" for n in notes + sorted(table.notes)],
        "",
    ]
    print("\n".join(["", *summary]))
    if args.quick and not args.output:
        return  # a smoke test leaves the stored table alone
    out = Path(args.output) if args.output else HERE / "results" / ("peers-cuda.md" if cuda else "peers.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(text))
    print(f"written to {out}")


if __name__ == "__main__":
    main()
