"""MmDC's distillation calibration (`sdrt calibrate`).

- :mod:`~sdrt_cli.calibration.pure`: the parts that need no model (the judge's verdict, Eq. 5 and
  Eq. 6, the ROUGE-L filter, balancing, the pools' update, reading a pool file);
- :mod:`~sdrt_cli.calibration.pools`: the run directory, its pool files and seeded trace stores;
- :mod:`~sdrt_cli.calibration.stages`: the stages of one iteration;
- :mod:`~sdrt_cli.calibration.report`: the per-iteration report;
- :mod:`~sdrt_cli.calibration.run`: the loop, :func:`~sdrt_cli.calibration.run.calibrate`.

Only the model-free parts are imported here, so reading a pool (the ``pool`` dataset) stays light.
"""

from sdrt_cli.calibration.pure import (
    ROUGE_L_LIMIT,
    ROW_FIELDS,
    JudgeResult,
    PoolUpdate,
    balance,
    clean_generated_question,
    diversity_check,
    is_difficult,
    judge,
    parse_judge_scores,
    read_pool,
    rouge_l,
    update_pools,
)

__all__ = [
    "ROUGE_L_LIMIT", "ROW_FIELDS", "JudgeResult", "PoolUpdate", "balance", "clean_generated_question", "diversity_check",
    "is_difficult", "judge", "parse_judge_scores", "read_pool", "rouge_l", "update_pools",
]
