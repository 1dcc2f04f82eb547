"""Your own model from a factory function: ``path/to/file.py:function`` or
``package.module:function`` (the form of ``timm``'s and torchvision's builder names), with its
weights (a state dict read with ``weights_only=True``), labels and preprocessing.

A factory is called with no arguments and returns an ``nn.Module`` classifier (logits out);
pretrained weights are its business, and ``weights=`` may add a state dict on top. Loading a
factory **runs the code of that file or module**, as ``import`` does: give only files you trust.
Checkpoints of ``convlens train --arch SPEC`` record the spec and so run it again when loaded.

Example:
    >>> model = cl.load_model("nets.py:resnet18", weights="skin.pth", labels="labels.txt")
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from convlens.checks import RequestError

__all__ = [
    "build",
    "check_fit",
    "find_factory",
    "find_head",
    "is_factory",
    "load_weights",
    "read_labels",
    "replace_head",
    "split_spec",
]

_FUNCTION = re.compile(r"[A-Za-z_]\w*")
_MODULE = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")
# the files a spec's ``file.py`` part has been executed as, by path and modification time
_LOADED: dict[tuple[str, int], Any] = {}


def split_spec(spec: str) -> tuple[str, str] | None:
    """``(file or module, function)`` of a factory spec, or ``None`` when ``spec`` is not one
    (a checkpoint path such as ``C:\\runs\\skin.pt`` is not: its last part is no name)."""
    where, sep, function = spec.rpartition(":")
    if not sep or not where or not _FUNCTION.fullmatch(function):
        return None
    if where.endswith(".py") or _MODULE.fullmatch(where):
        return where, function
    return None


def is_factory(spec: Any) -> bool:
    """Whether ``spec`` names a factory (``file.py:function`` or ``package.module:function``)."""
    return isinstance(spec, str) and split_spec(spec) is not None


def _first_line(error: BaseException) -> str:
    text = str(error).splitlines()[0] if str(error) else ""
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _from_file(path: Path) -> Any:
    """The module of a Python file, executed once per modification (its folder is on
    ``sys.path`` while it runs, so that it can import its neighbours)."""
    path = path.resolve()
    key = (str(path), path.stat().st_mtime_ns)
    if key in _LOADED:
        return _LOADED[key]
    name = f"convlens_factory_{abs(hash(key)):x}"
    loader = importlib.util.spec_from_file_location(name, path)
    if loader is None or loader.loader is None:
        raise RequestError(f"cannot import {path}: not a Python file")
    module = importlib.util.module_from_spec(loader)
    sys.modules[name] = module  # dataclasses and pickling look their module up by name
    folder = str(path.parent)
    sys.path.insert(0, folder)
    try:
        loader.loader.exec_module(module)
    except Exception as error:
        sys.modules.pop(name, None)
        raise RequestError(f"importing {path} failed: {_first_line(error)}") from error
    finally:
        if folder in sys.path:
            sys.path.remove(folder)
    _LOADED[key] = module
    return module


def find_factory(spec: str) -> Callable[[], Any]:
    parts = split_spec(spec)
    if parts is None:
        raise RequestError(
            f"model spec {spec!r} is not a factory; expected path/to/file.py:function or "
            "package.module:function"
        )
    where, function = parts
    if where.endswith(".py"):
        path = Path(where).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"model factory file not found: {where} (in {spec!r})")
        module = _from_file(path)
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as error:
            raise RequestError(f"cannot import module {where!r} (in {spec!r}): {error}") from None
        except Exception as error:
            raise RequestError(f"importing {where!r} failed: {_first_line(error)}") from error
    factory = getattr(module, function, None)
    if factory is None:
        names = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))[
            :12
        ]
        raise RequestError(
            f"{where} has no function {function!r}"
            + (f"; it defines {', '.join(names)}" if names else "")
        )
    if not callable(factory):
        raise RequestError(f"{where}:{function} is a {type(factory).__name__}, not a function")
    return factory  # type: ignore[no-any-return]


def build(spec: str) -> nn.Module:
    """Call the factory ``spec`` names (with no arguments) and check that it returns a module."""
    module = find_factory(spec)()
    if not isinstance(module, nn.Module):
        raise RequestError(
            f"the factory {spec!r} returned a {type(module).__name__}, not an nn.Module"
        )
    return module


def _state_dict(loaded: Any, path: Path) -> dict[str, torch.Tensor]:
    """The state dict in a weights file: the dict itself, or its ``state_dict``/``model``
    entry (the usual training-script checkpoints)."""
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(loaded, dict) and isinstance(loaded.get(key), dict):
            loaded = loaded[key]
            break
    if not isinstance(loaded, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in loaded.items()
    ):
        raise RequestError(f"{path} holds no state dict (a dict of parameter names to tensors)")
    return loaded


def load_weights(module: nn.Module, path: str | os.PathLike, what: str = "weights") -> None:
    """Load the state dict in ``path`` (read with ``weights_only=True``: no code runs) into
    ``module``; a file that does not fit is refused naming the first missing, unexpected or
    differently shaped key. A ``module.`` prefix (``nn.DataParallel``) is removed."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} file not found: {path}")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise RequestError(f"cannot read {what} {path}: {_first_line(error)}") from None
    state = _state_dict(loaded, path)
    if state and all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    check_fit(module, state, f"{what} {path} do not fit the model:")
    module.load_state_dict(state)


