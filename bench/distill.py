"""Benchmark `sdrt distill` against the naive (pyreft-style) training loop on `llava-next-bench`.

Naive: every step, for every (example, prompt), the whole `LlavaNextForConditionalGeneration` forward
(vision tower, all decoder layers, logits at every position) with the adapter hooks attached, then the
same losses on the aligned rows, backward, AdamW — what pyreft's trainer does, every epoch.
sdrt: `sdrt distill` itself (the frozen layers below the first trained layer run once per example and
are cached; each step runs only the layers above, and the logits only at the aligned rows).

Both train the same adapters (same initialisation, data order, learning rate schedule and losses) on
the same trace store of synthetic charts (realistic anyres images, ~2,000-2,600 image tokens), each in
its own subprocess, so that peak RSS is measured per method.  Their loss curves are compared.

    python bench/distill.py [--examples 4] [--prompts 2] [--epochs 3] [--batch-size 2]

`--lower` times only the lower layers' states of one example for 8 prompts (`--prompts 8 --examples 2`):
the shared prompt run once per example (sdrt) against once per prompt (whole sequences, as before).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import machine, write_section  # noqa: E402

BACKBONE = "llava-next-bench"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


# ---------------------------------------------------------------------------------------------
# workers (each runs in its own process)
# ---------------------------------------------------------------------------------------------


def sdrt_worker(args) -> dict:
    from sdrt_cli.cli import main

    out = Path(args.out)
    argv = [
        "distill", "--traces", args.store, "--out", str(out), "--epochs", str(args.epochs), "--batch-size", str(args.batch_size),
        "--micro-batch-size", "1", "--lr", str(args.lr), "--seed", "0", "--rank", "4", "--model-dtype", "fp32", "--device", "cpu",
    ]
    try:
        main(argv)
    except SystemExit as exc:
        if exc.code:
            raise
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {
        "steps_per_s": [line["steps_per_s"] for line in lines if line["kind"] == "epoch"],
        "epoch_seconds": [line["seconds"] for line in lines if line["kind"] == "epoch"],
        "epoch_cpu_seconds": [line["cpu_seconds"] for line in lines if line["kind"] == "epoch"],
        "steps_per_epoch": [line["steps"] for line in lines if line["kind"] == "epoch"],
        "losses": [line["losses"] for line in lines if line["kind"] == "train"],
        "parts": [line["parts"] for line in lines if line["kind"] == "train"],
        "cache": [line["cache"] for line in lines if line["kind"] == "epoch"][-1],
        "peak_rss_mb": peak_rss_mb(),
    }


def naive_worker(args) -> dict:
    """The pyreft-style loop: nothing reused between steps or epochs."""
    from sdrt_cli.adapters import attach, intervention_positions
    from sdrt_cli.backbone import load_backbone
    from sdrt_cli.distill import InterventionStudent, StudentSpec, TrainSettings, epoch_batches, lr_at, split_train_val
    from sdrt_cli.losses import DistillBatch, compose
    from sdrt_cli.trace_store import TraceStore
    from sdrt_cli.traces import student_turns
    from sdrt_plugins.datasets.synthetic_charts import SyntheticCharts

    store = TraceStore(args.store)
    backbone = load_backbone(BACKBONE, seed=0, device="cpu", dtype="fp32")
    store.check_compatible(backbone.record())
    recorded = store.fingerprint["dataset"]
    dataset = SyntheticCharts(split=recorded["split"], limit=max(store.example_indices) + 1, seed=recorded["seed"])
    layers = store.fingerprint["settings"]["layers"]
    pos = store.fingerprint["settings"]["pos"]
    units = store.prompt_ids
    settings = TrainSettings(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=0)
    student = InterventionStudent(backbone, units, StudentSpec(adapter="reft", layers=layers, compare_layers=layers, pos=pos, rank=4), seed=0)
    params = [p for n in range(len(units)) for p in student.parameters_of(n)]
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    loss_fn = compose("mse+kl")
    train, _ = split_train_val(store.example_indices, 0.0)
    steps_per_epoch = -(-len(train) // settings.batch_size)
    total = settings.epochs * steps_per_epoch
    torch.manual_seed(0)

    def one_sequence(n: int, index: int) -> torch.Tensor:
        example = dataset.example(index)
        record = store.record(index, units[n])
        processed = backbone.processor.image_processor([im.convert("RGB") for im in example.images], return_tensors="pt")
        prompt = backbone.tokenize(backbone.render_chat(student_turns(dataset, example)), token_counts[index])
        ids = torch.tensor([prompt + record.y2_ids[:-1]])
        prompt_mask = torch.zeros_like(ids)
        prompt_mask[0, : len(prompt)] = 1
        rows = record.hidden.shape[0]
        with attach(backbone.decoder_layers, student.adapters[n], capture=layers) as handle:
            handle.set_inputs(intervention_positions(prompt_mask, pos))
            output = backbone.model(
                input_ids=ids, pixel_values=processed["pixel_values"], image_sizes=processed["image_sizes"], attention_mask=torch.ones_like(ids)
            )
            hidden = torch.stack([handle.captured[layer][0, -rows:] for layer in layers], dim=1)
        batch = DistillBatch(
            student_hidden=hidden[None],
            teacher_hidden=record.hidden[None],
            row_mask=torch.ones((1, rows), dtype=torch.bool),
            student_logits=output.logits[0, -rows:][None],
            topk_ids=record.topk_ids.long()[None],
            topk_logprobs=record.topk_logprobs[None],
            tail_mass=record.tail_mass[None],
        )
        return loss_fn(batch)

    # image token counts shape the prompt ids (the processor's job in a user's loop): known before
    # training starts; the model forward still runs the vision tower every step
    token_counts = {i: backbone.encode_images(dataset.example(i).images).token_counts for i in train}
    step = 0
    steps_per_s, epoch_seconds, epoch_cpu_seconds, steps_per_epoch, losses, all_parts = [], [], [], [], [], []
    for epoch in range(settings.epochs):
        batches = epoch_batches(train, settings.batch_size, settings.seed, epoch)
        seconds = cpu_seconds = 0.0
        for batch in batches:
            began, cpu_began = time.perf_counter(), time.process_time()
            optimizer.zero_grad(set_to_none=True)
            step_losses, step_parts = {}, {}
            for n, unit in enumerate(units):
                step_losses[unit], step_parts[unit] = 0.0, {"mse": 0.0, "kl": 0.0}
                for index in batch:
                    value, parts = one_sequence(n, index)
                    (value / len(batch)).backward()
                    step_losses[unit] += float(value.detach()) / len(batch)
                    for name in step_parts[unit]:
                        step_parts[unit][name] += float(parts[name]) / len(batch)
            for n in range(len(units)):
                torch.nn.utils.clip_grad_norm_(student.parameters_of(n), settings.max_grad_norm)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, total, settings)
            optimizer.step()
            step += 1
            seconds += time.perf_counter() - began
            cpu_seconds += time.process_time() - cpu_began
            losses.append(step_losses)
            all_parts.append(step_parts)
        steps_per_epoch.append(len(batches))
        steps_per_s.append(steps_per_epoch[-1] / seconds)
        epoch_seconds.append(seconds)
        epoch_cpu_seconds.append(cpu_seconds)
    return {
        "steps_per_s": steps_per_s,
        "epoch_seconds": epoch_seconds,
        "epoch_cpu_seconds": epoch_cpu_seconds,
        "steps_per_epoch": steps_per_epoch,
        "losses": losses,
        "parts": all_parts,
        "peak_rss_mb": peak_rss_mb(),
    }


# ---------------------------------------------------------------------------------------------
# the lower layers: the shared prompt once per example, or once per prompt
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def lower_whole_sequences(backbone, inputs, features, units, cache_end, micro_batch_size):
    """The lower states as distill computed them before: every prompt's whole sequence (prompt + tail),
    right-padded in micro-batches, so the shared prompt runs once per prompt."""
    from sdrt_cli.distill import LowerStates

    tails, prefix, size = {}, None, len(inputs.prompt_ids)
    for start in range(0, len(units), micro_batch_size):
        chunk = units[start : start + micro_batch_size]
        seqs = [inputs.prompt_ids + inputs.tails[u] for u in chunk]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), backbone.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for r, s in enumerate(seqs):
            ids[r, : len(s)] = torch.tensor(s)
            mask[r, : len(s)] = 1
        hidden = backbone.embed(ids, [features] * len(seqs))
        positions = torch.arange(width).expand(len(seqs), width)
        hidden = backbone.run_layers(hidden, mask, positions, 0, cache_end)
        if prefix is None:
            prefix = hidden[0, :size].clone()
        for r, unit in enumerate(chunk):
            tails[unit] = hidden[r, size : len(seqs[r])].clone()
    return LowerStates(prefix, tails)


def lower_bench(args) -> None:
    """`Distiller.compute_lower` against the whole-sequence way, on the same inputs, in this process."""
    from types import SimpleNamespace

    from sdrt_cli.backbone import load_backbone
    from sdrt_cli.distill import Distiller, ExampleInputs, TrainSettings
    from sdrt_cli.traces import student_turns
    from sdrt_plugins.datasets.synthetic_charts import SyntheticCharts

    torch.set_num_threads(args.threads)
    backbone = load_backbone(BACKBONE, seed=0, device="cpu", dtype="fp32")
    data = SyntheticCharts(split="validation", limit=args.examples)
    units = [f"prompt-{n}" for n in range(args.prompts)]
    cache_end = len(backbone.decoder_layers) - 2  # a store of the last 3 layers: its first one's output
    # what compute_lower reads of a Distiller
    trainer = SimpleNamespace(backbone=backbone, device=backbone.device, units=units, settings=TrainSettings(micro_batch_size=4), cache_end=cache_end)
    generator = torch.Generator().manual_seed(0)
    timings = {"whole": [], "prefix_once": []}
    cpu = {"whole": [], "prefix_once": []}
    largest, image_tokens = 0.0, []
    for index in range(args.examples):
        example = data.example(index)
        encoded = backbone.encode_images(example.images)
        features = torch.cat(encoded.features)
        image_tokens.append(encoded.token_counts[0])
        prompt = backbone.tokenize(backbone.render_chat(student_turns(data, example)), encoded.token_counts)
        # answer tails like y2[:-1]: 8-31 tokens of ordinary vocabulary
        tails = {u: torch.randint(100, 30000, (int(torch.randint(8, 32, (1,), generator=generator)),), generator=generator).tolist() for u in units}
        inputs = ExampleInputs(index, example.id, prompt, tails, rows={})
        began, cpu_began = time.perf_counter(), time.process_time()
        old = lower_whole_sequences(backbone, inputs, features, units, cache_end, 4)
        timings["whole"].append(time.perf_counter() - began)
        cpu["whole"].append(time.process_time() - cpu_began)
        began, cpu_began = time.perf_counter(), time.process_time()
        new = Distiller.compute_lower(trainer, inputs, features)
        timings["prefix_once"].append(time.perf_counter() - began)
        cpu["prefix_once"].append(time.process_time() - cpu_began)
        largest = max(largest, float((old.prefix - new.prefix).abs().max()), *(float((old.tails[u] - new.tails[u]).abs().max()) for u in units))
    wall = sum(timings["whole"]) / sum(timings["prefix_once"])
    cpu_ratio = sum(cpu["whole"]) / sum(cpu["prefix_once"])
    raw = {
        "machine": machine(),
        "backbone": BACKBONE,
        "examples": args.examples,
        "prompts": args.prompts,
        "cache_end": cache_end,
        "image_tokens_per_example": image_tokens,
        "seconds": timings,
        "cpu_seconds": cpu,
        "speedup_wall": wall,
        "speedup_cpu": cpu_ratio,
        "largest_abs_difference": largest,
    }
    md = f"""## Distill lower layers (`python bench/distill.py --lower --examples {args.examples} --prompts {args.prompts}`)

