"""Result tables: our runs beside the paper's numbers, cell by cell (Tables 1-6).

    python -m zipfls_train.tables outputs/multirun/table2_tinyimagenet_resnet18 [more folders...]
        [--table 1|2|3|4|5|6|auto] [--out FILE] [--cost] [--paper experiments/paper_tables.yaml]

Every folder is searched recursively for runs (config.yaml next to metrics.jsonl). Per cell
(dataset, model, method, the method's options, the recipe) the table shows the best-epoch top-1
mean ± sample std over seeds, the number of seeds and the last-epoch mean, the paper's value and
the difference ours - paper. Cells of the paper without runs read "missing" (saying what the cell
needs where runs of its method have other options, e.g. Dense2's stages); unfinished runs, short
schedules and data subsets are marked in the cell; runs that fit no cell shown are listed after.
``--cost`` adds Table 1's cost columns as ratios to CE's (median epoch time, peak GPU and CPU
memory) beside the paper's ratios. The markdown is printed and written to ``--out`` (default
``<first folder>/table.md``).

The reading and grouping live in :mod:`zipfls_train.analysis.results`; this module only matches
cells to the paper's and formats them.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from zipfls_train.analysis.results import CellKey, CellSummary, Run, RunFolderError, group_cells, load_runs, summarise_all

TABLE_IDS = ("1", "2", "3", "4", "5", "6")
AUTO_TABLE_IDS = ("2", "3", "4", "5", "6")  # Table 1's accuracies repeat Tables 2 and 3's
PAPER_TABLES_ENV = "ZIPFLS_PAPER_TABLES"
# Options shown in a row's label even when every run has the same value: BAN's generation 1 is the
# CE-trained teacher, so a BAN row must say which generation it holds.
ALWAYS_LABELLED = ("generation",)


# ---------------------------------------------------------------- the paper's numbers


@dataclass(frozen=True)
class PaperCell:
    dataset: str
    model: str
    method: str
    options: tuple[tuple[str, Any], ...]  # loss options a run must have (frozen like CellKey.options)
    top1: float | None  # as printed, or CE's value + gain where the paper prints only the gain
    std: float | None = None
    gain: float | None = None
    label: str | None = None
    derived: bool = False  # top1 = CE's value + the printed gain

    def value_of(self, name: str) -> str:
        return str(getattr(self, name))


@dataclass(frozen=True)
class PaperTable:
    table_id: str
    title: str
    row_fields: tuple[str, ...]
    column_fields: tuple[str, ...]
    cells: tuple[PaperCell, ...]
    costs: Mapping[str, Mapping[str, float]] = field(default_factory=dict)

    @property
    def has_gains(self) -> bool:
        return any(cell.gain is not None for cell in self.cells)


@dataclass(frozen=True)
class Paper:
    tables: Mapping[str, PaperTable]
    epochs: Mapping[str, int]
    image_size: Mapping[str, int]
    labels: Mapping[str, Mapping[str, str]]
    model_options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    # The paper's other recipe settings per dataset, by recipe key (format: which copy of a dataset
    # that has several, TinyImageNet's 64 px originals rather than the 32 px pack; train_augment;
    # batch_size).
    recipe: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def label(self, kind: str, name: str) -> str:
        return self.labels.get(kind, {}).get(name, name)


def _freeze(value: Any) -> Any:
    return tuple(_freeze(v) for v in value) if isinstance(value, (list, tuple)) else value


def default_paper_path() -> Path:
    """$ZIPFLS_PAPER_TABLES, else experiments/paper_tables.yaml of this checkout, else of the cwd."""
    if os.environ.get(PAPER_TABLES_ENV):
        return Path(os.environ[PAPER_TABLES_ENV])
    for root in (Path(__file__).resolve().parents[2], Path.cwd()):
        candidate = root / "experiments" / "paper_tables.yaml"
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"experiments/paper_tables.yaml not found next to the package or in {Path.cwd()}; "
        f"pass --paper FILE or set ${PAPER_TABLES_ENV}"
    )


def _paper_cells(raw_cells: Sequence[Mapping[str, Any]], source: Path, table_id: str) -> tuple[PaperCell, ...]:
    baselines = {(c["dataset"], c["model"]): c.get("top1") for c in raw_cells if c["method"] == "ce"}
    cells = []
    for raw in raw_cells:
        top1, derived = raw.get("top1"), False
        if top1 is None:
            base = baselines.get((raw["dataset"], raw["model"]))
            if base is None or raw.get("gain") is None:
                raise ValueError(f"{source}: table {table_id} cell {raw} has neither top1 nor CE's value + gain")
            top1, derived = round(base + raw["gain"], 2), True
        options = tuple(sorted((k, _freeze(v)) for k, v in (raw.get("options") or {}).items()))
        cells.append(
            PaperCell(
                dataset=raw["dataset"],
                model=raw["model"],
                method=raw["method"],
                options=options,
                top1=float(top1),
                std=raw.get("std"),
                gain=raw.get("gain"),
                label=raw.get("label"),
                derived=derived,
            )
        )
    return tuple(cells)


def load_paper(path: Path | None = None) -> Paper:
    path = path or default_paper_path()
    data = yaml.safe_load(Path(path).read_text())
    tables = {
        str(table_id): PaperTable(
            table_id=str(table_id),
            title=raw["title"],
            row_fields=tuple(raw["rows"]),
            column_fields=tuple(raw["columns"]),
            cells=_paper_cells(raw["cells"], Path(path), str(table_id)),
            costs=raw.get("costs") or {},
        )
        for table_id, raw in data["tables"].items()
    }
    return Paper(
        tables=tables,
        epochs=data["epochs"],
        image_size=data["image_size"],
        labels=data["labels"],
        model_options=data.get("model_options") or {},
        recipe=data.get("recipe") or {},
    )


def matches(cell: PaperCell, key: CellKey) -> bool:
    """A run cell fits a paper cell: same dataset, model, method and the options the paper fixes."""
    if (cell.dataset, cell.model, cell.method) != (key.dataset, key.model, key.method):
        return False
    return all(key.option(name) == value for name, value in cell.options)


# ---------------------------------------------------------------- formatting helpers


def _num(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _signed(value: float | None) -> str:
    return "" if value is None else f"{value:+.2f}"


def _value(value: Any) -> str:
    if isinstance(value, tuple):
        return "+".join(map(_value, value))
    return "none" if value is None else str(value)


def _markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell.replace("|", "/") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def recipe_notes(key: CellKey, paper: Paper) -> list[str]:
    """How a cell's recipe departs from the paper's: schedule length, data subsets, resolution, capped
    epochs, data format, augmentation, batch size, the dataset's class count."""
    recipe = dict(key.recipe)
    notes = []
    planned, reference = key.planned_epochs, paper.epochs.get(key.dataset)
    if reference is not None and planned != reference:
        kind = "short" if planned < reference else "long"
        notes.append(f"{kind} schedule {planned}/{reference} ep")
    if recipe.get("num_classes_subset") is not None:
        notes.append(f"{recipe['num_classes_subset']} classes")
    if recipe.get("train_per_class") is not None:
        notes.append(f"{recipe['train_per_class']} train img/class")
    if recipe.get("val_per_class") is not None:
        notes.append(f"{recipe['val_per_class']} val img/class")
    size = recipe.get("image_size")
    if size is not None and paper.image_size.get(key.dataset) not in (None, size):
        notes.append(f"{size} px")
    if recipe.get("eval_precision") == "train":
        notes.append("val scored in the training precision (bf16/fp16), not fp32")
    if recipe.get("init_from") is not None:
        notes.append(f"initialised from {recipe['init_from']} (paper: from scratch)")
    if recipe.get("max_steps_per_epoch") is not None:
        notes.append(f"trainer.max_steps_per_epoch={recipe['max_steps_per_epoch']}")
    for name, config_key in (("format", "dataset.format"), ("train_augment", "dataset.train_augment"),
                             ("batch_size", "trainer.batch_size"), ("num_classes", "dataset.num_classes")):
        value, expected = recipe.get(name), paper.recipe.get(name, {}).get(key.dataset)
        if value is not None and expected not in (None, value):
            notes.append(f"{config_key}={value} (paper: {expected})")
    reference = paper.model_options.get(key.model, {})
    for name, value in recipe.items():
        option = name.removeprefix("model.")
        if name.startswith("model.") and option in reference and reference[option] != value:
            notes.append(f"model {option}={_value(value)} (paper {reference[option]})")
    return notes


