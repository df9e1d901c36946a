"""Built-in datasets."""

from sdrt_cli.hookspecs import hookimpl


@hookimpl
def register_datasets(register):
    from sdrt_plugins.datasets.synthetic_charts import SyntheticCharts

    register("synthetic-charts", SyntheticCharts)