`Distiller.compute_lower` (layers 0–{cache_end - 1} of `{BACKBONE}`, fp32, {args.threads} torch thread(s)) for {args.prompts} prompts per example,
{min(image_tokens)}–{max(image_tokens)} image tokens per example, answer tails of 8–31 tokens.  Whole sequences = what distill did
before: every prompt's prompt + tail, so the shared image prompt ran {args.prompts} times; prefix once = the prompt runs once
with its KV cache kept and the tails run on it.  Machine: {machine()}.

| | whole sequences | prefix once | speed-up |
|---|---|---|---|
| wall time, {args.examples} examples | {sum(timings['whole']):.2f} s | {sum(timings['prefix_once']):.2f} s | **{wall:.2f}×** |
| CPU time | {sum(cpu['whole']):.2f} s | {sum(cpu['prefix_once']):.2f} s | **{cpu_ratio:.2f}×** |

Same lower states: largest absolute difference {largest:.1e} (float32 summation order).
"""
    write_section("distill-lower", md, raw)
    print(md)


# ---------------------------------------------------------------------------------------------
# driver
# ---------------------------------------------------------------------------------------------


def run_worker(kind: str, args, out: Path) -> dict:
    cmd = [
        sys.executable, __file__, "--worker", kind, "--store", str(args.store), "--out", str(out), "--epochs", str(args.epochs),
        "--batch-size", str(args.batch_size), "--lr", str(args.lr),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise SystemExit(f"{kind} worker failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker (1: steadiest on a shared machine)")
    parser.add_argument("--lower", action="store_true", help="only time the lower layers' states: the shared prompt once vs once per prompt")
    parser.add_argument("--worker", choices=["sdrt", "naive"], help=argparse.SUPPRESS)
    parser.add_argument("--store", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.lower:
        lower_bench(args)
        return
    if args.worker:
        result = (sdrt_worker if args.worker == "sdrt" else naive_worker)(args)
        print(json.dumps(result))
        return

    with tempfile.TemporaryDirectory() as tmp:
        args.store = Path(tmp) / "store"
        traces = [
            sys.executable, "-m", "sdrt_cli", "traces", "--backbone", BACKBONE, "--model-dtype", "fp32", "--device", "cpu",
            "--dataset", "synthetic-charts", "--limit", str(args.examples), "--prompts", str(args.prompts),
            "--max-new-tokens-step1", "8", "--max-new-tokens-step2", "8", "--out", str(args.store),
        ]
        subprocess.run(traces, check=True, capture_output=True)
        from sdrt_cli.backbone import load_backbone
        from sdrt_cli.trace_store import TraceStore

        store = TraceStore(args.store)
        backbone = load_backbone(BACKBONE, seed=0, device="cpu", dtype="fp32")
        from sdrt_plugins.datasets.synthetic_charts import SyntheticCharts

        data = SyntheticCharts(split=store.fingerprint["dataset"]["split"], limit=args.examples)
        image_tokens = [backbone.encode_images(data.example(i).images).token_counts[0] for i in store.example_indices]
        sequence_lengths = [len(r.y2_ids) for r in store.records()]
        del backbone

        naive = run_worker("naive", args, Path(tmp) / "naive")
        sdrt = run_worker("sdrt", args, Path(tmp) / "sdrt")

    ratios = [s / n for s, n in zip(sdrt["steps_per_s"], naive["steps_per_s"])]
    cpu_rate = {k: [steps / cpu for steps, cpu in zip(r["steps_per_epoch"], r["epoch_cpu_seconds"])] for k, r in (("naive", naive), ("sdrt", sdrt))}
    cpu_ratios = [s / n for s, n in zip(cpu_rate["sdrt"], cpu_rate["naive"])]
    # mse carries the comparison; kl on random weights (near-uniform next-token distributions) is ~1e-7,
    # at float32 rounding noise, so it is compared in absolute terms
    mse_relative = [max(abs(a[u]["mse"] - b[u]["mse"]) / abs(a[u]["mse"]) for u in a) for a, b in zip(naive["parts"], sdrt["parts"])]
    kl_absolute = [max(abs(a[u]["kl"] - b[u]["kl"]) for u in a) for a, b in zip(naive["parts"], sdrt["parts"])]
    kl_scale = max(abs(p[u]["kl"]) for p in naive["parts"] for u in p)
    raw = {
        "machine": machine(),
        "backbone": BACKBONE,
        "examples": args.examples,
        "prompts": args.prompts,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "threads_per_worker": args.threads,
        "image_tokens_per_example": image_tokens,
        "y2_tokens_per_record": sequence_lengths,
        "naive": naive,
        "sdrt": sdrt,
        "steps_per_s_ratio_per_epoch": ratios,
        "steps_per_cpu_s": cpu_rate,
        "steps_per_cpu_s_ratio_per_epoch": cpu_ratios,
        "peak_rss_ratio_sdrt_over_naive": sdrt["peak_rss_mb"] / naive["peak_rss_mb"],
        "mse_relative_difference_per_step": mse_relative,
        "kl_absolute_difference_per_step": kl_absolute,
        "largest_kl": kl_scale,
    }
    rows = "\n".join(
        f"| {e + 1} | {n:.3f} | {s:.3f} | **{r:.2f}×** | {nc:.3f} | {sc:.3f} | **{rc:.2f}×** |"
        for e, (n, s, r, nc, sc, rc) in enumerate(zip(naive["steps_per_s"], sdrt["steps_per_s"], ratios, cpu_rate["naive"], cpu_rate["sdrt"], cpu_ratios))
    )
    later = min(ratios[1:]) if len(ratios) > 1 else float("nan")
    later_cpu = min(cpu_ratios[1:]) if len(cpu_ratios) > 1 else float("nan")
    md = f"""## Distill (`python bench/distill.py --examples {args.examples} --prompts {args.prompts} --epochs {args.epochs} --batch-size {args.batch_size}`)

