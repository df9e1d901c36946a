"""`sdrt distill`: the student matches the trace contract, outputs, checkpoints, NaN stops, bad input."""

from __future__ import annotations

import gc
import json
import math
import weakref
from pathlib import Path

import pytest
import torch

from sdrt_cli.adapters import attach, intervention_positions
from sdrt_cli.backbone import load_backbone
from sdrt_cli.data import examples_by_index
from sdrt_cli.distill import (
    Distiller,
    LowerCache,
    LowerStates,
    StudentSpec,
    TraceSource,
    TrainSettings,
    epoch_batches,
    load_adapters,
    lr_at,
    rank_share,
    read_latest,
    split_train_val,
)
from sdrt_cli.errors import SdrtError
from sdrt_cli.hookspecs import hookimpl
from sdrt_cli.trace_store import TraceStore
from sdrt_cli.traces import student_turns
from sdrt_plugins.datasets.synthetic_charts import SyntheticCharts

TRACE_ARGS = [
    "traces", "--backbone", "llava-next-tiny", "--dataset", "synthetic-charts", "--prompts", "2", "--limit", "3",
    "--max-new-tokens-step1", "4", "--max-new-tokens-step2", "4", "--pos", "3", "--store-dtype", "fp32",
]


def run_main(*args) -> int:
    from sdrt_cli.cli import main

    try:
        main([str(a) for a in args])
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 1
    return 0


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # the CI box has 2 cores shared by several jobs; one thread avoids OpenMP oversubscription
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("distill") / "store"
    assert run_main(*TRACE_ARGS, "--out", out) == 0
    return out


@pytest.fixture(scope="module")
def tiny():
    return load_backbone("llava-next-tiny", seed=0)


def distill_args(store_dir, out, *extra):
    return ["distill", "--traces", store_dir, "--out", out, *map(str, extra)]


def full_forward_rows(backbone, dataset, example, record, layers, adapter=None, pos=3, skip_layer=None):
    """The student's states at the aligned rows from one plain full-model forward (no cache)."""
    from sdrt_cli.adapters import pool_vision_features

    encoded = backbone.encode_images(example.images, early_layer=skip_layer)
    prompt = backbone.tokenize(backbone.render_chat(student_turns(dataset, example)), encoded.token_counts)
    ids = prompt + record.y2_ids[:-1]
    rows = record.hidden.shape[0]
    embeds = backbone.embed(torch.tensor([ids]), [torch.cat(encoded.features)])
    mask = torch.ones((1, len(ids)), dtype=torch.long)
    positions = torch.arange(len(ids))[None]
    prompt_mask = torch.zeros((1, len(ids)), dtype=torch.long)
    prompt_mask[0, : len(prompt)] = 1
    with torch.no_grad(), attach(backbone.decoder_layers, [adapter] if adapter else [], capture=layers) as handle:
        if adapter is not None:
            vision = pool_vision_features(encoded.early)[None] if skip_layer is not None else None
            handle.set_inputs(intervention_positions(prompt_mask, pos), vision=vision)
        out = backbone.lm_forward(embeds, mask, positions)
        hidden = torch.stack([handle.captured[layer][0, -rows:] for layer in layers], dim=1)
    logits = backbone.lm_logits(out.last_hidden[0, -rows:])
    return hidden, logits


# ---------------------------------------------------------------------------------------------
# pieces
# ---------------------------------------------------------------------------------------------


def test_rank_share_splits_each_global_batch_disjointly_and_evenly():
    batch = [7, 2, 9, 4, 11, 6, 3]
    for world in (1, 2, 3):
        parts = [rank_share(batch, world, r) for r in range(world)]
        assert sorted(i for p in parts for i in p) == sorted(batch)
        assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_epoch_batches_cover_the_epoch_once_and_do_not_depend_on_the_number_of_processes():
    train = [i for i in range(103) if i % 7]  # gaps, as a held-out split leaves
    for batch_size in (1, 4, 8):
        batches = [epoch_batches(train, batch_size, seed=3, epoch=e) for e in range(3)]
        for epoch in batches:
            assert sorted(i for b in epoch for i in b) == train
            assert all(len(b) == batch_size for b in epoch[:-1]) and 1 <= len(epoch[-1]) <= batch_size
        if batch_size > 1:
            assert batches[0] != batches[1]  # reshuffled every epoch
    assert epoch_batches(train, 8, seed=3, epoch=1) == epoch_batches(list(train), 8, seed=3, epoch=1)
    assert epoch_batches(train, 8, seed=3, epoch=1) != epoch_batches(train, 8, seed=4, epoch=1)


