"""Save a model trained in your own code, and load it back, without pickle.

[`save_model`][settransformer.deploy.saved.save_model] writes a folder with two files:

- ``config.json``: ``{"format": 1, "class": "SetTransformer", "config": {...constructor arguments...}}``;
- ``model.safetensors``: the weights, in the `safetensors <https://huggingface.co/docs/safetensors>`_
  format (plain tensors and names: loading it runs no code).

[`load_model`][settransformer.deploy.saved.load_model] rebuilds the model from ``config.json`` and loads the
weights. Such a folder is accepted by ``settransformer predict`` and ``settransformer export`` like a run
folder.

Models that can be saved: [`SetTransformer`][settransformer.SetTransformer] and
[`DeepSets`][settransformer.DeepSets] (they keep their constructor arguments in ``.config``), built
with JSON-serialisable arguments (a score given by name, not as a module).

Examples:
    >>> model = SetTransformer(3, 1, 2, dim_hidden=16, num_inducing=4)
    >>> folder = save_model(model, "my-model")
    >>> sorted(p.name for p in folder.iterdir())
    ['config.json', 'model.safetensors']
    >>> x = torch.randn(2, 5, 3)
    >>> torch.equal(load_model(folder)(x), model.eval()(x))
    True
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..nn.models import DeepSets, SetTransformer

__all__ = [
    "CONFIG_FILE",
    "MODEL_CLASSES",
    "SAVED_FORMAT",
    "WEIGHTS_FILE",
    "is_saved_model",
    "load_model",
    "save_model",
]

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
SAVED_FORMAT = 1
"""Bumped when the layout of ``config.json`` changes incompatibly."""
MODEL_CLASSES: dict[str, type[nn.Module]] = {"SetTransformer": SetTransformer, "DeepSets": DeepSets}
"""The classes [`save_model`][settransformer.deploy.saved.save_model] writes and
[`load_model`][settransformer.deploy.saved.load_model] rebuilds, by name."""


def _safetensors() -> Any:
    try:
        import safetensors.torch
    except ImportError:  # pragma: no cover - a dependency of the package
        raise ImportError("saving and loading models needs safetensors (pip install safetensors)") from None
    return safetensors.torch


def save_model(model: nn.Module, path: str | Path, *, overwrite: bool = False) -> Path:
    """Write ``model`` to the folder ``path`` (``config.json`` + ``model.safetensors``); return it.

    Raises:
        TypeError: ``model`` is not a SetTransformer or DeepSets, or its configuration is not
            JSON-serialisable (e.g. a score module passed as ``score=``).
        FileExistsError: the folder already holds a saved model and ``overwrite`` is false.
    """
    name = type(model).__name__
    if MODEL_CLASSES.get(name) is not type(model):
        raise TypeError(f"model: save_model saves {' or '.join(MODEL_CLASSES)}, got {name}")
    info = {"format": SAVED_FORMAT, "class": name, "config": model.config}
    try:
        text = json.dumps(info, indent=2) + "\n"
    except TypeError as e:
        raise TypeError(
            f"model: its configuration is not JSON-serialisable ({e}); pass options by name"
        ) from None
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise FileExistsError(f"{folder}: exists and is not a folder")
    if not overwrite and any((folder / f).exists() for f in (CONFIG_FILE, WEIGHTS_FILE)):
        raise FileExistsError(f"{folder}: already holds a saved model; pass overwrite=True to replace it")
    folder.mkdir(parents=True, exist_ok=True)
    _safetensors().save_model(model, str(folder / WEIGHTS_FILE))
    (folder / CONFIG_FILE).write_text(text)
    return folder


_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
}


def _saved_dtype(weights_path: Path) -> torch.dtype:
    """The floating-point dtype of the weights in ``weights_path`` (float32 if there are none)."""
    try:
        with _safetensors().safe_open(str(weights_path), framework="pt") as f:
            names = f.keys()  # a safe_open handle is not iterable
            kinds = {f.get_slice(name).get_dtype() for name in names}
    except Exception as e:  # safetensors raises its own error types for damaged files
        raise ValueError(f"{weights_path}: not a readable safetensors file ({e})") from None
    floats = {_SAFETENSORS_DTYPES[k] for k in kinds if k in _SAFETENSORS_DTYPES}
    if len(floats) > 1:
        raise ValueError(f"{weights_path}: weights in several float dtypes ({sorted(map(str, floats))})")
    return floats.pop() if floats else torch.float32


def is_saved_model(path: str | Path) -> bool:
    """Whether ``path`` is a folder written by [`save_model`][settransformer.deploy.saved.save_model] (it
    holds ``model.safetensors``)."""
    return Path(path).is_dir() and (Path(path) / WEIGHTS_FILE).is_file()


def load_model(
    path: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> nn.Module:
    """The model saved in the folder ``path`` by [`save_model`][settransformer.deploy.saved.save_model], on
    ``device``, in eval mode, in ``dtype`` (default: the dtype its weights were saved in, so a float64
    or bfloat16 model comes back as it was saved).

    Examples:
        >>> model = SetTransformer(3, 1, 2, dim_hidden=16, num_inducing=4).double()
        >>> next(load_model(save_model(model, "float64-model")).parameters()).dtype
        torch.float64

    Raises:
        ValueError: naming the file, for a missing or unreadable file, an unknown class or format,
            a configuration the class refuses, or weights that do not fit the model.
    """
    folder = Path(path)
    config_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    for p in (config_path, weights_path):
        if not p.is_file():
            raise ValueError(f"{p}: does not exist (expected a folder written by save_model)")
    try:
        info = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{config_path}: not valid JSON ({e})") from None
    if not isinstance(info, dict) or not isinstance(info.get("config"), dict):
        raise ValueError(f"{config_path}: expected an object with 'class' and 'config'")
    if info.get("format") != SAVED_FORMAT:
        raise ValueError(f"{config_path}: format {info.get('format')!r}; this version reads {SAVED_FORMAT}")
    cls = MODEL_CLASSES.get(info.get("class"))  # type: ignore[arg-type]
    if cls is None:
        raise ValueError(
            f"{config_path}: class {info.get('class')!r}; expected one of {', '.join(MODEL_CLASSES)}"
        )
    try:
        model = cls(**info["config"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"{config_path}: cannot build {cls.__name__} ({e})") from None
    model.to(dtype or _saved_dtype(weights_path))
    try:
        missing, unexpected = _safetensors().load_model(model, str(weights_path), strict=False)
    except RuntimeError as e:  # load_state_dict: a tensor of another shape
        last = (str(e).strip().splitlines() or [""])[-1].strip()
        raise ValueError(f"{weights_path}: its weights do not fit {cls.__name__} ({last})") from None
    except Exception as e:  # safetensors raises its own error types for damaged files
        raise ValueError(f"{weights_path}: not a readable safetensors file ({e})") from None
    if missing or unexpected:
        parts = [
            f"{label}: {', '.join(keys[:3])}"
            for label, keys in (("missing", missing), ("unexpected", unexpected))
            if keys
        ]
        raise ValueError(f"{weights_path}: its weights do not fit {cls.__name__} ({'; '.join(parts)})")
    return model.to(device).eval()
