"""keep_freed_memory: a large tensor made again reuses the heap's pages instead of faulting in new ones."""

import subprocess
import sys
import textwrap

import pytest

from settransformer import heap

# In a child process: the setting is process-wide and one-way, so each case starts from glibc's defaults.
_FAULTS = textwrap.dedent(
    """
    import resource, sys, torch
    import settransformer.nn.models  # a process that uses the library (its heap, as the CLI's)
    from settransformer.heap import keep_freed_memory
    if sys.argv[1] == "keep":
        assert keep_freed_memory()
    def faults():
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for i in range(8):
        if i == 4:
            before = faults()
        x = torch.ones(16 << 20)  # 64 MB: above glibc's largest adaptive mmap threshold (32 MB)
        del x
    print(faults() - before)
    """
)


def _faults_of_last_four(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", _FAULTS, mode], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(heap._libc() is None, reason="mallopt is glibc's")
def test_keep_freed_memory_reuses_pages() -> None:
    pages = (64 << 20) // 4096
    # glibc's default: each freed 64 MB goes back to the system, and each new tensor faults its pages in
    assert _faults_of_last_four("system") > 3 * pages
    # kept: once the heap has settled (where a 64-byte-aligned block fits among the freed ones, which can
    # take a couple of rounds; more in a process that has allocated little else), each new tensor lands
    # on pages an earlier one left in the heap
    assert _faults_of_last_four("keep") < pages // 5


def test_keep_freed_memory_checks_its_limit() -> None:
    with pytest.raises(ValueError, match="128 KiB"):
        heap.keep_freed_memory(1024)
    with pytest.raises(ValueError, match="2147483647"):
        heap.keep_freed_memory(1 << 31)


def test_keep_freed_memory_off_glibc(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(heap, "_libc", lambda: None)
    assert heap.keep_freed_memory() is False
