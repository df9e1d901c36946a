"""Teacher and student rows are the same places.

End to end, without the alignment code under test: the teacher's own step-2 prompt (rebuilt here
from the record's texts) + y2[:-1] fed through distill's student path with identity adapters must
reproduce the stored record (hidden states and next-token distributions).  A pack whose step 2 ends
otherwise than the single-step prompt is warned about by `packs validate` and refused by distill and
by the teacher-forced measurement; a store made before prompt endings were recorded still works,
with one warning line.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sdrt_cli.backbone import Turn, load_backbone
from sdrt_cli.distill import Distiller, ExampleInputs, StudentSpec, TraceSource, TrainSettings
from sdrt_cli.errors import SdrtError
from sdrt_cli.io import sha256_file
from sdrt_cli.plugins import register_plugin, unregister_plugin
from sdrt_cli.teacher_forcing import AnswerTarget, answer_logits
from sdrt_cli.trace_store import TraceStore
from sdrt_plugins.datasets.synthetic_charts import SyntheticCharts
from sharp_backbone import SharpBackbonePlugin, sharp_tiny

TRACE = [
    "traces", "--dataset", "synthetic-charts", "--split", "train", "--limit", "2",
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
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a shared 2-core box: avoid OpenMP oversubscription
    yield
    torch.set_num_threads(threads)


def teacher_kl(student_logits: torch.Tensor, topk_ids, topk_logprobs, tail_mass) -> torch.Tensor:
    """KL(teacher ‖ student) per row over the teacher's top-k + one tail bucket, written out here."""
    student = student_logits.double().log_softmax(-1)
    top = student.gather(-1, topk_ids.long())
    student_tail = torch.log1p(-top.exp().sum(-1).clamp(max=1 - 1e-12))
    teacher = topk_logprobs.double()
    teacher_tail = tail_mass.double().clamp_min(1e-12)
    return (teacher.exp() * (teacher - top)).sum(-1) + teacher_tail * (teacher_tail.log() - student_tail)


@pytest.mark.slow
def test_the_teachers_own_prompt_through_the_student_path_reproduces_the_record(tmp_path):
    register_plugin(SharpBackbonePlugin(), "sharp-tiny-alignment")
    try:
        assert run_main(*TRACE, "--backbone", "llava-next-tiny-sharp", "--prompts", "2", "--out", tmp_path / "store") == 0
    finally:
        unregister_plugin("sharp-tiny-alignment")
    backbone = sharp_tiny()
    store = TraceStore(tmp_path / "store")
    dataset = SyntheticCharts(split="train", limit=2)
    examples = dict(enumerate(dataset))
    layers = store.fingerprint["settings"]["layers"]
    checked = 0
    for prompt_id in store.prompt_ids:
        spec = StudentSpec(adapter="reft", layers=layers, compare_layers=layers, pos=3, rank=2)
        trainer = Distiller(backbone, TraceSource(store, dataset, [prompt_id], examples), spec, TrainSettings(), "mse+kl", {}, tmp_path / prompt_id, {})
        for index, example in examples.items():
            record = store.record(index, prompt_id)
            # the teacher's step-2 prompt, rebuilt from the record's own texts
            encoded = backbone.encode_images(example.images)
            turns = [Turn("user", record.step1_text, images=len(example.images)), Turn("assistant", record.y1), Turn("user", record.step2_text)]
            step2_prompt = backbone.tokenize(backbone.render_chat(turns), encoded.token_counts)
            assert step2_prompt[-record.prompt_rows :] == record.prompt_tail_ids
            rows = record.prompt_rows + len(record.y2_ids) - 1
            trainer.inputs[index] = ExampleInputs(index, example.id, step2_prompt, {prompt_id: record.y2_ids[:-1]}, {prompt_id: rows})
            with torch.no_grad():
                (batch,) = trainer.forward_units(0, [trainer.example_state(index)], frozenset({"hidden", "logits"}), training=False)
            student_hidden, student_logits = batch.student_hidden[0], batch.student_logits[0]
            relative_mse = float((student_hidden - record.hidden).pow(2).mean() / record.hidden.pow(2).mean())
            teacher = (record.topk_ids, record.topk_logprobs, record.tail_mass)
            kl = teacher_kl(student_logits, *teacher)
            assert relative_mse < 1e-9
            assert float(kl.max()) < 1e-5
            # the check can fail: the same rows one place off are far from the teacher
            shifted = teacher_kl(student_logits[1:], *(t[:-1] for t in teacher))
            assert float(shifted.mean()) > 0.1
            assert float((student_hidden[1:] - record.hidden[:-1]).pow(2).mean() / record.hidden.pow(2).mean()) > 0.01
            checked += 1
    assert checked == 4


