"""Every configs/experiment/*.yaml composes, for every value its sweep gives a config group, with the
paper's recipe; and every run a table's sweep makes fits a cell of that table, so the table builder
can place it (runs -> zipfls_train.tables).

A sweep point whose group option file does not exist fails, naming the missing file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from omegaconf import OmegaConf

from zipfls_train.analysis.results import cell_key_from_config
from zipfls_train.engine.naming import safe_dirname
from zipfls_train.tables import load_paper, matches

REPO = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO / "configs"
EXPERIMENTS = sorted(path.stem for path in (CONFIG_DIR / "experiment").glob("*.yaml"))

# The paper-table experiments (and the quick comparison): each sweeps its cells.
TABLE_EXPERIMENTS = [name for name in EXPERIMENTS if name.startswith(("table", "quick"))]
SMALL = {"epochs": 200, "batch_size": 128, "milestones": [0.5, 0.75]}
LARGE = {"epochs": 100, "batch_size": 256, "milestones": [0.3, 0.6, 0.9]}
RECIPES = {"table2": SMALL, "table5": SMALL, "table3": LARGE, "table4": LARGE, "quick": {"epochs": 60, "batch_size": 128, "milestones": [0.5, 0.75]}}


def experiment_yaml(name: str) -> dict[str, Any]:
    return yaml.safe_load((CONFIG_DIR / "experiment" / f"{name}.yaml").read_text())


def sweep_params(name: str) -> dict[str, list[str]]:
    """The swept values by key; {} for an experiment without a sweep (a single run, e.g. demo)."""
    params = (((experiment_yaml(name).get("hydra") or {}).get("sweeper") or {}).get("params")) or {}
    return {key: [v.strip() for v in str(value).split(",")] for key, value in params.items()}


def is_group(key: str) -> bool:
    return (CONFIG_DIR / key).is_dir()


def sweep_points(name: str) -> list[tuple[str, ...]]:
    """Overrides of one run per value of each swept config group (the other keys at their first value)."""
    params = sweep_params(name)
    if not params:
        return [()]
    first = {key: values[0] for key, values in params.items()}
    points = [first]
    for key, values in params.items():
        if is_group(key):
            points += [{**first, key: value} for value in values[1:]]
    return [tuple(f"{key}={value}" for key, value in point.items()) for point in points]


def option_files(name: str, overrides: tuple[str, ...]) -> list[Path]:
    """The group option files a sweep point needs: the experiment's own `override /group: x` and the swept groups."""
    files = []
    for entry in experiment_yaml(name).get("defaults", []):
        if isinstance(entry, dict):
            for group, option in entry.items():
                files.append(CONFIG_DIR / group.removeprefix("override ").lstrip("/") / f"{option}.yaml")
    for override in overrides:
        key, value = override.split("=", 1)
        if is_group(key):
            files.append(CONFIG_DIR / key / f"{value}.yaml")
    return files


def require_files(files: list[Path]) -> None:
    missing = [str(path.relative_to(REPO)) for path in files if not path.is_file()]
    if not missing:
        return
    pytest.fail(f"an experiment sweeps config option file(s) that do not exist: {', '.join(missing)}")


def compose(overrides: list[str], hydra_config: bool = False):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return hydra_compose(config_name="train", overrides=overrides, return_hydra_config=hydra_config)


def test_every_table_has_experiments():
    prefixes = {name.split("_")[0] for name in EXPERIMENTS}
    assert {"table1", "table2", "table3", "table4", "table5", "table6", "quick"} <= prefixes
    assert {f"table2_{d}_{m}" for d in ("cifar100", "tinyimagenet") for m in ("resnet18", "densenet121")} <= set(EXPERIMENTS)


@pytest.mark.parametrize("name", TABLE_EXPERIMENTS)
def test_sweep_block(name):
    """hydra.sweeper.params is set (hydra 1.3 basic sweeper) and runs land in outputs/multirun/<name>."""
    require_files(option_files(name, ()))
    config = compose([f"experiment={name}"], hydra_config=True)
    assert config.experiment_name == name
    written = experiment_yaml(name)["hydra"]["sweeper"]["params"]
    assert dict(config.hydra.sweeper.params) == {key: str(value) for key, value in written.items()}
    assert config.hydra.sweep.dir == f"outputs/multirun/{name}"
    assert "seed" in config.hydra.sweeper.params


