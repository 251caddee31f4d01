"""Cost of input validation per forward: all checks, checks without finiteness, and no checks at all.

    nice -n 19 .venv/bin/python benchmarks/validation.py            # about a minute on 1 core
    nice -n 19 .venv/bin/python benchmarks/validation.py --repeats 50

"No checks" calls ``model.decode(model.encode(zero_padding(x, mask), mask), mask)`` (the forward
without any validation); "O(1) checks" is the forward with the finiteness check switched off
(``settransformer.nn.validation.finite_checks(False)``); "all checks" is the default forward. Times
are medians over ``--repeats`` rounds of interleaved runs, CPU, float32, under
``torch.inference_mode``, ``--threads`` threads (default 1). A second table times each check of
``prepare_set`` alone (best of 20 rounds), which a loaded machine's noise hides in the first.
"""

from __future__ import annotations

import argparse
import statistics
import time
import timeit
from collections.abc import Callable

import torch
from torch import Tensor, nn

from settransformer import SAB, SetTransformer
from settransformer.nn import validation as v
from settransformer.nn.validation import finite_checks, zero_padding


def cases() -> list[tuple[str, nn.Module, Tensor, Tensor, Callable[[Tensor, Tensor], Tensor]]]:
    """(name, module, x, mask, unchecked forward)."""
    out = []
    # the MoG clustering model (isab32-pma) at the ONNX benchmark's batch 10, N = 500
    for b, n in [(10, 500), (2, 16)]:
        model = SetTransformer(2, 4, 5, dim_hidden=128, num_heads=4, num_inducing=32).eval()
        x, mask = torch.randn(b, n, 2), torch.rand(b, n) > 0.1

        def raw(x: Tensor, mask: Tensor, model: SetTransformer = model) -> Tensor:
            return model.decode(model.encode(zero_padding(x, mask), mask), mask)

        out.append((f"SetTransformer isab32-pma, B={b}, N={n}", model, x, mask, raw))
    for b, n, d in [(8, 1000, 64), (2, 6, 16)]:
        sab = SAB(d, d, 4).eval()
        x, mask = torch.randn(b, n, d), torch.rand(b, n) > 0.1

        def raw_sab(x: Tensor, mask: Tensor, sab: SAB = sab) -> Tensor:
            return sab.forward_unchecked(zero_padding(x, mask), mask)

        out.append((f"SAB dim={d}, B={b}, N={n}", sab, x, mask, raw_sab))
    return out


def timed(fn: Callable[[], object], number: int) -> float:
    start = time.perf_counter()
    for _ in range(number):
        fn()
    return (time.perf_counter() - start) / number


def measure(
    module: nn.Module, x: Tensor, mask: Tensor, raw: Callable[[Tensor, Tensor], Tensor], repeats: int
) -> dict[str, float]:
    """Median seconds per call: no checks, O(1) checks (finiteness off), all checks."""

    def o1() -> Tensor:
        with finite_checks(False):
            return module(x, mask)

    fns = {"none": lambda: raw(x, mask), "o1": o1, "all": lambda: module(x, mask)}
    runs: dict[str, list[float]] = {k: [] for k in fns}
    with torch.inference_mode():
        number = max(1, int(0.02 / timed(fns["all"], 3)))  # about 20 ms per measurement
        for _ in range(repeats):  # interleaved, so load changes hit all three alike
            for key, fn in fns.items():
                runs[key].append(timed(fn, number))
    return {k: statistics.median(v) for k, v in runs.items()}


def check_costs(shape: tuple[int, int, int]) -> list[float]:
    """Best seconds per call: the O(1) checks of ``prepare_set``, its zero padding, its finiteness check."""
    x, mask, weight = torch.randn(*shape), torch.rand(shape[:2]) > 0.1, nn.Parameter(torch.randn(4, 4))
    number = 2000 if x.numel() < 10**4 else 200

    def best(fn: Callable[[], object]) -> float:
        return min(timeit.repeat(fn, number=number, repeat=20)) / number

    with torch.inference_mode():
        xz = zero_padding(x, mask)
        o1 = best(lambda: (v.check_set(x, shape[-1]), v.check_mask(mask, x), v.check_like(x, weight)))
        return [o1, best(lambda: zero_padding(x, mask)), best(lambda: v.check_finite(xz))]


def fmt(t: float) -> str:
    return f"{t * 1e6:.1f} us" if t < 1e-4 else f"{t * 1e6:.0f} us" if t < 1e-3 else f"{t * 1e3:.2f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print("| case | no checks | O(1) checks | all checks | finiteness share of all |")
    print("|---|---|---|---|---|")
    for name, module, x, mask, raw in cases():
        med = measure(module, x, mask, raw, args.repeats)
        share = (med["all"] - med["o1"]) / med["all"]
        print(f"| {name} | {fmt(med['none'])} | {fmt(med['o1'])} | {fmt(med['all'])} | {share:+.1%} |")
    print()
    print("| input (B, N, D) | O(1) checks | zero_padding | finiteness |")
    print("|---|---|---|---|")
    for shape in [(2, 6, 16), (10, 500, 2), (8, 1000, 64)]:
        row = check_costs(shape)
        print(f"| {shape} | " + " | ".join(fmt(t) for t in row) + " |")


if __name__ == "__main__":
    main()