MISMATCHED_PACK = """
name = "paper-style"
version = "1"
description = "a step 2 that does not end like the single-step prompt"

[[prompts]]
id = "answer-after-analysis"
category = "c"
step1 = "{question}\\nDescribe the image first."
step2 = "Based on your analysis, answer the question: {question}"
"""


@pytest.fixture(scope="module")
def mismatched_store(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mismatch")
    (root / "pack.toml").write_text(MISMATCHED_PACK)
    out = root / "store"
    assert run_main(*mismatched_trace(out)) == 0
    return out


def mismatched_trace(out: Path) -> list:
    # 8 prompt rows: more than the chat template's own closing tokens, which every prompt shares
    args = [*TRACE[: TRACE.index("--pos")], "--pos", "8", *TRACE[TRACE.index("--pos") + 2 :]]
    return [*args, "--backbone", "llava-next-tiny", "--pack", out.parent / "pack.toml", "--out", out]


def test_packs_validate_warns_about_a_step_2_that_ends_otherwise(cli, mismatched_store):
    shipped = Path(__file__).resolve().parents[1] / "prompt_packs" / "visual_reasoning.toml"
    result = cli("packs", "validate", mismatched_store.parent / "pack.toml", shipped)
    assert result.exit_code == 0
    warnings = [line for line in result.err.splitlines() if line.startswith("Warning:")]
    assert len(warnings) == 1  # the shipped pack follows the rule
    assert "prompt 1 ('answer-after-analysis') field 'step2' does not end with \"{question}\\n{instruction}\"" in warnings[0]
    # `sdrt traces` says it before tracing (here: a resume with nothing left to do)
    again = cli(*mismatched_trace(mismatched_store))
    assert again.exit_code == 0 and "Wrote 2 trace records" in again.out
    assert [line for line in again.err.splitlines() if line.startswith("Warning:")] == warnings


def test_distill_refuses_a_store_whose_prompt_endings_differ_in_one_sentence(cli, mismatched_store, tmp_path):
    tiny = load_backbone("llava-next-tiny", seed=0)
    record = TraceStore(mismatched_store).record(0, "answer-after-analysis")
    teacher_text = tiny.decode(record.prompt_tail_ids)
    result = cli("distill", "--traces", mismatched_store, "--out", tmp_path / "adapters", "--epochs", "1")
    assert result.exit_code == 1
    message = result.err.strip()
    assert message.count("\n") == 0 and "Traceback" not in result.output
    assert "prompt 'answer-after-analysis' does not end like the student prompt on example 'synthetic-charts/train/0'" in message
    assert f"its step-2 prompt's last 8 tokens are {teacher_text!r} but the single-step prompt's are " in message
    assert not (tmp_path / "adapters" / "manifest.json").exists()

    # the teacher-forced measurement (ensemble --kl-epochs, bench/fidelity) refuses it the same way
    dataset = SyntheticCharts(split="train", limit=2)
    with pytest.raises(SdrtError, match="prompt 'answer-after-analysis' does not end like the student prompt"):
        with torch.no_grad():
            answer_logits(tiny, dataset, [dataset.example(0)], [[AnswerTarget.of(record)]])


def test_a_store_without_prompt_endings_is_read_with_one_warning(cli, tmp_path):
    """Stores made before ``prompt_tail_ids`` existed cannot be checked: distill says so once and trains."""
    store = tmp_path / "store"
    assert run_main(*TRACE, "--backbone", "llava-next-tiny", "--prompts", "1", "--out", store) == 0
    manifest = json.loads((store / "manifest.json").read_text())
    for shard in manifest["shards"]:
        path = store / "shards" / f"{shard['name']}.jsonl"
        lines = [json.loads(line) for line in path.read_text().splitlines()]
        path.write_text("".join(json.dumps({k: v for k, v in line.items() if k != "prompt_tail_ids"}) + "\n" for line in lines))
        shard["sha256"]["jsonl"] = sha256_file(path)
    (store / "manifest.json").write_text(json.dumps(manifest))
    assert TraceStore(store).record(0, TraceStore(store).prompt_ids[0]).prompt_tail_ids is None

    import sdrt_cli.teacher_forcing as teacher_forcing

    teacher_forcing._warned_unchecked = False
    result = cli("distill", "--traces", store, "--out", tmp_path / "adapters", "--epochs", "1", "--loss", "mse")
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "predates the stored prompt endings" in warnings[0]


@pytest.mark.parametrize("weights", ["fp32", "bf16"])
def test_student_logits_are_float32_under_bf16_autocast(weights):
    """The final norm and LM head the KL reads run in float32 inside bf16 autocast, whatever the
    weights' dtype: the KL then equals the float32 computation, where bf16 logits visibly miss it."""
    backbone = sharp_tiny(dtype=weights)
    hidden = torch.randn((6, backbone.hidden_size), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        # the float32 computation, by hand from float32 copies of the weights
        norm = backbone.model.model.language_model.norm
        normed = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon) * norm.weight.float()
        reference = normed @ backbone.model.lm_head.weight.float().T
        with torch.autocast("cpu", dtype=torch.bfloat16):
            plain = backbone.lm_logits(backbone.final_norm(hidden.to(backbone.dtype)))
            logits = backbone.float32_logits(hidden)
    assert plain.dtype == torch.bfloat16  # what autocast alone (or bf16 weights) would hand the loss
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, reference, rtol=1e-5, atol=1e-4)
    target = reference.double().log_softmax(-1)

    def kl(student):
        return float((target.exp() * (target - student.double().log_softmax(-1))).sum(-1).mean())

    assert kl(logits) < 1e-8 and kl(plain) > 1e-5, (kl(logits), kl(plain))