@pytest.mark.parametrize("batch_size", [8, 12, 32])
def test_eight_ranks_all_train_at_every_step_and_each_always_on_its_own_examples(batch_size):
    world, train = 8, list(range(1000))
    owners: dict[int, set[int]] = {}
    for epoch in range(3):
        batches = epoch_batches(train, batch_size, seed=0, epoch=epoch)
        for step, batch in enumerate(batches):
            shares = [rank_share(batch, world, r) for r in range(world)]
            assert sorted(i for share in shares for i in share) == sorted(batch)
            sizes = [len(share) for share in shares]
            assert max(sizes) - min(sizes) <= 1
            if step < len(batches) - 1:  # full batches: no rank idles
                assert min(sizes) == batch_size // world
            for r, share in enumerate(shares):
                for index in share:
                    owners.setdefault(index, set()).add(r)
    # every example is always trained (and its lower states cached) on the same rank: each rank
    # computes only its own examples (the old owner-preferring split computed ~2x that at B = 8)
    assert all(len(ranks) == 1 for ranks in owners.values())
    per_rank = [sum(1 for ranks in owners.values() if r in ranks) for r in range(world)]
    assert sum(per_rank) == len(train)
    if batch_size % world == 0:
        assert max(per_rank) - min(per_rank) <= batch_size // world


def test_a_batch_smaller_than_the_number_of_processes_is_refused():
    settings = TrainSettings(batch_size=4)
    settings.validate(world=4)
    with pytest.raises(SdrtError, match=r"^--batch-size 4 is smaller than the 8 processes, so some would idle at every step; use --batch-size 8 or a multiple of it$"):
        settings.validate(world=8)


def test_val_split_depends_on_example_indices_only():
    train, val = split_train_val(range(10), 0.3)
    assert len(val) == 3 and sorted(train + val) == list(range(10))
    assert split_train_val(range(10), 0.3) == (train, val)
    assert split_train_val(range(10), 0.0) == (list(range(10)), [])
    assert len(split_train_val(range(2), 0.9)[0]) == 1  # never everything


def test_learning_rate_warms_up_then_follows_the_schedule():
    settings = TrainSettings(lr=1.0, warmup_ratio=0.2, schedule="linear")
    rates = [lr_at(s, 10, settings) for s in range(10)]
    assert rates[:2] == [0.5, 1.0]
    assert rates[2] == 1.0 and rates[-1] == pytest.approx(1 / 8)
    assert all(a >= b for a, b in zip(rates[1:], rates[2:]))
    cosine = TrainSettings(lr=1.0, warmup_ratio=0.0, schedule="cosine")
    assert lr_at(0, 4, cosine) == 1.0 and lr_at(2, 4, cosine) == pytest.approx(0.5)
    assert lr_at(9, 10, TrainSettings(lr=0.3, schedule="constant")) == 0.3


def test_lower_cache_spills_to_disk_and_reads_back_the_same_tensors(tmp_path):
    def states(seed):
        g = torch.Generator().manual_seed(seed)
        return LowerStates(torch.randn(5, 4, generator=g), {"a": torch.randn(2, 4, generator=g), "b": torch.zeros(0, 4)})

    one = states(0).nbytes
    cache = LowerCache(ram_bytes=one, disk_bytes=one, directory=tmp_path / "c", device=torch.device("cpu"))
    for i in range(3):
        cache.put(i, states(i))
    assert cache.stats()["ram_examples"] == 1 and cache.stats()["disk_examples"] == 1
    for i in (0, 1):
        got = cache.get(i)
        assert torch.equal(got.prefix, states(i).prefix) and torch.equal(got.full("a"), states(i).full("a"))
        assert got.full("b").shape == (5, 4)
    assert cache.get(2) is None  # over both budgets: the caller recomputes
    assert (cache.hits, cache.misses) == (2, 1)
    cache.close()
    assert not (tmp_path / "c").exists()


