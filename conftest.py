"""Doctest set-up for the package's ``>>>`` examples (collected by ``--doctest-modules``).

Every example sees ``torch`` and ``np`` without importing them, starts from ``torch.manual_seed(0)``
(printed random values are the same on every run) and runs in a fresh temporary folder, so the
files an example writes (``Path("runs/demo")``, ``"sets.npz"``) never land in the repository.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

# Examples use tiny tensors, where a second intra-op thread only adds synchronisation on a busy machine.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _doctest_setup(request: pytest.FixtureRequest) -> None:
    if isinstance(request.node, pytest.DoctestItem):
        namespace: dict[str, Any] = request.getfixturevalue("doctest_namespace")
        namespace.update(torch=torch, np=np)
        request.getfixturevalue("monkeypatch").chdir(request.getfixturevalue("tmp_path"))
        torch.manual_seed(0)
