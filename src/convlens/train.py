"""Transfer learning on an image folder (``convlens train DATA_DIR --out model.pt``).

The bundled EfficientNet-Lite0 (or the network a factory returns, ``arch="file.py:function"``,
with its own pretrained weights or ``weights=``) keeps its features and gets a new linear head
for the folder's classes (Yosinski et al. 2014, "How transferable are features in deep neural
networks?", NeurIPS; Kornblith, Shlens & Le 2019, "Do Better ImageNet Models Transfer
Better?", CVPR). By default only the head learns (the backbone is frozen); with
``freeze_backbone=False`` the whole network is fine-tuned, the backbone at a tenth of the
learning rate. BatchNorm statistics stay ImageNet's (eval mode) in both cases, as is usual for
small folders.

The layout is one sub-folder per class. A stratified split keeps ``val_fraction`` of every
class for validation; the weights of the best validation epoch are kept. Training images are
augmented with random resized crops, horizontal flips and brightness/contrast jitter; classes
are weighted by inverse frequency in the loss when the folder is unbalanced. The checkpoint
(weights, labels, preprocessing, history) loads with ``cl.load_model(path)`` under
``weights_only=True``; a confusion-matrix picture with per-class accuracy is written beside it.
"""

from __future__ import annotations

import copy
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from convlens import factories, viz, zoo
from convlens.checks import RequestError, finite
from convlens.engine import select_output
from convlens.files import check_output, printable, save_picture
from convlens.images import ImageError, load_image
from convlens.model import IMAGENET_MEAN, IMAGENET_STD, Model, size_pair

__all__ = ["IMAGE_SUFFIXES", "Folder", "TrainResult", "scan_folder", "stratified_split", "train"]

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"})


@dataclass(frozen=True)
class Folder:
    """An image-folder data set: class names (sorted sub-folder names), files and labels."""

    root: Path
    classes: list[str]
    files: list[Path]
    labels: list[int]


