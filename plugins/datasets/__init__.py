"""Built-in datasets: the five benchmarks of the SDRT paper (Table 1), read from local files or
the local Hugging Face cache (never downloaded), plus generated synthetic charts and the instruction pools of `sdrt calibrate`."""

from sdrt_cli.hookspecs import hookimpl


@hookimpl
def register_datasets(register):
    from sdrt_plugins.datasets.chartqa import ChartQA
    from sdrt_plugins.datasets.docvqa import DocVQA, InfographicVQA
    from sdrt_plugins.datasets.figureqa import FigureQA
    from sdrt_plugins.datasets.mmmu import MMMU

    for dataset_class in (DocVQA, InfographicVQA, ChartQA, FigureQA, MMMU):
        register(dataset_class.name, dataset_class)

    from sdrt_plugins.datasets.synthetic_charts import SyntheticCharts

    register("synthetic-charts", SyntheticCharts)

    from sdrt_plugins.datasets.pool import PoolDataset

    register("pool", PoolDataset)