def check_fit(module: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """Refuse a state dict that does not fit ``module``, after ``what``, naming the first
    missing, unexpected or differently shaped key."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        first = f"lacks {missing[0]!r}" if missing else f"has an unexpected key {unexpected[0]!r}"
        raise RequestError(
            f"{what} it {first} ({len(missing)} missing, {len(unexpected)} unexpected keys)"
        )
    for key, value in expected.items():
        if state[key].shape != value.shape:
            raise RequestError(
                f"{what} {key} has shape {tuple(state[key].shape)} there, "
                f"{tuple(value.shape)} in the model"
            )


def read_labels(path: str | os.PathLike) -> list[str]:
    """Class names from a file: a JSON list, or one name per line (blank lines ignored)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"labels file not found: {path}")
    try:
        text = path.read_text("utf-8-sig")
    except (OSError, UnicodeDecodeError) as error:
        raise RequestError(f"cannot read labels {path}: {_first_line(error)}") from None
    if text.lstrip().startswith("["):
        try:
            labels = json.loads(text)
        except json.JSONDecodeError as error:
            raise RequestError(f"labels {path} is not a JSON list: {error}") from None
        if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
            raise RequestError(f"labels {path} must be a JSON list of strings")
        labels = [label.strip() for label in labels]
    else:
        labels = [line.strip() for line in text.splitlines() if line.strip()]
    if not labels or not all(labels):
        raise RequestError(f"labels {path} holds an empty name or no names")
    if len(set(labels)) != len(labels):
        repeated = next(label for i, label in enumerate(labels) if label in labels[:i])
        raise RequestError(f"labels {path} names {repeated!r} more than once")
    return labels


def find_head(module: nn.Module, name: str | None = None) -> tuple[str, nn.Module]:
    """The classifier head: the module called ``name``, or the last ``nn.Linear`` registered
    (torchvision's ``fc``/``classifier``, timm's ``head.fc``/``fc``)."""
    modules = dict(module.named_modules())
    if name is not None:
        if name not in modules or name == "":
            raise RequestError(f"the model has no module {name!r} to use as its head (--head)")
        return name, modules[name]
    linear = [(n, m) for n, m in modules.items() if isinstance(m, nn.Linear)]
    if not linear:
        raise RequestError(
            "the model has no nn.Linear to use as its classifier head; name it with --head"
        )
    return linear[-1]


def replace_head(module: nn.Module, n_classes: int, name: str | None = None) -> str:
    """Replace the classifier head (:func:`find_head`) by a freshly initialised one with
    ``n_classes`` outputs: an ``nn.Linear``, or a 1x1 ``nn.Conv2d`` (SqueezeNet's); returns
    the head's name."""
    name, head = find_head(module, name)
    if isinstance(head, nn.Linear):
        new: nn.Module = nn.Linear(head.in_features, n_classes, bias=head.bias is not None)
    elif isinstance(head, nn.Conv2d) and head.kernel_size == (1, 1) and head.groups == 1:
        new = nn.Conv2d(head.in_channels, n_classes, 1, bias=head.bias is not None)
    else:
        raise RequestError(
            f"the head {name!r} is a {type(head).__name__}; convlens replaces an nn.Linear or a "
            "1x1 nn.Conv2d (name one with --head)"
        )
    parameter = next(head.parameters(), None)
    if parameter is not None:
        new = new.to(device=parameter.device, dtype=parameter.dtype)
    parent_name, _, child = name.rpartition(".")
    parent = module.get_submodule(parent_name) if parent_name else module
    setattr(parent, child, new)
    return name