def _hidden(path: Path, root: Path) -> bool:
    """Whether a file or folder below ``root`` is hidden (its name, or a folder's on the way,
    starts with '.': ``.ipynb_checkpoints``, ``.DS_Store``, ``._photo.jpg``)."""
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def scan_folder(root: str | os.PathLike) -> Folder:
    """The classes and image files of ``root`` (one sub-folder per class, searched
    recursively; hidden files and folders are ignored at every depth)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data folder not found: {root}")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if len(classes) < 2:
        raise RequestError(
            f"{root} needs one sub-folder per class (at least two); found {len(classes)}"
        )
    files: list[Path] = []
    labels: list[int] = []
    for index, name in enumerate(classes):
        found = sorted(
            p
            for p in (root / name).rglob("*")
            if p.suffix.lower() in IMAGE_SUFFIXES and not _hidden(p, root) and p.is_file()
        )
        if not found:
            raise RequestError(
                f"class folder {root / name} has no images ({', '.join(sorted(IMAGE_SUFFIXES))})"
            )
        files += found
        labels += [index] * len(found)
    return Folder(root, classes, files, labels)


def stratified_split(
    labels: list[int], val_fraction: float, seed: int = 0
) -> tuple[list[int], list[int]]:
    """Train and validation indices: ``val_fraction`` of each class (at least one image of a
    class with two or more) goes to validation, chosen by ``seed``."""
    if not 0 <= val_fraction < 1:
        raise RequestError(f"val_fraction must be in [0, 1), not {val_fraction}")
    rng = np.random.default_rng(seed)
    train_rows: list[int] = []
    val_rows: list[int] = []
    for label in sorted(set(labels)):
        rows = [i for i, y in enumerate(labels) if y == label]
        rng.shuffle(rows)
        n_val = 0 if val_fraction == 0 or len(rows) < 2 else max(1, round(len(rows) * val_fraction))
        val_rows += rows[:n_val]
        train_rows += rows[n_val:]
    return sorted(train_rows), sorted(val_rows)


@dataclass(frozen=True)
class TrainResult:
    """What ``train`` produced: the model (best validation epoch), the files it wrote, one
    dict per epoch in ``history``, and the validation confusion matrix (rows: true class)."""

    model: Model
    checkpoint: Path
    confusion_picture: Path
    history: list[dict[str, float]]
    confusion: Tensor
    val_accuracy: float
    per_class_accuracy: list[float]
    skipped: list[tuple[str, str]]
    seconds: float


def _stored(model: Model, size: tuple[int, int]) -> Callable[[Any], Tensor]:
    """Images as uint8 (C, *size), C the model's channels: shorter side resized to fit
    ``size``, centre crop, not normalised (values 0-255)."""
    identity = (0.0,) * model.channels, (1.0,) * model.channels
    plain = Model(model.module, input_size=size, mean=identity[0], std=identity[1], crop=1.0)
    return lambda picture: (plain.preprocess(picture)[0] * 255).round().to(torch.uint8)


def _augment(batch: Tensor, size: tuple[int, int], generator: torch.Generator) -> Tensor:
    """Random resized crop (area 50-100%, aspect 3/4-4/3), horizontal flip, brightness and
    contrast in [0.8, 1.2]; ``batch`` is uint8 (B, 3, S, T), the result float in [0, 1]."""

    def uniform(low: float, high: float) -> float:
        return low + (high - low) * float(torch.rand((), generator=generator))

    rows, cols = batch.shape[-2:]
    crops = []
    for picture in batch.float() / 255.0:
        area = rows * cols * uniform(0.5, 1.0)
        ratio = math.exp(uniform(math.log(3 / 4), math.log(4 / 3))) * cols / rows
        w = min(cols, round(math.sqrt(area * ratio)))
        h = min(rows, round(math.sqrt(area / ratio)))
        top = int(torch.randint(0, rows - h + 1, (), generator=generator))
        left = int(torch.randint(0, cols - w + 1, (), generator=generator))
        crop = picture[None, :, top : top + h, left : left + w]
        crop = F.interpolate(crop, size=size, mode="bilinear", antialias=h > size[0])
        if torch.rand((), generator=generator) < 0.5:
            crop = crop.flip(-1)
        mean = crop.mean()
        crop = (crop - mean) * uniform(0.8, 1.2) + mean
        crops.append((crop * uniform(0.8, 1.2)).clamp(0, 1))
    return torch.cat(crops)


def _centre(batch: Tensor, size: tuple[int, int]) -> Tensor:
    top, left = (batch.shape[-2] - size[0]) // 2, (batch.shape[-1] - size[1]) // 2
    return batch[..., top : top + size[0], left : left + size[1]].float() / 255.0


def _starting_model(
    classes: list[str],
    name: str,
    arch: str | None,
    weights: Any,
    head: str | None,
    size: tuple[int, int],
    mean: Any,
    std: Any,
) -> tuple[Model, str]:
    """The network to fine-tune, with a fresh head for ``classes``, and the head's name."""
    if arch is None:
        given = {"weights": weights, "head": head, "mean": mean, "std": std}
        if any(value is not None for value in given.values()):
            option = next(key for key, value in given.items() if value is not None)
            raise RequestError(
                f"{option} is for arch=file.py:function (the bundled Lite0 has its own)"
            )
        return zoo.lite0_transfer(classes, size, name=name), zoo.HEAD
    module = factories.build(arch)
    if weights is not None:
        factories.load_weights(module, weights)
    head = factories.replace_head(module, len(classes), head)
    model = Model(
        module.eval(), input_size=size, mean=mean if mean is not None else IMAGENET_MEAN,
        std=std if std is not None else IMAGENET_STD, labels=classes, name=name,
    )  # fmt: skip
    outputs = factories.probe(model, arch, head)
    if outputs != len(classes):
        raise RequestError(
            f"with its head {head!r} replaced, {arch} gives {outputs} outputs per image, not "
            f"{len(classes)}: name the classifier with --head"
        )
    return model, head


def _confusion_path(out: Path) -> Path:
    return out.with_name(f"{out.stem}_confusion.png")


def _confusion(predicted: Tensor, truth: Tensor, k: int) -> Tensor:
    return torch.bincount(truth * k + predicted, minlength=k * k).view(k, k)


