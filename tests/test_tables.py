"""Result tables: the paper's numbers as transcribed, and our runs reduced to cells.

Run folders are written by hand in the trainer's format (config.yaml + metrics.jsonl); expected
means and standard deviations are computed by hand in the comments.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml

from zipfls_train.analysis.results import CellKey, RunFolderError, group_cells, load_runs, read_epoch_records, summarise
from zipfls_train.tables import build_report, load_paper, main, paper_cost_ratios

REPO = Path(__file__).resolve().parents[1]
PAPER_TABLES = REPO / "experiments" / "paper_tables.yaml"
PAPER_NAME = "zipf_label_smoothing_eccv2022.txt"


# ---------------------------------------------------------------- the paper text, parsed


def paper_text() -> str:
    for folder in (REPO / "shared" / "paper", REPO.parent / "shared" / "paper"):
        if (folder / PAPER_NAME).is_file():
            return (folder / PAPER_NAME).read_text()
    if os.environ.get("CI") == "true":
        raise FileNotFoundError(f"CI=true but shared/paper/{PAPER_NAME} is missing")
    pytest.skip(f"shared/paper/{PAPER_NAME} not present (outside CI)")


def table_block(text: str, number: int) -> list[list[str]]:
    """The tab-separated lines that follow the caption 'Table <number>:' (header lines included)."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"Table {number}:"))
    first = next(i for i in range(start + 1, len(lines)) if "\t" in lines[i])
    block = []
    for line in lines[first:]:
        if not line.strip():
            break
        block.append([re.sub(r"</?u>", "", field).strip() for field in line.split("\t")])
    return block


def number(text: str) -> float:
    return float(re.fullmatch(r"\(?\+?(-?[\d.]+)[Gh]?\)?", text).group(1))


def value_gain(text: str) -> tuple[float, float | None]:
    match = re.fullmatch(r"([\d.]+)\s*(?:\(\+([\d.]+)\))?", text)
    return float(match.group(1)), float(match.group(2)) if match.group(2) else None


PAPER_METHODS = {
    "Baseline": "ce", "Vanilla": "ce", "BAN": "ban", "BYOT": "byot", "PS-KD": "pskd", "DDGSD": "ddgsd",
    "CS-KD": "cskd", "LS": "ls", "Label Smooth": "ls", "TF-KD": "tfkd", "Ours": "zipf", "Zipf’s LS": "zipf",
}  # fmt: skip
PAPER_DATASETS = {"CIFAR100": "cifar100", "TinyImageNet": "tinyimagenet", "ImageNet": "imagenet", "INAT21": "inat21"}
PAPER_MODELS_32PX = {"DenseNet121": "cifar_densenet121", "ResNet18": "cifar_resnet18"}
PAPER_MODELS_224PX = {
    "ResNet18": "resnet18", "ResNet50": "resnet50", "ResNet101": "resnet101", "ResNeXt50_32x4d": "resnext50_32x4d",
    "ResNeXt101_32x8d": "resnext101_32x8d", "DenseNet121": "densenet121", "MobileNetV2": "mobilenetv2",
}  # fmt: skip


def method_of(name: str) -> str:
    return PAPER_METHODS[re.sub(r"\s*\[\d+\]$", "", name)]


@pytest.fixture(scope="module")
def transcribed() -> dict[str, Any]:
    return yaml.safe_load(PAPER_TABLES.read_text())["tables"]


def cells_by(table: dict[str, Any]) -> dict[tuple[str, str, str, tuple], dict[str, Any]]:
    out = {}
    for cell in table["cells"]:
        options = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in (cell.get("options") or {}).items()))
        key = (cell["dataset"], cell["model"], cell["method"], options)
        assert key not in out, f"duplicate cell {key}"
        out[key] = cell
    return out


def only(cells: dict, dataset: str, model: str, method: str, **options: Any) -> dict[str, Any]:
    wanted = {k: tuple(v) if isinstance(v, list) else v for k, v in options.items()}
    found = [c for (d, m, meth, opts), c in cells.items() if (d, m, meth) == (dataset, model, method) and all(dict(opts).get(k) == v for k, v in wanted.items())]
    assert len(found) == 1, (dataset, model, method, options, found)
    return found[0]


def test_table1_matches_paper(transcribed):
    rows = table_block(paper_text(), 1)
    assert rows[0][:2] == ["Method", "Non-Uniform"]
    table = transcribed["1"]
    cells = cells_by(table)
    assert len(rows) - 1 == len(table["costs"]) == 9
    for row in rows[1:]:
        method = method_of(row[0])
        cpu, gpu, hours, tiny, imt = row[5:10]
        assert table["costs"][method] == {"cpu_mem_gb": number(cpu), "gpu_mem_gb": number(gpu), "time_per_epoch_h": number(hours)}
        for (dataset, model), printed in ((("tinyimagenet", "cifar_resnet18"), tiny), (("imagenet", "resnet50"), imt)):
            cell = only(cells, dataset, model, method)
            key = "gain" if printed.startswith("(") else "top1"
            assert cell[key] == number(printed), (method, dataset, printed)
    assert len(table["cells"]) == 18


def test_table2_matches_paper(transcribed):
    rows = table_block(paper_text(), 2)
    datasets = [PAPER_DATASETS[name] for name in rows[0][1:]]
    models, current = [], None
    for name in rows[1][1:] + [""] * (len(datasets) - len(rows[1][1:])):
        current = PAPER_MODELS_32PX.get(name, current)
        models.append(current)
    assert list(zip(datasets, models)) == [
        ("cifar100", "cifar_densenet121"), ("tinyimagenet", "cifar_densenet121"),
        ("cifar100", "cifar_resnet18"), ("tinyimagenet", "cifar_resnet18"),
    ]  # fmt: skip
    cells = cells_by(transcribed["2"])
    assert len(rows) - 2 == 9 and len(cells) == 36
    for row in rows[2:]:
        method = method_of(row[0])
        for dataset, model, printed in zip(datasets, models, row[1:]):
            mean, std = (float(x) for x in printed.split("±"))
            cell = only(cells, dataset, model, method)
            assert (cell["top1"], cell["std"]) == (mean, std), (method, dataset, model)


def test_table3_matches_paper(transcribed):
    rows = table_block(paper_text(), 3)
    columns = [
        (PAPER_DATASETS[name], "cifar_densenet121" if name in ("CIFAR100", "TinyImageNet") else "resnet50")
        for name in rows[0][1:]
    ]  # the caption: DenseNet121 on CIFAR100/TinyImageNet, ResNet50 on ImageNet/INAT21
    cells = cells_by(transcribed["3"])
    assert len(cells) == 4 * (len(rows) - 1) == 20
    for row in rows[1:]:
        for (dataset, model), printed in zip(columns, row[1:]):
            assert only(cells, dataset, model, method_of(row[0]))["top1"] == float(printed)


