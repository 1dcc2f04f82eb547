"""``convlens.audit.run``: explain every image of a data set with several methods and keep the
results as rows of ``DIR/results.parquet`` (see :mod:`convlens.audit.store` for the layout),
optionally SpRAy's strategies per class, and the page ``DIR/index.html``
(:mod:`convlens.audit.page`).

One function, :func:`explain_batch`, explains a chunk of images; the engines only schedule it:
``engine="local"`` (the default) runs the chunks here one after the other, ``engine="ray"``
(:mod:`convlens.audit.ray_engine`) on a pool of Ray actors, each holding one copy of the model.
Both give the same rows: chunks are the same (``chunk`` consecutive images of the source), and
random methods run with a seed derived from ``seed`` and the image's name
(:func:`convlens.audit.data.image_seed`), not from the worker or the order of work.

Reading a map back from the results (``map`` holds ``map_size`` x ``map_size`` float16 values,
little-endian, scaled so that the largest magnitude is 1)::

    import numpy as np, pandas as pd
    rows = pd.read_parquet("DIR/results.parquet")
    row = rows.iloc[0]
    heat = np.frombuffer(row["map"], dtype="<f2").reshape(int(row["map_size"]), -1)
    heat = heat.astype(np.float32) * row["map_scale"]  # the map's own values, area-averaged

(a column with nulls, such as ``map_size`` on error rows, reads as float in pandas.) In
DuckDB: ``SELECT * FROM 'DIR/results.parquet' WHERE error IS NULL``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from convlens.audit.batch import explain_batch
from convlens.audit.data import Item, Source, chunks, open_source
from convlens.audit.page import write_page
from convlens.audit.store import Store
from convlens.audit.strategies import strategies
from convlens.checks import RequestError, positive_int
from convlens.model import Model
from convlens.registry import get_method, list_methods
from convlens.zoo import load_model

__all__ = ["explain_batch", "run"]

ENGINES = ("local", "ray")


def _check_methods(methods: Sequence[str] | str, params: Mapping[str, Any] | None) -> list[str]:
    names = [methods] if isinstance(methods, str) else list(methods)
    if not names:
        raise RequestError("give at least one method")
    known = list_methods()
    for name in names:
        if name not in known:
            raise RequestError(f"unknown method {name!r}; known: {', '.join(known)}")
    if len(set(names)) != len(names):
        raise RequestError("a method is named twice")
    for name in params or {}:
        if name not in names:
            raise RequestError(f"parameters given for {name!r}, which is not among the methods")
    for name in names:
        method_cls = get_method(name)
        method_cls.check(method_cls.resolve_params(dict((params or {}).get(name, {}))))
    return names


def _check_layers(
    model: Model, methods: Sequence[str], params: Mapping[str, Mapping[str, Any]] | None
) -> None:
    """Refuse a ``layer`` the model does not have, or given to a method that takes none."""
    for name in methods:
        layer = (params or {}).get(name, {}).get("layer")
        if layer is None:
            continue
        if not get_method(name).uses_layer:
            raise RequestError(f"method {name!r} does not take a layer")
        for spec in layer if isinstance(layer, (list, tuple)) else [layer]:
            model.layer(spec)


def _model_record(model: Model) -> str:
    """The model's name and a hash of its weights: a spec and the model it loads are one."""
    digest = hashlib.blake2b(digest_size=8)
    for name, tensor in model.module.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return f"{model.name}@{digest.hexdigest()}"


