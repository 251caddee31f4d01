"""The library on a CUDA device: the same guarantees as on the CPU (skipped where no GPU is present).

Each test builds its module on the CPU, copies it to the GPU, and compares the GPU's result with
the CPU's in float32 (TF32 off), or checks the guarantee directly (padding, order, empty sets)
in bfloat16, where the fused flash / memory-efficient SDPA kernels run.
"""

from __future__ import annotations

import pytest
import torch

from settransformer import ISAB, PMA, SAB, DeepSets, SetTransformer, pad_sets

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def _exact_float32():
    """TF32 matrix products differ from the CPU by ~1e-3; the comparisons below need full float32."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _models() -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    return {
        "isab": SetTransformer(3, num_outputs=2, dim_output=5, dim_hidden=32, num_heads=4, num_inducing=8),
        "sab": SetTransformer(3, num_outputs=2, dim_output=5, dim_hidden=32, num_heads=4, num_inducing=None),
        "deepsets": DeepSets(3, num_outputs=2, dim_output=5, dim_hidden=32, pool="max"),
    }


def _batch(sizes=(7, 130, 1, 64)) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    return pad_sets([torch.randn(n, 3) for n in sizes])


@pytest.mark.parametrize("name", ["isab", "sab", "deepsets"])
def test_gpu_matches_cpu_forward_and_backward(name):
    model = _models()[name]
    x, mask = _batch()
    out_cpu = model(x, mask)
    out_cpu.square().sum().backward()
    grads_cpu = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    gpu = model.to(CUDA)
    out_gpu = gpu(x.to(CUDA), mask.to(CUDA))
    out_gpu.square().sum().backward()
    torch.testing.assert_close(out_gpu.cpu(), out_cpu, atol=2e-5, rtol=1e-4)
    for g_gpu, g_cpu in zip((p.grad for p in gpu.parameters()), grads_cpu):
        torch.testing.assert_close(g_gpu.cpu(), g_cpu, atol=5e-4, rtol=1e-3)


def test_gpu_isab_over_a_long_set_takes_the_explicit_kernel_and_matches_cpu():
    """Inducing points over thousands of elements: the explicit kernel on the GPU, the same values."""
    from settransformer.nn.attention import choose_kernel

    torch.manual_seed(0)
    isab = ISAB(3, 32, 4, 8)
    x = torch.randn(1, 6000, 3)
    out_cpu = isab(x)
    out_cpu.square().mean().backward()
    grads_cpu = [p.grad.clone() for p in isab.parameters()]
    isab.zero_grad()
    gpu = isab.to(CUDA)
    q, k = torch.randn(1, 4, 8, 8, device=CUDA), torch.randn(1, 4, 6000, 8, device=CUDA)
    assert choose_kernel(q, k, k) == "explicit"
    out_gpu = gpu(x.to(CUDA))
    out_gpu.square().mean().backward()
    torch.testing.assert_close(out_gpu.cpu(), out_cpu, atol=2e-5, rtol=1e-4)
    for g_gpu, g_cpu in zip((p.grad for p in gpu.parameters()), grads_cpu):
        torch.testing.assert_close(g_gpu.cpu(), g_cpu, atol=5e-4, rtol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["isab", "sab"])
def test_gpu_padding_order_and_empty_sets(name, dtype):
    """Padded batch == each set alone; order does not matter; an empty set gives finite outputs."""
    model = _models()[name].to(CUDA, dtype).eval()
    x, mask = _batch((5, 40, 0, 17))
    x, mask = x.to(CUDA, dtype), mask.to(CUDA)
    tol = {"atol": 3e-2, "rtol": 3e-2} if dtype == torch.bfloat16 else {"atol": 1e-5, "rtol": 1e-4}
    with torch.no_grad():
        out = model(x, mask)
        assert torch.isfinite(out).all()
        for i, n in enumerate(mask.sum(1).tolist()):
            if n:
                torch.testing.assert_close(out[i], model(x[i : i + 1, :n])[0], **tol)
        perm = torch.randperm(x.shape[1], device=CUDA)
        torch.testing.assert_close(model(x[:, perm], mask[:, perm]), out, **tol)


def test_gpu_chunked_equals_unchunked():
    model = _models()["isab"].to(CUDA).eval()
    x, mask = _batch((300, 1000, 17))
    x, mask = x.to(CUDA), mask.to(CUDA)
    with torch.no_grad():
        torch.testing.assert_close(model(x, mask, chunk_size=128), model(x, mask), atol=1e-5, rtol=1e-4)


def test_gpu_chunked_training_gradients_equal_unchunked():
    model = _models()["isab"].to(CUDA)
    x, mask = _batch((300, 700))
    x, mask = x.to(CUDA), mask.to(CUDA)
    model(x, mask).sum().backward()
    full = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model(x, mask, chunk_size=256).sum().backward()
    for g, f in zip((p.grad for p in model.parameters()), full):
        torch.testing.assert_close(g, f, atol=1e-4, rtol=1e-3)


def test_gpu_blocks_under_bf16_autocast_training_step():
    torch.manual_seed(0)
    blocks = torch.nn.ModuleList([ISAB(3, 64, 4, 16), SAB(64, 64, 4), PMA(64, 4, 2)]).to(CUDA)
    opt = torch.optim.Adam(blocks.parameters(), lr=1e-3)
    x, mask = _batch((50, 2000, 300))
    x, mask = x.to(CUDA), mask.to(CUDA)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        h = blocks[0](x, mask)
        h = blocks[1](h, mask)
        out = blocks[2](h, mask)
    loss = out.float().square().mean()
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in blocks.parameters() if p.grad is not None)
    opt.step()
    assert out.shape == (3, 2, 64)


def test_gpu_large_set_isab_memory_is_linear():
    """ISAB over 1M elements in bf16 stays far below the (N, N) attention a SAB would need (~2 TB)."""
    torch.manual_seed(0)
    isab = ISAB(3, 128, 4, 32).to(CUDA, torch.bfloat16).eval()
    x = torch.randn(1, 1_000_000, 3, device=CUDA, dtype=torch.bfloat16)
    torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        y = isab(x)
    assert y.shape == (1, 1_000_000, 128) and torch.isfinite(y).all()
    assert torch.cuda.max_memory_allocated() < 4 * 2**30
