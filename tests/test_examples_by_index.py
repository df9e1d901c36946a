"""Examples kept as references and decoded on demand (`sdrt_cli.data.ExamplesByIndex`)."""

from __future__ import annotations

import threading
import time

import pytest
from PIL import Image

from fixtures_datasets import make_lmms_docvqa
from sdrt_cli.data import Decoded, Example, ExamplesByIndex, examples_by_index, open_dataset, prefetched
from sdrt_cli.errors import SdrtError
from sdrt_plugins.datasets.local import ImageRef, Record
from sdrt_plugins.datasets.synthetic_charts import SyntheticCharts


def test_parquet_references_keep_compressed_bytes_and_decode_to_the_same_examples(tmp_path):
    dataset = open_dataset("docvqa", data_dir=make_lmms_docvqa(tmp_path), limit=4)
    references = list(dataset.references())
    assert [r.id for r in references] == list(dataset.ids())
    assert all(isinstance(r, Record) and all(isinstance(i, ImageRef) and isinstance(i.payload, bytes) for i in r.images) for r in references)
    for reference, example in zip(references, dataset):
        decoded = reference.materialise()
        assert decoded.id == example.id and decoded.question == example.question and decoded.answers == example.answers
        assert [im.tobytes() for im in decoded.images] == [im.tobytes() for im in example.images]


def test_synthetic_chart_references_redraw_the_same_chart():
    dataset = SyntheticCharts(split="validation", limit=3)
    references = list(dataset.references())
    assert [r.id for r in references] == list(dataset.ids())
    assert references[2].materialise().images[0].tobytes() == dataset.example(2).images[0].tobytes()


def test_examples_are_decoded_on_demand_and_at_most_cache_size_are_kept():
    dataset = SyntheticCharts(split="validation", limit=6)
    examples = examples_by_index(dataset, {1, 3, 4}, cache_size=2)
    assert sorted(examples) == [1, 3, 4] and len(examples) == 3
    assert [examples.id_of(i) for i in (1, 3, 4)] == [dataset.example(i).id for i in (1, 3, 4)]
    assert examples.decodes == 0 and not examples.decoded  # ids come without decoding

    first = examples[1]
    assert examples[1] is first and examples.decodes == 1  # a hit
    examples[3]
    examples[1]  # 1 is now the most recently used
    examples[4]  # evicts 3, the least recently used
    assert list(examples.decoded) == [1, 4] and examples.decodes == 3
    assert examples[3].images[0].tobytes() == dataset.example(3).images[0].tobytes()
    assert examples.decodes == 4 and len(examples.decoded) == 2
    assert 0 not in examples and examples.get(0) is None


def test_reading_stops_at_the_largest_wanted_index():
    class Counting(SyntheticCharts):
        read = 0

        def references(self):
            for reference in super().references():
                Counting.read += 1
                yield reference

    examples = examples_by_index(Counting(split="validation", limit=50), {0, 2})
    assert sorted(examples) == [0, 2] and Counting.read == 3
    assert len(examples_by_index(Counting(split="validation", limit=5))) == 5


def test_a_dataset_without_references_still_works_through_the_default():
    image = Image.new("RGB", (2, 2))
    example = Example(id="a", images=[image], question="q")
    lookup = ExamplesByIndex({0: Decoded(example)})
    assert lookup.id_of(0) == "a" and lookup[0] is example


def test_prefetched_prepares_the_next_batch_on_another_thread_while_the_caller_works():
    events: list[str] = []
    threads: set[int] = set()

    def prepare(batch):
        threads.add(threading.get_ident())
        events.append(f"prepared {batch}")
        return [x * 10 for x in batch]

    results = []
    for prepared in prefetched(iter([[1], [2, 3], [4]]), prepare):
        time.sleep(0.05)  # the caller's work on this batch; the next one is prepared meanwhile
        events.append(f"used {prepared}")
        results.append(prepared)
    assert results == [[10], [20, 30], [40]]
    assert threading.get_ident() not in threads
    assert events.index("prepared [2, 3]") < events.index("used [10]")
    assert list(prefetched([], prepare)) == []


def test_an_error_while_prefetching_reaches_the_caller_with_its_batch():
    def prepare(batch):
        if batch == "bad":
            raise SdrtError("image of row 1 cannot be decoded")
        return batch

    got = []
    with pytest.raises(SdrtError, match="row 1 cannot be decoded"):
        for prepared in prefetched(["ok", "bad", "never"], prepare):
            got.append(prepared)
    assert got == ["ok"]
