"""What a report is asked to explain, besides its images and methods: the top-K target
(:class:`Top`), one target per image (:func:`targets_by_image`), and a reference set drawn from
the user's images (:class:`Background`, :func:`background_files`, :func:`load_background`,
:func:`with_background`) for DeepSHAP, GradientSHAP and the ``"mean"`` baseline.

Example:
    >>> background = report.load_background(model, ["photos/"], size=32, seed=0)
    >>> report.explain_images(model, sources, ["deeplift", "gradient_shap"], "out",
    ...                       params={"deeplift": {"shap": True}}, target=report.Top(3),
    ...                       background=background, save_attributions=True)
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from convlens.checks import RequestError, first_line, positive_int
from convlens.files import printable
from convlens.images import ImageError
from convlens.model import Model

__all__ = [
    "Background",
    "Top",
    "background_files",
    "background_users",
    "describe_target",
    "load_background",
    "targets_by_image",
    "unused_background",
    "with_background",
]


@dataclass(frozen=True)
class Top:
    """A report target: one map per each of the ``k`` most probable classes of each image
    (rank 1 to ``k``), each explained as that class index alone would be. Report-only: for
    ``cl.explain`` give the class indices themselves."""

    k: int

    def __post_init__(self) -> None:
        positive_int("top k", self.k)

    def describe(self) -> str:
        return f"top:{self.k}"


def describe_target(model: Model, spec: Any) -> Any:
    """A JSON-friendly description of one image's target request (label names resolved)."""
    from convlens.targets import check_target_spec

    if isinstance(spec, Top):
        return spec.describe()
    return check_target_spec(spec, 1, model.labels)[0].describe()


def targets_by_image(
    names: Sequence[str], target: Any = None, targets: Mapping[str, Any] | None = None
) -> list[Any]:
    """The target of each image ``names[i]``: ``targets[name]`` where given, ``target`` for
    the rest. Refuses names in ``targets`` that are not among ``names``, listing them."""
    targets, given = dict(targets or {}), set(names)
    unknown = [name for name in targets if name not in given]
    if unknown:
        raise RequestError(
            f"targets are given for {len(unknown)} image(s) that are not explained: "
            + ", ".join(printable(str(name)) for name in unknown)
        )
    return [targets.get(name, target) for name in names]


# -- the reference set --------------------------------------------------------------------------


@dataclass
class Background:
    """A reference set drawn from the user's images: ``images`` (K, C, H, W), preprocessed for
    the model; ``files`` the images drawn (in that order), ``skipped`` those that could not be
    read, ``source`` where they were drawn from and ``seed`` the draw's seed."""

    images: Tensor
    files: list[str] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    source: str = "a tensor"
    seed: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.images, Tensor) or self.images.dim() != 4 or not len(self.images):
            shape = tuple(self.images.shape) if isinstance(self.images, Tensor) else None
            raise RequestError(f"a background is a tensor (K, C, H, W) with K >= 1, not {shape}")
        if not bool(torch.isfinite(self.images).all()):
            raise RequestError("the background contains NaN or infinite values")

    @property
    def description(self) -> str:
        """How results.json records it: ``background (32 images from DIR, seed 0)``."""
        seed = "" if self.seed is None else f", seed {self.seed}"
        return f"background ({len(self.images)} images from {self.source}{seed})"

    def mean(self) -> Tensor:
        """The mean image of the set, (1, C, H, W)."""
        return self.images.mean(dim=0, keepdim=True)

    def record(self) -> dict[str, Any]:
        """JSON-friendly: the description, the files drawn and those skipped."""
        return {
            "description": self.description,
            "size": len(self.images),
            "seed": self.seed,
            "source": self.source,
            "files": list(self.files),
            "skipped": list(self.skipped),
        }


def _hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def background_files(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """The image files of ``paths``: a folder gives its images (recursively, by their suffix,
    hidden files and folders left out, sorted), a file itself; each file once. Refuses a path
    that does not exist and a folder without images."""
    from convlens.train import IMAGE_SUFFIXES

    if isinstance(paths, (str, os.PathLike)) or not paths:
        raise RequestError("give the background as a list of folders or image files")
    files: list[Path] = []
    for given in paths:
        path = Path(given)
        if path.is_dir():
            found = sorted(
                p
                for p in path.rglob("*")
                if p.suffix.lower() in IMAGE_SUFFIXES and not _hidden(p, path) and p.is_file()
            )
            if not found:
                raise RequestError(
                    f"background folder {printable(str(path))} has no images "
                    f"({', '.join(sorted(IMAGE_SUFFIXES))})"
                )
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"background not found: {printable(str(path))}")
    return list(dict.fromkeys(files))


