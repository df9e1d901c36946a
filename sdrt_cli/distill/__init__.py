"""Distillation: train one adapter per prompt so the single-step student reproduces the two-step teacher.

The student, per (example, prompt n) — the trace contract seen from the student side
====================================================================================
* The example's images are encoded once (``encode_images``, with ``early_layer`` when the vision skip
  connection is on; the early features are pooled by :func:`sdrt_cli.adapters.pool_vision_features`).
* The student prompt is ``S = tokenize(render_chat(student_turns(dataset, example)))`` and the fed
  sequence is ``S + y2[:-1]`` (the teacher's answer, teacher-forced; its last token is never fed).
* The teacher record has ``R = prompt_rows + len(y2) - 1`` aligned rows; they are EXACTLY the last
  ``R`` positions of the fed sequence (row j predicts the token after it).  The last ``prompt_rows``
  ids of ``S`` must be the record's ``prompt_tail_ids`` (``check_prompt_alignment``).
* Adapter ``n`` intervenes at the first and last ``pos`` positions of ``S`` only, on ``layers``.
* ``mse`` compares the student's decoder-layer outputs (residual stream before the final norm, after
  the adapter's edit) on the store's layers with the stored ``hidden``; ``kl`` compares
  ``lm_logits(final_norm(last layer output))`` at the rows, in float32 even under bf16 autocast
  (``Backbone.float32_logits``), with the stored top-k + tail bucket.
* Gold mode (``--loss ce``): the fed sequence is ``S`` + the first gold answer as the chat template
  writes an assistant turn, cut at the end of the answer text and ended with the tokenizer's EOS id
  (:func:`gold_answer_ids`), minus its last token; the rows are the last ``len(answer)`` positions and
  CE scores each answer token.  One adapter, ``gold``.

Objective and batching
======================
A step takes a global batch of B examples (shuffled per epoch from the seed).  Every adapter sees the
same B examples; adapter n's objective is ``(1/B) Σ_examples loss(example, n)`` where ``loss`` is the
composed loss evaluated on that example's own rows (so padding never leaks in and every example
weighs the same, however long its answer).  With a record selection (``sdrt distill --select``,
:mod:`sdrt_cli.selection`) adapter n sees only the batch's examples whose record for prompt n is
kept, and B becomes their number B_n; an adapter with B_n = 0 is not updated at that step (its
gradient stays None, so AdamW skips it: no momentum or decay step on nothing).  The adapters are independent: each has its own gradient
clipping, and AdamW is element-wise, so training N adapters together equals training each alone.
Sequences are right-padded (real tokens never attend to padding) and run in micro-batches of
``micro_batch_size`` sequences; gradients accumulate, which is exact because the objective is a sum.

Caching the frozen lower layers
===============================
Nothing below the first layer anything trainable touches (``f = min(intervened ∪ compared layers)``)
depends on the adapters.  An intervention edits layer f's OUTPUT, so layer f itself is frozen too:
the cache holds layer f's un-edited output, ``run_layers(embed(ids, image features), ..., 0, f + 1)``
(for LoRA on layer f, whose weights train, it holds layer f's input, ``run_layers(..., 0, f)``).  It
is computed once per example under ``no_grad`` — for all of the example's sequences, whose shared
prompt part runs once and is stored once (the answer tails run on its keys and values) — and kept in RAM up to ``cache_ram_gb``
(backbone dtype), then on disk under ``OUT/cache/`` as safetensors up to ``cache_disk_gb``; beyond
both it is recomputed (vision tower included) whenever needed.  Each step applies layer f's edit to
the cached output and runs only ``run_layers(edited, ..., f + 1, end)`` with the adapter hooks
attached (``end`` stops after the last compared layer when no loss reads logits).  The ``projector``
adapter trains what every layer's input depends on, so its student (``fresh_images``) caches nothing:
each step encodes the images again (gradients reach the projector only) and runs every layer.

Scale and resume
================
What a run fixes is the sequence of global batches (:func:`epoch_batches`: it depends on the seed and
the batch size, never on the number of processes).  Under torchrun every rank takes its slots of each
global batch (B/W examples, every step, always the same examples, so each rank's cache holds only its
own share), scales its loss by ``1/B`` of the global batch and the adapters' gradients are summed over
ranks: the gradient of the same global batch as one process, exactly in real arithmetic (on CPU the
float results agree to rounding; see docs/gpu.md for GPUs).  B must be at least the number of
processes W, so that no rank idles.
Checkpoints (every epoch and every ``save_every`` steps) hold the adapters, AdamW state, the step,
the epoch position and every rank's own RNG state (CPU and its GPU; ranks are seeded ``seed + rank``
so their dropout masks differ) in safetensors + JSON; ``resume`` continues bit-for-bit on CPU.

Modules: ``settings`` (StudentSpec, TrainSettings, the LR schedule), ``sources`` (traces or gold
answers), ``students`` (intervention adapters, or a weights adapter's: LoRA, projector), ``cache`` (the lower layers' states),
``batching`` (splits, epoch order, rank shares), ``trainer`` (:class:`Distiller`), ``artifacts`` (the
run directory: manifest, metrics, checkpoints pointer, :func:`load_adapters`).  Every public name is
importable from ``sdrt_cli.distill``.
"""

from __future__ import annotations

from sdrt_cli.lazy import lazy_exports

# public name -> its home: a submodule, or a full module path; resolved on first use, so that
# importing one part (say the eval-time runtime) never loads the others (training code)
_HOMES = {
    "DEFAULT_BATCH_SIZE": "settings",
    "SCHEDULES": "settings",
    "StudentSpec": "settings",
    "TrainSettings": "settings",
    "default_batch_size": "settings",
    "lr_at": "settings",
    "ExampleInputs": "sources",
    "check_store_examples": "sources",
    "DISTILL_SAME_DATA": "sources",
    "GOLD": "sources",
    "GoldSource": "sources",
    "TraceSource": "sources",
    "gold_answer_ids": "sources",
    "InterventionStudent": "students",
    "LoraStudent": "students",
    "build_student": "students",
    "LowerCache": "cache",
    "LowerStates": "cache",
    "epoch_batches": "batching",
    "epoch_order": "batching",
    "rank_share": "batching",
    "split_train_val": "batching",
    "Distiller": "trainer",
    "TrainState": "trainer",
    "ADAPTERS_DIR": "artifacts",
    "CACHE_DIR": "artifacts",
    "CHECKPOINTS_DIR": "artifacts",
    "CHECKPOINT_FORMAT": "artifacts",
    "CHECKPOINT_JSON": "artifacts",
    "CHECKPOINT_TENSORS": "artifacts",
    "FORMAT_VERSION": "artifacts",
    "LATEST": "artifacts",
    "MANIFEST": "artifacts",
    "MANIFEST_KIND": "artifacts",
    "METRICS": "artifacts",
    "load_adapters": "artifacts",
    "read_latest": "artifacts",
    "read_manifest": "artifacts",
    "trained_backbone": "artifacts",
    "truncate_metrics": "artifacts",
    "clear_run": "artifacts",
    "holds_run": "artifacts",
    "is_finished": "artifacts",
    "warm_start_adapters": "artifacts",
    "WeightsCheckpoint": "artifacts",
    "write_manifest": "artifacts",
}

__all__ = sorted(_HOMES)


__getattr__, __dir__ = lazy_exports(__name__, _HOMES)
