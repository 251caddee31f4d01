"""settransformer: the Set Transformer (Lee et al., ICML 2019) for PyTorch.

Permutation-invariant attention models for sets, with masks for variable-size sets::

    import torch
    from settransformer import SetTransformer, pad_sets

    x, mask = pad_sets([torch.randn(n, 2) for n in (120, 300, 45)])  # (3, 300, 2), (3, 300)
    model = SetTransformer(dim_input=2, num_outputs=4, dim_output=5)
    out = model(x, mask)  # (3, 4, 5), independent of element order and padding
"""

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