def test_table4_matches_paper(transcribed):
    rows = table_block(paper_text(), 4)
    assert rows[0] == ["Architecture", "Method", "ImageNet", "INAT21"]
    cells = cells_by(transcribed["4"])
    assert len(cells) == 2 * (len(rows) - 1) == 42
    architecture = None
    for row in rows[1:]:
        architecture = PAPER_MODELS_224PX[row[0]] if row[0] else architecture
        for dataset, printed in zip(("imagenet", "inat21"), row[2:]):
            value, gain = value_gain(printed)
            cell = only(cells, dataset, architecture, method_of(row[1]))
            assert (cell["top1"], cell.get("gain")) == (value, gain), (architecture, row[1], dataset)


def test_table5_matches_paper(transcribed):
    rows = table_block(paper_text(), 5)
    assert rows[0][:5] == ["Method", "CE", "LR", "Dense1", "Dense2"]
    cells = cells_by(transcribed["5"])
    # Ticks per row: 1 = CE, 2 = + logits ranking, 3 = + Dense1, 4 = + Dense2.
    by_ticks = {
        1: only(cells, "tinyimagenet", "cifar_resnet18", "ce"),
        2: only(cells, "tinyimagenet", "cifar_resnet18", "zipf", rank_by="logits"),
        3: only(cells, "tinyimagenet", "cifar_resnet18", "zipf", rank_by="dense", stages=["final"]),
        4: only(cells, "tinyimagenet", "cifar_resnet18", "zipf", rank_by="dense", stages=["final", "penultimate"]),
    }
    assert len(rows) - 1 == len(cells) == 4
    for row in rows[1:]:
        cell = by_ticks[row[1:5].count("✓")]
        printed = row[-1]
        assert cell["gain" if printed.startswith("(") else "top1"] == number(printed), row


def test_table6_matches_paper(transcribed):
    rows = table_block(paper_text(), 6)
    assert rows[0] == ["Distribution", "TinyImageNet", "ImageNet", "INAT21"]
    columns = [("tinyimagenet", "cifar_resnet18"), ("imagenet", "resnet50"), ("inat21", "resnet50")]
    cells = cells_by(transcribed["6"])
    assert len(cells) == 3 * (len(rows) - 1) == 21
    for row in rows[1:]:
        name = row[0]
        for (dataset, model), printed in zip(columns, row[1:]):
            if name in ("Vanilla", "LS"):
                cell = only(cells, dataset, model, method_of(name))
            else:
                cell = only(cells, dataset, model, "zipf", distribution=name.lower())
            assert cell["top1"] == float(printed) and cell["label"] == name, (name, dataset)


def test_transcription_is_consistent_across_tables(transcribed):
    """Gains agree with values (Table 4), and the tables that repeat a cell agree with each other."""
    t4 = cells_by(transcribed["4"])
    # The paper's own slip, kept as printed: ResNet18 INAT21 Zipf's LS 56.36 (+2.03), 56.36 - 54.31 = 2.05.
    printed_inconsistent = {("inat21", "resnet18", "zipf")}
    for (dataset, model, method, opts), cell in t4.items():
        if method != "ce":
            consistent = round(cell["top1"] - only(t4, dataset, model, "ce")["top1"], 2) == cell["gain"]
            assert consistent != ((dataset, model, method) in printed_inconsistent), (dataset, model, method)
    t1, t2, t3, t6 = (cells_by(transcribed[t]) for t in "1236")
    ce_tiny = only(t1, "tinyimagenet", "cifar_resnet18", "ce")["top1"]
    for (dataset, model, method, opts), cell in t1.items():
        if dataset == "tinyimagenet" and method != "ce":
            assert round(ce_tiny + cell["gain"], 2) == only(t2, dataset, model, method)["top1"], method
    for method in ("ce", "ls", "zipf"):
        for dataset, model in (("imagenet", "resnet50"), ("inat21", "resnet50")):
            options = {"distribution": "zipf"} if method == "zipf" else {}
            t6_value = only(t6, dataset, model, method, **options)["top1"]
            assert only(t3, dataset, model, method)["top1"] == only(t4, dataset, model, method)["top1"] == t6_value


def test_paper_loader_derives_values_from_gains():
    paper = load_paper(PAPER_TABLES)
    t5 = {cell.label: cell for cell in paper.tables["5"].cells}
    assert t5["Logits-based (LR)"].top1 == 58.11 and t5["Logits-based (LR)"].derived
    assert t5["Voting-based (Dense2)"].top1 == 59.25
    assert paper_cost_ratios(paper, "cskd")["time_per_epoch_h"] == pytest.approx(2.18 / 1.82)
    assert paper_cost_ratios(paper, "ce") == {"time_per_epoch_h": 1.0, "gpu_mem_gb": 1.0, "cpu_mem_gb": 1.0}


# ---------------------------------------------------------------- hand-made run folders


def write_run(
    folder: Path,
    *,
    dataset: str = "tinyimagenet",
    model: str = "cifar_resnet18",
    method: str = "ce",
    seed: int = 0,
    top1: Sequence[float] = (50.0, 55.0),
    epochs: int | None = None,
    loss_options: dict[str, Any] | None = None,
    dataset_options: dict[str, Any] | None = None,
    model_options: dict[str, Any] | None = None,
    epoch_times: Sequence[float] | None = None,
    gpu_mb: float | None = None,
    cpu_mb: float = 1000.0,
    first_steps: dict[int, float] | None = None,
) -> Path:
    """A run folder as the trainer writes it; ``top1`` is val_top1 per completed epoch and
    ``epochs`` the planned budget (default: as many as completed)."""
    folder.mkdir(parents=True)
    config = {
        "seed": seed,
        "experiment_name": "test",
        "tag": "",
        "dataset": {"name": dataset, "image_size": 224 if dataset in ("imagenet", "inat21") else 32,
                    "num_classes_subset": None, "train_per_class": None, "val_per_class": None, **(dataset_options or {})},
        "model": {"name": model, "options": model_options or {}},
        "loss": {"name": method, **(loss_options or {})},
        "trainer": {"epochs": epochs if epochs is not None else len(top1), "batch_size": 128},
    }  # fmt: skip
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    times = list(epoch_times) if epoch_times is not None else [10.0] * len(top1)
    best = 0.0
    lines = []
    for epoch, (value, seconds) in enumerate(zip(top1, times), start=1):
        best = max(best, value)
        lines.append(json.dumps({
            "epoch": epoch, "train_loss": 1.0, "train_ce": 1.0, "val_top1": value, "val_top5": value + 20,
            "best_val_top1": best, "lr": 0.1, "epoch_time_s": seconds, "images_per_s": 1000.0,
            "peak_gpu_mem_mb": gpu_mb, "peak_cpu_mem_mb": cpu_mb,
            **({"first_step_s": first_steps[epoch]} if epoch in (first_steps or {}) else {}),
        }))  # fmt: skip
    (folder / "metrics.jsonl").write_text("".join(line + "\n" for line in lines))
    return folder