`{BACKBONE}` (random weights, real anyres image processor: {min(image_tokens)}–{max(image_tokens)} image tokens per example),
{args.prompts} prompts × {args.examples} examples, reft adapters on the store's last 3 of 6 decoder layers, loss mse+kl, one
optimizer step = {args.batch_size} examples × {args.prompts} adapters, fp32. Machine: {machine()}; each worker runs
with {args.threads} torch thread(s) (the machine's cores are shared with other jobs, so CPU time is reported beside wall time).
Naive = the pyreft way: the whole LLaVA-NeXT forward (vision tower, every layer, logits at every position)
with autograd and the adapter hooks, every step of every epoch.  sdrt = `sdrt distill` (lower layers cached
after epoch 1, logits only at the aligned rows).  Each method runs in its own process.

| epoch | naive steps/s (wall) | sdrt steps/s (wall) | speed-up | naive steps per CPU-s | sdrt steps per CPU-s | speed-up |
|---|---|---|---|---|---|---|
{rows}

From the second epoch on: **≥ {later:.2f}×** in wall time, **≥ {later_cpu:.2f}×** in CPU time (target ≥ 2×).  Peak RSS (whole process, model included):
naive {naive['peak_rss_mb']:,.0f} MB, sdrt {sdrt['peak_rss_mb']:,.0f} MB (**{sdrt['peak_rss_mb'] / naive['peak_rss_mb']:.2f}×**, target ≤ 1×);
sdrt's cache held {sdrt['cache']['ram_bytes'] / 2**20:,.1f} MB in RAM.  Same computation: at the first step (identical
adapters) the two methods' mse differs by {mse_relative[0]:.1e} (relative), at later steps by at most {max(mse_relative):.1e}
(float-order differences that AdamW's normalised updates carry forward); kl differs by at most {max(kl_absolute):.1e}
(absolute; with random weights the next-token distributions are near-uniform and kl is at most {kl_scale:.1e},
float32 rounding level).
"""
    write_section("distill", md, raw)
    print(md)


if __name__ == "__main__":
    main()
