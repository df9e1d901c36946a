"""``mmmu``: MMMU (Yue et al. 2024), college-level multi-discipline questions on one to seven
images, scored with the official answer extraction and micro-averaged accuracy.

Layout: the Hub repo ``MMMU/MMMU``, one folder per subject holding ``{split}-*.parquet``
(dev, validation, test) with id, question, options (a Python-literal list in a string),
image_1 .. image_7, question_type (multiple-choice | open), answer and subfield.
``--data-dir`` may be the repo root, one subject folder or one parquet file; the ``subjects``
option (comma-separated) keeps some subjects.  Subjects are read in alphabetical order.

Images: the question and options refer to them as ``<image N>``; an example's images are the
referenced ones in increasing N (what lmms-eval feeds LLaVA), or every non-empty image column
when nothing is referenced.  The markers stay in the text.  Test answers are hidden ("?"), so
the test split has ``has_answers == False``.  Default split: validation.
"""

from __future__ import annotations

import ast
import re
from typing import Any, Iterator

from sdrt_cli.data import Example
from sdrt_cli.errors import SdrtError, did_you_mean
from sdrt_cli.metrics.mmmu import domain_of, option_letters
from sdrt_plugins.datasets.local import LocalDataset, ParquetTable, Record, parquet_image, split_parquets

IMAGE_COLUMNS = tuple(f"image_{n}" for n in range(1, 8))
_REQUIRED = ("id", "question", "options", "question_type", "answer", "image_1")
_TEXT_COLUMNS = ("id", "question", "options", "question_type", "answer", "subfield", "topic_difficulty", "img_type")
_MARKER = re.compile(r"<image (\d+)>")
_ID_SUBJECT = re.compile(r"^[A-Za-z]+_(.+)_\d+$")  # validation_Art_Theory_12 -> Art_Theory

# lmms-eval's default MMMU prompts (the ones LLaVA-1.6 is reported with)
MULTIPLE_CHOICE_INSTRUCTION = "Answer with the option's letter from the given choices directly."
OPEN_INSTRUCTION = "Answer the question using a single word or phrase."


def _options(value: Any, where: str) -> list[str]:
    if value is None or value == "":
        return []
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    try:
        parsed = ast.literal_eval(str(value))
    except (ValueError, SyntaxError):
        raise SdrtError(f"{where} has options {str(value)[:80]!r} that are not a Python list literal") from None
    if not isinstance(parsed, (list, tuple)):
        raise SdrtError(f"{where} has options that are not a list ({type(parsed).__name__})")
    return [str(v) for v in parsed]


def _gold(value: Any) -> list[str]:
    """Gold answers; a few open questions list several (e.g. "['$MgS$', 'MgS']"); "?" means hidden."""
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    text = str(value).strip()
    if text in ("", "?"):
        return []
    if text.startswith("[") and text.endswith("]"):
        try:
            parsed = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            parsed = None
        if isinstance(parsed, (list, tuple)) and parsed and all(isinstance(v, (str, int, float)) for v in parsed):
            return [str(v) for v in parsed]
    return [text]