ZIPF_DENSE2 = {"weight": 1.0, "alpha": 1.0, "distribution": "zipf", "rank_by": "dense", "stages": ["final", "penultimate"]}


def table_rows(report: str, title_start: str) -> dict[str, dict[str, str]]:
    """The markdown table under the heading that starts with ``title_start``: row label -> header -> text."""
    section = report.split(f"### {title_start}", 1)[1].split("\n### ", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("| ")]
    header = [h.strip() for h in lines[0].strip("|").split(" | ")]
    rows = {}
    for line in lines[1:]:
        fields = [f.strip() for f in line.strip()[2:-2].split(" | ")]
        # Sub-columns repeat 'paper'/'Δ': key them by the preceding 'ours' column.
        keyed, group = {}, ""
        for name, value in zip(header, fields):
            if name.endswith(": ours"):
                group = name[: -len(": ours")]
                keyed[group] = value
            else:
                keyed[f"{group} {name}".strip()] = value
        rows[fields[0]] = keyed
    return rows


def test_mean_and_sample_std_over_seeds(tmp_path):
    # Best epochs 59.0, 59.5, 60.0 -> mean 59.5; deviations -0.5, 0, 0.5 -> var (0.25+0+0.25)/2 = 0.25 -> std 0.5.
    # Last epochs 58.0, 59.5, 59.0 -> mean 58.8333.
    for seed, curve in enumerate([(50.0, 59.0, 58.0), (52.0, 59.5, 59.5), (55.0, 60.0, 59.0)]):
        write_run(tmp_path / f"seed{seed}", seed=seed, top1=curve)
    runs = load_runs([tmp_path])
    cells = group_cells(runs)
    assert len(cells) == 1
    summary = summarise(next(iter(cells.values())))
    assert summary.n_seeds == 3 and summary.seeds == (0, 1, 2)
    assert summary.best_mean == pytest.approx(59.5)
    assert summary.best_std == pytest.approx(0.5)
    assert summary.last_mean == pytest.approx((58.0 + 59.5 + 59.0) / 3)
    assert not summary.from_incomplete and not summary.incomplete
    run = next(r for r in runs if r.seed == 0)
    assert (run.best_top1, run.best_epoch, run.last_top1) == (59.0, 2, 58.0)


def test_a_runs_best_epoch_is_the_earliest_of_a_tie(tmp_path):
    # val_top1 52.0, 60.0, 55.0, 60.0: the best 60.0 is reached at epochs 2 and 4; the run's best epoch
    # is the first (as the trainer's best.pt, which a later equal score does not replace), last 60.0.
    write_run(tmp_path / "tie", top1=(52.0, 60.0, 55.0, 60.0))
    (run,) = load_runs([tmp_path])
    assert (run.best_top1, run.best_epoch, run.last_top1) == (60.0, 2, 60.0)


def test_table2_cells_paper_values_and_differences(tmp_path):
    # CE on TinyImageNet ResNet18: best 56.0 and 57.0 -> 56.50 ± 0.71 (sqrt(0.5) = 0.7071); paper 56.41 ± 0.20 -> Δ +0.09.
    write_run(tmp_path / "ce0", method="ce", seed=0, top1=(40.0, 56.0))
    write_run(tmp_path / "ce1", method="ce", seed=1, top1=(41.0, 57.0))
    # Zipf's LS, one seed: 60.00 ± -, paper 59.25 ± 0.20 -> Δ +0.75.
    write_run(tmp_path / "zipf0", method="zipf", top1=(45.0, 60.0), loss_options=ZIPF_DENSE2)
    report = build_report(load_runs([tmp_path]), load_paper(PAPER_TABLES), table="2")
    rows = table_rows(report, "Table 2")
    col = "TinyImageNet ResNet18"
    assert rows["Vanilla"][col].startswith("56.50 ± 0.71, n=2, last 56.50")
    assert rows["Vanilla"][f"{col} paper"] == "56.41 ± 0.20"
    assert rows["Vanilla"][f"{col} Δ"] == "+0.09"
    # The paper's cell here is its Dense2 result, a row of its own that says so.
    dense2 = "Zipf's LS (paper: stages=final+penultimate)"
    assert rows[dense2][col].startswith("60.00 ± -, n=1, last 60.00")
    assert rows[dense2][f"{col} Δ"] == "+0.75"
    assert rows["Zipf's LS"]["CIFAR100 ResNet18"] == "missing"
    # Every paper cell without runs reads "missing"; the paper's value is still there.
    assert rows["CS-KD"][col] == "missing" and rows["CS-KD"][f"{col} paper"] == "58.38 ± 0.38" and rows["CS-KD"][f"{col} Δ"] == ""
    assert rows["Vanilla"]["CIFAR100 DenseNet121"] == "missing"
    assert rows["Vanilla"]["CIFAR100 DenseNet121 paper"] == "77.86 ± 0.26"
    assert list(rows) == ["Vanilla", "BAN", "BYOT", "PS-KD", "DDGSD", "CS-KD", "LS", "TF-KD", "Zipf's LS", dense2]
    # Two planned epochs where the paper trains 200: labelled, never silently compared.
    assert "short schedule 2/200 ep" in rows["Vanilla"][col]


def test_short_schedules_and_subsets_are_labelled(tmp_path):
    write_run(tmp_path / "a", top1=(40.0, 50.0), epochs=2, dataset_options={"train_per_class": 100})
    report = build_report(load_runs([tmp_path]), load_paper(PAPER_TABLES), table="2")
    cell = table_rows(report, "Table 2")["Vanilla"]["TinyImageNet ResNet18"]
    assert "short schedule 2/200 ep" in cell and "100 train img/class" in cell


