"""The passes of Ablation-CAM: a layer's channels set to zero one at a time, one row each.

Desai & Ramaswamy 2020 ("Ablation-CAM", WACV) score the network once per channel k of a layer,
with channel k set to zero. All those passes compute the same tensors up to the layer, so
:func:`channel_ablations` runs them *from the layer on*: the input goes in at batch 1 and the
layer's output is expanded to one row per ablated channel (row r zeroes channel k_r), so that only
the network after the layer runs once per channel. Tensors computed before the layer that later
operations read (residual skips, a squeeze-excitation's input) broadcast from batch 1.

Where the network after the layer cannot take that batch (a ``torch.cat`` or an in-place update
of an earlier tensor, a reshape to the input's batch, an output whose batch is not the rows'),
or answers otherwise, the channels are ablated in full passes (the input repeated once per
channel), as Ablation-CAM always ran before. The shortcut is checked, and is left at the first
doubt: the output must have one row per ablated channel, an un-ablated row leading each input's
first batch must give the clean pass's score, and on the first input the first channel's score
must equal that of one full pass.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import AbstractContextManager
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from convlens.engine import Engine, Score, Scored, channels_last_grid, split
from convlens.hooks import Unbatchable, batch_at, edit_output
from convlens.targets import Target

__all__ = ["Ablations", "ChannelScores", "FromLayer", "channel_ablations", "rows_per_pass"]

# The least a pass from the layer on may hold at the layer (elements of the expanded output,
# 64 MiB in float32), whatever the batch size: it keeps the passes few on small networks.
MIN_ELEMENTS = 16 << 20


class ChannelScores(Scored):
    """One scored perturbation per channel of a layer, for one input ``x`` (1, C, H, W) whose
    layer gives ``features`` (K, h, w)."""

    def __init__(self, x: Tensor, features: Tensor) -> None:
        self.x, self.features, self.n = x, features, len(features)


def ablate(made: Tensor, output: Tensor) -> Tensor:
    """``output`` with channel ``made[r]`` of row r set to zero (nothing where ``made[r]`` < 0).
    An output of batch 1 is expanded to ``len(made)`` rows; channels are read in the last
    dimension of tokens (B, N, C) and Swin grids (B, h, w, C)."""
    last = output.dim() == 3 or channels_last_grid(output.shape)
    keep = torch.ones(len(made), output.shape[-1 if last else 1])
    rows = (made >= 0).nonzero().flatten()
    keep[rows, made[rows]] = 0
    shape = (len(made), *[1] * (output.dim() - 2), -1) if last else (*keep.shape, 1, 1)
    edited = output * keep.view(shape).to(output)
    if output.dim() == 4 and output.is_contiguous(memory_format=torch.channels_last):
        edited = edited.contiguous(memory_format=torch.channels_last)  # the model's own layout
    return edited


class Ablations(ChannelScores):
    """Full passes: row k of a batch is the input with channel k of the layer set to zero at
    the layer's ``calls``-th call."""

    def __init__(self, x: Tensor, features: Tensor, layer: nn.Module, calls: int) -> None:
        super().__init__(x, features)
        self.layer, self.calls = layer, calls

    def batch(self, start: int, stop: int) -> tuple[Tensor, Any]:
        return self.x.expand(stop - start, -1, -1, -1), torch.arange(start, stop)

    def around(self, made: Any) -> AbstractContextManager[Any]:
        return edit_output(self.layer, partial(ablate, made), self.calls)


class FromLayer(Ablations):
    """Passes from the layer on: the input at batch 1, its rows made at the layer (expanded at
    ``root``'s door with ``widen``, :func:`~convlens.hooks.batch_at`). The first batch leads
    with an un-ablated row, whose score must be ``clean`` within ``rtol``."""

    def __init__(
        self,
        root: nn.Module,
        x: Tensor,
        features: Tensor,
        layer: nn.Module,
        calls: int,
        clean: Tensor,
        rtol: float,
        widen: bool = True,
    ) -> None:
        super().__init__(x, features, layer, calls)
        self.root, self.clean, self.rtol, self.widen, self.rows = root, clean, rtol, widen, 0

    def batch(self, start: int, stop: int) -> tuple[Tensor, Any]:
        made = torch.arange(start - (start == 0), stop)  # -1: the un-ablated row
        return self.x, made

    def around(self, made: Any) -> AbstractContextManager[Any]:
        edit = partial(ablate, made)
        if self.widen:
            return batch_at(self.root, self.layer, edit, len(made), self.calls)
        return edit_output(self.layer, edit, self.calls)

    def fold(self, start: int, stop: int, scores: Tensor, made: Any) -> None:
        if scores.shape != (len(made),):
            raise Unbatchable(
                f"the output has {len(scores)} row(s) where the layer had {len(made)}"
            )
        self.rows += len(made)
        if start == 0:
            if not agree(scores[0], self.clean, self.rtol):
                raise Unbatchable("an un-ablated row's score differs from the clean pass's")
            scores = scores[1:]
        super().fold(start, stop, scores, made)