def progress_note(summary: CellSummary) -> str | None:
    """'incomplete: 12/200 ep' when the stats come from unfinished runs, '+1 incomplete (...)' beside finished ones."""
    if not summary.incomplete:
        return None
    done = sorted({run.epochs_done for run in summary.incomplete})
    span = f"{done[0]}" if len(done) == 1 else f"{done[0]}-{done[-1]}"
    progress = f"{span}/{summary.key.planned_epochs} ep"
    if summary.from_incomplete:
        return f"incomplete: {progress}"
    return f"+{len(summary.incomplete)} incomplete ({progress})"


def ours_text(summary: CellSummary | None, paper: Paper, gain: float | None = None) -> str:
    """'59.50 ± 0.50 (+2.10), n=3, last 59.17' plus progress and recipe notes; 'missing' without runs."""
    if summary is None:
        return "missing"
    notes = [note for note in [progress_note(summary), *recipe_notes(summary.key, paper)] if note]
    if summary.duplicates:
        notes.append(f"{len(summary.duplicates)} duplicate seed run(s) ignored")
    setups = {setup for run in summary.counted for setup in run.setups}
    if len(setups) > 1:
        notes.append(f"trained in {len(setups)} setups (see {SETUPS_TITLE!r})")
    if summary.best_mean is None:
        return "; ".join(["no epoch finished yet", *notes])
    text = f"{_num(summary.best_mean)} ± {_num(summary.best_std)}"
    if gain is not None:
        text += f" ({_signed(gain)})"
    text += f", n={summary.n_seeds}, last {_num(summary.last_mean)}"
    return "; ".join([text, *notes])


