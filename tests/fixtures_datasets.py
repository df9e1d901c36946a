"""Tiny benchmark fixtures written in each real on-disk format (parquet with embedded PNG bytes,
RRC / ChartQA / FigureQA JSON with PNG files beside it), for the dataset plugin tests."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

# the Arrow type Hugging Face `datasets` writes for an Image feature
IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def png_bytes(width: int = 6, height: int = 4, color: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buffer, format="PNG")
    return buffer.getvalue()


def write_png(path: Path, width: int = 6, height: int = 4) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png_bytes(width, height))
    return path


def image_cell(width: int = 6, height: int = 4) -> dict[str, Any]:
    return {"bytes": png_bytes(width, height), "path": None}


def write_parquet(path: Path, rows: list[dict[str, Any]], types: dict[str, pa.DataType]) -> Path:
    """Rows -> one parquet file; image columns use the `datasets` struct, row groups of 2 rows
    so that readers cross row-group boundaries."""
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = {name: pa.array([row.get(name) for row in rows], type=kind) for name, kind in types.items()}
    pq.write_table(pa.table(columns), path, row_group_size=2)
    return path


STRINGS = pa.list_(pa.string())

# ---------------------------------------------------------------- DocVQA / InfographicVQA

DOCVQA_TYPES = {
    "questionId": pa.string(),
    "question": pa.string(),
    "question_types": STRINGS,
    "image": IMAGE_TYPE,
    "docId": pa.int64(),
    "ucsf_document_id": pa.string(),
    "ucsf_document_page_no": pa.string(),
    "answers": STRINGS,
    "data_split": pa.string(),
}
INFOVQA_TYPES = {
    "questionId": pa.string(),
    "question": pa.string(),
    "answers": STRINGS,
    "answer_type": STRINGS,
    "image": IMAGE_TYPE,
    "image_url": pa.string(),
    "operation/reasoning": STRINGS,
    "ocr": pa.string(),
    "data_split": pa.string(),
}


def docvqa_rows(split: str, start: int, count: int, hidden: bool = False) -> list[dict[str, Any]]:
    return [
        {
            "questionId": str(start + i),
            "question": f"What is the date on page {i}?",
            "question_types": ["handwritten", "form"] if i % 2 else ["layout"],
            "image": image_cell(8 + i, 5),
            "docId": 100 + i,
            "ucsf_document_id": f"doc{i}",
            "ucsf_document_page_no": "1",
            "answers": None if hidden else [f"1{i}/02/1990", f"{i}th feb"],
            "data_split": split,
        }
        for i in range(count)
    ]


def make_lmms_docvqa(root: Path) -> Path:
    """lmms-lab/DocVQA: DocVQA/{validation,test}-*.parquet; validation in two shards of 3 rows."""
    config = root / "DocVQA"
    write_parquet(config / "validation-00000-of-00002.parquet", docvqa_rows("val", 1000, 3), DOCVQA_TYPES)
    write_parquet(config / "validation-00001-of-00002.parquet", docvqa_rows("val", 2000, 3), DOCVQA_TYPES)
    write_parquet(config / "test-00000-of-00001.parquet", docvqa_rows("test", 5000, 2, hidden=True), DOCVQA_TYPES)
    return root


def make_lmms_infovqa(root: Path) -> Path:
    config = root / "InfographicVQA"
    rows = [
        {
            "questionId": str(70000 + i),
            "question": f"How many sites in region {i}?",
            "answers": [str(i + 2)],
            "answer_type": ["single span"] if i else ["non span", "question span"],
            "image": image_cell(5, 9),
            "image_url": f"https://example.org/{i}.jpeg",
            "operation/reasoning": ["counting"],
            "ocr": "{}",
            "data_split": "val",
        }
        for i in range(3)
    ]
    write_parquet(config / "validation-00000-of-00001.parquet", rows, INFOVQA_TYPES)
    hidden = [dict(row, answers=None, questionId=str(80000 + i)) for i, row in enumerate(rows[:2])]
    write_parquet(config / "test-00000-of-00001.parquet", hidden, INFOVQA_TYPES)
    return root


def make_rrc_docvqa(root: Path) -> Path:
    """Official RRC release: val/val_v1.0.json + val/documents/*.png, test/test_v1.0.json (no answers)."""
    for split, hidden in (("val", False), ("test", True)):
        folder = root / split
        data = []
        for i in range(3):
            record = {
                "questionId": 49000 + i + (100 if hidden else 0),
                "question": f"What is the title of form {i}?",
                "question_types": ["form"],
                "image": f"documents/doc_{split}_{i}.png",
                "docId": 14000 + i,
                "ucsf_document_id": f"u{i}",
                "ucsf_document_page_no": "2",
                "data_split": split,
            }
            if not hidden:
                record["answers"] = [f"Form {i}", f"form-{i}"]
            data.append(record)
            write_png(folder / "documents" / f"doc_{split}_{i}.png", 7, 3 + i)
        content = {"dataset_name": "docvqa", "dataset_version": "1.0", "dataset_split": split, "data": data}
        (folder / f"{split}_v1.0.json").write_text(json.dumps(content))
    return root


def make_rrc_infovqa(root: Path) -> Path:
    """Official InfographicVQA: infographicsVQA_val_v1.0_withQT.json + infographicsvqa_images/."""
    data = []
    for i in range(2):
        data.append(
            {
                "questionId": 65000 + i,
                "question": f"What percentage is shown in panel {i}?",
                "image_local_name": f"{30000 + i}.jpeg",
                "image_url": "https://example.org/x.jpeg",
                "ocr_output_file": f"{30000 + i}.json",
                "answers": [f"{10 * i}%"],
                "data_split": "val",
                "answer_type": ["single span"],
                "evidence": ["text"],
                "operation/reasoning": [],
            }
        )
        image = Image.new("RGB", (9, 4), (10, 120, 10))
        (root / "infographicsvqa_images").mkdir(parents=True, exist_ok=True)
        image.save(root / "infographicsvqa_images" / f"{30000 + i}.jpeg", format="JPEG")
    content = {"dataset_name": "infographicVQA", "dataset_version": "1.0", "dataset_split": "val", "data": data}
    (root / "infographicsVQA_val_v1.0_withQT.json").write_text(json.dumps(content))
    return root


# ---------------------------------------------------------------- ChartQA


def make_chartqa_official(root: Path, split: str = "test") -> Path:
    folder = root / "ChartQA Dataset" / split
    human = [{"imgname": f"h{i}.png", "query": f"What is the value of bar {i}?", "label": str(10 + i)} for i in range(2)]
    augmented = [{"imgname": f"a{i}.png", "query": f"Which year is highest {i}?", "label": "2019"} for i in range(3)]
    (folder / "png").mkdir(parents=True, exist_ok=True)
    for record in human + augmented:
        write_png(folder / "png" / record["imgname"], 6, 6)
    (folder / f"{split}_human.json").write_text(json.dumps(human))
    (folder / f"{split}_augmented.json").write_text(json.dumps(augmented))
    return root


def make_chartqa_m4(root: Path) -> Path:
    """HuggingFaceM4/ChartQA: data/{train,val,test}-*.parquet, label is a list, human_or_machine 0/1."""
    types = {"image": IMAGE_TYPE, "query": pa.string(), "label": STRINGS, "human_or_machine": pa.int64()}
    rows = [
        {"image": image_cell(), "query": "What is the share of Asia?", "label": ["45%"], "human_or_machine": 0},
        {"image": image_cell(), "query": "Is the line increasing?", "label": ["Yes"], "human_or_machine": 1},
        {"image": image_cell(), "query": "Sum of two largest?", "label": ["1200"], "human_or_machine": 1},
    ]
    write_parquet(root / "data" / "test-00000-of-00001.parquet", rows, types)
    write_parquet(root / "data" / "val-00000-of-00001.parquet", rows[:1], types)
    return root


def make_chartqa_lmms(root: Path) -> Path:
    """lmms-lab/ChartQA: data/test-*.parquet with type/question/answer/image."""
    types = {"type": pa.string(), "question": pa.string(), "answer": pa.string(), "image": IMAGE_TYPE}
    rows = [
        {"type": "human_test", "question": "How many bars are red?", "answer": "3", "image": image_cell()},
        {"type": "augmented_test", "question": "What is the peak value?", "answer": "87.5", "image": image_cell()},
    ]
    write_parquet(root / "data" / "test-00000-of-00001.parquet", rows, types)
    return root


# ---------------------------------------------------------------- FigureQA


def make_figureqa(root: Path, split: str = "validation1", folder_name: str | None = None, answers: bool = True) -> Path:
    folder = root / (folder_name or split)
    pairs = []
    for i in range(4):
        pair = {
            "image_index": i // 2,
            "question_string": f"Is Dark Blue the {'maximum' if i % 2 else 'minimum'}?",
            "question_id": i % 2,
            "color1_name": "Dark Blue",
            "color2_name": "--None--",
        }
        if answers:
            pair["answer"] = i % 2
        pairs.append(pair)
    for image_index in range(2):
        write_png(folder / "png" / f"{image_index}.png", 5, 5)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "qa_pairs.json").write_text(json.dumps({"qa_pairs": pairs}))
    return root


# ---------------------------------------------------------------- MMMU

MMMU_TYPES = {
    "id": pa.string(),
    "question": pa.string(),
    "options": pa.string(),
    "explanation": pa.string(),
    **{f"image_{n}": IMAGE_TYPE for n in range(1, 8)},
    "img_type": pa.string(),
    "answer": pa.string(),
    "topic_difficulty": pa.string(),
    "question_type": pa.string(),
    "subfield": pa.string(),
}


def mmmu_row(split: str, subject: str, n: int, **fields: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "id": f"{split}_{subject}_{n}",
        "question": f"<image 1> Which option fits question {n}?",
        "options": "['apple', 'banana', 'cherry', 'date']",
        "explanation": "",
        "image_1": image_cell(4, 4),
        "img_type": "['Diagrams']",
        "answer": "B",
        "topic_difficulty": "Easy",
        "question_type": "multiple-choice",
        "subfield": "Testing",
    }
    row.update(fields)
    return row


def make_mmmu(root: Path) -> Path:
    """MMMU/MMMU: {Subject}/{split}-*.parquet for Math (2 rows) and Art_Theory (2 rows), plus a test split."""
    math_rows = [
        mmmu_row("validation", "Math", 1),
        mmmu_row(
            "validation",
            "Math",
            2,
            question="Compare <image 2> with <image 1>. What is the area?",
            options="[]",
            question_type="open",
            answer="12.5",
            image_2=image_cell(3, 7),
            image_3=image_cell(2, 2),  # present but not referenced: not given to the model
        ),
    ]
    art_rows = [
        mmmu_row("validation", "Art_Theory", 1, options="['<image 2>', '<image 3>', 'neither']", image_2=image_cell(5, 2), image_3=image_cell(2, 5)),
        mmmu_row("validation", "Art_Theory", 2, question_type="open", options="[]", answer="['$MgS$', 'MgS']"),
    ]
    write_parquet(root / "Math" / "validation-00000-of-00001.parquet", math_rows, MMMU_TYPES)
    write_parquet(root / "Art_Theory" / "validation-00000-of-00001.parquet", art_rows, MMMU_TYPES)
    write_parquet(root / "Math" / "test-00000-of-00001.parquet", [mmmu_row("test", "Math", 1, answer="?")], MMMU_TYPES)
    return root


def make_hub_cache(cache: Path, repo_id: str, build) -> Path:
    """A Hugging Face hub cache entry (refs/main -> snapshots/<commit>) filled by ``build(snapshot)``."""
    repo_dir = cache / ("datasets--" + repo_id.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / "main").write_text(commit)
    snapshot = repo_dir / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    build(snapshot)
    return snapshot