# SPEC.md section 3 (recipes) and section 1 (Zipf's defaults: lambda, the x2 bilinear upsample of
# 32 px maps; beta, the auxiliary weight of Dense2, from the paper: 0.1 CIFAR-100, 0.5 TinyImageNet).
DATASET_RECIPES = {
    "cifar100": {"image_size": 32, "train_augment": "crop_pad", "test_transform": "none", "zipf": (0.1, "bilinear", 0.1)},
    "tinyimagenet": {"image_size": 32, "train_augment": "random_resized_crop", "test_transform": "resize", "zipf": (1.0, "bilinear", 0.5)},
    "imagenet": {"image_size": 224, "train_augment": "random_resized_crop", "test_transform": "resize_center_crop", "zipf": (0.1, "none")},
    "inat21": {"image_size": 224, "train_augment": "random_resized_crop", "test_transform": "resize_center_crop", "zipf": (1.0, "none")},
}
SGD = {"name": "sgd", "momentum": 0.9, "weight_decay": 1e-4, "nesterov": False, "base_batch_size": None}


def assert_dataset_recipe(resolved: dict[str, Any]) -> None:
    dataset = resolved["dataset"]
    recipe = DATASET_RECIPES[dataset["name"]]
    assert {key: dataset[key] for key in ("image_size", "train_augment", "test_transform")} == {
        key: recipe[key] for key in ("image_size", "train_augment", "test_transform")
    }
    if resolved["loss"]["name"] == "zipf":
        loss = resolved["loss"]
        assert (loss["weight"], loss["upsample"], loss["aux_weight"])[: len(recipe["zipf"])] == recipe["zipf"]


@pytest.mark.parametrize("dataset", sorted(DATASET_RECIPES))
def test_each_dataset_defaults_to_the_spec_recipe(dataset):
    resolved = OmegaConf.to_container(compose([f"dataset={dataset}", "loss=zipf"]), resolve=True)
    assert_dataset_recipe(resolved)
    assert {key: resolved["optim"][key] for key in SGD} == SGD
    assert resolved["optim"]["lr"] == 0.1


NEEDS_HYDRA_RUNTIME = {"ban_generations"}  # its loss.teacher_checkpoint reads ${hydra:...}


@pytest.mark.parametrize(("name", "overrides"), [(n, p) for n in EXPERIMENTS for p in sweep_points(n)], ids=lambda v: ",".join(v) if isinstance(v, tuple) else v)
def test_sweep_point_composes_and_fits_its_table(name, overrides):
    require_files(option_files(name, overrides))
    config = compose([f"experiment={name}", *overrides])
    if name in NEEDS_HYDRA_RUNTIME:
        # ${hydra:sweep.dir} exists only inside a launched job; tests/test_training.py runs this
        # experiment as a real sweep, which checks the resolved path.
        config.loss.teacher_checkpoint = None
    resolved = OmegaConf.to_container(config, resolve=True)  # every interpolation resolves
    if name not in TABLE_EXPERIMENTS:  # another part's experiment (demo, recipes): composing is the check
        return
    assert resolved["experiment_name"] == name
    prefix = name.split("_")[0]
    recipe = RECIPES.get(prefix) or (SMALL if name.startswith("table6_tinyimagenet") else LARGE)
    assert resolved["trainer"]["epochs"] == recipe["epochs"]
    assert resolved["trainer"]["batch_size"] == recipe["batch_size"]
    assert resolved["sched"]["milestones"] == recipe["milestones"]
    assert resolved["optim"]["lr"] == 0.1
    assert {key: resolved["optim"][key] for key in SGD} == SGD
    if prefix == "quick":
        assert resolved["dataset"]["format"] == "pack" and resolved["dataset"]["train_per_class"] == 100
        assert resolved["dataset"]["val_per_class"] is None and resolved["dataset"]["image_size"] == 32
        if resolved["loss"]["name"] == "zipf":
            assert resolved["loss"]["weight"] == 1.0
        return
    assert_dataset_recipe(resolved)
    key = cell_key_from_config(resolved, Path(f"{name}:{','.join(overrides)}"))
    table = load_paper().tables[prefix.removeprefix("table")]
    fitting = [cell for cell in table.cells if matches(cell, key)]
    assert len(fitting) == 1, f"{name} {overrides}: the run {key} fits {len(fitting)} cells of table {table.table_id}, not one"
    # ... and the right one: the run's method and every option the cell fixes (e.g. Table 6's
    # distribution, Table 5's rank_by and stages), read from the composed config, not from the key.
    cell, loss = fitting[0], resolved["loss"]
    assert cell.method == loss["name"]
    for option, value in cell.options:
        given = loss[option]
        assert (tuple(given) if isinstance(given, list) else given) == value, (option, given, value)



