"""settransformer: the Set Transformer (Lee et al., ICML 2019) for PyTorch.

Permutation-invariant attention models for sets, with masks for variable-size sets::

    import torch
    from settransformer import SetTransformer, pad_sets

    x, mask = pad_sets([torch.randn(n, 2) for n in (120, 300, 45)])  # (3, 300, 2), (3, 300)
    model = SetTransformer(dim_input=2, num_outputs=4, dim_output=5)
    out = model(x, mask)  # (3, 4, 5), independent of element order and padding
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # for type checkers and the API docs; at run time the names load on first use
    from .deploy.saved import load_model, save_model
    from .large.aggregation import SetAggregation
    from .large.ragged import ragged_forward
    from .nn.attention import attention
    from .nn.blocks import ISAB, PMA, SAB
    from .nn.mab import MAB, BlockOptions
    from .nn.models import DeepSets, SetTransformer
    from .nn.sets import masked_pool, pad_sets, unpad_sets
    from .nn.validation import finite_checks

__version__ = "0.2.0"

__all__ = [
    "ISAB",
    "MAB",
    "PMA",
    "SAB",
    "BlockOptions",
    "DeepSets",
    "SetAggregation",
    "SetTransformer",
    "__version__",
    "attention",
    "finite_checks",
    "load_model",
    "masked_pool",
    "pad_sets",
    "ragged_forward",
    "save_model",
    "unpad_sets",
]

# Loaded on first use, so that ``import settransformer`` (and the CLI's start) does not import PyTorch
# until something needs it: Ctrl-C during those seconds then ends the command quietly (__main__).
_EXPORTS = {
    "ISAB": "nn.blocks",
    "MAB": "nn.mab",
    "PMA": "nn.blocks",
    "SAB": "nn.blocks",
    "BlockOptions": "nn.mab",
    "DeepSets": "nn.models",
    "SetAggregation": "large.aggregation",
    "SetTransformer": "nn.models",
    "attention": "nn.attention",
    "finite_checks": "nn.validation",
    "load_model": "deploy.saved",
    "masked_pool": "nn.sets",
    "pad_sets": "nn.sets",
    "ragged_forward": "large.ragged",
    "save_model": "deploy.saved",
    "unpad_sets": "nn.sets",
}
_SUBPACKAGES = {"cli", "compat", "data", "deploy", "heap", "large", "nn", "tasks", "training"}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    elif name in _SUBPACKAGES:
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value  # once: later lookups find it directly
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS, *_SUBPACKAGES})