def paper_text(cell: PaperCell) -> str:
    text = _num(cell.top1)
    if cell.std is not None:
        text += f" ± {_num(cell.std)}"
    if cell.gain is not None:
        text += f" ({_signed(cell.gain)})"
    return text


# ---------------------------------------------------------------- accuracy tables


def _row_id(table: PaperTable, cell: PaperCell) -> tuple[Any, ...]:
    return (tuple(cell.value_of(name) for name in table.row_fields), cell.options, cell.label)


def _column_id(table: PaperTable, cell: PaperCell) -> tuple[str, ...]:
    return tuple(cell.value_of(name) for name in table.column_fields)


def _row_label(table: PaperTable, cell: PaperCell, paper: Paper) -> str:
    if cell.label:
        return cell.label
    return " · ".join(paper.label(name, cell.value_of(name)) for name in table.row_fields)


def _row_labels(table: PaperTable, first_cells: Sequence[PaperCell], paper: Paper) -> list[str]:
    """Each row's label; rows that would read alike (the paper's cells of one method that ask for
    other options, e.g. Table 2's Dense2 cell of TinyImageNet ResNet18) add the options that tell
    them apart: 'Zipf's LS (paper: stages=final+penultimate)'."""
    plain = [_row_label(table, cell, paper) for cell in first_cells]
    labels = []
    for label, cell in zip(plain, first_cells):
        alike = [other for other, other_label in zip(first_cells, plain) if other_label == label]
        own = [(name, value) for name, value in cell.options if any(dict(other.options).get(name) != value for other in alike)]
        labels.append(f"{label} (paper: {_options_text(own)})" if own else label)
    return labels


def _column_label(table: PaperTable, column: tuple[str, ...], paper: Paper) -> str:
    return " ".join(paper.label(name, value) for name, value in zip(table.column_fields, column))


def _distinguishing(key: CellKey) -> dict[str, Any]:
    return {**dict(key.options), **{f"recipe.{k}": v for k, v in key.recipe}}


def _baseline(summary: CellSummary, summaries: Sequence[CellSummary]) -> CellSummary | None:
    """Our CE cell of the same dataset, model and recipe (for gains)."""
    key = summary.key
    for other in summaries:
        if other.key.method == "ce" and (other.key.dataset, other.key.model, other.key.recipe) == (key.dataset, key.model, key.recipe):
            return other
    return None