def _listed(names: list[str], most: int = 3) -> str:
    shown = ", ".join(names[:most])
    return shown + (f" and {len(names) - most} more" if len(names) > most else "")


def load_background(
    model: Model,
    paths: Sequence[str | os.PathLike],
    size: int = 32,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
) -> Background:
    """Draw ``size`` images (all when there are fewer) from :func:`background_files`
    ``(paths)`` with ``numpy.random.default_rng(seed)`` and preprocess them for ``model``.

    The files are taken in a seeded random order until ``size`` are read; one that cannot be
    read is reported through ``log``, listed under ``skipped`` and replaced by the next; it is
    an error only when none can be read. The set keeps the files' sorted order."""
    positive_int("background size", size)
    positive_int("seed", seed, minimum=0)
    files = background_files(paths)
    order = np.random.default_rng(seed).permutation(len(files))
    chosen: dict[int, Tensor] = {}
    skipped: list[dict[str, str]] = []
    for index in order.tolist():
        if len(chosen) == size:
            break
        try:
            chosen[index] = model.preprocess(str(files[index])).float()
        except (ImageError, OSError, RequestError) as error:  # the file, not a bug: skip it
            reason = first_line(error)
            if log is not None:
                log(f"convlens: skipping background {printable(str(files[index]))}: {reason}")
            skipped.append({"image": str(files[index]), "reason": reason})
    if not chosen:
        raise RequestError(f"none of the {len(files)} background image(s) could be read")
    kept = sorted(chosen)
    return Background(
        images=torch.cat([chosen[i] for i in kept]),
        files=[str(files[i]) for i in kept],
        skipped=skipped,
        source=_listed([str(p) for p in paths]),
        seed=seed,
    )


def unused_background(methods: Sequence[str]) -> str:
    """The refusal of a background that none of ``methods`` takes."""
    return (
        f"none of the methods ({', '.join(methods)}) uses a background: it is the reference "
        "set of gradient_shap and of deeplift with shap=True, and the image of baseline=mean"
    )


def background_users(
    methods: Sequence[str], params: Mapping[str, Mapping[str, Any]] | None
) -> list[str]:
    """The methods that take a background (:func:`with_background`): ``gradient_shap`` and
    ``deeplift`` with ``shap=True`` without a baseline of their own, and ``baseline="mean"``."""
    users = []
    for method in methods:
        given = (params or {}).get(method, {})
        baseline = given.get("baseline")
        shap = method == "gradient_shap" or (method == "deeplift" and given.get("shap") is True)
        if (isinstance(baseline, str) and baseline == "mean") or (baseline is None and shap):
            users.append(method)
    return users


def with_background(
    methods: Sequence[str],
    params: Mapping[str, Mapping[str, Any]] | None,
    background: Background | Tensor | None,
) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """Each method's parameters with the reference set put in, and, per method whose baseline
    came from it, how to record that baseline.

    With a background: ``deeplift`` with ``shap=True`` and ``gradient_shap`` get the set as
    their ``baseline`` unless one is given; ``baseline="mean"`` becomes the set's mean image.
    Without one, ``"mean"`` stays each image's mean colour, and ``deeplift`` with ``shap=True``
    and no tensor baseline is refused (DeepSHAP needs a reference set). A background that no
    method takes is refused too, rather than ignored."""
    if isinstance(background, Tensor):
        background = Background(background)
    if background is not None and not background_users(methods, params):
        raise RequestError(unused_background(methods))
    params = {name: dict(value) for name, value in (params or {}).items()}
    notes: dict[str, str] = {}
    for method in background_users(methods, params):
        given = params.get(method, {})
        if background is None:  # "mean" stays each image's mean colour
            if method == "deeplift" and given.get("baseline") is None:
                raise RequestError(
                    "DeepSHAP (deeplift with shap=True) needs a reference set: give a "
                    "background (--background DIR on the command line)"
                )
        elif given.get("baseline") is None:  # a reference set's user
            params[method] = given | {"baseline": background.images}
            notes[method] = background.description
        else:  # baseline="mean"
            params[method] = given | {"baseline": background.mean()}
            notes[method] = f"mean image of the {background.description}"
    return params, notes
