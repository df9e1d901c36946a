"""The weighted adapter ensemble (SDRT §3.2.4): one forward pass, N adapters, per-input weights.

What the predictor reads
========================
For an intervention run whose adapters act on decoder layers ``L`` (the paper: the last 3), let
``f = min(L)`` be the first intervened layer.  The predictor's input is the INPUT of decoder layer
``f`` (= the output of layer ``f - 1``; the token embeddings when ``f = 0``) at the LAST prompt
token of the single-step student prompt.  That state is computed before any intervention touches
the sequence, so in one forward pass a pre-hook on layer ``f`` reads it, computes
``w = softmax(MLP(state))`` over the K member adapters, and hands ``w`` to the adapters' hooks
before layer ``f`` runs.  The last prompt token is used (not a mean over the prompt) because the
prompt is mostly image tokens (~2,000-2,900 on LLaVA-NeXT), which would swamp a mean, while the
last position has attended over image and question and is the state that predicts the answer.

Labels: example x's label is the member prompt whose trace had the highest ``confidence`` in the
trace store (the mean top-token probability over the prompt's y2; ties go to the earlier member);
with ``label = "correct-then-confident"`` the most confident among the members whose traces the
store scored right, falling back to the most confident (:func:`sdrt_cli.selection.confidence_labels`).
The predictor (LayerNorm without affine -> Linear -> GELU -> Linear) is trained with cross-entropy
on features computed once, under no_grad, from the base model; a seeded held-out fraction picks
the training step kept (lowest held-out cross-entropy) and reports accuracy next to the
majority-label baseline.  Optionally (``kl_epochs``, ``sdrt ensemble --kl-epochs``) the predictor is
then fine-tuned end to end on KL(most confident teacher ‖ weighted ensemble) at the teacher's answer
rows, the epoch with the lowest held-out KL kept (``finetune_predictor_kl``).

On disk, beside the adapters: ``ADAPTERS/ensembles/NAME/adapter.safetensors`` + ``adapter.json``
(format ``sdrt-ensemble``: members, feature layer, predictor shape, training report, backbone
identity) + ``run.json``.  A ``uniform`` ensemble has no predictor: w = 1/K for every input.

Modules: ``runtime`` (what ``sdrt eval`` needs: :func:`load_ensemble`, :class:`Ensemble` and its
hook; it imports no training code), ``predictor`` (cross-entropy training), ``finetune`` (the KL
phase), ``build`` (:func:`build_ensemble`).  Every public name is importable from
``sdrt_cli.ensemble``.
"""

from __future__ import annotations

from sdrt_cli.lazy import lazy_exports

# public name -> its home: a submodule, or a full module path; resolved on first use, so that
# importing one part (say the eval-time runtime) never loads the others (training code)
_HOMES = {
    "ENSEMBLES_DIR": "runtime",
    "ENSEMBLE_FORMAT": "runtime",
    "Ensemble": "runtime",
    "EnsembleHandle": "runtime",
    "EnsemblePredictor": "runtime",
    "VisionInput": "runtime",
    "check_members_compatible": "runtime",
    "check_run_backbone": "runtime",
    "ensemble_dir": "runtime",
    "first_intervened_layer": "runtime",
    "last_prompt_states": "runtime",
    "layer_input_tap": "runtime",
    "load_ensemble": "runtime",
    "load_intervention_run": "runtime",
    "predictor_entropy": "runtime",
    "save_ensemble": "runtime",
    "saved_ensembles": "runtime",
    "vision_input": "runtime",
    "TrainSettings": "predictor",
    "confidence_labels": "predictor",
    "split_holdout": "predictor",
    "train_predictor": "predictor",
    "finetune_predictor_kl": "finetune",
    "build_ensemble": "build",
    "check_store_matches": "build",
    "open_store_dataset": "build",
    "select_members": "build",
    "store_features": "build",
    # defined elsewhere, still importable from here
    "prompt_features": "sdrt_cli.prompting",
    "segment_prompt_mask": "sdrt_cli.prompting",
    "student_prompt_ids": "sdrt_cli.prompting",
}

__all__ = sorted(_HOMES)


__getattr__, __dir__ = lazy_exports(__name__, _HOMES)
