"""The Ray engine of ``convlens.audit.run`` (``engine="ray"``): the chunks still to do become a
Ray Data data set, an actor pool of ``workers`` (each holding one copy of the model, and one
GPU, or a share of the GPUs, where the cluster has them) reads and explains them with the same
:func:`convlens.audit.batch.explain_batch` as the local engine, and the driver writes each
chunk's rows as the same part files, so a Ray run resumes like a local one (and either engine
can resume the other's run).

Only this module imports Ray, and only ``run(..., engine="ray")`` imports this module. To run
on a cluster, install convlens (and the model's files, for a checkpoint spec) on every node and
give its address: ``run(..., engine="ray", address="ray://head:10001")`` or ``"auto"``.
"""

from __future__ import annotations

import importlib
import os
import pickle
from collections.abc import Mapping
from typing import Any

import numpy as np

from convlens.audit.batch import explain_batch
from convlens.audit.data import Item
from convlens.audit.store import Store
from convlens.checks import RequestError
from convlens.model import Model

__all__ = ["ExplainActor", "run_ray"]


def _ray() -> Any:
    """Ray, imported only when a Ray run asks for it (an optional extra)."""
    try:
        return importlib.import_module("ray")
    except ImportError:
        raise RequestError("engine='ray' needs Ray: pip install 'convlens[ray]'") from None


class ExplainActor:
    """A Ray actor: loads the model once, then explains one chunk per call."""

    def __init__(self, model: Any, spec: str | None, options: Mapping[str, Any]) -> None:
        import torch

        from convlens.zoo import load_model

        ray = _ray()
        if spec is not None:
            loaded = load_model(spec)
        else:
            loaded = ray.get(model) if isinstance(model, ray.ObjectRef) else model
        if ray.get_gpu_ids() and torch.cuda.is_available():
            loaded.module.to("cuda")
        self.model: Model = loaded
        self.options = dict(options)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:

        out = []
        for blob in batch["items"]:
            items: list[Item] = pickle.loads(blob)
            out.append(pickle.dumps(explain_batch(self.model, items, **self.options)))
        return {"chunk": np.asarray(batch["chunk"]), "rows": np.array(out, dtype=object)}


def _connect(address: str | None, workers: int) -> bool:
    """Connect to Ray (``address``, or a new local instance with a CPU for each worker at
    least); whether this call started it."""
    ray = _ray()

    if ray.is_initialized():
        return False
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        cpus = max(workers, os.cpu_count() or 1)
        ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    return True


def run_ray(
    model: Model,
    spec: str | None,
    todo: list[tuple[int, list[Item]]],
    options: Mapping[str, Any],
    store: Store,
    address: str | None,
    workers: int,
    bar: Any,
) -> None:
    """Explain the chunks ``todo`` on Ray and write each as a part of ``store``. ``spec`` (a
    ``load_model`` spec) lets each worker load the model itself; without it the model object
    is shipped once through the object store."""
    ray = _ray()
    importlib.import_module("ray.data")

    if not todo:
        return
    started = _connect(address, workers)
    try:
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False
        resources = ray.cluster_resources()
        gpus = float(resources.get("GPU", 0))
        per_worker = min(1.0, gpus / workers) if gpus else 0.0
        # a share of a CPU where the cluster has fewer CPUs than workers: all of them start
        cpus = min(1.0, float(resources.get("CPU", workers)) / workers)
        shipped = None if spec is not None else ray.put(model)
        sizes = {index: len(items) for index, items in todo}
        data = ray.data.from_items(
            [{"chunk": index, "items": pickle.dumps(items)} for index, items in todo],
            override_num_blocks=len(todo),
        )
        results = data.map_batches(
            ExplainActor,
            fn_constructor_kwargs={"model": shipped, "spec": spec, "options": dict(options)},
            batch_size=1,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=workers),
            num_cpus=cpus,
            num_gpus=per_worker or None,
        )
        with bar:
            for row in results.iter_rows():
                index = int(row["chunk"])
                store.write(index, pickle.loads(row["rows"]))
                bar.update(sizes[index])
    finally:
        if started:
            ray.shutdown()