def test_ban_runs_the_spec_three_generations():
    """SPEC section 2: BAN trains 3 generations, in the sweep (experiment=ban_generations) as in
    scripts/run_ban.sh, each from generation 1 (plain CE, no teacher) on."""
    assert sweep_params("ban_generations")["loss.generation"] == ["1", "2", "3"]
    assert "\ngenerations=3\n" in (REPO / "scripts" / "run_ban.sh").read_text()
    assert compose(["loss=ban"]).loss.generation == 1

def test_zipf_variants_keep_the_method_name():
    """loss=zipf_<variant> is still loss.name=zipf; only the options differ (the table builder relies on it)."""
    expected = {
        "zipf_logits": {"rank_by": "logits", "stages": ["final"]},
        "zipf_dense1": {"rank_by": "dense", "stages": ["final"]},
        "zipf_dense2": {"rank_by": "dense", "stages": ["final", "penultimate"]},
        "zipf_constant": {"distribution": "constant"},
        "zipf_linear_decay": {"distribution": "linear_decay"},
        "zipf_random_uniform": {"distribution": "random_uniform"},
        "zipf_random_pareto": {"distribution": "random_pareto"},
        **{
            f"zipf_dense2_{shape}": {"rank_by": "dense", "stages": ["final", "penultimate"], "distribution": shape}
            for shape in ("constant", "linear_decay", "random_uniform", "random_pareto")
        },
    }
    require_files([CONFIG_DIR / "loss" / "zipf.yaml"])
    reference = OmegaConf.to_container(compose(["loss=zipf"]).loss, resolve=True)
    for option, changes in expected.items():
        loss = OmegaConf.to_container(compose([f"loss={option}"]).loss, resolve=True)
        assert loss == {**reference, **changes}, option


def test_table6_tinyimagenet_distribution_rows_differ_from_the_zipf_row_in_the_distribution_alone():
    """Sec. 4.4 compares soft-label distributions: every Zipf's LS run of the sweep has the Zipf row's
    options (Dense2: final + penultimate votes, the auxiliary head) but loss.distribution. (The other
    distributions ran with the final stage's votes, and without the auxiliary head's CE.)"""
    name = "table6_tinyimagenet_resnet18"
    losses = {}
    for overrides in sweep_points(name):
        loss = OmegaConf.to_container(compose([f"experiment={name}", *overrides]).loss, resolve=True)
        if loss["name"] == "zipf":
            losses[loss.pop("distribution")] = loss
    assert sorted(losses) == sorted(["zipf", "constant", "linear_decay", "random_uniform", "random_pareto"])
    assert losses["zipf"]["stages"] == ["final", "penultimate"] and losses["zipf"]["rank_by"] == "dense"
    assert all(loss == losses["zipf"] for loss in losses.values()), losses


def test_sweep_folder_names_leave_out_every_key_a_run_resumes_under():
    """A key that changes how a run executes (RESUME_TOLERATED) lets a single run resume under
    another value; in a sweep it also had to stay out of the job's folder name, or the sweep rerun
    with it (trainer.compile=true added, say) started every run again in new folders. tag names
    runs on purpose."""
    from zipfls_train.engine.resume import RESUME_TOLERATED

    hydra_config = yaml.safe_load((CONFIG_DIR / "hydra" / "default.yaml").read_text())
    excluded = set(hydra_config["job"]["config"]["override_dirname"]["exclude_keys"])
    assert RESUME_TOLERATED - {"tag"} <= excluded, sorted(RESUME_TOLERATED - {"tag"} - excluded)


