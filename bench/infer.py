"""Inference cost of `sdrt eval` methods on `llava-next-bench`: prompt vs cot vs sdrt (K = 4).

The adapters are real: `sdrt traces` (4 prompts) -> `sdrt distill` (a few steps) -> `sdrt ensemble
--members 4` on synthetic-charts train examples, all on the bench backbone; their values do not change
the cost, but this way the measured path is exactly the one `sdrt eval --method sdrt` runs.

Latency per example = wall time of one example's generation at batch size 1 (image encoding, prompt
forward, decoding).  Every answer is exactly --max-new-tokens tokens and cot's analysis exactly
--max-new-tokens-step1 (EOS is ignored for the measurement, so an early stop cannot favour a method).  Methods are interleaved per example and repeated; the
median over repeats is each example's latency, and the table reports the mean over examples.

    python bench/infer.py [--examples 6] [--repeats 3] [--max-new-tokens 16] [--max-new-tokens-step1 64]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import machine, write_section  # noqa: E402
from sdrt_cli.backbone import load_backbone  # noqa: E402
from sdrt_cli.ensemble import load_ensemble  # noqa: E402
from sdrt_cli.evaluate import CotMethod, GenerationSettings, PromptMethod, SdrtMethod  # noqa: E402
from sdrt_cli.packs import load_pack  # noqa: E402
from sdrt_plugins.datasets.synthetic_charts import SyntheticCharts  # noqa: E402

BACKBONE = "llava-next-bench"


def sdrt(*args) -> None:
    from sdrt_cli.cli import main

    try:
        main([str(a) for a in args])
    except SystemExit as exc:
        if exc.code not in (0, None):
            raise SystemExit(f"sdrt {' '.join(map(str, args))} failed with exit code {exc.code}") from None


def build_adapters(work: Path, train_examples: int) -> Path:
    traces, adapters = work / "traces", work / "adapters"
    sdrt("traces", "--backbone", BACKBONE, "--dataset", "synthetic-charts", "--split", "train", "--limit", train_examples,
         "--prompts", "4", "--max-new-tokens-step1", "8", "--max-new-tokens-step2", "4", "--out", traces)
    sdrt("distill", "--traces", traces, "--out", adapters, "--max-steps", "2", "--batch-size", "2")
    sdrt("ensemble", "--adapters", adapters, "--traces", traces, "--members", "4", "--steps", "100")
    return adapters


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=16, help="answer length (cot: of step 2)")
    parser.add_argument("--max-new-tokens-step1", type=int, default=64, help="cot: length of the analysis")
    parser.add_argument("--train-examples", type=int, default=4)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        adapters = build_adapters(Path(tmp), args.train_examples)
        backbone = load_backbone(BACKBONE, seed=0, device="cpu", dtype="fp32")
        ensemble = load_ensemble(adapters, backbone, "k4")
    backbone.eos_token_ids = ()  # every generation runs the full budget (see the docstring)
    data = SyntheticCharts(split="validation", limit=args.examples)
    examples = list(data)
    pack = load_pack("visual_reasoning")
    methods = {"prompt": PromptMethod(), "cot": CotMethod(pack, pack.prompts[0]), "sdrt": SdrtMethod(adapters, ensemble)}
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens, max_new_tokens_step1=args.max_new_tokens_step1, batch_size=1)
    image_tokens = [backbone.encode_images(ex.images).token_counts[0] for ex in examples]

    seconds: dict[str, list[list[float]]] = {name: [[] for _ in examples] for name in methods}
    tokens: dict[str, int] = {name: 0 for name in methods}
    order = list(methods)
    for method in methods.values():  # warm-up, untimed
        with method.active(backbone):
            method.generate(backbone, data, examples[:1], settings)
    for repeat in range(args.repeats):
        for i, example in enumerate(examples):
            rotation = order[(i + repeat) % len(order):] + order[: (i + repeat) % len(order)]  # no method always runs first
            for name in rotation:
                method = methods[name]
                with method.active(backbone):
                    began = time.perf_counter()
                    (out,) = method.generate(backbone, data, [example], settings)
                    seconds[name][i].append(time.perf_counter() - began)
                if repeat == 0:
                    tokens[name] += len(out.output_ids) + len(out.extra.get("y1_ids", []))

    latency = {name: statistics.mean(statistics.median(r) for r in per_example) for name, per_example in seconds.items()}
    ratio = {name: latency[name] / latency["prompt"] for name in methods}
    n = len(examples)
    raw = {
        "machine": machine(),
        "backbone": backbone.record().to_json(),
        "examples": n,
        "repeats": args.repeats,
        "max_new_tokens": args.max_new_tokens,
        "max_new_tokens_step1": args.max_new_tokens_step1,
        "image_tokens_per_example": image_tokens,
        "ensemble": {"members": ensemble.members, "feature_layer": ensemble.feature_layer, "adapter_layers": ensemble.adapters[0].layers, "pos": ensemble.pos},
        "latency_seconds_per_example": latency,
        "ratio_to_prompt": ratio,
        "new_tokens_per_example": {name: tokens[name] / n for name in methods},
        "seconds_per_example_and_repeat": seconds,
        "torch_threads": torch.get_num_threads(),
    }
    md = f"""## Inference cost (`python bench/infer.py --examples {n} --repeats {args.repeats} --max-new-tokens {args.max_new_tokens} --max-new-tokens-step1 {args.max_new_tokens_step1}`)

`llava-next-bench` ({backbone.hidden_size}-d, {len(backbone.decoder_layers)} layers, random weights, real anyres image processor:
{min(image_tokens)}–{max(image_tokens)} image tokens per example), batch size 1, greedy; answers of exactly {args.max_new_tokens} tokens,
cot's analysis exactly {args.max_new_tokens_step1} (EOS ignored so no method stops early). sdrt = K = {len(ensemble.members)} reft adapters from
`sdrt distill` on layers {ensemble.adapters[0].layers} with the trained `sdrt ensemble` predictor (pos {ensemble.pos}).
Latency = mean over examples of the median over {args.repeats} interleaved repeats. Machine: {machine()}.

| method | latency per example | × prompt | new tokens per example |
|---|---|---|---|
| prompt (single step) | {latency['prompt']:.3f} s | 1.00 | {tokens['prompt'] / n:.0f} |
| sdrt (single step + weighted K = {len(ensemble.members)} adapters) | {latency['sdrt']:.3f} s | **{ratio['sdrt']:.3f}** (target ≤ 1.10) | {tokens['sdrt'] / n:.0f} |
| cot (two steps: analysis, then answer) | {latency['cot']:.3f} s | {ratio['cot']:.2f} | {tokens['cot'] / n:.0f} |

The adapters and the predictor act only inside the prompt forward (2·pos positions on 3 layers, one
MLP on one state per example); decoding sees their effect through the KV cache, so sdrt costs what
the plain prompt costs.  cot pays the image prompt forward once (its step 2 reuses the step-1 KV
cache), then generates the analysis, runs the step-2 prompt and generates the answer: its extra
cost is the second generation, which grows with the analysis length.
"""
    write_section("infer", md, raw)
    print(md)


if __name__ == "__main__":
    main()
