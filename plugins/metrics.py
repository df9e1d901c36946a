"""Built-in answer metrics (``sdrt_cli.metrics``), registered like any plugin's."""

from sdrt_cli.hookspecs import hookimpl


@hookimpl
def register_metrics(register):
    from sdrt_cli.metrics.anls import ANLS
    from sdrt_cli.metrics.base import ExactMatch
    from sdrt_cli.metrics.extracted import ExtractedRelaxedAccuracy
    from sdrt_cli.metrics.mmmu import MMMUAccuracy
    from sdrt_cli.metrics.relaxed import RelaxedAccuracy
    from sdrt_cli.metrics.yes_no import YesNoAccuracy

    for metric_class in (ANLS, RelaxedAccuracy, ExtractedRelaxedAccuracy, YesNoAccuracy, MMMUAccuracy, ExactMatch):
        register(metric_class.name, metric_class)
