"""The five benchmark plugins, loaded from tiny fixtures in each real format they accept."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from fixtures_datasets import (
    DOCVQA_TYPES,
    MMMU_TYPES,
    docvqa_rows,
    image_cell,
    make_chartqa_lmms,
    make_chartqa_m4,
    make_chartqa_official,
    make_figureqa,
    make_hub_cache,
    make_lmms_docvqa,
    make_lmms_infovqa,
    make_mmmu,
    make_rrc_docvqa,
    make_rrc_infovqa,
    mmmu_row,
    write_parquet,
)
from sdrt_cli.data import open_dataset
from sdrt_cli.errors import SdrtError
from sdrt_cli.metrics import aggregate, check_scorable, get_metric, write_submission

# ---------------------------------------------------------------- DocVQA / InfographicVQA


def test_docvqa_lmms_parquet(tmp_path):
    dataset = open_dataset("docvqa", data_dir=make_lmms_docvqa(tmp_path))
    assert dataset.split == "validation" and dataset.metric == "anls"
    examples = list(dataset)
    # two shards, read in file order, each crossing a 2-row row group
    assert [e.id for e in examples] == ["1000", "1001", "1002", "2000", "2001", "2002"]
    first = examples[1]
    assert first.question == "What is the date on page 1?"
    assert first.answers == ["11/02/1990", "1th feb"]
    assert len(first.images) == 1 and isinstance(first.images[0], Image.Image)
    assert first.images[0].size == (9, 5) and first.images[0].mode == "RGB"
    assert dataset.categories(first) == {"question_type": ["handwritten", "form"]}
    assert dataset.format_question(first) == "What is the date on page 1?\nAnswer the question using a single word or phrase."
    assert len(dataset) == 6 and list(dataset.ids()) == [e.id for e in examples]
    assert dataset.has_answers
    assert get_metric(dataset.metric).score("11/02/1990", first) == 1.0


def test_limit_keeps_the_first_examples_and_shards_partition_them(tmp_path):
    root = make_lmms_docvqa(tmp_path)
    limited = open_dataset("docvqa", data_dir=root, limit=4)
    assert [e.id for e in limited] == ["1000", "1001", "1002", "2000"] and len(limited) == 4
    shards = [[e.id for e in limited.iter_shard(rank, 3)] for rank in range(3)]
    assert shards == [["1000", "2000"], ["1001"], ["1002"]]
    assert [e.id for e in open_dataset("docvqa", data_dir=root, limit=0)] == []


def test_no_dataset_name_or_an_option_its_class_does_not_take_is_one_sentence(plugin):
    from sdrt_cli.data import Dataset, Example
    from sdrt_cli.hookspecs import hookimpl

    class Fixed(Dataset):
        """Takes only the options every dataset gets: another one is a TypeError from Python."""

        name = "fixed-options"

        def __init__(self, data_dir=None, split=None, limit=None, seed=0):
            super().__init__(data_dir, split, limit, seed)

        def __iter__(self):
            yield Example(id="f/0", images=[], question="?", answers=["a"])

    class FixedPlugin:
        @staticmethod
        @hookimpl
        def register_datasets(register):
            register("fixed-options", Fixed)

    plugin(FixedPlugin, "fixed-options-plugin")
    assert [e.id for e in open_dataset("fixed-options")] == ["f/0"]
    with pytest.raises(SdrtError, match=r"dataset 'fixed-options' does not accept these options \['no_such_option'\]"):
        open_dataset("fixed-options", no_such_option=1)
    with pytest.raises(SdrtError, match="choose a dataset with --dataset"):
        open_dataset(None)


def test_docvqa_test_split_hides_answers_refuses_scoring_and_writes_submission(tmp_path):
    dataset = open_dataset("docvqa", data_dir=make_lmms_docvqa(tmp_path), split="test")
    examples = list(dataset)
    assert [e.answers for e in examples] == [[], []]
    assert not dataset.has_answers
    with pytest.raises(SdrtError, match="docvqa split 'test' has no answers"):
        check_scorable(dataset)
    with pytest.raises(SdrtError, match="example '5000' has no gold answers"):
        get_metric("anls").score("x", examples[0])
    path = write_submission(tmp_path / "docvqa_test.json", dataset, {"5000": "a", "5001": "b"})
    assert json.loads(path.read_text()) == [{"questionId": 5000, "answer": "a"}, {"questionId": 5001, "answer": "b"}]


def test_docvqa_parquet_written_by_hf_datasets(tmp_path):
    """The parquet `datasets` itself writes for an Image feature loads the same way."""
    from datasets import Dataset as HFDataset
    from datasets import Features, Sequence, Value
    from datasets import Image as HFImage

    rows = docvqa_rows("val", 7, 2)
    features = Features(
        {
            "questionId": Value("string"),
            "question": Value("string"),
            "question_types": Sequence(Value("string")),
            "image": HFImage(),
            "answers": Sequence(Value("string")),
        }
    )
    table = {name: [row[name] for row in rows] for name in features}
    HFDataset.from_dict(table, features=features).to_parquet(str(tmp_path / "DocVQA" / "validation-00000-of-00001.parquet"))
    examples = list(open_dataset("docvqa", data_dir=tmp_path))
    assert [e.id for e in examples] == ["7", "8"] and examples[1].images[0].size == (9, 5)


def test_docvqa_rrc_json_folder_and_file(tmp_path):
    root = make_rrc_docvqa(tmp_path)
    dataset = open_dataset("docvqa", data_dir=root)
    examples = list(dataset)
    assert [e.id for e in examples] == ["49000", "49001", "49002"]
    assert examples[2].answers == ["Form 2", "form-2"] and examples[2].images[0].size == (7, 5)
    assert dataset.categories(examples[0]) == {"question_type": ["form"]}
    # the test JSON has no answers: hidden
    test = open_dataset("docvqa", data_dir=root, split="test")
    assert not test.has_answers and [e.answers for e in test] == [[], [], []]
    # a file given without --split says which split it holds
    single = open_dataset("docvqa", data_dir=root / "test" / "test_v1.0.json")
    assert single.split == "test" and len(single) == 3
    with pytest.raises(SdrtError, match="holds the 'test' split, not 'validation'"):
        open_dataset("docvqa", data_dir=root / "test" / "test_v1.0.json", split="validation")


def test_docvqa_rrc_json_image_dir_option(tmp_path):
    root = make_rrc_docvqa(tmp_path / "release")
    moved = tmp_path / "elsewhere"
    (root / "val" / "documents").rename(moved)
    with pytest.raises(SdrtError, match=r"image 'documents/doc_val_0.png' of record 0 in .*val_v1.0.json does not exist"):
        list(open_dataset("docvqa", data_dir=root))
    examples = list(open_dataset("docvqa", data_dir=root, image_dir=str(moved)))
    assert examples[0].images[0].size == (7, 3)


def test_infographicvqa_lmms_parquet(tmp_path):
    root = make_lmms_infovqa(tmp_path)
    make_lmms_docvqa(tmp_path)  # both configs side by side, as in the lmms-lab repo
    dataset = open_dataset("infographicvqa", data_dir=root)
    examples = list(dataset)
    assert [e.id for e in examples] == ["70000", "70001", "70002"]
    assert dataset.categories(examples[0]) == {"answer_type": ["non span", "question span"]}
    assert examples[0].images[0].size == (5, 9)
    assert not open_dataset("infographicvqa", data_dir=root, split="test").has_answers


def test_infographicvqa_rrc_json(tmp_path):
    dataset = open_dataset("infographicvqa", data_dir=make_rrc_infovqa(tmp_path))
    examples = list(dataset)
    assert [e.id for e in examples] == ["65000", "65001"]
    assert examples[1].answers == ["10%"] and examples[1].images[0].size == (9, 4)
    assert dataset.categories(examples[1]) == {"answer_type": ["single span"]}


# ---------------------------------------------------------------- ChartQA


def test_chartqa_official_folders_and_subset_report(tmp_path):
    dataset = open_dataset("chartqa", data_dir=make_chartqa_official(tmp_path))
    assert dataset.split == "test" and dataset.metric == "relaxed_accuracy"
    examples = list(dataset)
    assert [e.id for e in examples] == ["test_human_0", "test_human_1", "test_augmented_0", "test_augmented_1", "test_augmented_2"]
    assert examples[0].answers == ["10"] and examples[0].images[0].size == (6, 6)
    assert dataset.format_question(examples[0]) == "What is the value of bar 0?\nAnswer the question with a single word."
    metric = get_metric(dataset.metric)
    predictions = ["10.4", "99", "2019", "2020", "2019"]  # 10.4 is within 5% of 10; 2020 within 5% of 2019
    scores = [metric.score(p, e) for p, e in zip(predictions, examples)]
    report = aggregate(scores, [dataset.categories(e) for e in examples])
    assert report["overall"] == pytest.approx(4 / 5)
    assert report["categories"]["subset"]["human"] == {"score": 0.5, "count": 2}
    assert report["categories"]["subset"]["augmented"] == {"score": 1.0, "count": 3}


def test_chartqa_and_figureqa_accept_one_split_folder(tmp_path):
    split_dir = make_chartqa_official(tmp_path / "c") / "ChartQA Dataset" / "test"
    assert len(open_dataset("chartqa", data_dir=split_dir)) == 5
    with pytest.raises(SdrtError, match="holds the ChartQA split 'test', not 'val'"):
        open_dataset("chartqa", data_dir=split_dir, split="validation")
    folder = make_figureqa(tmp_path / "f", split="validation2", folder_name="figureqa-validation2-v1") / "figureqa-validation2-v1"
    dataset = open_dataset("figureqa", data_dir=folder)
    assert dataset.split == "validation2" and next(iter(dataset)).id == "validation2_0"
    with pytest.raises(SdrtError, match="holds the FigureQA split 'validation2', not 'train1'"):
        open_dataset("figureqa", data_dir=folder, split="train1")


def test_chartqa_huggingfacem4_parquet(tmp_path):
    root = make_chartqa_m4(tmp_path)
    dataset = open_dataset("chartqa", data_dir=root)
    examples = list(dataset)
    assert [(e.answers, dataset.categories(e)["subset"]) for e in examples] == [
        (["45%"], "human"),
        (["Yes"], "augmented"),
        (["1200"], "augmented"),
    ]
    assert get_metric("relaxed_accuracy").score("0.45", examples[0]) == 1.0
    assert len(open_dataset("chartqa", data_dir=root, split="validation")) == 1  # "validation" means "val"


def test_chartqa_lmms_parquet(tmp_path):
    dataset = open_dataset("chartqa", data_dir=make_chartqa_lmms(tmp_path))
    examples = list(dataset)
    assert [(e.question, e.answers, dataset.categories(e)) for e in examples] == [
        ("How many bars are red?", ["3"], {"subset": "human"}),
        ("What is the peak value?", ["87.5"], {"subset": "augmented"}),
    ]


# ---------------------------------------------------------------- FigureQA


def test_figureqa_official_release(tmp_path):
    dataset = open_dataset("figureqa", data_dir=make_figureqa(tmp_path))
    assert dataset.split == "validation1" and dataset.metric == "yes_no_accuracy"
    examples = list(dataset)
    assert [e.answers for e in examples] == [["no"], ["yes"], ["no"], ["yes"]]
    assert examples[2].metadata["image_index"] == 1 and examples[2].images[0].size == (5, 5)
    assert dataset.categories(examples[1]) == {"question_template": "1"}
    assert get_metric("yes_no_accuracy").score("Yes.", examples[1]) == 1.0


def test_figureqa_versioned_folder_name_and_hidden_answers(tmp_path):
    make_figureqa(tmp_path, split="test1", folder_name="figureqa-test1-v1", answers=False)
    dataset = open_dataset("figureqa", data_dir=tmp_path, split="test1")
    assert len(dataset) == 4 and not dataset.has_answers


# ---------------------------------------------------------------- MMMU


def test_mmmu_subjects_images_and_prompts(tmp_path):
    dataset = open_dataset("mmmu", data_dir=make_mmmu(tmp_path))
    examples = {e.id: e for e in dataset}
    assert list(examples) == ["validation_Art_Theory_1", "validation_Art_Theory_2", "validation_Math_1", "validation_Math_2"]

    art = examples["validation_Art_Theory_1"]  # <image 1> in the question, <image 2>/<image 3> as options
    assert [im.size for im in art.images] == [(4, 4), (5, 2), (2, 5)]
    assert art.metadata["options"] == ["<image 2>", "<image 3>", "neither"]
    assert dataset.categories(art) == {"subject": "Art_Theory", "domain": "Art and Design", "question_type": "multiple-choice"}
    assert dataset.format_question(art) == (
        "<image 1> Which option fits question 1?\nA. <image 2>\nB. <image 3>\nC. neither\n\n"
        "Answer with the option's letter from the given choices directly."
    )

    assert dataset.question_text(art) == "<image 1> Which option fits question 1?\nA. <image 2>\nB. <image 3>\nC. neither"
    assert dataset.instruction_for(art) == "Answer with the option's letter from the given choices directly."

    area = examples["validation_Math_2"]  # refers to <image 2> before <image 1>; image_3 is not referenced
    assert [im.size for im in area.images] == [(4, 4), (3, 7)]
    assert area.metadata["image_markers"] == ["<image 1>", "<image 2>"]
    assert dataset.format_question(area) == (
        "Compare <image 2> with <image 1>. What is the area?\n\nAnswer the question using a single word or phrase."
    )
    assert dataset.instruction_for(area) == "Answer the question using a single word or phrase."
    assert examples["validation_Art_Theory_2"].answers == ["$MgS$", "MgS"]

    metric = get_metric("mmmu")
    assert metric.score("B", art) == 1.0 and metric.score("The area is 12.50", area) == 1.0


def test_mmmu_subjects_option_and_hidden_test(tmp_path):
    root = make_mmmu(tmp_path)
    assert [e.id for e in open_dataset("mmmu", data_dir=root, subjects="Math")] == ["validation_Math_1", "validation_Math_2"]
    assert len(open_dataset("mmmu", data_dir=root / "Math")) == 2  # one subject's folder
    with pytest.raises(SdrtError, match="MMMU subject 'Maths' is not under .*did you mean 'Math'"):
        open_dataset("mmmu", data_dir=root, subjects="Maths")
    test = open_dataset("mmmu", data_dir=root, split="test")
    assert not test.has_answers and [e.answers for e in test] == [[]]


def test_mmmu_reference_to_an_empty_image_column(tmp_path):
    row = mmmu_row("validation", "Math", 5, question="See <image 2>.")
    write_parquet(tmp_path / "Math" / "validation-0.parquet", [row], MMMU_TYPES)
    with pytest.raises(SdrtError, match=r"row 0 of .*validation-0.parquet \(validation_Math_5\) refers to <image 2> but its image_2 is missing or empty"):
        list(open_dataset("mmmu", data_dir=tmp_path))


def test_mmmu_malformed_options(tmp_path):
    write_parquet(tmp_path / "Math" / "validation-0.parquet", [mmmu_row("validation", "Math", 1, options="['a', ")], MMMU_TYPES)
    with pytest.raises(SdrtError, match="row 0 of .* has options .* that are not a Python list literal"):
        list(open_dataset("mmmu", data_dir=tmp_path))


# ---------------------------------------------------------------- the Hugging Face cache


def test_hub_id_reads_the_local_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    make_hub_cache(tmp_path / "hub", "lmms-lab/DocVQA", make_lmms_docvqa)
    make_hub_cache(tmp_path / "hub", "MMMU/MMMU", make_mmmu)
    explicit = open_dataset("docvqa", hub_id="lmms-lab/DocVQA")
    assert len(explicit) == 6 and explicit.identity()["hub_id"] == "lmms-lab/DocVQA"
    assert len(open_dataset("mmmu")) == 4  # the default Hub repo, found in the cache


def test_hub_id_not_in_cache_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    with pytest.raises(SdrtError, match=r"lmms-lab/ChartQA is not in the local Hugging Face cache .*huggingface-cli download --repo-type dataset lmms-lab/ChartQA"):
        open_dataset("chartqa", hub_id="lmms-lab/ChartQA")
    with pytest.raises(SdrtError, match=r"no docvqa data given: pass --data-dir with .* or fetch lmms-lab/DocVQA once"):
        open_dataset("docvqa")
    with pytest.raises(SdrtError, match="no figureqa data given: pass --data-dir with the official FigureQA folders"):
        open_dataset("figureqa")


# ---------------------------------------------------------------- one-sentence failures


def test_wrong_layout_directory(tmp_path):
    (tmp_path / "notes.txt").write_text("nothing here")
    for name, expected in [
        ("docvqa", "holds no docvqa data: expected lmms-lab parquet"),
        ("chartqa", "holds no ChartQA data"),
        ("figureqa", "holds no FigureQA data"),
        ("mmmu", "holds no MMMU data"),
    ]:
        with pytest.raises(SdrtError, match=expected):
            open_dataset(name, data_dir=tmp_path)


def test_missing_directory_and_unknown_split(tmp_path):
    with pytest.raises(SdrtError, match="docvqa data path .*nowhere does not exist"):
        open_dataset("docvqa", data_dir=tmp_path / "nowhere")
    with pytest.raises(SdrtError, match=r"has no docvqa split 'train' \(splits found: test, validation\)"):
        open_dataset("docvqa", data_dir=make_lmms_docvqa(tmp_path / "d"), split="train")
    with pytest.raises(SdrtError, match=r"has no figureqa split 'train1' \(splits found: validation1\)"):
        open_dataset("figureqa", data_dir=make_figureqa(tmp_path / "f"), split="train1")
    with pytest.raises(SdrtError, match=r"has no chartqa split 'train' \(splits found: test\)"):
        open_dataset("chartqa", data_dir=make_chartqa_official(tmp_path / "c"), split="train")


def test_missing_column_names_file_and_column(tmp_path):
    types = {k: v for k, v in DOCVQA_TYPES.items() if k != "question"}
    path = write_parquet(tmp_path / "DocVQA" / "validation-0.parquet", docvqa_rows("val", 1, 1), types)
    with pytest.raises(SdrtError, match=f"{path} has no column 'question', which the docvqa parquet layout needs"):
        open_dataset("docvqa", data_dir=tmp_path)


def test_parquet_without_answers_column(tmp_path):
    types = {k: v for k, v in DOCVQA_TYPES.items() if k != "answers"}
    write_parquet(tmp_path / "DocVQA" / "validation-0.parquet", docvqa_rows("val", 1, 1), types)
    with pytest.raises(SdrtError, match="has no column 'answers'"):
        open_dataset("docvqa", data_dir=tmp_path)
    import pyarrow as pa

    m4 = {"image": DOCVQA_TYPES["image"], "query": pa.string(), "human_or_machine": pa.int64()}
    write_parquet(tmp_path / "c" / "data" / "test-0.parquet", [{"image": image_cell(), "query": "q", "human_or_machine": 0}], m4)
    with pytest.raises(SdrtError, match="has no column 'label', which the parquet-m4 ChartQA layout needs"):
        open_dataset("chartqa", data_dir=tmp_path / "c")


def test_unreadable_images(tmp_path):
    rows = docvqa_rows("val", 1, 2)
    rows[1]["image"] = {"bytes": b"not a png at all", "path": None}
    path = write_parquet(tmp_path / "DocVQA" / "validation-0.parquet", rows, DOCVQA_TYPES)
    dataset = open_dataset("docvqa", data_dir=tmp_path)
    assert list(dataset.ids()) == ["1", "2"]  # listing ids never decodes images
    with pytest.raises(SdrtError, match=f"'image' of row 1 in {path} cannot be decoded as an image"):
        list(dataset)
    root = make_chartqa_official(tmp_path / "c")
    png = root / "ChartQA Dataset" / "test" / "png" / "h1.png"
    png.write_bytes(png.read_bytes()[:30])  # truncated
    with pytest.raises(SdrtError, match=r"chart 'h1.png' of record 1 in .*test_human.json cannot be decoded as an image"):
        list(open_dataset("chartqa", data_dir=root))


def test_missing_image_file(tmp_path):
    root = make_figureqa(tmp_path)
    (root / "validation1" / "png" / "1.png").unlink()
    with pytest.raises(SdrtError, match=r"plot 1.png of record 2 in .*qa_pairs.json does not exist"):
        list(open_dataset("figureqa", data_dir=root))


def test_bad_json_files(tmp_path):
    root = make_figureqa(tmp_path / "f")
    (root / "validation1" / "qa_pairs.json").write_text('{"qa_pairs": [')
    with pytest.raises(SdrtError, match=r"qa_pairs.json is not valid JSON \(Expecting value at line 1"):
        open_dataset("figureqa", data_dir=root)
    (root / "validation1" / "qa_pairs.json").write_text(json.dumps({"qa_pairs": [{"image_index": 0}]}))
    with pytest.raises(SdrtError, match="record 0 of .*qa_pairs.json has no 'question_string' field"):
        open_dataset("figureqa", data_dir=root)
    (root / "validation1" / "qa_pairs.json").write_text(json.dumps({"qa_pairs": [{"image_index": 0, "question_string": "q", "answer": 2}]}))
    with pytest.raises(SdrtError, match="has answer 2; FigureQA answers are 0 or 1"):
        open_dataset("figureqa", data_dir=root)
    rrc = tmp_path / "rrc" / "val_v1.0.json"
    rrc.parent.mkdir()
    rrc.write_text(json.dumps({"dataset_split": "val", "questions": []}))
    with pytest.raises(SdrtError, match="val_v1.0.json is not an RRC docvqa file: it has no 'data' list"):
        open_dataset("docvqa", data_dir=rrc.parent)


def test_a_file_that_is_not_parquet(tmp_path):
    bad = tmp_path / "data" / "test-0.parquet"
    bad.parent.mkdir()
    bad.write_bytes(b"PAR1 garbage")
    with pytest.raises(SdrtError, match=f"{bad} is not a readable parquet file"):
        open_dataset("chartqa", data_dir=tmp_path)


def test_unknown_option_and_bad_limit(tmp_path):
    root = make_figureqa(tmp_path)
    with pytest.raises(SdrtError, match="dataset 'figureqa' has no option 'subjects'; its options are: hub_id, revision"):
        open_dataset("figureqa", data_dir=root, subjects="Math")
    with pytest.raises(SdrtError, match="limit must be a non-negative integer"):
        open_dataset("figureqa", data_dir=root, limit=-1)


def test_unknown_dataset_name_suggests():
    with pytest.raises(SdrtError, match="unknown dataset 'docvq'.*Did you mean 'docvqa'"):
        open_dataset("docvq")


# ---------------------------------------------------------------- CLI

FORMATS = {
    "docvqa-lmms": ("docvqa", make_lmms_docvqa, "1000"),
    "docvqa-rrc": ("docvqa", make_rrc_docvqa, "49000"),
    "infographicvqa-lmms": ("infographicvqa", make_lmms_infovqa, "70000"),
    "infographicvqa-rrc": ("infographicvqa", make_rrc_infovqa, "65000"),
    "chartqa-official": ("chartqa", make_chartqa_official, "test_human_0"),
    "chartqa-m4": ("chartqa", make_chartqa_m4, "test_0"),
    "chartqa-lmms": ("chartqa", make_chartqa_lmms, "test_0"),
    "figureqa": ("figureqa", make_figureqa, "validation1_0"),
    "mmmu": ("mmmu", make_mmmu, "validation_Art_Theory_1"),
}


@pytest.mark.parametrize("layout", sorted(FORMATS))
def test_cli_show_each_format(cli, tmp_path, layout):
    name, build, first_id = FORMATS[layout]
    result = cli("datasets", "show", name, "--data-dir", build(tmp_path), "--limit", "2")
    assert result.exit_code == 0, result.output
    assert first_id in result.out
    assert f"{name} · split" in result.out and "Single-step prompt of the first record" in result.out


def test_cli_show_split_option_and_hidden_answers(cli, tmp_path):
    result = cli("datasets", "show", "docvqa", "--data-dir", make_lmms_docvqa(tmp_path), "--split", "test")
    assert result.exit_code == 0, result.output
    assert "answers hidden" in result.out and "(hidden)" in result.out and "5001" in result.out


def test_cli_show_dataset_option(cli, tmp_path):
    result = cli("datasets", "show", "mmmu", "--data-dir", make_mmmu(tmp_path), "--option", "subjects=Math")
    assert result.exit_code == 0, result.output
    assert "validation_Math_2" in result.out and "Art_Theory" not in result.out


def test_cli_show_errors_are_one_line(cli, tmp_path):
    result = cli("datasets", "show", "figureqa", "--data-dir", tmp_path)
    assert result.exit_code == 1
    assert result.err.strip().startswith("Error:") and "holds no FigureQA data" in result.err
    assert "Traceback" not in result.output
    result = cli("datasets", "show", "mmmu", "--data-dir", tmp_path, "--option", "subjects")
    assert result.exit_code == 1 and "--option 'subjects' is not KEY=VALUE" in result.err


def test_cli_list(cli):
    result = cli("datasets", "list")
    assert result.exit_code == 0, result.output
    for name in ("docvqa", "infographicvqa", "chartqa", "figureqa", "mmmu"):
        assert name in result.out
    listed = json.loads(cli("datasets", "list", "--json").out)
    by_name = {row["name"]: row for row in listed}
    assert by_name["mmmu"]["metric"] == "mmmu" and by_name["chartqa"]["default_split"] == "test"
    assert by_name["docvqa"]["hub_ids"] == ["lmms-lab/DocVQA"]


def test_datasets_show_option_values_are_converted_like_dataset_option(plugin, cli):
    from sdrt_cli.data import Dataset, Example
    from sdrt_cli.hookspecs import hookimpl

    seen = {}

    class Typed(Dataset):
        name = "typed-options"

        def __init__(self, **kwargs):
            options = {k: v for k, v in kwargs.items() if k not in ("data_dir", "split", "limit", "seed")}
            seen.update(options)
            super().__init__(**kwargs)

        def __iter__(self):
            yield Example(id="typed/0", images=[], question="?", answers=["a"], metadata={})

    class TypedPlugin:
        @staticmethod
        @hookimpl
        def register_datasets(register):
            register("typed-options", Typed)

    plugin(TypedPlugin, "typed-options-plugin")
    result = cli("datasets", "show", "typed-options", "--option", "size=3", "--option", "flag=true", "--option", "name=x")
    assert result.exit_code == 0, result.output
    assert seen == {"size": 3, "flag": True, "name": "x"}
    bad = cli("datasets", "show", "typed-options", "--option", "size")
    assert bad.exit_code == 1 and "--option 'size' is not KEY=VALUE" in bad.err


def test_the_core_applies_limit_to_a_plugin_that_ignores_it(plugin):
    from sdrt_cli.data import Dataset, Example, open_dataset
    from sdrt_cli.hookspecs import hookimpl

    class Unlimited(Dataset):
        """Ten examples, whatever ``limit`` says: every iteration method of its own ignores it."""

        name = "unlimited"

        def __iter__(self):
            for i in range(10):
                yield Example(id=f"u/{i}", images=[], question="?", answers=[str(i)])

        def ids(self):
            return (f"u/{i}" for i in range(10))

        def iter_shard(self, rank, world_size):
            return (example for position, example in enumerate(self.__class__.__iter__(self)) if position % world_size == rank)

        def __len__(self):
            return 10

    class UnlimitedPlugin:
        @staticmethod
        @hookimpl
        def register_datasets(register):
            register("unlimited", Unlimited)

    plugin(UnlimitedPlugin, "unlimited-plugin")
    limited = open_dataset("unlimited", limit=3)
    assert [e.id for e in limited] == ["u/0", "u/1", "u/2"]
    assert list(limited.ids()) == ["u/0", "u/1", "u/2"] and len(limited) == 3
    assert [r.id for r in limited.references()] == ["u/0", "u/1", "u/2"]
    # rank 1 of 2 owns positions 1 (and 3, 5, ... beyond the limit)
    assert [e.id for e in limited.iter_shard(1, 2)] == ["u/1"]
    assert [e.id for e in limited.iter_shard(0, 2)] == ["u/0", "u/2"]
    assert len(open_dataset("unlimited")) == 10
    with pytest.raises(SdrtError, match="dataset 'unlimited': limit must be a non-negative integer, not -1"):
        open_dataset("unlimited", limit=-1)
