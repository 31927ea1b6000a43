"""A real text-classification task needing no download: which stdlib package wrote a docstring?

Why this task: fine-tuning benchmarks should train on real text (so loss curves and
held-out accuracy mean something) but machines running tests have no dataset hub.  Every
CPython installation ships thousands of docstrings, and the package they come from
(``email`` vs ``asyncio`` vs ``logging`` ...) is learnable from their wording.

The texts depend on the Python version (docstrings change between releases), but for one
interpreter the dataset is identical for identical arguments: everything is sorted before
it is shuffled with ``random.Random(seed)``.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import pkgutil
import random
import types
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "DOCSTRING_PACKAGES",
    "DocstringDataset",
    "Example",
    "available_docstring_packages",
    "load_docstring_dataset",
    "tokenize_batches",
]

DOCSTRING_PACKAGES: tuple[str, ...] = (
    "asyncio",
    "email",
    "logging",
    "xml",
    "unittest",
    "importlib",
    "multiprocessing",
    "http",
)
"""Candidate packages, most docstrings first, so small ``num_classes`` still get big classes.

All are pure-Python parts of every CPython build (``tkinter``, ``sqlite3`` and the like
are optional and deliberately left out, so labels do not shift between machines).
"""

MIN_DOCSTRING_CHARS = 40
"""Shorter docstrings ("Return self.") carry almost no signal about their package."""

MAX_DOCSTRING_CHARS = 300
"""Truncation length: keeps tokenized examples within a typical benchmark ``seq_len``."""

Example = tuple[str, int]


@dataclass(frozen=True)
class DocstringDataset:
    """Class-balanced, shuffled ``(text, label)`` splits; ``label_names[label]`` is the package."""

    train: list[Example]
    held_out: list[Example]
    label_names: tuple[str, ...]

    @property
    def num_classes(self) -> int:
        return len(self.label_names)


def _normalise(docstring: str) -> str:
    """Collapse whitespace (indentation carries no label signal) and truncate."""
    text = " ".join(inspect.cleandoc(docstring).split())
    return text[:MAX_DOCSTRING_CHARS].rstrip()


def _iter_package_modules(package_name: str) -> Iterator[types.ModuleType]:
    """The package and every submodule that imports cleanly, skipping tests and ``__main__``.

    ``__main__`` modules run programs on import (``unittest.__main__``); test packages
    would mix a different kind of docstring into the class.
    """
    package = importlib.import_module(package_name)
    yield package
    search_path = getattr(package, "__path__", None)
    if search_path is None:
        return
    submodules = pkgutil.walk_packages(
        search_path, prefix=f"{package_name}.", onerror=lambda _name: None
    )
    for info in submodules:
        parts = info.name.split(".")
        if any(part == "__main__" or part.startswith("test") for part in parts[1:]):
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # deprecated submodules warn on import
                yield importlib.import_module(info.name)
        except Exception:  # platform-specific modules (asyncio.windows_events, ...)
            continue


def _docstrings_defined_in(module: types.ModuleType) -> Iterator[str]:
    """Docstrings of the module and of classes, functions and methods defined in it.

    Objects re-exported or patched in from elsewhere are skipped (``__module__`` check) so
    a docstring is attributed to the package that wrote it, whatever else was imported.
    ``__doc__`` is read directly rather than via ``inspect.getdoc``, which would inherit
    docstrings from base classes.
    """
    if module.__doc__:
        yield module.__doc__
    for obj in list(vars(module).values()):
        if getattr(obj, "__module__", None) != module.__name__:
            continue
        if inspect.isfunction(obj) and obj.__doc__:
            yield obj.__doc__
        elif inspect.isclass(obj):
            if obj.__doc__:
                yield obj.__doc__
            for member in list(vars(obj).values()):
                if isinstance(member, property):
                    member = member.fget
                elif isinstance(member, (classmethod, staticmethod)):
                    member = member.__func__
                # the module check also drops methods other libraries monkeypatch onto
                # stdlib classes (transformers adds ``logging.Logger.warning_advice``)
                if (
                    inspect.isfunction(member)
                    and member.__module__ == module.__name__
                    and member.__doc__
                ):
                    yield member.__doc__


@functools.cache
def _package_docstrings(package_name: str) -> frozenset[str]:
    """All normalised docstrings of one package that are long enough (cached: imports are slow)."""
    texts = set()
    for module in _iter_package_modules(package_name):
        for docstring in _docstrings_defined_in(module):
            text = _normalise(docstring)
            if len(text) >= MIN_DOCSTRING_CHARS:
                texts.add(text)
    return frozenset(texts)


def available_docstring_packages() -> tuple[str, ...]:
    """The :data:`DOCSTRING_PACKAGES` that import on this interpreter, in label order."""
    available = []
    for package_name in DOCSTRING_PACKAGES:
        try:
            importlib.import_module(package_name)
        except Exception:
            continue
        available.append(package_name)
    return tuple(available)


def load_docstring_dataset(
    num_classes: int = 4,
    seed: int = 0,
    held_out_fraction: float = 0.2,
    max_per_class: int | None = 400,
) -> DocstringDataset:
    """Docstrings of the first ``num_classes`` available packages, labelled by package.

    Every class gets the same number of examples: ``max_per_class`` capped by the smallest
    class.  The held-out split takes ``held_out_fraction`` of each class (stratified), so
    it is balanced too.  Texts found in more than one package are dropped as ambiguous.
    """
    packages = available_docstring_packages()
    if not 2 <= num_classes <= len(packages):
        raise ValueError(
            f"num_classes must be between 2 and {len(packages)} (packages available here: "
            f"{', '.join(packages)}), got {num_classes}"
        )
    if not 0.0 <= held_out_fraction < 1.0:
        raise ValueError(f"held_out_fraction must be in [0, 1), got {held_out_fraction}")
    if max_per_class is not None and max_per_class < 1:
        raise ValueError(f"max_per_class must be >= 1 or None, got {max_per_class}")

    label_names = packages[:num_classes]
    texts_per_class = [_package_docstrings(name) for name in label_names]
    seen_in_several = set()
    for index, texts in enumerate(texts_per_class):
        for other in texts_per_class[index + 1:]:
            seen_in_several |= texts & other

    rng = random.Random(seed)
    per_class = min(len(texts - seen_in_several) for texts in texts_per_class)
    if max_per_class is not None:
        per_class = min(per_class, max_per_class)
    held_out_per_class = round(per_class * held_out_fraction)

    train: list[Example] = []
    held_out: list[Example] = []
    for label, texts in enumerate(texts_per_class):
        ordered = sorted(texts - seen_in_several)  # set order varies between runs; sort first
        rng.shuffle(ordered)
        chosen = ordered[:per_class]
        held_out.extend((text, label) for text in chosen[:held_out_per_class])
        train.extend((text, label) for text in chosen[held_out_per_class:])
    rng.shuffle(train)
    rng.shuffle(held_out)
    return DocstringDataset(train=train, held_out=held_out, label_names=label_names)


def tokenize_batches(
    dataset_split: Sequence[Example],
    tokenizer: Any,
    batch_size: int,
    seq_len: int,
    seed: int,
    drop_last: bool = True,
) -> Iterator[dict[str, torch.Tensor]]:
    """Shuffled batches of ``input_ids``, ``attention_mask`` ``[batch, seq_len]`` and ``labels``.

    Every batch is padded/truncated to exactly ``seq_len`` so torch.compile sees static
    shapes; with ``drop_last=True`` (the default) the batch dimension is static as well.
    ``tokenizer`` is a Hugging Face tokenizer such as ``load_minilm_tokenizer()``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    order = list(range(len(dataset_split)))
    random.Random(seed).shuffle(order)
    for start in range(0, len(order), batch_size):
        indices = order[start:start + batch_size]
        if drop_last and len(indices) < batch_size:
            return
        texts = [dataset_split[index][0] for index in indices]
        encoded = tokenizer(
            texts,
            padding="max_length",
            truncation=True,
            max_length=seq_len,
            return_tensors="pt",
        )
        yield {
            "input_ids": encoded["input_ids"].long(),
            "attention_mask": encoded["attention_mask"].long(),
            "labels": torch.tensor(
                [dataset_split[index][1] for index in indices], dtype=torch.long
            ),
        }
