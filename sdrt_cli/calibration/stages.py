"""The stages of one calibration iteration (MmDC's three phases), each a function of the run and
the iteration: instruction tuning through the `traces`, `distill`, `ensemble` and `eval` commands
themselves (``invoke``), assessment and augmentation with the models in-process.  Each stage is
resumable: it skips what an interrupted earlier attempt already wrote."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Callable

from sdrt_cli.calibration.pools import (
    ENSEMBLE_NAME,
    Run,
    read_rows,
    seed_store,
    write_pool,
)
from sdrt_cli.progress import progress_bar

# -- multimodal alignment (MmDC's stage 1, before the first iteration) -----------------------


def stage_align(run: Run, invoke) -> None:
    """Only the multimodal projector trained on the source split's gold answers (``sdrt distill
    --adapter projector --loss ce``); :attr:`Run.projector` hands it to every later stage."""
    out = run.align_dir
    args = {
        **run.sets.get("align", {}),
        "adapter": "projector", "loss": "ce", "out": str(out), "resume": _exists_on_rank0(out),
        "dataset": run.opts["dataset"], "data_dir": run.opts["data_dir"], "split": run.opts["split"], "limit": run.opts["limit"],
        "dataset_option": list(run.opts["dataset_option"]), "backbone": run.opts["backbone"], "model": run.opts["model"],
        "device": run.opts["device"], "model_dtype": run.opts["model_dtype"], "seed": run.opts["seed"],
    }
    invoke("distill", args)


# -- instruction tuning ---------------------------------------------------------------------


def stage_traces(run: Run, n: int, invoke) -> None:
    store = run.iteration_dir(n) / "traces"
    args = {
        **run.sets.get("traces", {}),
        "out": str(store), "dataset": "pool", "data_dir": run.opts["data_dir"], "dataset_option": run.pool_options(run.tuning(n)),
        "pack": run.opts["pack"], "backbone": run.opts["backbone"], "model": run.opts["model"], "device": run.opts["device"],
        "model_dtype": run.opts["model_dtype"], "seed": run.opts["seed"],
        # the later stages rebuild the backbone the store records: with the aligned projector if any
        "projector": run.projector,
    }
    if n > 1:
        from sdrt_cli import distributed

        if distributed.is_main():
            seed_store(run.iteration_dir(n - 1) / "traces", store, run.tuning(n))
        distributed.barrier()  # the copied records are on disk before any rank traces the rest
    invoke("traces", args)


def stage_distill(run: Run, n: int, invoke) -> None:
    adapters = run.iteration_dir(n) / "adapters"
    args = {
        **run.sets.get("distill", {}),
        "traces": str(run.iteration_dir(n) / "traces"), "out": str(adapters), "device": run.opts["device"],
        "model_dtype": run.opts["model_dtype"], "seed": run.opts["seed"], "resume": _exists_on_rank0(adapters),
        # warm start: the student of iteration N starts from the adapters of iteration N-1
        "init_from": str(run.iteration_dir(n - 1) / "adapters") if n > 1 else None,
    }
    invoke("distill", args)


def _exists_on_rank0(path: Path) -> bool:
    """Whether ``path`` exists, as rank 0 sees it before any rank starts the stage that creates it
    (every rank then passes the command the same options)."""
    from sdrt_cli import distributed

    return distributed.broadcast_object(path.exists())


def stage_ensemble(run: Run, n: int, invoke) -> None:
    args = {
        **run.sets.get("ensemble", {}),
        "adapters": str(run.iteration_dir(n) / "adapters"), "traces": str(run.iteration_dir(n) / "traces"), "name": ENSEMBLE_NAME,
        "device": run.opts["device"], "model_dtype": run.opts["model_dtype"], "seed": run.opts["seed"],
    }
    invoke("ensemble", args)


def stage_heldout(run: Run, n: int, invoke) -> None:
    """The student of iteration N scored on the untouched --eval-split (MmDC's Figure 4)."""
    if run.opts["eval_split"] is None:
        return
    out = run.iteration_dir(n) / "heldout"
    args = {
        "method": "sdrt", "adapters": str(run.iteration_dir(n) / "adapters"), "ensemble": ENSEMBLE_NAME, "out": str(out),
        "dataset": run.opts["dataset"], "data_dir": run.opts["data_dir"], "split": run.opts["eval_split"], "limit": run.opts["eval_limit"],
        "dataset_option": list(run.opts["dataset_option"]), "backbone": run.opts["backbone"], "model": run.opts["model"],
        "device": run.opts["device"], "model_dtype": run.opts["model_dtype"], "seed": run.opts["seed"],
        "max_new_tokens": run.opts["max_new_tokens"], "overwrite": _exists_on_rank0(out), "report": False,
    }
    invoke("eval", args)


# -- assessment -----------------------------------------------------------------------------


def generate_in_shards(path: Path, units: list[tuple[Any, Callable[[], tuple[dict[str, Any], Any]]]], key_of: Callable[[dict[str, Any]], Any], batch_size: int, description: str, generate) -> None:
    """The record of every unit in ``path``, in the units' order, each generated once.

    ``units``: (key, make) in the order of a one-process run; ``make()`` gives the record's key
    fields and the Example to generate from, ``generate(batch)`` the records of a batch of them.
    Unit i is rank i mod W's (as `sdrt eval` deals examples); records that ``path`` or an interrupted
    attempt's per-rank files already hold are kept, and each rank generates the rest of its share,
    appending its records batch by batch to its own ``PATH.partial/rNNN.jsonl`` (a kill loses at
    most the batch in flight); rank 0 then writes ``path`` whole, the same for any number of
    processes."""
    import itertools
    import shutil

    from sdrt_cli import distributed
    from sdrt_cli.io import append_jsonl, read_jsonl

    partial = path.with_name(f"{path.stem}.partial")

    def recorded() -> dict[Any, dict[str, Any]]:
        files = [path, *sorted(partial.glob("r*.jsonl"))]
        return {key_of(record): record for file in files for record in read_jsonl(file)}

    done = recorded()
    distributed.barrier()  # every rank has read what earlier attempts left before any rank appends
    world, rank = distributed.world_size(), distributed.rank()
    mine = [make for i, (key, make) in enumerate(units) if i % world == rank and key not in done]
    own = partial / f"r{rank:03d}.jsonl"
    stream = (make() for make in mine)
    with progress_bar(description, total=len(mine)) as bar:
        while batch := list(itertools.islice(stream, batch_size)):
            append_jsonl(own, *generate(batch))
            bar.advance(len(batch))
    distributed.barrier()  # every rank's records are on disk
    if distributed.is_main():
        records = recorded()
        write_pool(path, [records[key] for key, _ in units])
        shutil.rmtree(partial, ignore_errors=True)  # all of it is in ``path`` now
    distributed.barrier()


def stage_answers(run: Run, n: int, invoke=None) -> None:
    """The teacher's and the student's answers to every cache-pool instruction."""
    from sdrt_cli.ensemble import load_ensemble
    from sdrt_cli.evaluate import CotMethod, PromptMethod, SdrtMethod
    from sdrt_cli.packs import load_pack

    data = run.open_pool(run.cache(n))
    model = run.open_model()
    adapters = run.iteration_dir(n) / "adapters"
    if run.opts["teacher"] == "two-step":
        pack = load_pack(run.opts["pack"])
        teacher = CotMethod(pack, pack.prompts[0])
    else:
        teacher = PromptMethod()
    student = SdrtMethod(adapters, load_ensemble(adapters, model, ENSEMBLE_NAME))
    settings = run.settings(run.opts["max_new_tokens"])
    references = list(data.references())
    for role, method in (("teacher", teacher), ("student", student)):

        def generate(batch, method=method):
            # not evaluate_method: that also parses and scores, and a generated question has no gold answer
            outputs = method.generate(model, data, [example for _, example in batch], settings)
            return [{**key, "method": method.name, "output": out.output} for (key, _), out in zip(batch, outputs)]

        units = [(i, functools.partial(_indexed, i, ref)) for i, ref in enumerate(references)]
        with method.active(model):
            generate_in_shards(run.iteration_dir(n) / "answers" / f"{role}.jsonl", units, _by_index, settings.batch_size, f"answers of the {role}", generate)


def _indexed(i: int, ref) -> tuple[dict[str, Any], Any]:
    example = ref.materialise()
    return {"index": i, "id": example.id}, example


def _by_index(record: dict[str, Any]) -> int:
    return record["index"]


class RolePrompts:
    """What `generate_single_step` needs of a dataset to send a role's rendered text as the user turn."""

    def format_question(self, example) -> str:
        return example.question


def role_generator(run: Run, backbone: str | None, max_new_tokens: int):
    """A role's batch generator ([(key fields, Example with the rendered text)] -> records) and its batch size."""
    from sdrt_cli.evaluate import generate_single_step

    model = run.open_model(backbone)
    settings = run.settings(max_new_tokens)

    def generate(batch):
        outputs = generate_single_step(model, RolePrompts(), [example for _, example in batch], settings, "role")
        return [{**key, "output": out.output} for (key, _), out in zip(batch, outputs)]

    return generate, settings.batch_size


def answers_by_index(run: Run, n: int, role: str) -> dict[int, dict[str, Any]]:
    from sdrt_cli.io import read_jsonl

    return {record["index"]: record for record in read_jsonl(run.iteration_dir(n) / "answers" / f"{role}.jsonl")}


def stage_judge(run: Run, n: int, invoke=None) -> None:
    """Each cache instruction judged twice, teacher's answer first and student's answer first."""
    from sdrt_cli.data import Example
    from sdrt_cli.roles import load_role_pack

    if run.opts["assessor"] != "judge":
        return
    roles = load_role_pack(run.opts["roles"])
    data = run.open_pool(run.cache(n))
    teacher, student = answers_by_index(run, n, "teacher"), answers_by_index(run, n, "student")

    def make(i: int, ref, order: str) -> tuple[dict[str, Any], Example]:
        example = ref.materialise()
        first, second = (teacher[i], student[i]) if order == "teacher-first" else (student[i], teacher[i])
        text = roles.assessor.render(question=data.question_text(example), answer_1=first["output"], answer_2=second["output"])
        return {"index": i, "id": example.id, "order": order}, Example(id=f"{example.id}#{order}", images=example.images, question=text)

    units = [((i, order), functools.partial(make, i, ref, order)) for i, ref in enumerate(data.references()) for order in ("teacher-first", "student-first")]
    generate, batch_size = role_generator(run, run.opts["assessor_backbone"], run.opts["judge_max_new_tokens"])
    generate_in_shards(run.iteration_dir(n) / "judge.jsonl", units, lambda record: (record["index"], record["order"]), batch_size, "judgements", generate)


def stage_assess(run: Run, n: int, invoke=None) -> None:
    """Scores, difficulty (Eq. 6) and difficult/easy for every cache instruction: RUN/iter-N/assessed.jsonl."""
    from sdrt_cli import distributed
    from sdrt_cli.assessment import Assessment
    from sdrt_cli.calibration import pure as calibration
    from sdrt_cli.io import read_jsonl
    from sdrt_cli.metrics import get_metric

    if not distributed.is_main():  # reads the answers and judgements, writes one file
        return
    tau = run.opts["tau"]
    rows = read_rows(run.cache(n))
    data = run.open_pool(run.cache(n))
    position = {example_id: i for i, example_id in enumerate(data.ids())}
    teacher, student = answers_by_index(run, n, "teacher"), answers_by_index(run, n, "student")
    verdicts: dict[int, dict[str, str]] = {}
    for record in read_jsonl(run.iteration_dir(n) / "judge.jsonl"):
        verdicts.setdefault(record["index"], {})[record["order"]] = record["output"]
    metric = get_metric(data.metric) if run.opts["assessor"] == "metric" else None
    examples = {i: ex for i, ex in enumerate(data)} if metric is not None else {}
    assessed = []
    for row in rows:
        row = {**row, "assessed_in": None, "scores": None, "difficulty": None, "label": None, "excluded": None, "judgements_parsed": None}
        i = position.get(row["id"])
        if i is None:  # a rejected augmentation: not part of the pool
            assessed.append(row)
            continue
        row["assessed_in"] = n
        row["answers"] = {"teacher": teacher[i]["output"], "student": student[i]["output"]}
        if metric is not None:
            example = examples[i]
            if not example.answers:
                row["excluded"] = "no gold answer to score with the metric"
                assessed.append(row)
                continue
            assessment = Assessment.from_metric(metric.score(teacher[i]["output"], example), metric.score(student[i]["output"], example))
        else:
            orders = verdicts.get(i, {})
            result = calibration.judge(orders.get("teacher-first", ""), orders.get("student-first", ""))
            row["judgements_parsed"] = result.parsed
            row["judgements"] = orders
            assessment = result.assessment()
            if assessment is None:
                row["excluded"] = "unparseable judgement"
                assessed.append(row)
                continue
        row["scores"] = {"teacher": assessment.teacher, "student": assessment.student}
        row["difficulty"] = assessment.difficulty()
        row["label"] = "difficult" if calibration.is_difficult(assessment, tau) else "easy"
        assessed.append(row)
    write_pool(run.iteration_dir(n) / "assessed.jsonl", assessed)


# -- augmentation ---------------------------------------------------------------------------


def stage_augment(run: Run, n: int, invoke=None) -> None:
    """One new question per difficult instruction, kept when ROUGE-L < 0.7 against every other
    question of its image: RUN/iter-N/augmented.jsonl (accepted and rejected, with the reason)."""
    from sdrt_cli import distributed
    from sdrt_cli.calibration import pure as calibration
    from sdrt_cli.data import Example
    from sdrt_cli.io import read_jsonl
    from sdrt_cli.roles import load_role_pack

    assessed = read_rows(run.iteration_dir(n) / "assessed.jsonl")
    difficult = [row for row in assessed if row.get("label") == "difficult"]
    raw_path = run.iteration_dir(n) / "augment.jsonl"
    if difficult and not raw_path.exists():  # written whole once every new question is
        roles = load_role_pack(run.opts["roles"])
        data = run.open_pool(run.cache(n))
        wanted = {row["id"] for row in difficult}

        def make(ref) -> tuple[dict[str, Any], Example]:
            example = ref.materialise()
            text = roles.augmentor.render(question=data.question_text(example))
            return {"id": example.id}, Example(id=f"{example.id}#augment", images=example.images, question=text)

        units = [(ref.id, functools.partial(make, ref)) for ref in data.references() if ref.id in wanted]
        generate, batch_size = role_generator(run, run.opts["augmentor_backbone"], run.opts["augment_max_new_tokens"])
        generate_in_shards(raw_path, units, lambda record: record["id"], batch_size, "new questions", generate)
    if not distributed.is_main():  # the rest reads files and writes one
        return
    written = {record["id"]: record["output"] for record in read_jsonl(raw_path)}
    present = [row for row in assessed if row.get("status") != "rejected"]
    candidates: list[dict[str, Any]] = []
    for row in difficult:
        question = calibration.clean_generated_question(written[row["id"]])
        same_image = [(r["id"], r["question"]) for r in present + [c for c in candidates if c["status"] == "accepted"] if r["image"]["index"] == row["image"]["index"]]
        if not question:
            accepted, reason = False, "empty question"
        else:
            accepted, reason = calibration.diversity_check(question, same_image)
        candidates.append({
            "id": f"{row['id']}~a{n}", "parent_id": row["id"], "image": row["image"], "question": question or written[row["id"]],
            "origin": "augmented", "iteration": n, "status": "accepted" if accepted else "rejected", "reason": reason,
            "scores": None, "difficulty": None, "label": None,
        })
    write_pool(run.iteration_dir(n) / "augmented.jsonl", candidates)


def stage_update(run: Run, n: int, invoke=None) -> None:
    """The pools of iteration N+1 (and RUN/pools/, the latest pools)."""
    from sdrt_cli import distributed
    from sdrt_cli.calibration import pure as calibration

    if not distributed.is_main():  # reads files, writes the pools
        return

    tuning = read_rows(run.tuning(n))
    assessed = read_rows(run.iteration_dir(n) / "assessed.jsonl")
    candidates = read_rows(run.iteration_dir(n) / "augmented.jsonl")
    accepted = [row for row in candidates if row["status"] == "accepted"]
    update = calibration.update_pools(tuning, assessed, accepted, run.opts["seed"], n)
    cache = update.cache + [row for row in candidates if row["status"] == "rejected"]
    write_pool(run.iteration_dir(n) / "sampled_easy.jsonl", [{"id": i} for i in update.sampled_easy])
    write_pool(run.cache(n + 1), cache)
    write_pool(run.tuning(n + 1), update.tuning)
    write_pool(run.out / "pools" / "cache.jsonl", cache)
    write_pool(run.out / "pools" / "tuning.jsonl", update.tuning)


# every phase of an iteration, in order: (name, function(run, n, invoke))
STAGES = (
    ("traces", stage_traces), ("distill", stage_distill), ("ensemble", stage_ensemble), ("heldout", stage_heldout),
    ("answers", stage_answers), ("judge", stage_judge), ("assess", stage_assess),
    ("augment", stage_augment), ("update", stage_update),
)