def run(
    model: Model | str,
    data: Any,
    methods: Sequence[str] | str,
    out: str | os.PathLike,
    engine: str = "local",
    *,
    params: Mapping[str, Mapping[str, Any]] | None = None,
    boxes: str | os.PathLike | None = None,
    seed: int = 0,
    steps: int = 100,
    chunk: int = 16,
    map_size: int = 32,
    save_maps: bool = False,
    address: str | None = None,
    workers: int = 2,
    progress: bool | None = None,
    spray: str | None = None,
    page: bool = True,
) -> Path:
    """Audit ``model`` on every image of ``data`` with ``methods``; returns
    ``out/results.parquet`` (one row per image x method; columns in
    :data:`convlens.audit.store.RESULT_COLUMNS`).

    Args:
        model: a :class:`convlens.Model`, or a ``convlens.load_model`` spec (a name such as
            ``"shapes-cnn"``, a checkpoint, a factory), which Ray workers load themselves.
        data: an image folder (class sub-folders are the true labels; its ``boxes.csv`` is
            read), a ``.csv``/``.parquet`` file with a ``path`` column (optional ``label``,
            ``x0,y0,x1,y1``), or a list of paths.
        methods: method names (``convlens.list_methods()``).
        out: the output folder. Started again with the same arguments, a run does only the
            chunks missing; with other arguments it is refused.
        engine: ``"local"`` (here, chunk after chunk) or ``"ray"`` (Ray Data, an actor pool of
            ``workers``, at ``address`` or on a local instance started and stopped here).
        params: each method's parameters, ``{"rise": {"n_masks": 500}}``.
        boxes: a box file (``convlens.boxes.read_boxes``) for the pointing game and energy.
        seed: the seed; random methods run with ``image_seed(seed, image)`` per image.
        steps: steps of the deletion and insertion curves (0: no AUC).
        chunk: images explained together and written as one part.
        map_size: side of the reduced map kept in the results.
        save_maps: also write full-resolution maps to ``out/maps/part-*.npz``.
        progress: the progress bar over images (``None``: on for a terminal).
        spray: a method among ``methods`` whose maps SpRAy clusters per class at the end
            (:func:`convlens.audit.strategies.strategies`: the ``cluster`` column and
            ``out/strategies.json``).
        page: write the audit's page ``out/index.html`` at the end
            (:func:`convlens.audit.page.write_page`).
    """
    if engine not in ENGINES:
        raise RequestError(f"engine must be one of {', '.join(ENGINES)}, not {engine!r}")
    if engine == "ray" and importlib.util.find_spec("ray") is None:
        raise RequestError("engine='ray' needs Ray: pip install 'convlens[ray]'")
    if importlib.util.find_spec("pyarrow") is None:
        raise RequestError("an audit writes Parquet, which needs pyarrow: pip install pyarrow")
    if address is not None and engine != "ray":
        raise RequestError("a Ray address is for engine='ray'")
    names = _check_methods(methods, params)
    if spray is not None and spray not in names:
        raise RequestError(f"spray={spray!r}: not one of the methods ({', '.join(names)})")
    seed = positive_int("seed", seed, minimum=0)
    steps = positive_int("steps", steps, minimum=0)
    chunk = positive_int("chunk", chunk)
    map_size = positive_int("map_size", map_size)
    workers = positive_int("workers", workers)
    source = open_source(data, boxes)
    loaded = load_model(model) if isinstance(model, (str, os.PathLike)) else model
    _check_layers(loaded, names, params)
    record = {
        "model": _model_record(loaded),
        "data": source.origin,
        "data_kind": source.kind,
        "images": len(source),
        "data_fingerprint": source.fingerprint(),
        "methods": names,
        "params": {k: dict(v) for k, v in (params or {}).items()},
        "boxes": None if boxes is None else os.fspath(boxes),
        "seed": seed,
        "steps": steps,
        "chunk": chunk,
        "map_size": map_size,
        "save_maps": bool(save_maps),
    }
    store = Store(out, record)
    done = store.done()
    todo = [(i, c) for i, c in enumerate(chunks(source.items, chunk)) if i not in done]
    options = {
        "methods": names,
        "params": record["params"],
        "seed": seed,
        "steps": steps,
        "map_size": map_size,
        "full_maps": bool(save_maps),
    }
    if engine == "ray":
        from convlens.audit.ray_engine import run_ray

        spec = model if isinstance(model, (str, os.PathLike)) else None
        run_ray(loaded, spec, todo, options, store, address, workers, _bar(source, todo, progress))
    else:
        _run_local(loaded, todo, options, store, _bar(source, todo, progress))
    results = store.consolidate()
    if spray is not None:
        strategies(out, spray, seed=seed)
    if page:
        write_page(out, loaded)
    return results


def _bar(source: Source, todo: list[tuple[int, list[Item]]], progress: bool | None) -> Any:
    from tqdm.auto import tqdm

    total = sum(len(c) for _, c in todo)
    disable = None if progress is None else not progress
    return tqdm(total=total, unit="image", desc="audit", disable=disable)


def _run_local(
    model: Model,
    todo: list[tuple[int, list[Item]]],
    options: dict[str, Any],
    store: Store,
    bar: Any,
) -> None:
    with bar:
        for index, items in todo:
            store.write(index, explain_batch(model, items, **options))
            bar.update(len(items))