def _split_keys(matched: Sequence[Sequence[CellSummary]]) -> list[str]:
    """Option/recipe keys that tell apart the run cells fitting one paper cell (they split its row),
    plus the always-labelled options the runs have."""
    runs = [s for found in matched for s in found]
    keys = [name for name in ALWAYS_LABELLED if any(name in dict(s.key.options) for s in runs)]
    for found in matched:
        for name in sorted({k for s in found for k in _distinguishing(s.key)}):
            if name not in keys and len({_distinguishing(s.key).get(name) for s in found}) > 1:
                keys.append(name)
    return keys


def _variant(summary: CellSummary, split_keys: Sequence[str]) -> str:
    values = _distinguishing(summary.key)
    return ", ".join(f"{name.removeprefix('recipe.')}={_value(values.get(name))}" for name in split_keys)


def _options_text(options: Sequence[tuple[str, Any]]) -> str:
    return ", ".join(f"{name}={_value(value)}" for name, value in options)


def missing_text(table: PaperTable, cell: PaperCell, summaries: Sequence[CellSummary]) -> str:
    """'missing', and where runs of the cell's method that fit no cell of the table exist with other
    options, what the cell asks for and what they have (e.g. Table 2's Dense2 cell beside loss=zipf
    runs: stages=final)."""
    near = [
        s for s in summaries
        if (s.key.dataset, s.key.model, s.key.method) == (cell.dataset, cell.model, cell.method)
        and not any(matches(other, s.key) for other in table.cells)
    ]  # fmt: skip
    if not near:
        return "missing"
    differing = [(name, value) for name, value in cell.options if any(s.key.option(name) != value for s in near)]
    theirs = sorted({_value(s.key.option(name)) for s in near for name, _ in differing[:1]})
    return f"missing: this cell needs {_options_text(differing)}; runs of this method here have {differing[0][0]}={' or '.join(theirs)}"


def _cell_texts(table: PaperTable, cell: PaperCell, summary: CellSummary | None, summaries: Sequence[CellSummary], paper: Paper) -> list[str]:
    """[ours, paper, Δ] of one column of one row."""
    if summary is None:
        return [missing_text(table, cell, summaries), paper_text(cell), ""]
    gain = diff = None
    if summary is not None and summary.best_mean is not None:
        base = _baseline(summary, summaries)
        if table.has_gains and summary.key.method != "ce" and base is not None and base.best_mean is not None:
            gain = summary.best_mean - base.best_mean
        diff = summary.best_mean - cell.top1 if cell.top1 is not None else None
    return [ours_text(summary, paper, gain), paper_text(cell), _signed(diff)]


def render_table(table: PaperTable, summaries: Sequence[CellSummary], paper: Paper) -> tuple[str, set[CellKey]]:
    """One paper table in its own shape, ours / paper / Δ per column. Returns the markdown and the
    run cells it used. Several run cells fitting one paper cell (e.g. two Zipf variants) each get
    a row, labelled by what tells them apart."""
    rows: dict[tuple[Any, ...], list[PaperCell]] = {}
    columns: list[tuple[str, ...]] = []
    for cell in table.cells:
        rows.setdefault(_row_id(table, cell), []).append(cell)
        if _column_id(table, cell) not in columns:
            columns.append(_column_id(table, cell))

    used: set[CellKey] = set()
    body: list[list[str]] = []
    labels = _row_labels(table, [cells[0] for cells in rows.values()], paper)
    for row_cells, label in zip(rows.values(), labels):
        by_column = {_column_id(table, cell): cell for cell in row_cells}
        matched = {id(cell): [s for s in summaries if matches(cell, s.key)] for cell in row_cells}
        split_keys = _split_keys(list(matched.values()))
        variants = list(dict.fromkeys(_variant(s, split_keys) for found in matched.values() for s in found)) or [""]
        for variant in variants:
            line = [f"{label} [{variant}]" if variant else label]
            for column in columns:
                cell = by_column.get(column)
                if cell is None:  # the paper has no value here
                    line += ["", "", ""]
                    continue
                summary = next((s for s in matched[id(cell)] if _variant(s, split_keys) == variant), None)
                if summary is not None:
                    used.add(summary.key)
                line += _cell_texts(table, cell, summary, summaries, paper)
            body.append(line)

    header = ["Method" if table.row_fields == ("method",) else " · ".join(f.capitalize() for f in table.row_fields)]
    for column in columns:
        header += [f"{_column_label(table, column, paper)}: ours", "paper", "Δ"]
    legend = [
        f"### {table.title}",
        "",
        "ours: best-epoch top-1 mean ± sample std over seeds (- with one seed)"
        + (" (gain over our CE)" if table.has_gains else "")
        + ", n seeds, last-epoch mean; Δ = ours - paper.",
    ]
    if any(cell.derived for cell in table.cells):
        legend.append("The paper prints only gains here; its value is its CE value + the gain.")
    return "\n".join([*legend, "", _markdown(header, body)]), used