def agree(a: Tensor, b: Tensor, rtol: float) -> bool:
    """Whether two scores agree within ``rtol`` of the larger magnitude."""
    return bool((a - b).abs() <= rtol * torch.maximum(a.abs(), b.abs()))


def rows_per_pass(engine: Engine, layer: nn.Module, calls: int, per_row: int) -> int:
    """Rows of one pass from the layer on: as many as keep the widest module output after the
    layer (the probe's record, :attr:`Engine.calls`; the layer's own output of ``per_row``
    elements at least) within the widest module output of a full pass at the engine's batch
    size, and at least :data:`MIN_ELEMENTS`."""
    seen = engine.calls
    at = [j for j, call in enumerate(seen) if call.module is layer]
    after = seen[at[calls - 1] :] if len(at) >= calls else []

    def width(shape: Sequence[int] | None) -> int:
        return math.prod(shape[1:]) if shape else 0

    widest = max((width(call.shape) for call in seen), default=per_row)
    widest_after = max([per_row, *(width(call.shape) for call in after)])
    return max(1, max(engine.batch_size * widest, MIN_ELEMENTS) // widest_after)


def channel_ablations(
    engine: Engine,
    x: Tensor,
    features: Tensor,
    targets: Sequence[Target],
    clean: Tensor,
    layer: nn.Module,
    calls: int,
    score: Score,
    full: bool = False,
) -> tuple[list[Tensor], dict[str, Any]]:
    """Per input ``x[i]``, the scores (K,) of ``targets[i]`` with each channel k of ``layer``
    (its ``calls``-th call; ``features`` (N, K, h, w) its clean output, ``clean`` (N,) the clean
    scores) set to zero, and what ran, for ``Result.resolved``: ``ablation`` ("from the layer",
    or "full passes (why)"), ``rows_from_layer`` (rows run from the layer on, the un-ablated
    ones included).

    The input is first expanded at the model's door (:func:`~convlens.hooks.batch_at`, for
    networks that read their batch size from the input); where a module gets that batch before
    the layer (the input transformed by the model's own code first), it is fed at batch 1.
    ``engine.forwards`` counts what enters the model: one image per pass from the layer on, one
    per channel in full passes. ``full`` forces full passes (tests, benchmarks)."""
    n, k = len(x), features.shape[1]
    rows = rows_per_pass(engine, layer, calls, features[0].numel())
    passes = len(list(split(k, rows)))
    low = engine.dtype not in (torch.float32, torch.float64)
    rtol = 3e-2 if low else 1e-3 if engine.device.type == "cpu" else 1e-2  # GPUs: TF32 convs
    why = "forced" if full else None
    first_full, widen, ran = (0 if full else n), True, [0]
    engine.expect(n * k if full else n * passes + 1)

    def from_layer(i: int, widen: bool) -> Tensor:
        image, maps = x[i : i + 1], features[i]
        shortcut = FromLayer(engine.model.module, image, maps, layer, calls, clean[i], rtol, widen)
        try:
            engine.stream(shortcut, targets[i], score, rows=rows)
        finally:
            ran[0] += shortcut.rows
        if i == 0:  # the first channel's row against one full pass
            check = engine.stream(Ablations(image, maps[:1], layer, calls), targets[i], score)
            if not agree(check.scores[0], shortcut.scores[0], rtol):
                raise Unbatchable("an ablated row's score differs from a full pass's")
        return shortcut.scores

    scores: list[Tensor] = []
    for i, target in enumerate(targets):
        if why is None:
            before, planned = engine.forwards, passes + (i == 0)
            try:
                try:
                    scores.append(from_layer(i, widen))
                except Unbatchable as early:
                    if not (widen and early.early):
                        raise
                    widen = False
                    scores.append(from_layer(i, widen))
                continue
            except Unbatchable as reason:
                why = str(reason)
            except Exception as error:  # any failure: the full passes decide
                first = (str(error).splitlines() or [""])[0][:100]
                why = f"{type(error).__name__} after the layer: {first}"
            first_full = i
            unrun = planned - (engine.forwards - before) + passes * (n - i - 1)
            engine.expect(k * (n - i) - unrun)
        ablations = Ablations(x[i : i + 1], features[i], layer, calls)
        scores.append(engine.stream(ablations, target, score).scores)
    if why is None:
        how = "from the layer"
    elif first_full == 0:
        how = f"full passes ({why})"
    else:
        how = f"from the layer for inputs 0-{first_full - 1}, then full passes ({why})"
    return scores, {"ablation": how, "rows_from_layer": ran[0]}