def test_long_sweep_folder_names_keep_the_swept_values_and_stay_unique():
    constant = "dataset.num_classes_subset=5,dataset.root=/data/x,dataset.train_per_class=20,dataset.val_per_class=8,experiment_name=sweep,model.options.width=16"
    names = {seed: safe_dirname(f"{constant},loss=ce,seed={seed}") for seed in (0, 1)}
    assert names[0].startswith("num_classes_subset=5,root=_data_x,train_per_class=20,") and "/" not in names[0]
    assert ",loss=ce,seed=0__" in names[0] and ",loss=ce,seed=1__" in names[1]
    assert len(names[0]) <= 150 and names[0] != names[1]
    # Characters Windows refuses in names (a teacher checkpoint's drive letter; a value quoted for its
    # spaces) become "_" or, the quotes, go.
    assert safe_dirname('loss.teacher_checkpoint=C:\\runs\\best.pt,tag="_my run?"') == "loss.teacher_checkpoint=C__runs_best.pt,tag=_my run_"
    # Short names are the overrides as given; an enormous one is cut but keeps its unique hash.
    assert safe_dirname("loss=ce,seed=0") == "loss=ce,seed=0"
    huge = [safe_dirname(f"{'x' * 300},seed={seed}") for seed in (0, 1)]
    assert all(len(name) <= 150 for name in huge) and huge[0] != huge[1]
    assert huge[0].startswith("x" * 100) and ",seed=0__" in huge[0]
    # Still too long once the groups are gone: keys of several words become their initials, the
    # same in every run of a sweep whatever its values (a cut by length abbreviated them per run),
    # and the short swept values stay whole wherever they sort.
    names = [safe_dirname(",".join(f"dataset.option_number_{i}=value{i}" for i in range(8)) + f",loss=ce,seed={seed},trainer.zzz_last=1")
             for seed in (3, 12)]  # fmt: skip
    assert names[0].startswith("on0=value0,on1=value1,") and ",loss=ce,seed=3,zl=1__" in names[0]
    assert names[1].startswith("on0=value0,on1=value1,") and ",loss=ce,seed=12,zl=1__" in names[1]


# Normalisation (mean, std per RGB channel): ImageNet's are torchvision's documented constants,
# used for INAT21 too (the paper trains it with the ImageNet pipeline); CIFAR-100's are its train
# set's statistics as published with the CIFAR training recipes; TinyImageNet's are its 64 px train
# set's (checked against the data below).
NORMALISATION = {
    "imagenet": ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
    "inat21": ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
    "cifar100": ([0.5071, 0.4865, 0.4409], [0.2673, 0.2564, 0.2762]),
    "tinyimagenet": ([0.4802, 0.4481, 0.3975], [0.2770, 0.2691, 0.2821]),
}


@pytest.mark.parametrize("dataset", sorted(NORMALISATION))
def test_each_dataset_normalises_with_its_published_statistics(dataset):
    config = compose([f"dataset={dataset}"]).dataset
    assert (list(config.mean), list(config.std)) == NORMALISATION[dataset]


def test_tinyimagenet_mean_is_its_train_sets_mean():
    """The configured TinyImageNet mean against the 100,000 training images themselves (the 32 px
    pack: averaging 2x2 keeps the mean; JPEG moves it by ~0.002)."""
    from conftest import shared_data
    from zipfls_train.data.tinyimagenet import read_pack

    images = read_pack(shared_data(), "train").images
    assert len(images) == 100_000
    measured = images.double().mean(dim=(0, 2, 3)) / 255
    expected = torch.tensor(NORMALISATION["tinyimagenet"][0], dtype=torch.float64)
    torch.testing.assert_close(measured, expected, atol=0.005, rtol=0)