def test_runs_on_another_class_count_or_capped_epochs_never_mix_with_the_recipe(tmp_path):
    # A 20-class image folder read as TinyImageNet, and a run capped at 1 step per epoch, used to sit
    # in the paper's cell unlabelled (and average with the recipe's runs).
    write_run(tmp_path / "full", seed=0, top1=(50.0,), epochs=200, dataset_options={"num_classes": 200})
    write_run(tmp_path / "twenty", seed=1, top1=(70.0,), epochs=200, dataset_options={"num_classes": 20})
    write_run(tmp_path / "capped", seed=2, top1=(5.0,), epochs=200, dataset_options={"num_classes": 200})
    config = yaml.safe_load((tmp_path / "capped/config.yaml").read_text())
    config["trainer"]["max_steps_per_epoch"] = 1
    (tmp_path / "capped/config.yaml").write_text(yaml.safe_dump(config))
    report = build_report(load_runs([tmp_path]), load_paper(PAPER_TABLES), table="2")
    cells = {label: row["TinyImageNet ResNet18"] for label, row in table_rows(report, "Table 2").items() if label.startswith("Vanilla")}
    assert len(cells) == 3, cells
    recipe = [text for text in cells.values() if text.startswith("50.00")]
    assert len(recipe) == 1 and "n=1" in recipe[0] and "num_classes" not in recipe[0] and "max_steps" not in recipe[0]
    assert any(text.startswith("70.00") and "dataset.num_classes=20 (paper: 200)" in text for text in cells.values())
    assert any(text.startswith("5.00") and "trainer.max_steps_per_epoch=1" in text for text in cells.values())


def test_tinyimagenet_runs_on_the_32px_pack_never_mix_with_the_originals(tmp_path):
    # The paper's recipe crops the 64 px originals (dataset.format=tree); the pack's runs, and runs
    # on format auto (which does not record what it found), are their own rows and say so.
    write_run(tmp_path / "tree", top1=(56.0,), epochs=200, dataset_options={"format": "tree"})
    write_run(tmp_path / "pack", top1=(50.0,), epochs=200, dataset_options={"format": "pack"})
    write_run(tmp_path / "auto", top1=(51.0,), epochs=200, dataset_options={"format": "auto"})
    report = build_report(load_runs([tmp_path]), load_paper(PAPER_TABLES), table="2")
    cells = [row["TinyImageNet ResNet18"] for label, row in table_rows(report, "Table 2").items() if label.startswith("Vanilla")]
    assert len(cells) == 3, cells
    by_value = {cell[:5]: cell for cell in cells}
    assert "dataset.format" not in by_value["56.00"]
    assert "dataset.format=pack (paper: tree)" in by_value["50.00"]
    assert "dataset.format=auto (paper: tree)" in by_value["51.00"]


def test_runs_with_another_augmentation_or_batch_never_mix_with_the_recipe_and_say_so(tmp_path):
    # SPEC.md's TinyImageNet recipe: RandomResizedCrop(32) + flip, batch 128. A crop-and-pad run or
    # a batch-64 run is its own row, labelled; it used to average into the recipe's cell.
    recipe = {"format": "tree", "train_augment": "random_resized_crop"}
    write_run(tmp_path / "recipe", top1=(56.0,), epochs=200, dataset_options=recipe)
    write_run(tmp_path / "crop_pad", top1=(50.0,), epochs=200, dataset_options={**recipe, "train_augment": "crop_pad"})
    write_run(tmp_path / "batch64", top1=(52.0,), epochs=200, dataset_options=recipe)
    config = yaml.safe_load((tmp_path / "batch64" / "config.yaml").read_text())
    config["trainer"]["batch_size"] = 64
    (tmp_path / "batch64" / "config.yaml").write_text(yaml.safe_dump(config))
    report = build_report(load_runs([tmp_path]), load_paper(PAPER_TABLES), table="2")
    cells = [row["TinyImageNet ResNet18"] for label, row in table_rows(report, "Table 2").items() if label.startswith("Vanilla")]
    by_value = {cell[:5]: cell for cell in cells}
    assert sorted(by_value) == ["50.00", "52.00", "56.00"], cells
    assert "n=1" in by_value["56.00"] and "(paper:" not in by_value["56.00"]
    assert "dataset.train_augment=crop_pad (paper: random_resized_crop)" in by_value["50.00"]
    assert "trainer.batch_size=64 (paper: 128)" in by_value["52.00"]


def _set_trainer(run_dir: Path, **values: Any) -> None:
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    config["trainer"].update(values)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))


def _record_precisions(run_dir: Path, **fields: str) -> None:
    """Set fields of every epoch record (what the trainer records: precision, eval_precision)."""
    lines = [json.loads(line) | fields for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))


def test_runs_scored_in_a_training_precision_other_than_fp32_are_kept_apart_and_say_so(tmp_path):
    """What val was scored in, as each epoch's record says: fp32, or bf16 (trainer.eval_precision=train
    with bf16 training; and every epoch recorded before eval_precision existed, scored in the training
    precision). The config alone is not enough: trainer.precision=auto is fp32 on most CPUs."""
    recipe = {"format": "tree", "train_augment": "random_resized_crop"}
    write_run(tmp_path / "before_either_field", seed=0, top1=(56.0,), epochs=200, dataset_options=recipe)
    _record_precisions(write_run(tmp_path / "bf16_scored_fp32", seed=1, top1=(57.0,), epochs=200, dataset_options=recipe),
                       precision="bf16", eval_precision="fp32")
    auto_on_a_cpu = write_run(tmp_path / "auto_on_a_cpu", seed=2, top1=(58.0,), epochs=200, dataset_options=recipe)
    _set_trainer(auto_on_a_cpu, precision="auto", eval_precision="train")
    _record_precisions(auto_on_a_cpu, precision="fp32", eval_precision="fp32")
    _record_precisions(write_run(tmp_path / "scored_bf16", seed=0, top1=(50.0,), epochs=200, dataset_options=recipe),
                       precision="bf16", eval_precision="bf16")
    _record_precisions(write_run(tmp_path / "older_bf16", seed=1, top1=(51.0,), epochs=200, dataset_options=recipe),
                       precision="bf16")  # (before eval_precision: scored in bf16)
    report = build_report(load_runs([tmp_path]), load_paper(PAPER_TABLES), table="2")
    cells = [row["TinyImageNet ResNet18"] for label, row in table_rows(report, "Table 2").items() if label.startswith("Vanilla")]
    by_value = {cell[:5]: cell for cell in cells}
    assert sorted(by_value) == ["50.50", "57.00"], cells  # 57.00 = mean of 56, 57, 58; 50.50 of 50, 51
    assert "n=3" in by_value["57.00"] and "training precision" not in by_value["57.00"]
    assert "n=2" in by_value["50.50"] and "val scored in the training precision (bf16/fp16), not fp32" in by_value["50.50"]