def train(
    data_dir: str | os.PathLike,
    out: str | os.PathLike = "model.pt",
    *,
    epochs: int = 8,
    freeze_backbone: bool = True,
    val_fraction: float = 0.2,
    batch_size: int = 16,
    lr: float = 3e-3,
    augment: bool = True,
    balance: bool = True,
    image_size: int | tuple[int, int] = 224,
    seed: int = 0,
    progress: bool | None = None,
    log: Callable[[str], None] | None = None,
    arch: str | None = None,
    weights: str | os.PathLike | None = None,
    head: str | None = None,
    mean: Any = None,
    std: Any = None,
) -> TrainResult:
    """Fine-tune the bundled EfficientNet-Lite0, or the network of the factory ``arch``
    (``file.py:function`` or ``package.module:function``, called with no arguments; a state
    dict ``weights`` is loaded into it), on ``data_dir`` and save a checkpoint to ``out``.

    The classifier head (the last ``nn.Linear``, or the module ``head``) is replaced by a new
    one for the folder's classes; ``image_size`` is the input side (or ``(height, width)``),
    ``mean``/``std`` the normalisation of a factory's network (default ImageNet's). The
    checkpoint records ``arch``: loading it calls the factory again. Unreadable images are
    reported through ``log`` and skipped. ``balance`` weights the loss by inverse class
    frequency. Returns a :class:`TrainResult`; the confusion matrix picture is
    ``<out stem>_confusion.png``.
    """
    from tqdm.auto import tqdm

    # the whole request is checked before any work: a bad one costs no training
    size = size_pair(image_size)
    if epochs < 1 or batch_size < 1 or size is None or min(size) < 32:
        raise RequestError("need epochs >= 1, batch_size >= 1 and an image size of at least 32")
    if finite("lr", lr) <= 0:
        raise RequestError(f"lr must be positive, not {lr!r}")
    if not 0 <= finite("val_fraction", val_fraction) < 1:
        raise RequestError(f"val_fraction must be in [0, 1), not {val_fraction}")
    out = check_output(out, "file", what="out")
    check_output(_confusion_path(out), "file", what="the confusion picture")
    say = log or (lambda text: print(printable(text), file=sys.stderr))
    started = time.perf_counter()
    folder = scan_folder(data_dir)
    with torch.random.fork_rng():  # the new head's weights come from ``seed`` alone
        torch.manual_seed(seed)
        model, head = _starting_model(
            folder.classes, folder.root.name, arch, weights, head, size, mean, std
        )
    module = model.module
    stored = (round(size[0] / model.crop), round(size[1] / model.crop))
    store = _stored(model, stored)

    pictures, labels, skipped = [], [], []
    for path, label in zip(folder.files, folder.labels, strict=True):
        try:
            pictures.append(store(load_image(path, size=stored)))
            labels.append(label)
        except (ImageError, OSError, ValueError) as error:
            skipped.append((str(path), str(error).splitlines()[0]))
            say(f"convlens: skipping {printable(path)}: {printable(skipped[-1][1])}")
    if len(set(labels)) < len(folder.classes):
        raise RequestError("every class needs at least one readable image")
    data, targets = torch.stack(pictures), torch.tensor(labels)
    train_rows, val_rows = stratified_split(labels, val_fraction, seed)
    k = len(folder.classes)
    counts = torch.bincount(targets[train_rows], minlength=k).double()
    class_weights = (counts.sum() / (k * counts.clamp(min=1))).float() if balance else None
    say(
        f"{len(labels)} images of {k} classes ({', '.join(folder.classes)}): "
        f"{len(train_rows)} to train, {len(val_rows)} to validate"
        + (f"; class weights {[round(w, 2) for w in class_weights.tolist()]}" if balance else "")
    )
    if not val_rows:
        say(
            "no validation split (val_fraction is 0 or no class has 2 images): the accuracies "
            "shown are on the training images, not a validation measure"
        )
    measured = "validation accuracy" if val_rows else "accuracy on the training images"

    shift = torch.tensor(model.mean).view(1, -1, 1, 1)
    scale = torch.tensor(model.std).view(1, -1, 1, 1)
    head_parameters = list(module.get_submodule(head).parameters())
    chosen_ids = {id(p) for p in head_parameters}
    backbone = [p for p in module.parameters() if id(p) not in chosen_ids]
    for parameter in backbone:
        parameter.requires_grad_(not freeze_backbone)
    for parameter in head_parameters:
        parameter.requires_grad_(True)
    groups = [{"params": head_parameters, "lr": lr}]
    if not freeze_backbone:
        groups.append({"params": backbone, "lr": lr / 10})
    optimiser = torch.optim.AdamW(groups, weight_decay=1e-4)
    steps = epochs * math.ceil(len(train_rows) / batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=steps)
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    module.eval()  # BatchNorm keeps ImageNet's statistics; no dropout

    def evaluate(rows: list[int]) -> tuple[Tensor, float]:
        predicted, loss = [], 0.0
        with torch.no_grad():
            for start in range(0, len(rows), 32):
                chunk = rows[start : start + 32]
                logits, _ = select_output(module((_centre(data[chunk], size) - shift) / scale))
                loss += float(
                    F.cross_entropy(logits, targets[chunk], weight=class_weights, reduction="sum")
                )
                predicted.append(logits.argmax(1))
        return torch.cat(predicted), loss / max(len(rows), 1)

    history: list[dict[str, float]] = []
    best: tuple[float, float] = (-1.0, 0.0)
    best_state: dict[str, Tensor] = {}
    chosen = val_rows or train_rows
    for epoch in range(1, epochs + 1):
        tic = time.perf_counter()
        order = torch.randperm(len(train_rows), generator=generator).tolist()
        seen, correct, total_loss = 0, 0, 0.0
        batches = range(0, len(order), batch_size)
        bar = tqdm(
            batches,
            desc=f"epoch {epoch}/{epochs}",
            unit="batch",
            disable=progress is False,
            leave=False,
        )
        for start in bar:
            rows = [train_rows[i] for i in order[start : start + batch_size]]
            x = _augment(data[rows], size, generator) if augment else _centre(data[rows], size)
            logits, _ = select_output(module((x - shift) / scale))
            loss = F.cross_entropy(logits, targets[rows], weight=class_weights)
            if not bool(torch.isfinite(loss)):
                raise RequestError(
                    f"training diverged: the loss became {float(loss)} in epoch {epoch}; "
                    f"lower lr (now {lr:g}); no checkpoint written"
                )
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            schedule.step()
            seen += len(rows)
            correct += int((logits.argmax(1) == targets[rows]).sum())
            total_loss += float(loss.detach()) * len(rows)
        predicted, val_loss = evaluate(chosen)
        if not math.isfinite(val_loss):
            raise RequestError(
                f"training diverged: the {'validation' if val_rows else 'training'} loss became "
                f"{val_loss} after epoch {epoch}; lower lr (now {lr:g}); no checkpoint written"
            )
        accuracy = float((predicted == targets[chosen]).float().mean())
        history.append(
            {
                "epoch": epoch,
                "train_loss": total_loss / seen,
                "train_accuracy": correct / seen,
                "val_loss": val_loss,
                "val_accuracy": accuracy,
                "seconds": time.perf_counter() - tic,
            }
        )
        say(
            f"epoch {epoch}/{epochs}: loss {total_loss / seen:.3f}, train accuracy "
            f"{correct / seen:.3f}, {measured} {accuracy:.3f} "
            f"({time.perf_counter() - tic:.1f} s)"
        )
        if (accuracy, -val_loss) > best:
            best = (accuracy, -val_loss)
            best_state = copy.deepcopy(module.state_dict())

    module.load_state_dict(best_state)
    for parameter in module.parameters():
        parameter.requires_grad_(True)
    module.zero_grad(set_to_none=True)
    predicted, _ = evaluate(chosen)
    confusion = _confusion(predicted, targets[chosen], k)
    per_class = (confusion.diag() / confusion.sum(1).clamp(min=1)).tolist()
    val_accuracy = float(confusion.diag().sum() / confusion.sum())
    seconds = time.perf_counter() - started
    training = {
        "data_dir": str(folder.root),
        "weights": str(weights) if weights is not None else None,
        "epochs": epochs,
        "freeze_backbone": freeze_backbone,
        "seed": seed,
        "class_weights": class_weights.tolist() if class_weights is not None else None,
        "history": history,
        "confusion": confusion.tolist(),
        "val_accuracy": val_accuracy,
        "per_class_accuracy": per_class,
        "validated_on": "validation split" if val_rows else "training images (no split)",
        "seconds": seconds,
    }
    zoo.save_checkpoint(out, model, training, arch=arch or "efficientnet-lite0", head=head)
    picture = _confusion_path(out)
    title = f"{model.name}: {measured} {val_accuracy:.1%}"
    save_picture(viz.confusion_plot(confusion, folder.classes, title), picture)
    say(
        f"{measured} {val_accuracy:.3f}; wrote {printable(out)} and {printable(picture)} "
        f"({seconds:.0f} s)"
    )
    return TrainResult(
        model, out, picture, history, confusion, val_accuracy, per_class, skipped, seconds
    )
