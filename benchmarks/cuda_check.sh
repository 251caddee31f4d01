#!/usr/bin/env bash
# One run on a GPU machine without internet (about 10 minutes on an H200); installs nothing.
#   (a) a self-contained correctness check of the models and blocks on CUDA, in float32 and bfloat16:
#       masked output == per-set output, chunked == unchunked, finite gradients, a TorchScript trace
#       (and ONNX when the onnx package is there), torch.compile(dynamic=True) with its recompiles
#       and graph breaks counted;
#   (b) the peer table on CUDA (benchmarks/peers.py) in float32 and bfloat16.
# Run from anywhere; it works in the repository root with PYTHONPATH=src (no `pip install -e .`):
#   OFFICIAL=/path/to/set_transformer OUT=/tmp/out bash benchmarks/cuda_check.sh
# OFFICIAL: a copy of github.com/juho-lee/set_transformer (the official column; skipped without it).
# OUT: where the results go (default benchmarks/out/cuda); peers-cuda.md there joins both tables.
#   (c) the attention kernels on CUDA (benchmarks/kernels.py --device cuda): fused against explicit at
#       the shapes the blocks run there, and which one choose_kernel's GPU rule picks.
# PARTS: "check peers kernels" (default), or some of them. Time limits: CHECK_S for (a) (default
# 200 s), PEERS_S for (b), per dtype (default 170 s), KERNELS_S for (c) (default 120 s).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
OUT=${OUT:-benchmarks/out/cuda}
mkdir -p "$OUT"
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH}
status=0
PARTS=${PARTS:-check peers kernels}

if ! "$PY" -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda, "available", torch.cuda.is_available())'; then
  echo "no torch for $PY" >&2
  exit 2
fi
"$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' || { echo "no CUDA device" >&2; exit 2; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true

if [[ " $PARTS " == *" check "* ]]; then
echo "== (a) correctness on CUDA =="
timeout "${CHECK_S:-200}" "$PY" - "$OUT/cuda_check.json" <<'EOF' || status=1
import json
import sys
import time
import traceback

import torch

from settransformer import ISAB, PMA, SAB, DeepSets, SetTransformer, pad_sets

dev = torch.device("cuda")
results = {}


def check(name, fn):
    t = time.perf_counter()
    try:
        detail = fn()
        results[name] = {"ok": True, "detail": detail, "s": round(time.perf_counter() - t, 2)}
        print(f"PASS {name}: {detail}", flush=True)
        save()
    except Exception as e:  # every check reports, the next one still runs
        results[name] = {"ok": False, "detail": f"{type(e).__name__}: {e}"[:500]}
        print(f"FAIL {name}: {type(e).__name__}: {e}", flush=True)
        traceback.print_exc(limit=3)
        save()


def save():  # after every check: a timeout still leaves the checks done so far
    with open(sys.argv[1], "w") as f:
        json.dump(results, f, indent=1, default=str)


def tol(dtype):
    return 1e-4 if dtype == torch.float32 else 4e-2


def models(dtype):
    torch.manual_seed(0)
    built = {
        "SetTransformer/ISAB": SetTransformer(3, 2, 5, dim_hidden=64, num_heads=4, num_inducing=16),
        "SetTransformer/SAB": SetTransformer(3, 2, 5, dim_hidden=64, num_heads=4, num_inducing=None),
        "DeepSets": DeepSets(3, 2, 5, dim_hidden=64),
        "ISAB": ISAB(3, 64, 4, 16),
        "SAB": SAB(3, 64, 4),
        "PMA": PMA(64, 4, 2),
    }
    return {k: m.to(dev, dtype).eval() for k, m in built.items()}


def sets(dtype, dim):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(n, dim, generator=g).to(dev, dtype) for n in (5, 17, 300)]


def masked_equals_per_set(dtype):
    worst = {}
    for name, m in models(dtype).items():
        dim = 64 if name == "PMA" else 3
        xs = sets(dtype, dim)
        x, mask = pad_sets(xs)
        with torch.no_grad():
            out = m(x, mask)
            for i, xi in enumerate(xs):
                ref = m(xi[None])[0]
                got = out[i, : len(xi)] if name in ("ISAB", "SAB") else out[i]
                err = ((got - ref).abs().max() / ref.abs().max().clamp_min(1e-6)).item()
                worst[name] = max(worst.get(name, 0.0), err)
    bad = {k: v for k, v in worst.items() if not v <= tol(dtype)}
    if bad:
        raise AssertionError(f"relative error above {tol(dtype)}: {bad}")
    return {k: f"{v:.1e}" for k, v in worst.items()}


def chunked_equals_unchunked(dtype):
    m = models(dtype)["SetTransformer/ISAB"]
    x = torch.randn(2, 20_000, 3, device=dev).to(dtype)
    with torch.no_grad():
        a, b = m(x), m(x, chunk_size=1024)
    err = ((a - b).abs().max() / a.abs().max()).item()
    assert err <= tol(dtype), f"relative error {err:.1e}"
    return f"relative error {err:.1e}"


