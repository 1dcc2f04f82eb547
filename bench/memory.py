"""Extra peak memory of one cold call, in a fresh process.

    python -m bench.memory {convlens,captum} METHOD

In a long-running process freed memory stays resident, so a second call shows no growth; a fresh
process whose model is loaded and warmed with one batch-1 forward shows what the call itself
needs. Prints the extra peak resident memory in MB.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch

import convlens as cl

from .common import PeakMemory
from .gradient import STEPS, captum_runs

SETTINGS = {"integrated_gradients": {"steps": STEPS}, "smoothgrad": {"n_samples": STEPS}}


def main() -> None:
    library, method = sys.argv[1], sys.argv[2]
    model = cl.load_model()
    x = model.preprocess(cl.sample_images()["chelsea"])
    with torch.no_grad():
        target = int(model.module(x).argmax())
    if library == "captum":
        run = captum_runs(model.module, x, target)[method]
    else:

        def run():
            return cl.explain(
                model, x, method, target=target, progress=False, **SETTINGS.get(method, {})
            )

    with PeakMemory() as memory:
        run()
    print(f"{memory.extra_mb:.1f}")


if __name__ == "__main__":
    main()
