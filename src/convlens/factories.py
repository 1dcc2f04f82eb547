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
import inspect
import json
import os
import pickle
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from convlens.checks import RequestError, distinct, first_line

__all__ = [
    "build",
    "check_fit",
    "find_factory",
    "find_head",
    "is_factory",
    "load_weights",
    "probe",
    "read_labels",
    "recorded_factory",
    "replace_head",
    "split_spec",
    "unreadable",
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


def _failure(error: BaseException) -> str:
    """``Type: first line`` of an exception raised by the user's code."""
    line = first_line(error)
    name = type(error).__name__
    return line if line == name else f"{name}: {line}"


@contextmanager
def _beside(folder: Path | None) -> Iterator[None]:
    """Run a factory file's code with its folder first on ``sys.path`` (so that it imports its
    neighbours, also lazily inside the factory), and forget those neighbours afterwards: a
    ``layers.py`` beside one factory file is never the ``layers`` of another."""
    if folder is None:
        yield
        return
    entry = str(folder)
    before = set(sys.modules)
    sys.path.insert(0, entry)
    try:
        yield
    finally:
        if entry in sys.path:
            sys.path.remove(entry)
        for name in set(sys.modules) - before:
            file = getattr(sys.modules.get(name), "__file__", None)
            if (
                file
                and not name.startswith("convlens_factory_")
                and Path(file).is_relative_to(folder)
            ):
                del sys.modules[name]


def _from_file(path: Path) -> Any:
    """The module of a Python file, executed once per modification."""
    key = (str(path), path.stat().st_mtime_ns)
    if key in _LOADED:
        return _LOADED[key]
    name = f"convlens_factory_{abs(hash(key)):x}"
    loader = importlib.util.spec_from_file_location(name, path)
    if loader is None or loader.loader is None:
        raise RequestError(f"cannot import {path}: not a Python file")
    module = importlib.util.module_from_spec(loader)
    sys.modules[name] = module  # dataclasses and pickling look their module up by name
    try:
        with _beside(path.parent):
            loader.loader.exec_module(module)
    except (Exception, SystemExit) as error:
        sys.modules.pop(name, None)
        raise RequestError(f"importing {path} failed: {_failure(error)}") from error
    _LOADED[key] = module
    return module


def _where(spec: str) -> tuple[str, str, Path | None]:
    """The module or file, the function and (for a file) its resolved path."""
    parts = split_spec(spec)
    if parts is None:
        hint = f" (the function is missing: {spec}:FUNCTION)" if spec.endswith(".py") else ""
        raise RequestError(
            f"model spec {spec!r} is not a factory; expected path/to/file.py:function or "
            f"package.module:function{hint}"
        )
    where, function = parts
    if not where.endswith(".py"):
        return where, function, None
    path = Path(where).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"model factory file not found: {where} (in {spec!r})")
    return where, function, path.resolve()


def find_factory(spec: str) -> Callable[..., Any]:
    """The function ``spec`` names, imported (a file is executed, once per modification)."""
    where, function, path = _where(spec)
    if path is not None:
        module = _from_file(path)
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as error:
            raise RequestError(f"cannot import module {where!r} (in {spec!r}): {error}") from None
        except (Exception, SystemExit) as error:
            raise RequestError(f"importing {where!r} failed: {_failure(error)}") from error
    factory = getattr(module, function, None)
    if factory is None:
        names = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
        raise RequestError(
            f"{where} has no function {function!r}"
            + (f"; it defines {', '.join(names[:12])}" if names else "")
        )
    if not callable(factory):
        raise RequestError(f"{where}:{function} is a {type(factory).__name__}, not a function")
    return factory  # type: ignore[no-any-return]


def _needs_arguments(factory: Callable[..., Any]) -> list[str]:
    """The parameters ``factory`` cannot be called without."""
    try:
        parameters = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):  # a builtin without a signature: try the call
        return []
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    kinds += (inspect.Parameter.KEYWORD_ONLY,)
    return [p.name for p in parameters if p.kind in kinds and p.default is inspect.Parameter.empty]