def render_other(summaries: Sequence[CellSummary], paper: Paper) -> str:
    """Run cells that fit no paper cell of the rendered tables, in long form."""
    header = ["Dataset", "Model", "Method", "Options", "ours"]
    rows = [
        [
            paper.label("dataset", s.key.dataset),
            s.key.model,
            paper.label("method", s.key.method),
            ", ".join(f"{k}={_value(v)}" for k, v in s.key.options) or "-",
            ours_text(s, paper),
        ]
        for s in summaries
    ]
    return "\n".join(["### Other runs (no cell of the tables above)", "", _markdown(header, rows)])


# ---------------------------------------------------------------- cost (Table 1)


@dataclass(frozen=True)
class CostCell:
    key: CellKey
    runs: tuple[Run, ...]

    @property
    def epoch_time_s(self) -> float | None:
        times = [t for run in self.runs for t in run.epoch_times_s]
        return statistics.median(times) if times else None

    @property
    def gpu_mem_mb(self) -> float | None:
        values = [run.peak_gpu_mem_mb for run in self.runs if run.peak_gpu_mem_mb is not None]
        return max(values) if values else None

    @property
    def cpu_mem_mb(self) -> float | None:
        values = [run.peak_cpu_mem_mb for run in self.runs if run.peak_cpu_mem_mb is not None]
        return max(values) if values else None


def _ratio(value: float | None, reference: float | None) -> float | None:
    return value / reference if value is not None and reference else None


def paper_cost_ratios(paper: Paper, method: str) -> dict[str, float | None]:
    """Table 1's cost of ``method`` over CE's (e.g. CS-KD time 2.18h / 1.82h)."""
    costs = paper.tables["1"].costs
    base, own = costs.get("ce", {}), costs.get(method)
    names = ("time_per_epoch_h", "gpu_mem_gb", "cpu_mem_gb")
    return {name: _ratio(own.get(name), base.get(name)) if own else None for name in names}


def _rank(order: Sequence[str], name: str) -> int:
    return order.index(name) if name in order else len(order)