def test_runs_with_other_optimiser_or_schedule_settings_are_separate_rows_named_by_the_setting(tmp_path):
    for name, weight_decay, top1 in (("wd1e-4_s0", 1e-4, 56.0), ("wd1e-4_s1", 1e-4, 58.0), ("wd5e-4", 5e-4, 50.0)):
        folder = write_run(tmp_path / name, top1=(top1,), seed=int(name[-1]) if "_s" in name else 0, epochs=200)
        config = yaml.safe_load((folder / "config.yaml").read_text())
        config["optim"] = {"name": "sgd", "lr": 0.1, "weight_decay": weight_decay}
        config["sched"] = {"name": "multistep", "milestones": [0.5, 0.75]}
        (folder / "config.yaml").write_text(yaml.safe_dump(config))
    report = build_report(load_runs([tmp_path]), load_paper(PAPER_TABLES), table="2")
    rows = {label: row["TinyImageNet ResNet18"] for label, row in table_rows(report, "Table 2").items() if label.startswith("Vanilla")}
    assert len(rows) == 2, rows
    (same,) = [cell for label, cell in rows.items() if "optim.weight_decay=0.0001" in label]
    (other,) = [cell for label, cell in rows.items() if "optim.weight_decay=0.0005" in label]
    assert same.startswith("57.00 ± 1.41, n=2") and other.startswith("50.00 ± -, n=1")


def test_model_options_split_cells_and_are_labelled(tmp_path):
    # A half-width demo ResNet never mixes with the paper's width (64) and says so.
    write_run(tmp_path / "w8", top1=(30.0,), model_options={"width": 8})
    write_run(tmp_path / "w64", top1=(50.0,), model_options={"width": 64})
    runs = load_runs([tmp_path])
    assert len(group_cells(runs)) == 2
    rows = table_rows(build_report(runs, load_paper(PAPER_TABLES), table="2"), "Table 2")
    narrow, full = rows["Vanilla [model.width=8]"], rows["Vanilla [model.width=64]"]
    assert narrow["TinyImageNet ResNet18"].startswith("30.00") and "model width=8 (paper 64)" in narrow["TinyImageNet ResNet18"]
    assert full["TinyImageNet ResNet18"].startswith("50.00") and "model width" not in full["TinyImageNet ResNet18"]


def test_incomplete_runs_are_marked(tmp_path):
    # Seeds 0 and 1 finished (200 of 200 planned epochs are simulated by planning 3 and logging 3);
    # seed 2 stopped after 1 of 3: counted apart, not in the mean.
    write_run(tmp_path / "s0", seed=0, top1=(50.0, 55.0, 56.0))
    write_run(tmp_path / "s1", seed=1, top1=(50.0, 57.0, 56.0))
    write_run(tmp_path / "s2", seed=2, top1=(30.0,), epochs=3)
    # LS: only an unfinished run (12 of 200 epochs): its best so far, marked incomplete.
    write_run(tmp_path / "ls", method="ls", top1=[10.0 + i for i in range(12)], epochs=200, loss_options={"epsilon": 0.1})
    runs = load_runs([tmp_path])
    summaries = {cell_runs[0].key.method: summarise(cell_runs) for cell_runs in group_cells(runs).values()}
    ce = summaries["ce"]
    assert ce.n_seeds == 2 and ce.best_mean == pytest.approx(56.5) and len(ce.incomplete) == 1
    assert summaries["ls"].from_incomplete and summaries["ls"].best_mean == pytest.approx(21.0)
    rows = table_rows(build_report(runs, load_paper(PAPER_TABLES), table="2"), "Table 2")
    assert "+1 incomplete (1/3 ep)" in rows["Vanilla"]["TinyImageNet ResNet18"]
    assert rows["LS"]["TinyImageNet ResNet18"].startswith("21.00 ± -, n=1")
    assert "incomplete: 12/200 ep" in rows["LS"]["TinyImageNet ResNet18"]
    assert "short schedule" not in rows["LS"]["TinyImageNet ResNet18"]


def test_run_without_a_finished_epoch(tmp_path):
    folder = write_run(tmp_path / "r", top1=(), epochs=200)
    summary = summarise(load_runs([tmp_path]))
    assert summary.best_mean is None and summary.n_seeds == 0 and summary.from_incomplete
    rows = table_rows(build_report(load_runs([folder]), load_paper(PAPER_TABLES), table="2"), "Table 2")
    assert rows["Vanilla"]["TinyImageNet ResNet18"] == "no epoch finished yet; incomplete: 0/200 ep"


def test_gains_and_differences_are_of_best_epochs_against_our_ce_of_the_same_recipe(tmp_path):
    # SPEC 3: the reported metric is the best epoch's top-1; the last epoch's is logged beside it.
    # Our CE (2 epochs): best 56.0, last 54.0. LR (2 epochs): best 57.0, last 55.0 -> gain 57 - 56 = +1.00
    # (not over CE's last 54.0: +3.00), Δ 57.00 - 58.11 = -1.11 (the last epoch's would be -3.11).
    # A CE run of another recipe (1 epoch, 30.0) is not the baseline (+27.00 if it were).
    write_run(tmp_path / "ce", top1=(56.0, 54.0))
    write_run(tmp_path / "ce_1_epoch", top1=(30.0,))
    write_run(tmp_path / "lr", method="zipf", top1=(57.0, 55.0),
              loss_options={"weight": 1.0, "distribution": "zipf", "rank_by": "logits", "stages": ["final"]})  # fmt: skip
    report = build_report(load_runs([tmp_path]), load_paper(PAPER_TABLES), table="5")
    row = table_rows(report, "Table 5")["Logits-based (LR)"]
    col = "TinyImageNet ResNet18"
    assert row[col].startswith("57.00 ± - (+1.00), n=1, last 55.00")
    assert row[f"{col} Δ"] == "-1.11"