def build(spec: str) -> nn.Module:
    """Call the factory ``spec`` names (with no arguments) and check that it returns a module.
    This runs the factory's code; an exception in it propagates with its traceback, except
    ``SystemExit``, which becomes a one-line error."""
    factory = find_factory(spec)
    needed = _needs_arguments(factory)
    if needed:
        raise RequestError(
            f"the factory {spec!r} needs arguments ({', '.join(needed)}); a factory is called "
            "with none: write a function of no arguments that calls it"
        )
    path = _where(spec)[2]
    try:
        with _beside(path.parent if path is not None else None):
            module = factory()
    except SystemExit as error:
        raise RequestError(f"the factory {spec!r} exited (SystemExit {error.code!r})") from None
    if not isinstance(module, nn.Module):
        raise RequestError(
            f"the factory {spec!r} returned a {type(module).__name__}, not an nn.Module"
        )
    return module


def probe(model: Any, spec: str, head: str | None = None) -> int:
    """The number of outputs per image of ``model`` (a ``convlens.Model``) on a blank input of
    its size; a model that cannot run on it is refused in one line naming what sets the input
    (``--input-size``, ``--mean``/``--std``: one value per input channel) or the head."""
    blank = torch.zeros(1, model.channels, *model.input_size)
    try:
        logits = model.predict(blank)
    except RequestError:
        raise
    except Exception as error:
        where = f"with its head {head!r} replaced, " if head is not None else ""
        raise RequestError(
            f"{where}{spec} cannot run on a blank input of shape {tuple(blank.shape)} (set by "
            f"--input-size, and --mean/--std: one value per input channel): {_failure(error)}"
        ) from error
    return int(logits.shape[-1])


def recorded_factory(spec: str, relative: Any, checkpoint: Path, trust_code: bool = False) -> str:
    """The factory a checkpoint records, found and allowed to run.

    A file is looked for where it was recorded, then at its recorded place relative to the
    checkpoint's folder (``relative``), then beside the checkpoint (a project folder moved to
    another machine). Its code runs without ``trust_code`` only when it lies in the
    checkpoint's folder or below it; a file elsewhere, or an installed module's function
    (``package.module:function``), needs ``trust_code=True``: a checkpoint is data, read with
    ``weights_only=True``, and must not by itself make convlens run code from anywhere.
    """
    where, function = split_spec(spec)  # type: ignore[misc]
    folder = checkpoint.expanduser().resolve().parent
    hint = "pass trust_code=True (--trust-code) if you trust it"
    if not where.endswith(".py"):
        if not trust_code:
            raise RequestError(
                f"{checkpoint} builds its network by calling {spec}, an installed module's "
                f"code; {hint}"
            )
        return spec
    tried = [Path(where)]
    if isinstance(relative, str):
        tried.append(folder / relative)
    tried.append(folder / Path(where).name)
    found = next((p.resolve() for p in tried if p.is_file()), None)
    if found is None:
        raise FileNotFoundError(
            f"model factory file not found: {where} (recorded in {checkpoint}; also looked "
            f"for {', '.join(str(p) for p in tried[1:])}); put the file there"
        )
    if not found.is_relative_to(folder) and not trust_code:
        raise RequestError(
            f"{checkpoint} builds its network by running {found}, outside the checkpoint's "
            f"folder; {hint}"
        )
    return f"{found}:{function}"


def unreadable(error: BaseException) -> str:
    """Why ``torch.load(..., weights_only=True)`` could not read a file, without torch's advice
    to load it with ``weights_only=False`` (which runs the code a file may carry)."""
    if isinstance(error, pickle.UnpicklingError):
        return (
            "it holds objects that need code to load (a pickled module or class), and convlens "
            "reads weights with weights_only=True, which runs no code; save a state dict"
        )
    return _failure(error)


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
        raise RequestError(f"cannot read {what} {path}: {unreadable(error)}") from None
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
        raise RequestError(f"cannot read labels {path}: {_failure(error)}") from None
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
    distinct(labels, f"labels {path}")
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
