"""``sdrt datasets list`` and ``sdrt datasets show NAME``: what is registered, and a look at records."""

from __future__ import annotations

import json
from itertools import islice
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from sdrt_cli.options import parse_key_values


def _first_line(text: str | None) -> str:
    return (text or "").strip().splitlines()[0] if (text or "").strip() else ""


def _describe_categories(categories: dict) -> str:
    parts = []
    for key, value in categories.items():
        shown = ", ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
        parts.append(f"{key}={shown}")
    return "\n".join(parts)


def register(app: typer.Typer) -> None:
    group = typer.Typer(
        name="datasets",
        help="Benchmark datasets: list the registered ones, look at a few records.",
        no_args_is_help=True,
        rich_markup_mode="rich",
    )

    @group.command("list")
    def list_command(as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table.")) -> None:
        """List registered datasets with their metric, default split and Hub sources."""
        from sdrt_cli.plugins import datasets

        rows = []
        for entry in datasets().entries():
            cls = entry.value
            rows.append(
                {
                    "name": entry.name,
                    "plugin": entry.plugin,
                    "metric": getattr(cls, "metric", ""),
                    "default_split": getattr(cls, "default_split", ""),
                    "hub_ids": list(getattr(cls, "hub_ids", ())),
                    "description": _first_line(cls.__doc__),
                }
            )
        if as_json:
            typer.echo(json.dumps(rows, indent=2))
            return
        table = Table(title="sdrt datasets")
        for column in ("name", "metric", "default split", "Hub cache sources", "plugin", "description"):
            table.add_column(column)
        for row in rows:
            table.add_row(
                row["name"], row["metric"], row["default_split"], ", ".join(row["hub_ids"]) or "-", row["plugin"], row["description"]
            )
        Console().print(table)

    @group.command("show")
    def show_command(
        name: str = typer.Argument(..., help="Registered dataset name (see `sdrt datasets list`)."),
        data_dir: Path | None = typer.Option(None, "--data-dir", help="Local directory or file holding the data."),
        hub_id: str | None = typer.Option(None, "--hub-id", help="A Hub dataset already in the local cache (never downloaded)."),
        split: str | None = typer.Option(None, "--split", help="Split to read (default: the dataset's own)."),
        limit: int = typer.Option(5, "--limit", min=0, help="How many records to load and print."),
        option: list[str] = typer.Option([], "--option", help="Dataset-specific option KEY=VALUE (repeatable)."),
    ) -> None:
        """Load the first records of a dataset and print them as a table."""
        from sdrt_cli.data import open_dataset

        options = parse_key_values(option, "--option")
        if hub_id:
            options["hub_id"] = hub_id
        dataset = open_dataset(name, data_dir=data_dir, split=split, limit=limit, **options)
        examples = list(islice(iter(dataset), limit))
        console = Console()
        answers_note = "answers present" if dataset.has_answers else "answers hidden (scoring refused; write a submission)"
        title = f"{name} · split {dataset.split} · metric {dataset.metric} · {answers_note}"
        table = Table(title=title, show_lines=True)
        for column in ("id", "images", "question", "answers", "categories"):
            table.add_column(column, overflow="fold")
        for example in examples:
            sizes = ", ".join(f"{image.width}×{image.height}" for image in example.images) or "-"
            answers = " | ".join(example.answers) if example.answers else "(hidden)"
            table.add_row(example.id, sizes, example.question, answers, _describe_categories(dataset.categories(example)))
        console.print(table)
        if examples:
            console.print("[bold]Single-step prompt of the first record:[/]")
            console.print(dataset.format_question(examples[0]), markup=False, highlight=False)
        else:
            console.print("No records.")

    app.add_typer(group, name="datasets")