# ---------------------------------------------------------------------------------------------
# the student against the trace contract
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "adapter, layers, skip, cache_end",
    [
        ("reft", [2, 3], False, 2),  # layer 1 is only compared: its output is cached
        ("loreft", [1, 2, 3], True, 2),  # layer 1 is intervened: the cached output gets the hook's edit
        ("lora", [1, 3], False, 1),  # LoRA trains layer 1's weights: the cache holds its input
    ],
)
def test_cached_student_equals_a_full_forward_at_the_aligned_rows(store_dir, tmp_path, adapter, layers, skip, cache_end):
    backbone = load_backbone("llava-next-tiny", seed=0)  # LoRA wraps the model in place: a fresh one
    store = TraceStore(store_dir)
    dataset = SyntheticCharts(split="validation", limit=3)
    examples = examples_by_index(dataset)
    compared = store.fingerprint["settings"]["layers"]
    source = TraceSource(store, dataset, store.prompt_ids, examples)
    spec = StudentSpec(adapter=adapter, layers=layers, compare_layers=compared, pos=3, rank=2, skip=skip, skip_layer=1 if skip else None)
    trainer = Distiller(backbone, source, spec, TrainSettings(micro_batch_size=2), "mse+kl", {}, tmp_path / "o", {})
    assert trainer.first == 1 and trainer.cache_end == cache_end
    # trained-looking weights, so that positions, skip input and LoRA placement all matter
    with torch.no_grad():
        for p in trainer.student.parameters_of(0):
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.3)

    items = [trainer.example_state(i) for i in (0, 1)]
    with torch.no_grad():
        batches = trainer.forward_units(0, items, frozenset({"hidden", "logits"}), training=False)
    hook_adapter = trainer.student.adapters[0] if adapter != "lora" else None  # the bound LoRA is in the model
    for (inputs, _), batch in zip(items, batches):
        record = store.record(inputs.index, store.prompt_ids[0])
        # the contract: R = prompt_rows + len(y2) - 1 rows, the last R fed positions
        assert inputs.rows[store.prompt_ids[0]] == record.prompt_rows + len(record.y2_ids) - 1 == record.hidden.shape[0]
        assert inputs.tails[store.prompt_ids[0]] == record.y2_ids[:-1]
        hidden, logits = full_forward_rows(backbone, dataset, examples[inputs.index], record, compared, hook_adapter, 3, 1 if skip else None)
        torch.testing.assert_close(batch.student_hidden[0], hidden, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(batch.student_logits[0], logits, rtol=1e-4, atol=1e-5)
        assert torch.equal(batch.teacher_hidden[0], record.hidden)
    # the two examples have different lengths, so the batch above was padded: padding changed nothing
    assert items[0][0].length(store.prompt_ids[0]) != items[1][0].length(store.prompt_ids[0])
    # and the weights matter: the same rows without them differ
    plain, _ = full_forward_rows(load_backbone("llava-next-tiny", seed=0), dataset, examples[0], store.record(0, store.prompt_ids[0]), compared)
    assert not torch.allclose(batches[0].student_hidden[0], plain, rtol=1e-4, atol=1e-5)


def test_fresh_adapters_reproduce_the_untouched_student(store_dir, tiny, tmp_path):
    store = TraceStore(store_dir)
    dataset = SyntheticCharts(split="validation", limit=3)
    examples = examples_by_index(dataset)
    layers = store.fingerprint["settings"]["layers"]
    spec = StudentSpec(adapter="reft", layers=layers, compare_layers=layers, pos=3, rank=2)
    trainer = Distiller(tiny, TraceSource(store, dataset, store.prompt_ids, examples), spec, TrainSettings(), "mse", {}, tmp_path / "o", {})
    with torch.no_grad():
        batch = trainer.forward_units(1, [trainer.example_state(2)], frozenset({"hidden"}), training=False)[0]
    record = store.record(2, store.prompt_ids[1])
    hidden, _ = full_forward_rows(tiny, dataset, examples[2], record, layers)
    torch.testing.assert_close(batch.student_hidden[0], hidden, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("micro_batch_size", [1, 2])
def test_lower_states_run_the_prompt_once_and_equal_whole_sequences(store_dir, tiny, tmp_path, micro_batch_size):
    store = TraceStore(store_dir)
    dataset = SyntheticCharts(split="validation", limit=3)
    spec = StudentSpec(adapter="reft", layers=[2, 3], compare_layers=store.fingerprint["settings"]["layers"], pos=3, rank=2)
    source = TraceSource(store, dataset, store.prompt_ids, examples_by_index(dataset))
    trainer = Distiller(tiny, source, spec, TrainSettings(micro_batch_size=micro_batch_size), "mse", {}, tmp_path / "o", {})
    inputs, _ = trainer.example_state(1)
    first, second = store.prompt_ids
    inputs.tails[second] = inputs.tails[second][:1]  # tails of different lengths: one is right-padded
    encoded = tiny.encode_images(dataset.example(1).images)
    features = torch.cat(encoded.features)
    lower = trainer.compute_lower(inputs, features)
    size = len(inputs.prompt_ids)
    for unit in (first, second):
        sequence = inputs.prompt_ids + inputs.tails[unit]
        with torch.no_grad():
            whole = tiny.run_layers(
                tiny.embed(torch.tensor([sequence]), [features]), torch.ones((1, len(sequence)), dtype=torch.long),
                torch.arange(len(sequence))[None], 0, trainer.cache_end,
            )[0]
        torch.testing.assert_close(lower.prefix, whole[:size], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(lower.tails[unit], whole[size:], rtol=1e-4, atol=1e-5)
    assert lower.tails[second].shape[0] == 1 and lower.tails[first].shape[0] > 1
    inputs.tails = {first: [], second: []}  # answers of one token feed no tail
    assert all(t.shape == (0, tiny.hidden_size) for t in trainer.compute_lower(inputs, features).tails.values())


def track_decoded_charts(monkeypatch) -> list[int]:
    """Count the decoded chart images alive each time one is drawn; returns [peak so far]."""
    drawn: list[weakref.ref] = []  # PIL images are unhashable: no WeakSet
    peak = [0]
    draw = SyntheticCharts.example

    def tracked(self, index):
        example = draw(self, index)
        gc.collect()
        drawn.extend(weakref.ref(image) for image in example.images)
        peak[0] = max(peak[0], sum(ref() is not None for ref in drawn))
        return example

    monkeypatch.setattr(SyntheticCharts, "example", tracked)
    return peak


@pytest.mark.slow
def test_distill_keeps_a_bounded_number_of_decoded_examples_with_the_same_results(store_dir, tiny, tmp_path, monkeypatch):
    store = TraceStore(store_dir)
    layers = store.fingerprint["settings"]["layers"]
    spec = StudentSpec(adapter="reft", layers=layers, compare_layers=layers, pos=3, rank=2)
    # no lower cache: every step decodes its examples again
    settings = TrainSettings(epochs=2, batch_size=2, cache_ram_gb=0, cache_disk_gb=0)

    def run(cache_size):
        peak = track_decoded_charts(monkeypatch)
        dataset = SyntheticCharts(split="validation", limit=3)
        examples = examples_by_index(dataset, cache_size=cache_size)
        out = tmp_path / f"cache{cache_size}"
        Distiller(tiny, TraceSource(store, dataset, store.prompt_ids[:1], examples), spec, settings, "mse+kl", {}, out, {}).run()
        losses = [line["losses"] for line in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if line["kind"] == "train"]
        return losses, peak[0], examples

    everything, peak_all, kept = run(cache_size=3)  # all decoded examples kept, as before
    bounded, peak_bounded, examples = run(cache_size=1)
    assert bounded == everything
    assert peak_all == 3 and kept.decodes == 3
    assert peak_bounded <= 2  # the cached one and the one being decoded
    assert len(examples.decoded) == 1 and 3 < examples.decodes <= 2 * 3  # decoded again when needed again


# ---------------------------------------------------------------------------------------------
# the command
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_outputs_manifest_metrics_and_load_adapters(cli, store_dir, tiny, tmp_path):
    out = tmp_path / "run"
    result = cli(*distill_args(store_dir, out, "--epochs", "2", "--batch-size", "2", "--val-fraction", "0.34", "--rank", "2"))
    assert result.exit_code == 0, result.output
    assert "Trained 2 reft adapter(s)" in result.out

    manifest = json.loads((out / "manifest.json").read_text())
    store = TraceStore(store_dir)
    assert manifest["kind"] == "adapters" and manifest["status"] == "complete" and manifest["adapter"] == "reft"
    assert manifest["prompts"] == store.prompt_ids
    assert manifest["layers"] == manifest["compare_layers"] == [1, 2, 3] and manifest["pos"] == 3
    assert manifest["traces"]["fingerprint"] == store.fingerprint
    assert manifest["backbone"] == tiny.record().to_json()
    assert manifest["loss"]["terms"] == [["mse", 1.0], ["kl", 1.0]] and manifest["loss"]["options"] == {"mse": {"scale": "relative"}}
    assert len(manifest["training"]["val_examples"]) == 1 and len(manifest["training"]["train_examples"]) == 2
    assert set(manifest["metrics"][store.prompt_ids[0]]) == {"train_loss", "val_mse", "val_kl"}
    assert json.loads((out / "run.json").read_text())["command"] == "distill"

    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["kind"] for line in lines] == ["val", "train", "epoch", "val", "train", "epoch", "val"]
    assert all(math.isfinite(line["loss"]) for line in lines if line["kind"] == "train")
    assert lines[2]["cache"]["misses"] == 3 and lines[5]["cache"]["hits"] == 3  # epoch 2 ran from the cache
    assert not (out / "cache").exists()

    loaded, pairs = load_adapters(out, tiny)
    assert [p for p, _ in pairs] == store.prompt_ids and loaded["status"] == "complete"
    for prompt_id, adapter in pairs:
        assert adapter.config.layers == [1, 2, 3] and adapter.config.rank == 2
        assert any(float(p.detach().abs().sum()) > 0 for n, p in adapter.named_parameters() if "up" in n)  # B moved off zero
        assert json.loads((out / "adapters" / prompt_id / "adapter.json").read_text())["extra"]["prompt_id"] == prompt_id
    with pytest.raises(SdrtError, match="were trained on backbone 'llava-next-tiny'.*not the one in use"):
        load_adapters(out, load_backbone("llava-next-tiny", seed=1))

    # the same --out again is refused; --overwrite starts afresh
    again = cli(*distill_args(store_dir, out, "--epochs", "1"))
    assert again.exit_code == 1 and "already holds a distill run; pass --resume" in again.err
    assert cli(*distill_args(store_dir, out, "--epochs", "1", "--max-steps", "1", "--overwrite")).exit_code == 0
    assert json.loads((out / "manifest.json").read_text())["training"]["steps"] == 1


def test_a_store_written_before_factory_options_were_recorded_rebuilds_its_backbone(cli, tmp_path):
    old = tmp_path / "old-store"
    assert run_main(*TRACE_ARGS, "--seed", "2", "--limit", "2", "--out", old) == 0
    manifest = json.loads((old / "manifest.json").read_text())
    del manifest["fingerprint"]["backbone"]["options"]  # as sdrt wrote it before: the seed only in "random:tiny:seed=2"
    (old / "manifest.json").write_text(json.dumps(manifest))
    out = tmp_path / "run"
    # the training seed stays 0; the backbone's weights must be the store's (seed 2), or the store is refused
    result = cli(*distill_args(old, out, "--max-steps", "1"))
    assert result.exit_code == 0, result.output
    assert json.loads((out / "manifest.json").read_text())["backbone"]["options"] == {"seed": 2}


@pytest.mark.slow
def test_cache_settings_do_not_change_the_numbers(cli, store_dir, tmp_path):
    def losses(name, *flags):
        out = tmp_path / name
        result = cli(*distill_args(store_dir, out, "--epochs", "2", "--batch-size", "3", "--prompts", "1", *flags))
        assert result.exit_code == 0, result.output
        lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        return [line["loss"] for line in lines if line["kind"] == "train"], [line["cache"] for line in lines if line["kind"] == "epoch"]

    ram, ram_stats = losses("ram")
    disk, disk_stats = losses("disk", "--cache-ram-gb", "0", "--cache-disk-gb", "1")
    none, none_stats = losses("none", "--cache-ram-gb", "0", "--cache-disk-gb", "0")
    assert ram == disk  # the disk round trip is exact
    assert none == pytest.approx(ram, rel=1e-5)
    assert ram_stats[-1]["ram_examples"] == 3 and disk_stats[-1]["disk_examples"] == 3 and none_stats[-1]["misses"] == 6
    assert not (tmp_path / "disk" / "cache").exists()  # the spill files go when the run ends


def test_resume_after_max_steps_is_refused_with_what_differs(cli, store_dir, tmp_path):
    out = tmp_path / "run"
    assert cli(*distill_args(store_dir, out, "--epochs", "2", "--batch-size", "1", "--max-steps", "2")).exit_code == 0
    other = cli(*distill_args(store_dir, out, "--epochs", "2", "--batch-size", "1", "--lr", "0.01", "--resume"))
    assert other.exit_code == 1 and "training.lr: 0.002 (checkpoint) vs 0.01 (now)" in other.err


class NanAtCall:
    """Loss plugin: mse, but NaN from the ``at``-th call on (one call per example and adapter)."""

    name = "nan-later"
    needs = frozenset({"hidden"})
    at = 5

    def __init__(self):
        from sdrt_plugins.losses.distill import MSELoss

        self.mse = MSELoss()
        self.calls = 0

    def __call__(self, batch):
        self.calls += 1
        value = self.mse(batch)
        return value * float("nan") if self.calls >= self.at else value


class NanPlugin:
    @hookimpl
    def register_losses(self, register):
        register("nan-later", NanAtCall)


def test_nan_loss_stops_with_step_and_batch_and_keeps_the_last_good_checkpoint(cli, plugin, store_dir, tmp_path):
    plugin(NanPlugin(), "nan-plugin")
    out = tmp_path / "run"
    # 2 prompts x batch 1: calls 5 and 6 belong to step 3
    result = cli(*distill_args(store_dir, out, "--loss", "nan-later", "--batch-size", "1", "--epochs", "2", "--save-every", "1"))
    assert result.exit_code == 1
    ids = [SyntheticCharts(split="validation", limit=3).example(i).id for i in range(3)]
    assert "non-finite loss at step 3 on batch examples [" in result.err
    named = result.err.split("batch examples [")[1].split("]")[0]
    assert len([i for i in ids if i in named]) == 1
    assert "adapter 'extract-relevant-facts'" in result.err and "step-00000002" in result.err
    assert read_latest(out).name == "step-00000002"
    assert json.loads((read_latest(out) / "trainer.json").read_text())["state"]["step"] == 2
    assert not (out / "manifest.json").exists() and not (out / "adapters").exists()
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_lora_with_distillation_losses_trains_one_lora_per_prompt(cli, store_dir, tiny, tmp_path):
    out = tmp_path / "lora"
    result = cli(*distill_args(store_dir, out, "--adapter", "lora", "--loss", "mse", "--layers", "-2,-1", "--max-steps", "2", "--batch-size", "2", "--rank", "2"))
    assert result.exit_code == 0, result.output
    manifest, pairs = load_adapters(out, tiny)
    assert manifest["adapter"] == "lora" and manifest["layers"] == [2, 3] and len(pairs) == 2
    from safetensors.torch import load_file

    first, second = (load_file(str(out / "adapters" / p / "adapter.safetensors")) for p, _ in pairs)
    assert any(not torch.equal(first[k], second[k]) for k in first if "lora_B" in k)  # two different LoRAs
    model = load_backbone("llava-next-tiny", seed=0)
    with pairs[0][1].applied(model):  # peft injects the LoRA layers into the model in place
        # 2 layers x the default targets: attention q, k, v, o and MLP gate, up, down
        assert sum(1 for n, _ in model.model.named_modules() if n.endswith("lora_A")) == 2 * 7
    assert not any(n.endswith("lora_A") for n, _ in model.model.named_modules())  # and removes them after


def test_gold_answers_with_lora_and_ce(cli, tiny, tmp_path):
    out = tmp_path / "gold"
    result = cli(
        "distill", "--loss", "ce", "--adapter", "lora", "--backbone", "llava-next-tiny", "--dataset", "synthetic-charts",
        "--limit", "2", "--layers", "-2,-1", "--epochs", "3", "--batch-size", "2", "--lr", "0.01", "--out", out,
    )
    assert result.exit_code == 0, result.output
    manifest, pairs = load_adapters(out, tiny)
    assert manifest["mode"] == "gold" and manifest["prompts"] == ["gold"] and manifest["traces"] is None
    assert [p for p, _ in pairs] == ["gold"] and (out / "adapters" / "gold" / "adapter.safetensors").exists()
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines() if '"train"' in line]
    assert len(losses) == 3 and losses[-1] < losses[0]  # CE on the gold answers goes down


def test_the_predictor_may_learn_from_more_store_examples_than_the_adapters(cli, store_dir, tmp_path):
    # the fidelity bench's recipe: routing labels are noisy, so the predictor gets the whole store
    out = tmp_path / "first-two"
    result = cli(*distill_args(store_dir, out, "--limit", "2", "--max-steps", "1", "--batch-size", "2"))
    assert result.exit_code == 0, result.output
    assert json.loads((out / "manifest.json").read_text())["training"]["train_examples"] == [0, 1]
    result = cli("ensemble", "--adapters", out, "--traces", store_dir, "--steps", "5")
    assert result.exit_code == 0, result.output
    ensemble = json.loads((out / "ensembles" / "k2" / "adapter.json").read_text())
    assert ensemble["traces"]["examples"] == len(TraceStore(store_dir).example_indices) == 3


def test_skip_connection_run_records_its_vision_input(cli, store_dir, tiny, tmp_path):
    out = tmp_path / "skip"
    result = cli(*distill_args(store_dir, out, "--skip", "--skip-layer", "2", "--skip-pool", "max", "--max-steps", "1", "--prompts", "1"))
    assert result.exit_code == 0, result.output
    manifest, pairs = load_adapters(out, tiny)
    assert manifest["skip"] == {"enabled": True, "vision_layer": 2, "pooling": "max"}
    adapter = pairs[0][1]
    assert adapter.config.skip and adapter.config.vision_dim == tiny.vision_hidden_size
    assert float(adapter.skips["1"].restore.detach().abs().sum()) > 0  # R moved off zero: the skip trained


def test_config_file_values_go_through_the_same_checks(cli, store_dir, tmp_path):
    config = tmp_path / "run.toml"
    config.write_text('[distill]\nloss = "msee"\nepochs = 2\n')
    result = cli("distill", "--traces", store_dir, "--out", tmp_path / "out", "--config", config)
    assert result.exit_code == 1 and "Did you mean 'mse'?" in result.err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "make_args, message",
    [
        (lambda s: ["--traces", s.parent / "nowhere"], "is not a trace store"),
        (lambda s: ["--traces", s, "--backbone", "llava-next-bench"], "was made with backbone 'llava-next-tiny'"),
        (lambda s: ["--traces", s, "--adapter", "reftt"], "Did you mean 'reft'?"),
        (lambda s: ["--traces", s, "--loss", "mse+kll"], "Did you mean 'kl'?"),
        (lambda s: ["--traces", s, "--mse-scale", "log"], "loss 'mse': scale must be one of relative, raw, got 'log'"),
        (lambda s: ["--loss", "ce", "--adapter", "lora", "--dataset", "synthetic-charts", "--backbone", "llava-next-tiny", "--lora-targets", "q_proj,gate_prj"], "LoRA target"),
        (lambda s: ["--loss", "ce", "--adapter", "lora", "--layers", "-1"], "choose a dataset with --dataset"),
        (lambda s: ["--traces", s, "--loss", "mse+ce"], "mixes ce (gold answers) with trace losses"),
        (lambda s: ["--traces", s, "--prompts", "extract-relevant-facts,nope"], "prompt 'nope' is not in trace store"),
        (lambda s: ["--traces", s, "--layers", "7"], "layer 7 does not exist"),
        (lambda s: ["--traces", s, "--schedule", "step"], "--schedule 'step' is not one of"),
        (lambda s: ["--traces", s, "--dataset", "synthetic-charts", "--split", "train"], "but trace store"),
        (lambda s: [], "choose a trace store with --traces"),
    ],
)
def test_bad_input_fails_in_one_sentence_and_writes_nothing(cli, store_dir, tmp_path, make_args, message):
    out = tmp_path / "out"
    result = cli("distill", "--out", out, *make_args(store_dir))
    assert result.exit_code == 1
    assert message in result.err
    assert "Traceback" not in result.output
    assert not out.exists()


def test_the_default_batch_gives_every_one_of_eight_processes_an_example():
    from sdrt_cli.distill import TrainSettings, default_batch_size

    assert [default_batch_size(world) for world in (1, 2, 4, 8, 16)] == [4, 4, 4, 8, 16]
    for world in (1, 2, 4, 8):
        TrainSettings(batch_size=default_batch_size(world)).validate(world=world)  # no refusal