def gradients_finite(dtype):
    out = {}
    for name, m in models(dtype).items():
        m.train()
        dim = 64 if name == "PMA" else 3
        x, mask = pad_sets(sets(dtype, dim))
        m(x, mask).float().square().mean().backward()
        bad = [n for n, p in m.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
        assert not bad, f"{name}: missing or non-finite gradients: {bad[:4]}"
        out[name] = "finite"
    return out


def torchscript_trace(dtype):
    m = models(dtype)["SetTransformer/ISAB"]
    x, mask = pad_sets(sets(dtype, 3))
    with torch.no_grad():
        traced = torch.jit.trace(m, (x, mask), check_trace=False)
        err = (traced(x, mask) - m(x, mask)).abs().max().item()
    assert err <= tol(dtype) * 10, f"max error {err:.1e}"
    return f"max error {err:.1e}"


def onnx_export(dtype):
    import importlib.util
    import tempfile

    from settransformer.deploy.export import export_onnx

    if importlib.util.find_spec("onnx") is None:
        return "skipped (onnx not installed)"
    m = models(torch.float32)["SetTransformer/ISAB"]
    with tempfile.TemporaryDirectory() as d:
        path = export_onnx(m, f"{d}/model.onnx", dim_input=3)  # verified in ONNX Runtime when installed
        return f"{path.stat().st_size} bytes, onnxruntime: {importlib.util.find_spec('onnxruntime') is not None}"


def compile_dynamic(dtype):
    import torch._dynamo as dynamo
    from torch._dynamo.utils import counters

    dynamo.reset()
    counters.clear()
    m = models(dtype)["SetTransformer/ISAB"]
    cm = torch.compile(m, dynamic=True)
    t = time.perf_counter()
    # a new batch size, then a new set size: with dynamic=True neither should compile again
    shapes = [(4, 100), (7, 100), (4, 333)] if dtype == torch.float32 else [(4, 100), (7, 333)]
    with torch.no_grad():
        for b, n in shapes:
            x = torch.randn(b, n, 3, device=dev).to(dtype)
            mask = torch.rand(b, n, device=dev) < 0.9
            mask[:, 0] = True
            err = ((cm(x, mask) - m(x, mask)).abs().max() / m(x, mask).abs().max()).item()
            assert err <= tol(dtype) * 10, f"shape {(b, n)}: relative error {err:.1e}"
    frames = dict(counters["stats"])
    breaks = sum(counters["graph_break"].values())
    return {
        "shapes": shapes,
        "unique_graphs": frames.get("unique_graphs"),
        "graph_breaks": breaks,
        "graph_break_reasons": list(counters["graph_break"])[:5],
        "seconds": round(time.perf_counter() - t, 1),
    }


print(torch.cuda.get_device_name(), flush=True)
for dtype in (torch.float32, torch.bfloat16):
    tag = str(dtype).removeprefix("torch.")
    check(f"{tag}: masked output == per-set output", lambda: masked_equals_per_set(dtype))
    check(f"{tag}: chunked == unchunked (N=20000)", lambda: chunked_equals_unchunked(dtype))
    check(f"{tag}: gradients finite", lambda: gradients_finite(dtype))
    check(f"{tag}: TorchScript trace", lambda: torchscript_trace(dtype))
check("float32: ONNX export", lambda: onnx_export(torch.float32))
for dtype in (torch.float32, torch.bfloat16):
    check(f"{str(dtype).removeprefix('torch.')}: torch.compile(dynamic=True)", lambda: compile_dynamic(dtype))

failed = [k for k, v in results.items() if not v["ok"]]
print(f"{len(results) - len(failed)}/{len(results)} checks passed" + (f"; failed: {failed}" if failed else ""))
sys.exit(1 if failed else 0)
EOF
fi

if [[ " $PARTS " == *" peers "* ]]; then
echo "== (b) peer table on CUDA =="
official=()
if [ -n "${OFFICIAL:-}" ] && [ -f "$OFFICIAL/modules.py" ]; then
  official=(--official "$OFFICIAL")
else
  echo "OFFICIAL not set or without modules.py: the official column is skipped"
fi
for dtype in float32 bfloat16; do
  timeout "${PEERS_S:-170}" "$PY" benchmarks/peers.py --device cuda --dtype "$dtype" "${official[@]}" --repeats 1 \
    --steps 4 --budget 0.25 --max-call-s 2 --mem-limit-gb 60 --output "$OUT/peers-cuda-$dtype.md" \
    || { echo "peers.py --dtype $dtype failed or timed out" >&2; status=1; }
done
cat "$OUT"/peers-cuda-float32.md "$OUT"/peers-cuda-bfloat16.md > "$OUT/peers-cuda.md" 2>/dev/null || true
echo "results in $OUT (copy $OUT/peers-cuda.md to benchmarks/results/peers-cuda.md)"
fi

if [[ " $PARTS " == *" kernels "* ]]; then
echo "== (c) attention kernels on CUDA =="
timeout "${KERNELS_S:-120}" "$PY" benchmarks/kernels.py --device cuda --output "$OUT/kernels-cuda.md" || status=1
echo "copy $OUT/kernels-cuda.md to benchmarks/results/kernels-cuda.md"
fi
exit $status