def test_table5_ablation_rows_and_gains(tmp_path):
    # Our CE 56.0; LR 57.0 (+1.00), Dense1 58.0 (+2.00), Dense2 59.0 (+3.00).
    write_run(tmp_path / "ce", top1=(56.0,))
    variants = {
        "lr": ({"rank_by": "logits", "stages": ["final"]}, 57.0),
        "d1": ({"rank_by": "dense", "stages": ["final"]}, 58.0),
        "d2": ({"rank_by": "dense", "stages": ["final", "penultimate"]}, 59.0),
    }
    for name, (options, top1) in variants.items():
        write_run(tmp_path / name, method="zipf", top1=(top1,), loss_options={"weight": 1.0, "distribution": "zipf", **options})
    runs = load_runs([tmp_path])
    report = build_report(runs, load_paper(PAPER_TABLES), table="auto")
    rows = table_rows(report, "Table 5")
    col = "TinyImageNet ResNet18"
    assert rows["Vanilla (CE)"][col].startswith("56.00 ± -, n=1")
    assert rows["Logits-based (LR)"][col].startswith("57.00 ± - (+1.00)")
    assert rows["Logits-based (LR)"][f"{col} paper"] == "58.11 (+1.70)"
    assert rows["Logits-based (LR)"][f"{col} Δ"] == "-1.11"
    assert rows["Voting-based (Dense1)"][col].startswith("58.00 ± - (+2.00)")
    assert rows["Voting-based (Dense2)"][col].startswith("59.00 ± - (+3.00)")
    assert rows["Voting-based (Dense2)"][f"{col} paper"] == "59.25 (+2.84)"
    # Auto picks every table the runs fit: 2 (Tiny ResNet18), 5 and 6; not 3 or 4.
    assert "### Table 2" in report and "### Table 6" in report and "### Table 3" not in report and "### Table 4" not in report
    # In Table 2 only Dense2 fits the Zipf row: the paper's 59.25 there is Table 5's Dense2 result.
    t2 = table_rows(report, "Table 2")
    zipf_rows = [label for label in t2 if label.startswith("Zipf's LS")]
    # (The other Zipf row holds the paper's cells of the other three columns, which take any stages.)
    dense2 = "Zipf's LS (paper: stages=final+penultimate)"
    assert zipf_rows == ["Zipf's LS", dense2], zipf_rows
    assert t2[dense2][col].startswith("59.00")
    assert t2[dense2][f"{col} paper"] == "59.25 ± 0.20"
    assert "Other runs" not in report


def test_table5_rows_hold_only_zipf_distribution_runs(tmp_path):
    # A Table 6 ablation (constant distribution, final-stage votes) is not Table 5's Dense1 row.
    write_run(tmp_path / "ce", top1=(56.0,))
    write_run(tmp_path / "k", method="zipf", top1=(58.5,),
              loss_options={"weight": 1.0, "distribution": "constant", "rank_by": "dense", "stages": ["final"]})  # fmt: skip
    report = build_report(load_runs([tmp_path]), load_paper(PAPER_TABLES), table="5")
    assert table_rows(report, "Table 5")["Voting-based (Dense1)"]["TinyImageNet ResNet18"] == (
        "missing: this cell needs distribution=zipf; runs of this method here have distribution=constant"
    )


def test_the_kernel_choice_does_not_split_a_cell(tmp_path):
    # loss.kernel picks an implementation of the same numbers: two seeds, one per kernel, one cell.
    for seed, kernel in ((0, "auto"), (1, "torch")):
        write_run(tmp_path / f"z{seed}", method="zipf", seed=seed, top1=(58.0 + seed,), loss_options={**ZIPF_DENSE2, "kernel": kernel})
    (cell,) = group_cells(load_runs([tmp_path])).values()
    assert summarise(cell).n_seeds == 2 and "kernel" not in dict(cell[0].key.options)


def test_table6_distributions_and_table4_shape(tmp_path):
    write_run(tmp_path / "c", dataset="imagenet", model="resnet50", top1=(76.0,), epochs=1)
    write_run(tmp_path / "k", dataset="imagenet", model="resnet50", method="zipf", top1=(77.0,),
              loss_options={"weight": 0.1, "distribution": "constant", "rank_by": "dense", "stages": ["final"]})  # fmt: skip
    report = build_report(load_runs([tmp_path]), load_paper(PAPER_TABLES), table="auto")
    t6 = table_rows(report, "Table 6")
    assert t6["Constant"]["ImageNet ResNet50"].startswith("77.00 ± -")
    assert t6["Constant"]["ImageNet ResNet50 paper"] == "77.09"
    assert t6["Constant"]["ImageNet ResNet50 Δ"] == "-0.09"
    assert t6["Zipf"]["ImageNet ResNet50"] == "missing"
    t4 = table_rows(report, "Table 4")
    assert t4["ResNet50 · Vanilla"]["ImageNet"].startswith("76.00 ± -, n=1, last 76.00; short schedule 1/100 ep")
    assert t4["ResNet50 · Vanilla"]["ImageNet paper"] == "76.48"
    assert t4["ResNet18 · Zipf's LS"]["ImageNet paper"] == "70.73 (+0.26)"
    assert t4["ResNet18 · Zipf's LS"]["ImageNet"] == "missing"
    assert "### Table 3" in report  # ImageNet ResNet50 CE is a Table 3 cell too


def test_a_cell_whose_method_ran_with_other_options_says_what_it_needs(tmp_path):
    # README's sweep trains loss=zipf (final-stage votes); Table 2's TinyImageNet ResNet18 cell is
    # the paper's Dense2 result, so those runs do not fill it: the cell says why, and the runs are
    # listed, also when one table is asked for.
    for seed in (0, 1):
        write_run(tmp_path / f"zipf{seed}", method="zipf", seed=seed, top1=(45.0, 50.0),
                  loss_options={**ZIPF_DENSE2, "stages": ["final"]})  # fmt: skip
    report = build_report(load_runs([tmp_path]), load_paper(PAPER_TABLES), table="2")
    cell = table_rows(report, "Table 2")["Zipf's LS (paper: stages=final+penultimate)"]["TinyImageNet ResNet18"]
    assert cell == "missing: this cell needs stages=final+penultimate; runs of this method here have stages=final"
    other = table_rows(report, "Other runs")
    assert list(other) == ["TinyImageNet"] and other["TinyImageNet"]["Method"] == "Zipf's LS"
    assert "stages=final," in other["TinyImageNet"]["Options"] and other["TinyImageNet"]["ours"].startswith("50.00 ± 0.00, n=2")


def test_unmatched_runs_are_listed(tmp_path):
    write_run(tmp_path / "x", dataset="cifar100", model="resnet101", top1=(10.0,))
    report = build_report(load_runs([tmp_path]), load_paper(PAPER_TABLES), table="auto")
    assert "No run fits a cell of Tables 2-6." in report
    assert "### Other runs" in report and "resnet101" in report


