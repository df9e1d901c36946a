"""The uniform example record every dataset plugin yields, and the dataset base class.

A dataset plugin registers a subclass of :class:`Dataset` through ``register_datasets``.  The core
never reads benchmark files itself; it only iterates ``Example`` records and asks the dataset how
to phrase the single-step question and how to score an answer.
"""

from __future__ import annotations

import abc
import collections
import concurrent.futures
import functools
import itertools
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

from PIL import Image


@dataclass
class Example:
    """One question about one or more images.

    ``answers`` is empty when the split hides its answers (DocVQA/InfographicVQA test).
    ``metadata`` holds what breakdowns need: question type, category, subject, options, ...
    """

    id: str
    images: list[Image.Image]
    question: str
    answers: list[str] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)


class ExampleRef(Protocol):
    """An example whose images are not decoded yet: compressed bytes, a path, or how to draw them."""

    id: str

    def materialise(self) -> Example: ...


@dataclass
class Decoded:
    """The reference of an example that is already decoded (for datasets that cannot defer decoding)."""

    example: Example

    @property
    def id(self) -> str:
        return self.example.id

    def materialise(self) -> Example:
        return self.example


class Dataset(abc.ABC):
    """Base class for dataset plugins.

    Subclasses set ``metric`` (a name understood by ``sdrt_cli.metrics``), ``instruction`` (the
    benchmark's standard answer instruction), and implement ``__iter__``.  ``limit`` keeps the
    first N examples in the dataset's canonical order, so every process and every rerun sees the
    same examples.  The core applies it: a subclass's ``__iter__``, ``ids``, ``references``,
    ``iter_shard`` and ``__len__`` are wrapped to stop after ``limit`` examples, so a plugin may
    ignore ``limit`` (or read it to stop loading early).
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for name, limited in _LIMITED_METHODS.items():
            method = cls.__dict__.get(name)
            if method is not None and not getattr(method, "_applies_limit", False):
                setattr(cls, name, limited(method))

    name: ClassVar[str] = ""
    metric: ClassVar[str] = "exact"
    instruction: ClassVar[str] = "Answer the question using a single word or phrase."
    default_split: ClassVar[str] = "validation"

    def __init__(
        self,
        data_dir: Path | str | None = None,
        split: str | None = None,
        limit: int | None = None,
        seed: int = 0,
        **options: Any,
    ) -> None:
        self.data_dir = Path(data_dir) if data_dir is not None else None
        self.split = split or self.default_split
        self.limit = limit
        self.seed = seed
        self.options = options

    @abc.abstractmethod
    def __iter__(self) -> Iterator[Example]:
        """Yield examples in a deterministic order, at most ``limit`` of them."""

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def ids(self) -> Iterator[str]:
        """Example ids in iteration order; plugins override this to skip decoding images."""
        for example in self:
            yield example.id

    def references(self) -> Iterator[ExampleRef]:
        """Every example, in iteration order, as a reference that decodes its images only when
        materialised.  Plugins override this to keep images compressed; the default decodes."""
        for example in self:
            yield Decoded(example)

    def iter_shard(self, rank: int, world_size: int) -> Iterator[Example]:
        """Examples whose position modulo ``world_size`` is ``rank`` (one process's share of the data).

        Plugins override this to skip decoding the images of other ranks' examples.
        """
        for position, example in enumerate(self):
            if position % world_size == rank:
                yield example

    @property
    def has_answers(self) -> bool:
        """False for splits whose answers are hidden (scoring is refused, a submission is written)."""
        return True

    def question_text(self, example: Example) -> str:
        """The question as the model reads it, without the answer instruction (MMMU: with lettered options).

        Prompt packs receive this as ``{question}`` and ``instruction`` as ``{instruction}``.
        """
        return example.question

    def format_question(self, example: Example) -> str:
        """The single-step user text: question plus the benchmark's standard instruction."""
        return f"{self.question_text(example)}\n{self.instruction_for(example)}"

    def categories(self, example: Example) -> dict[str, str]:
        """Breakdown keys for reports, e.g. {"subset": "human"} or {"domain": "Science"}."""
        return {}

    def instruction_for(self, example: Example) -> str:
        """The answer instruction for this example; differs per example where the benchmark's
        prompt does (MMMU: multiple-choice vs open questions)."""
        return self.instruction

    def identity(self) -> dict[str, Any]:
        """What a run records about the data it used."""
        return {"name": self.name, "split": self.split, "data_dir": str(self.data_dir) if self.data_dir else None, "limit": self.limit, "seed": self.seed}


def _first_examples(method: Callable) -> Callable:
    @functools.wraps(method)
    def limited(self: Dataset, *args: Any, **kwargs: Any) -> Iterator[Any]:
        items = method(self, *args, **kwargs)
        return items if self.limit is None else itertools.islice(items, self.limit)

    limited._applies_limit = True  # type: ignore[attr-defined]
    return limited


def _shard_of_first_examples(method: Callable) -> Callable:
    @functools.wraps(method)
    def limited(self: Dataset, rank: int, world_size: int) -> Iterator[Example]:
        items = method(self, rank, world_size)
        # this rank's examples among the first `limit` positions, in position order
        return items if self.limit is None else itertools.islice(items, len(range(rank, self.limit, world_size)))

    limited._applies_limit = True  # type: ignore[attr-defined]
    return limited


def _length_of_first_examples(method: Callable) -> Callable:
    @functools.wraps(method)
    def limited(self: Dataset) -> int:
        total = method(self)
        return total if self.limit is None else min(total, self.limit)

    limited._applies_limit = True  # type: ignore[attr-defined]
    return limited


_LIMITED_METHODS = {
    "__iter__": _first_examples,
    "ids": _first_examples,
    "references": _first_examples,
    "iter_shard": _shard_of_first_examples,
    "__len__": _length_of_first_examples,
}


# decoded examples kept by ExamplesByIndex: enough for a step's share of a batch, small enough that
# document-sized images (6-12 MB decoded each) stay far below any host's memory
DECODED_CACHE_SIZE = 8


class ExamplesByIndex(Mapping[int, Example]):
    """Examples by dataset index, decoded on demand.

    Keeps every example's reference (compressed image bytes or a path) and at most ``cache_size``
    decoded examples, the least recently used leaving first, so a run over a large store holds
    compressed images rather than decoded ones.  ``id_of`` answers without decoding.
    """

    def __init__(self, references: Mapping[int, ExampleRef], cache_size: int = DECODED_CACHE_SIZE):
        if cache_size < 1:
            raise ValueError(f"cache_size must be at least 1, got {cache_size}")
        self.references = dict(references)
        self.cache_size = cache_size
        self.decoded: collections.OrderedDict[int, Example] = collections.OrderedDict()
        self.decodes = 0  # materialisations so far (cache misses)

    def __getitem__(self, index: int) -> Example:
        if index in self.decoded:
            self.decoded.move_to_end(index)
            return self.decoded[index]
        example = self.references[index].materialise()
        self.decodes += 1
        self.decoded[index] = example
        while len(self.decoded) > self.cache_size:
            self.decoded.popitem(last=False)
        return example

    def __iter__(self) -> Iterator[int]:
        return iter(self.references)

    def __len__(self) -> int:
        return len(self.references)

    def id_of(self, index: int) -> str:
        return self.references[index].id


def examples_by_index(dataset: Dataset, wanted: Iterable[int] | None = None, cache_size: int = DECODED_CACHE_SIZE) -> ExamplesByIndex:
    """The examples at ``wanted`` indices (all when None), decoded on demand; reads the dataset only
    as far as the largest wanted index."""
    wanted = None if wanted is None else set(wanted)
    found: dict[int, ExampleRef] = {}
    if wanted is None or wanted:
        for index, reference in enumerate(dataset.references()):
            if wanted is None or index in wanted:
                found[index] = reference
                if wanted is not None and len(found) == len(wanted):
                    break
    return ExamplesByIndex(found, cache_size)


def prefetched(batches: Iterable[Any], prepare: Callable[[Any], Any]) -> Iterator[Any]:
    """``prepare(batch)`` for every batch, in order, the next batch prepared on a background thread
    while the caller works on the current one (image decoding releases the GIL, so it overlaps the
    model's work).  An error in ``prepare`` reaches the caller with the batch it belongs to.  At most
    three prepared batches are alive: the caller's previous one until it takes the next, the one it
    takes, and the one being prepared."""
    batches = iter(batches)
    first = next(batches, _NOTHING)
    if first is _NOTHING:
        return
    with concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="sdrt-prefetch") as pool:
        future = pool.submit(prepare, first)
        for batch in batches:
            ready = future.result()
            future = pool.submit(prepare, batch)
            yield ready
        yield future.result()


_NOTHING = object()


def open_dataset(name: str | None, /, data_dir: Path | str | None = None, split: str | None = None, limit: int | None = None, seed: int = 0, **options: Any) -> Dataset:
    """Instantiate the dataset registered as ``name`` (an unknown name fails with a did-you-mean,
    options its class does not accept in one sentence naming them); it yields at most ``limit``
    examples whatever the plugin does with ``limit``."""
    from sdrt_cli.errors import SdrtError
    from sdrt_cli.plugins import datasets

    if not name:
        raise SdrtError("choose a dataset with --dataset (see `sdrt datasets list`)")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise SdrtError(f"dataset {name!r}: limit must be a non-negative integer, not {limit!r}")

    dataset_class = datasets().get(name)
    try:
        return dataset_class(data_dir=data_dir, split=split, limit=limit, seed=seed, **options)
    except TypeError as exc:
        raise SdrtError(f"dataset {name!r} does not accept these options {sorted(options)}: {exc}") from None