class MMMU(LocalDataset):
    """MMMU, official answer extraction + micro-averaged accuracy (subject, domain); MMMU/MMMU parquet."""

    name = "mmmu"
    metric = "mmmu"
    instruction = MULTIPLE_CHOICE_INSTRUCTION
    open_instruction = OPEN_INSTRUCTION
    default_split = "validation"
    hub_ids = ("MMMU/MMMU",)
    split_aliases = {"val": "validation"}
    extra_options = ("subjects",)
    layouts = "the MMMU/MMMU parquet layout ({Subject}/{split}-*.parquet)"

    def _prepare(self) -> None:
        root = self.root
        if root.is_file():
            if root.suffix != ".parquet":
                raise SdrtError(f"{root} is not an MMMU parquet file; point --data-dir at {self.layouts}")
            files_by_subject = {root.parent.name: {self.split: [root]}}
        elif any(path.parent == root for paths in split_parquets(root).values() for path in paths):
            files_by_subject = {root.name: split_parquets(root)}  # one subject's folder
        else:
            files_by_subject = {d.name: split_parquets(d) for d in sorted(root.iterdir()) if d.is_dir()}
            files_by_subject = {subject: found for subject, found in files_by_subject.items() if found}
            if not files_by_subject:
                raise SdrtError(f"{root} holds no MMMU data: expected {self.layouts}")
        wanted = self._wanted_subjects(files_by_subject)
        self.tables: list[tuple[str, ParquetTable]] = []
        for subject in wanted:
            for path in files_by_subject[subject].get(self.split, []):
                table = ParquetTable(path)
                table.require(_REQUIRED, "the MMMU parquet layout")
                self.tables.append((subject, table))
        if not self.tables:
            available = {split for found in files_by_subject.values() for split in found}
            raise self._unknown_split(root, available)

    def _wanted_subjects(self, files_by_subject: dict[str, Any]) -> list[str]:
        option = self.options.get("subjects")
        if not option:
            return sorted(files_by_subject)
        names = [s.strip() for s in (option.split(",") if isinstance(option, str) else option) if s.strip()]
        for name in names:
            if name not in files_by_subject:
                hint = did_you_mean(name, sorted(files_by_subject))
                raise SdrtError(f"MMMU subject {name!r} is not under {self.root}{hint}")
        return sorted(set(names))

    def _records(self, with_images: bool) -> Iterator[Record]:
        columns = list(_TEXT_COLUMNS) + (list(IMAGE_COLUMNS) if with_images else [])
        for folder_subject, table in self.tables:
            for row, values in table.rows(columns):
                yield self._record(folder_subject, table, row, values, with_images)

    def _record(self, folder_subject: str, table: ParquetTable, row: int, values: dict, with_images: bool) -> Record:
        where = f"row {row} of {table.path}"
        example_id = values["id"]
        if not example_id or values["question"] is None:
            raise SdrtError(f"{where} has an empty id or question")
        example_id = str(example_id)
        options = _options(values["options"], where)
        match = _ID_SUBJECT.match(example_id)
        subject = match.group(1) if match and domain_of(match.group(1)) else folder_subject
        question = str(values["question"])
        markers = sorted({int(n) for n in _MARKER.findall(question + "\n" + "\n".join(options))})
        images = []
        if with_images:
            if markers:
                for n in markers:
                    column = f"image_{n}"
                    if n > len(IMAGE_COLUMNS) or values.get(column) is None:
                        raise SdrtError(f"{where} ({example_id}) refers to <image {n}> but its {column} is missing or empty")
                    images.append(parquet_image(values[column], table.path, row, column))
            else:
                images = [parquet_image(values[c], table.path, row, c) for c in IMAGE_COLUMNS if values.get(c) is not None]
        metadata = {
            "subject": subject,
            "domain": domain_of(subject),
            "subfield": values.get("subfield"),
            "question_type": values["question_type"],
            "options": options,
            "image_markers": [f"<image {n}>" for n in markers],
            "topic_difficulty": values.get("topic_difficulty"),
        }
        return Record(id=example_id, question=question, answers=_gold(values["answer"]), metadata=metadata, images=images)

    def _count(self) -> int:
        return sum(table.num_rows for _, table in self.tables)

    def question_text(self, example: Example) -> str:
        """The question, followed for multiple choice by its options as "A. ...", one per line."""
        options = example.metadata.get("options") or []
        if example.metadata.get("question_type") != "multiple-choice":
            return example.question
        listed = "\n".join(f"{letter}. {text}" for letter, text in zip(option_letters(options), options))
        return f"{example.question}\n{listed}"

    def instruction_for(self, example: Example) -> str:
        if example.metadata.get("question_type") == "multiple-choice":
            return self.instruction
        return self.open_instruction

    def format_question(self, example: Example) -> str:
        # lmms-eval's layout: a blank line between the question (with options) and the instruction
        return f"{self.question_text(example)}\n\n{self.instruction_for(example)}"

    def categories(self, example: Example) -> dict[str, str]:
        keys = {"subject": example.metadata["subject"], "question_type": example.metadata["question_type"]}
        if example.metadata.get("domain"):
            keys["domain"] = example.metadata["domain"]
        return keys

    def identity(self) -> dict[str, Any]:
        info = super().identity()
        info["subjects"] = sorted({subject for subject, _ in self.tables})
        return info