def test_only_generation_2_fills_the_papers_ban_cells(tmp_path):
    # The paper's BAN is "one step" (Sec. 4.2): generation 2. Generation 1 is the CE teacher and
    # generation 3 a further step; neither is set against the paper's BAN number.
    for generation, top1 in ((1, 56.0), (2, 58.0), (3, 59.0)):
        write_run(tmp_path / f"gen{generation}", method="ban", top1=(top1,), epochs=200,
                  loss_options={"generation": generation, "alpha": 0.2})  # fmt: skip
    report = build_report(load_runs([tmp_path]), load_paper(PAPER_TABLES), table="2")
    rows = table_rows(report, "Table 2")
    ban_rows = [label for label in rows if label.startswith("BAN")]
    assert ban_rows == ["BAN [generation=2]"], ban_rows
    assert rows["BAN [generation=2]"]["TinyImageNet ResNet18"].startswith("58.00")
    assert rows["BAN [generation=2]"]["TinyImageNet ResNet18 paper"] == "58.65 ± 0.83"


def test_duplicate_seeds_and_path_options_do_not_split_cells(tmp_path):
    # BAN runs name their teacher checkpoint (different per seed): still one cell.
    for seed in (0, 1):
        write_run(tmp_path / f"ban{seed}", method="ban", seed=seed, top1=(58.0 + seed,),
                  loss_options={"generation": 2, "alpha": 0.2, "teacher_checkpoint": f"/runs/gen1_seed{seed}/checkpoints/last.pt"})  # fmt: skip
    # The same seed twice (a copied folder): the one with more epochs counts, the other is reported.
    write_run(tmp_path / "ce_a", seed=0, top1=(50.0, 51.0), epochs=2)
    write_run(tmp_path / "ce_b", seed=0, top1=(52.0,), epochs=2)
    runs = load_runs([tmp_path, tmp_path / "ce_a"])  # overlapping folders read each run once
    assert len(runs) == 4
    summaries = {cell_runs[0].key.method: summarise(cell_runs) for cell_runs in group_cells(runs).values()}
    assert summaries["ban"].n_seeds == 2 and dict(summaries["ban"].key.options) == {"alpha": 0.2, "generation": 2}
    ce = summaries["ce"]
    assert ce.n_seeds == 1 and ce.best_mean == 51.0 and len(ce.duplicates) == 1 and not ce.incomplete
    rows = table_rows(build_report(runs, load_paper(PAPER_TABLES), table="2"), "Table 2")
    assert "1 duplicate seed run(s) ignored" in rows["Vanilla"]["TinyImageNet ResNet18"]
    # BAN rows always name their generation (generation 1 is the CE teacher).
    assert rows["BAN [generation=2]"]["TinyImageNet ResNet18"].startswith("58.50 ± 0.71, n=2")


def test_zipf_defaults_filled_for_older_configs(tmp_path):
    write_run(tmp_path / "z", method="zipf", top1=(59.0,), loss_options={"weight": 1.0})
    (run,) = load_runs([tmp_path])
    assert isinstance(run.key, CellKey)
    assert run.key.option("rank_by") == "dense" and run.key.option("stages") == ("final",) and run.key.option("distribution") == "zipf"


def test_metrics_file_quirks(tmp_path):
    folder = write_run(tmp_path / "r", top1=(50.0, 51.0), epochs=3)
    path = folder / "metrics.jsonl"
    # A resumed run re-logs epoch 2 (the later record wins) and a kill cut the last line short.
    with path.open("a") as stream:
        stream.write(json.dumps({"epoch": 2, "val_top1": 53.0}) + "\n" + '{"epoch": 3, "val_to')
    with pytest.warns(UserWarning, match=r"metrics.jsonl:4: ignoring a truncated last line"):
        records = read_epoch_records(path)
    assert [r["epoch"] for r in records] == [1, 2] and records[-1]["val_top1"] == 53.0
    with pytest.warns(UserWarning, match="truncated last line"):
        (run,) = load_runs([tmp_path])
    assert (run.epochs_done, run.best_top1, run.complete) == (2, 53.0, False)
    path.write_text('{"epoch": 1, "val_top1": 1.0}\nnot json\n{"epoch": 2, "val_top1": 2.0}\n')
    with pytest.raises(RunFolderError, match=r"metrics.jsonl:2"):
        load_runs([tmp_path])


def test_cost_ratios(tmp_path):
    # CE epoch times 10, 12, 10, 14 (two seeds pooled) -> median 11; CS-KD 20, 24, 22 -> median 22 -> 2.00x
    # (its first epoch, 95 s with a 75 s first step (a compilation, say), is left out; with it the
    # median would be 23). GPU: CE max 1000, CS-KD max 1500 -> 1.50x; CPU: 2000 vs 3000 -> 1.50x.
    # The CE runs are unfinished (2 of 4 planned epochs): their epochs count for cost all the same.
    write_run(tmp_path / "ce0", seed=0, top1=(1.0, 2.0), epochs=4, epoch_times=(10.0, 12.0), gpu_mb=900.0, cpu_mb=2000.0)
    write_run(tmp_path / "ce1", seed=1, top1=(1.0, 2.0), epochs=4, epoch_times=(10.0, 14.0), gpu_mb=1000.0, cpu_mb=1800.0)
    write_run(tmp_path / "cskd", method="cskd", top1=(1.0, 2.0, 3.0, 4.0), epoch_times=(95.0, 20.0, 24.0, 22.0),
              first_steps={1: 75.0}, gpu_mb=1500.0, cpu_mb=3000.0)  # fmt: skip
    # Another setting without CE: ratios read "no CE run".
    write_run(tmp_path / "zipf", dataset="cifar100", method="zipf", top1=(1.0,), loss_options={"weight": 0.1})
    report = build_report(load_runs([tmp_path]), load_paper(PAPER_TABLES), table="2", cost=True)
    section = report.split("### Table 1 (cost)", 1)[1]
    rows = {}
    for line in section.splitlines():
        fields = [f.strip() for f in line.strip("|").split("|")]
        if len(fields) == 12 and fields[0] != "Setting" and not set(fields[0]) <= {"-"}:
            rows[(fields[0].split(";")[0], fields[1])] = fields
    ce = rows[("TinyImageNet cifar_resnet18", "Vanilla")]
    assert ce[2:] == ["2", "11.0", "1.00", "1.00", "1000", "1.00", "1.00", "2000", "1.00", "1.00"]
    cskd = rows[("TinyImageNet cifar_resnet18", "CS-KD")]
    # Paper: time 2.18/1.82 = 1.20, GPU 9.8/6.8 = 1.44, CPU 27.4/18 = 1.52.
    assert cskd[2:] == ["1", "22.0", "2.00", "1.20", "1500", "1.50", "1.44", "3000", "1.50", "1.52"]
    zipf = rows[("CIFAR100 cifar_resnet18", "Zipf's LS")]
    assert zipf[4] == "no CE run" and zipf[5] == "1.01"  # paper: 1.83h / 1.82h
    # A run whose only epoch holds its first step: that epoch is all there is to time.
    write_run(tmp_path / "ls", dataset="cifar100", method="ls", top1=(1.0,), epoch_times=(30.0,), first_steps={1: 25.0})
    ls = next(run for run in load_runs([tmp_path]) if run.key.method == "ls")
    assert ls.epoch_times_s == (30.0,)