def test_distill_reads_float32_logits_inside_autocast(tmp_path, monkeypatch):
    """The trainer's forward under (CPU) bf16 autocast hands the loss float32 logits."""
    store = tmp_path / "store"
    assert run_main(*TRACE, "--backbone", "llava-next-tiny", "--prompts", "1", "--out", store) == 0
    backbone = load_backbone("llava-next-tiny", seed=0)
    trace_store = TraceStore(store)
    dataset = SyntheticCharts(split="train", limit=2)
    layers = trace_store.fingerprint["settings"]["layers"]
    spec = StudentSpec(adapter="reft", layers=layers, compare_layers=layers, pos=3, rank=2)
    source = TraceSource(trace_store, dataset, trace_store.prompt_ids, dict(enumerate(dataset)))
    trainer = Distiller(backbone, source, spec, TrainSettings(), "kl", {}, tmp_path / "o", {})
    with torch.no_grad():
        (exact,) = trainer.forward_units(0, [trainer.example_state(0)], frozenset({"logits"}), training=False)
        monkeypatch.setattr(trainer, "autocast", lambda: torch.autocast("cpu", dtype=torch.bfloat16))
        (mixed,) = trainer.forward_units(0, [trainer.example_state(0)], frozenset({"logits"}), training=False)
    assert exact.student_logits.dtype == mixed.student_logits.dtype == torch.float32
    # the layers ran in bf16, the head did not: the logits differ by the layers' rounding only
    torch.testing.assert_close(mixed.student_logits, exact.student_logits, rtol=0.05, atol=0.05)