def render_cost(runs: Sequence[Run], paper: Paper) -> str:
    """Per setting (dataset, model, recipe) and method: median epoch time, max peak GPU/CPU memory,
    each over CE's of the same setting, beside Table 1's ratios."""
    cells = [CostCell(key, tuple(found)) for key, found in group_cells(runs).items()]
    method_order = list(paper.labels.get("method", {}))
    settings: dict[tuple[Any, ...], list[CostCell]] = {}
    for cell in cells:
        settings.setdefault((cell.key.dataset, cell.key.model, cell.key.recipe), []).append(cell)
    header = ["Setting", "Method", "runs", "epoch time s (median)", "× CE", "paper × CE",
              "peak GPU MB", "× CE", "paper × CE", "peak CPU MB", "× CE", "paper × CE"]  # fmt: skip
    body = []
    for (dataset, model, recipe), found in settings.items():
        found.sort(key=lambda c: (_rank(method_order, c.key.method), repr(c.key.options)))
        base = next((c for c in found if c.key.method == "ce"), None)
        setting = "; ".join([f"{paper.label('dataset', dataset)} {model}", *recipe_notes(found[0].key, paper)])
        for cell in found:
            same_method = [c for c in found if c.key.method == cell.key.method]
            varying = [k for k, _ in cell.key.options if len({c.key.option(k) for c in same_method}) > 1]
            method = paper.label("method", cell.key.method)
            if varying:
                method += " [" + ", ".join(f"{k}={_value(cell.key.option(k))}" for k in varying) + "]"
            theirs = paper_cost_ratios(paper, cell.key.method)

            def ours(value: float | None, reference: float | None) -> str:
                if base is None:
                    return "no CE run"
                return _num(_ratio(value, reference))

            body.append([
                setting, method, str(len(cell.runs)),
                _num(cell.epoch_time_s, 1), ours(cell.epoch_time_s, base and base.epoch_time_s), _num(theirs["time_per_epoch_h"]),
                _num(cell.gpu_mem_mb, 0), ours(cell.gpu_mem_mb, base and base.gpu_mem_mb), _num(theirs["gpu_mem_gb"]),
                _num(cell.cpu_mem_mb, 0), ours(cell.cpu_mem_mb, base and base.cpu_mem_mb), _num(theirs["cpu_mem_gb"]),
            ])  # fmt: skip
    legend = [
        "### Table 1 (cost): ours as ratios to CE of the same setting, beside the paper's",
        "",
        "Paper: ImageNet, 4x 2080Ti, batch 16 (Table 1), ratio of each method's cost to the baseline's. "
        "Ours: median epoch_time_s over the epochs of the cell's runs (those holding a run's first step, "
        "which starts the loader and compiles, left out where a run has others), max peak_gpu_mem_mb / "
        "peak_cpu_mem_mb (- where not measured, e.g. GPU memory on CPU). A CPU peak is its process's "
        "since the run started: a run that followed others in one sweep process also counts what they "
        "left resident (imports, compiler caches: +5-8% measured), so compare costs of runs started as "
        "separate commands.",
    ]
    return "\n".join([*legend, "", _markdown(header, body)])


# ---------------------------------------------------------------- what trained the runs

SETUPS_TITLE = "What trained these runs"


def render_setups(runs: Sequence[Run]) -> str:
    """Each code, torch and device setup the runs trained in (environment.jsonl), with its run count:
    one line when the whole report comes from one setup; a cell mixing several says so."""
    counts: dict[str, int] = {}
    for run in runs:
        for setup in run.setups:
            counts[setup] = counts.get(setup, 0) + 1
    by_count = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    lines = [f"- {setup}: {count} run{'s' if count > 1 else ''}" for setup, count in by_count]
    legend = "From each run's environment.jsonl; a run resumed in another setup counts in each."
    return "\n".join([f"### {SETUPS_TITLE}", "", legend, "", *lines])


# ---------------------------------------------------------------- the command


def build_report(runs: Sequence[Run], paper: Paper, table: str = "auto", cost: bool = False) -> str:
    summaries = summarise_all(runs)
    table_ids = AUTO_TABLE_IDS if table == "auto" else (table,)
    sections: list[str] = []
    used: set[CellKey] = set()
    for table_id in table_ids:
        text, table_used = render_table(paper.tables[table_id], summaries, paper)
        if table == "auto" and not table_used:
            continue
        sections.append(text)
        used |= table_used
    if not sections:
        sections.append("No run fits a cell of Tables 2-6.")
    others = [s for s in summaries if s.key not in used]
    if others:
        sections.append(render_other(others, paper))
    if cost:
        sections.append(render_cost(runs, paper))
    sections.append(render_setups(runs))
    return "\n\n".join(sections) + "\n"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m zipfls_train.tables", description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="+", type=Path, help="run folders or folders above them (searched recursively)")
    parser.add_argument("--table", choices=[*TABLE_IDS, "auto"], default="auto",
                        help="paper table to fill (auto: every one of Tables 2-6 that some run fits)")  # fmt: skip
    parser.add_argument("--out", type=Path, default=None, help="markdown file to write (default: <first folder>/table.md)")
    parser.add_argument("--cost", action="store_true", help="add Table 1's cost columns as ratios to CE")
    parser.add_argument("--paper", type=Path, default=None, help=f"paper numbers (default: experiments/paper_tables.yaml or ${PAPER_TABLES_ENV})")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        paper = load_paper(args.paper)
        runs = load_runs(args.folders)
    except (RunFolderError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    report = build_report(runs, paper, table=args.table, cost=args.cost)
    out = args.out or args.folders[0] / "table.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report)
    print(report, end="")
    print(f"(written to {out})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