def _environment(folder: Path, *records: dict[str, Any], garbage: bool = False) -> None:
    lines = [json.dumps(record) for record in records] + (['{"code": {"git_comm'] if garbage else [])
    (folder / "environment.jsonl").write_text("".join(line + "\n" for line in lines))


def _setup(commit: str | None, device: str, processes: int = 1, dirty: bool = False, digest: str | None = None) -> dict[str, Any]:
    return {"code": {"version": "0.1.0", "git_commit": commit, "dirty": dirty, "diff_sha256": digest},
            "packages": {"torch": "2.14.1+cu130"}, "device": device, "processes": processes}  # fmt: skip


def test_the_report_says_what_trained_its_runs_and_which_cells_mix_setups(tmp_path):
    h200 = _setup("1a2b3c4d5e6f7a8b", "cuda: NVIDIA H200", processes=4)
    edited = _setup("1a2b3c4d5e6f7a8b", "cuda: NVIDIA H200", processes=4, dirty=True, digest="9f8e7d6c" + "0" * 56)
    for seed in (0, 1):
        _environment(write_run(tmp_path / f"ce{seed}", method="ce", seed=seed, top1=(50.0, 56.0)), h200)
    _environment(write_run(tmp_path / "zipf0", method="zipf", seed=0, top1=(50.0, 58.0), loss_options=ZIPF_DENSE2), h200)
    # resumed after an edit of the code; its file ends in a line cut short by a kill
    _environment(write_run(tmp_path / "zipf1", method="zipf", seed=1, top1=(50.0, 58.5), loss_options=ZIPF_DENSE2), h200, edited,
                 garbage=True)
    write_run(tmp_path / "ls0", method="ls", seed=0, top1=(50.0, 57.0))  # from before environment.jsonl
    _environment(write_run(tmp_path / "other", dataset="cifar100", seed=0), _setup(None, "cpu: AMD EPYC"))
    report = build_report(load_runs([tmp_path]), load_paper())
    setups = report.split("### What trained these runs", 1)[1].strip().splitlines()[2:]
    assert setups == [
        "- code 1a2b3c4d5e · torch 2.14.1+cu130 · cuda: NVIDIA H200 x4: 4 runs",
        "- code 1a2b3c4d5e (+ uncommitted changes 9f8e7d6c) · torch 2.14.1+cu130 · cuda: NVIDIA H200 x4: 1 run",
        "- not recorded: 1 run",
        "- zipfls-train 0.1.0 (no git commit) · torch 2.14.1+cu130 · cpu: AMD EPYC: 1 run",
    ]
    rows = table_rows(report, "Table 2")
    dense2 = rows["Zipf's LS (paper: stages=final+penultimate)"]["TinyImageNet ResNet18"]
    assert dense2.startswith("58.25 ± 0.35, n=2") and "trained in 2 setups (see 'What trained these runs')" in dense2
    assert "setups" not in rows["Vanilla"]["TinyImageNet ResNet18"]


def test_setups_of_runs_older_than_the_file_or_with_fields_of_other_types(tmp_path):
    from zipfls_train.analysis.results import read_setups

    resumed = write_run(tmp_path / "resumed")  # begun before environment.jsonl, resumed after
    _environment(resumed, {**_setup("1a2b3c4d5e6f", "cpu: x"), "from_step": 40})
    assert read_setups(resumed) == ("not recorded", "code 1a2b3c4d5e · torch 2.14.1+cu130 · cpu: x")
    odd = write_run(tmp_path / "odd", seed=1)
    (odd / "environment.jsonl").write_bytes(b"".join([
        json.dumps({"code": "abc", "packages": ["torch"], "processes": "2", "device": 7, "from_step": "0"}).encode() + b"\n",
        json.dumps({"code": {"git_commit": 5, "version": 1}}).encode() + b"\n",
        json.dumps({"code": {"git_commit": "ffff0000aaaa", "dirty": True, "diff_sha256": 9}}).encode() + b"\n",
        b'{"device": "cuda: caf\xe9"}\n',
    ]))  # fmt: skip
    assert read_setups(odd) == (
        "zipfls-train ? (no git commit) · torch ? · ?",
        "code ffff0000aa (+ uncommitted changes) · torch ? · ?",
        "zipfls-train ? (no git commit) · torch ? · cuda: caf\ufffd",
    )
    assert main([str(tmp_path), "--out", str(tmp_path / "table.md")]) == 0


def test_cli_writes_the_table(tmp_path, capsys):
    write_run(tmp_path / "runs" / "ce0", top1=(56.0,))
    assert main([str(tmp_path / "runs"), "--table", "2"]) == 0
    written = (tmp_path / "runs" / "table.md").read_text()
    assert written == capsys.readouterr().out
    assert "### Table 2" in written and "56.00 ± -" in written
    # As a module, with --out and --cost; table.md in the folder is not mistaken for a run.
    out = tmp_path / "elsewhere" / "t.md"
    result = subprocess.run([sys.executable, "-m", "zipfls_train.tables", str(tmp_path / "runs"), "--out", str(out), "--cost"],
                            capture_output=True, text=True, check=False)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "### Table 1 (cost)" in out.read_text() and str(out) in result.stderr


def test_cli_errors_name_the_folder(tmp_path, capsys):
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "sub" / "metrics.jsonl").write_text("")  # no config.yaml beside it: not a run
    assert main([str(empty)]) == 2
    message = capsys.readouterr().err
    assert str(empty) in message and "config.yaml next to metrics.jsonl" in message
    assert main([str(tmp_path / "nope")]) == 2
    assert "no such folder" in capsys.readouterr().err
    bad = write_run(tmp_path / "bad" / "r", top1=(1.0,))
    (bad / "config.yaml").write_text(yaml.safe_dump({"seed": 0, "dataset": {"name": "cifar100"}, "loss": {"name": "ce"}, "trainer": {"epochs": 1}}))
    assert main([str(tmp_path / "bad")]) == 2
    assert "missing key 'model.name'" in capsys.readouterr().err


def test_the_table_builder_starts_without_importing_torch():
    # It runs wherever the run folders are (a login node, a laptop): reading them must not load torch.
    code = "import sys, zipfls_train.tables; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "False"
