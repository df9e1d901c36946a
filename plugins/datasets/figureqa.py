"""``figureqa``: FigureQA (Kahou et al. 2018), yes/no questions on synthetic plots, scored by accuracy.

The official release: one folder per split (``train1``, ``validation1``, ``validation2``,
``test1``, ``test2``, also accepted as ``figureqa-{split}-v1``) holding ``qa_pairs.json``
(``{"qa_pairs": [{"question_string", "question_id", "image_index", "answer": 0|1, ...}]}``) and
the plots in ``png/<image_index>.png``.  ``--data-dir`` is the folder holding the split folders,
or one split folder.  Answers 1/0 become "yes"/"no"; ``question_id`` is FigureQA's question
template (its question type).  A split released without answers has ``has_answers == False``.
Default split: validation1.
"""

from __future__ import annotations

from typing import Any, Iterator

from sdrt_cli.data import Example
from sdrt_cli.errors import SdrtError
from sdrt_plugins.datasets.local import ImageRef, LocalDataset, Record, json_field, load_json

_ANSWER_WORDS = {0: "no", 1: "yes"}


class FigureQA(LocalDataset):
    """FigureQA, yes/no accuracy; the official qa_pairs.json + png/ release."""

    name = "figureqa"
    metric = "yes_no_accuracy"
    instruction = "Answer the question using a single word or phrase."
    default_split = "validation1"
    layouts = "the official FigureQA folders ({split}/qa_pairs.json with {split}/png/<image_index>.png)"

    def _prepare(self) -> None:
        root = self.root
        if root.is_file():
            raise SdrtError(f"{root} is a file; point --data-dir at {self.layouts}")
        if (root / "qa_pairs.json").is_file():
            split_dir = root  # one split's folder given directly: its name is the split
            folder_split = root.name.removeprefix("figureqa-").removesuffix("-v1")
            if self.requested_split is not None and self.requested_split != folder_split:
                raise SdrtError(f"{root} holds the FigureQA split {folder_split!r}, not {self.requested_split!r}")
            self.split = folder_split
        else:
            candidates = [root / self.split, root / f"figureqa-{self.split}-v1"]
            split_dir = next((c for c in candidates if (c / "qa_pairs.json").is_file()), None)
            if split_dir is None:
                available = sorted(
                    d.name.removeprefix("figureqa-").removesuffix("-v1")
                    for d in root.iterdir()
                    if d.is_dir() and (d / "qa_pairs.json").is_file()
                )
                if available:
                    raise self._unknown_split(root, available)
                raise SdrtError(f"{root} holds no FigureQA data: expected {self.layouts}")
        self.split_dir = split_dir
        self.qa_path = split_dir / "qa_pairs.json"
        content = load_json(self.qa_path)
        if not isinstance(content, dict) or not isinstance(content.get("qa_pairs"), list):
            raise SdrtError(f"{self.qa_path} is not a FigureQA file: it has no 'qa_pairs' list")
        self.pairs: list[dict] = content["qa_pairs"]
        for index, pair in enumerate(self.pairs):
            json_field(pair, "question_string", self.qa_path, index)
            json_field(pair, "image_index", self.qa_path, index)
            answer = pair.get("answer")
            if answer is not None and (isinstance(answer, bool) or answer not in (0, 1)):
                raise SdrtError(f"record {index} of {self.qa_path} has answer {answer!r}; FigureQA answers are 0 or 1")

    def _records(self, with_images: bool) -> Iterator[Record]:
        for index, pair in enumerate(self.pairs):
            image_index = pair["image_index"]
            images = []
            if with_images:
                image_path = self.split_dir / "png" / f"{image_index}.png"
                images = [ImageRef(image_path, f"plot {image_index}.png of record {index} in {self.qa_path}")]
            answer = pair.get("answer")
            metadata: dict[str, Any] = {"image_index": image_index, "question_template": pair.get("question_id")}
            for key in ("color1_name", "color2_name"):
                if key in pair:
                    metadata[key] = pair[key]
            yield Record(
                id=f"{self.split}_{index}",
                question=str(pair["question_string"]),
                answers=[_ANSWER_WORDS[answer]] if answer is not None else [],
                metadata=metadata,
                images=images,
            )

    def _count(self) -> int:
        return len(self.pairs)

    def categories(self, example: Example) -> dict[str, str]:
        template = example.metadata.get("question_template")
        return {"question_template": str(template)} if template is not None else {}
