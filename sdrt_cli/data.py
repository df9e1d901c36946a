"""The uniform example record every dataset plugin yields, and the dataset base class.

A dataset plugin registers a subclass of :class:`Dataset` through ``register_datasets``.  The core
never reads benchmark files itself; it only iterates ``Example`` records and asks the dataset how
to phrase the single-step question and how to score an answer.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Iterator

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


class Dataset(abc.ABC):
    """Base class for dataset plugins.

    Subclasses set ``metric`` (a name understood by ``sdrt_cli.metrics``), ``instruction`` (the
    benchmark's standard answer instruction), and implement ``__iter__``.  ``limit`` keeps the
    first N examples in the dataset's canonical order, so every process and every rerun sees the
    same examples.
    """

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


def open_dataset(name: str, /, data_dir: Path | str | None = None, split: str | None = None, limit: int | None = None, seed: int = 0, **options: Any) -> Dataset:
    """Instantiate the dataset registered as ``name`` (an unknown name fails with a did-you-mean)."""
    from sdrt_cli.plugins import datasets

    dataset_class = datasets().get(name)
    return dataset_class(data_dir=data_dir, split=split, limit=limit, seed=seed, **options)
