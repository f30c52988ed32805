"""The benchmark scripts that scripts/gpu_check.sh runs, on the CPU at toy sizes: a GPU session is
short and rare, and a script that fails at import or on an option costs its measurements."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys

import pytest

from conftest import REPO, shared_data


def run_script(*arguments: str) -> str:
    result = subprocess.run([sys.executable, *arguments], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def ratio(output: str, label: str) -> float:
    (value,) = re.findall(rf"{re.escape(label)}: ([0-9.]+)", output)
    return float(value)


def assert_ratio_of_printed_times(printed: float, numerator_ms: float, denominator_ms: float) -> None:
    """``printed`` (3 decimals, from the unrounded times) is numerator / denominator of the times
    printed to 0.01 ms: off by the ratio's rounding plus each time's relative rounding (up to 0.005 ms
    each), which grows with the ratio (a zipf step 33x a CE one at this toy size on a loaded machine)."""
    expected = numerator_ms / denominator_ms
    assert abs(printed - expected) <= 0.0005 + expected * (0.005 / numerator_ms + 0.005 / denominator_ms) * 1.01 + 1e-9


def test_bench_train_prints_images_per_second_and_ratios():
    output = run_script("scripts/bench_train.py", "--device", "cpu", "--cases", "small", "--batch-size", "4", "--width", "4",
                        "--steps", "1", "--warmup", "1", "--rounds", "1")  # fmt: skip
    for loss in ("ce", "ls", "zipf", "zipf_dense2"):
        assert re.search(rf"loss={loss}\s+[0-9.]+ ms/step\s+[0-9]+ img/s", output), output
        # each variant's figure printed as soon as it is warm (a time limit keeps what ran)
        assert re.search(rf"loss={loss}\s+warm-up\s+[0-9.]+ s, first look\s+[0-9]+ img/s", output), output
    # the ratio is the printed step times' (each rounded to 0.01 ms): zipf ms / ce ms
    ms = {loss: float(re.search(rf"loss={loss}\s+([0-9.]+) ms/step", output).group(1)) for loss in ("ce", "zipf")}
    assert_ratio_of_printed_times(ratio(output, "step-time ratio loss=zipf / loss=ce"), ms["zipf"], ms["ce"])
    # the plain PyTorch step on the same model, beside the trainer's: the trainer's cost is their ratio
    plain = float(re.search(r"plain step, same model\s+([0-9.]+) ms/step", output).group(1))
    assert_ratio_of_printed_times(ratio(output, "step-time ratio loss=ce / plain step, same model"), ms["ce"], plain)


def test_bench_train_compiled_real_loader_case_reports_the_data_stall():
    # The one compiled case: the real-loader one reads the synthetic compiled case's figures for its
    # data-stall line (reduce-overhead only, one compilation per loss; on the CPU without CUDA graphs).
    output = run_script("scripts/bench_train.py", "--device", "cpu", "--cases", "compile,compile_real", "--compile-modes",
                        "reduce-overhead", "--data", str(shared_data()), "--batch-size", "4", "--width", "4",
                        "--steps", "1", "--warmup", "1", "--rounds", "1", "--precision", "fp32")  # fmt: skip
    for case in ("compiled", "real compiled"):
        for loss in ("ce", "zipf"):
            assert re.search(rf"32px {case} +compile=reduce-overhead,loss={loss}\s+[0-9.]+ ms/step", output), output
    assert "data-stall fraction (compile=reduce-overhead,loss=zipf)" in output, output
    # the eager step runs beside the compiled ones, and the compiled/eager ratio is their step times'
    ms = {label: float(re.search(rf"32px compiled +{label}\s+([0-9.]+) ms/step", output).group(1))
          for label in ("eager,loss=ce", "compile=reduce-overhead,loss=ce")}  # fmt: skip
    assert_ratio_of_printed_times(ratio(output, "step-time ratio compile=reduce-overhead,loss=ce / eager,loss=ce"),
                                  ms["compile=reduce-overhead,loss=ce"], ms["eager,loss=ce"])  # fmt: skip


@pytest.mark.parametrize(("case", "setting"), [("layout", "channels_last"), ("precision", "precision")])
def test_bench_train_setting_cases_time_both_values_per_model(case, setting):
    output = run_script("scripts/bench_train.py", "--device", "cpu", "--cases", case, "--models", "cifar_resnet18,resnet18",
                        "--batch-size", "4", "--width", "4", "--r50-batch-size", "2", "--steps", "1", "--warmup", "1", "--rounds", "1")  # fmt: skip
    before, after = {"layout": ("false", "true"), "precision": ("fp32", "bf16")}[case]
    for model in ("cifar_resnet18", "resnet18"):
        ms = {value: float(re.search(rf"\s{model},{setting}={value}\s+([0-9.]+) ms/step", output).group(1)) for value in (before, after)}
        printed = ratio(output, f"step-time ratio {model},{setting}={after} / {model},{setting}={before}")
        assert_ratio_of_printed_times(printed, ms[after], ms[before])


def test_bench_train_threads_case_times_each_thread_count_side_by_side():
    output = run_script("scripts/bench_train.py", "--device", "cpu", "--cases", "threads", "--thread-counts", "2,1",
                        "--batch-size", "4", "--width", "4", "--steps", "1", "--warmup", "1", "--rounds", "1")  # fmt: skip
    assert re.search(r"CPU: \d+ torch threads by default, \d+ usable cores \(cgroup CPU limit: (none|[0-9.]+ CPUs)\)", output), output
    ms = {n: float(re.search(rf"threads={n}\s+([0-9.]+) ms/step", output).group(1)) for n in (1, 2)}
    assert_ratio_of_printed_times(ratio(output, "step-time ratio threads=1 / threads=2"), ms[1], ms[2])


def test_bench_loader_reports_the_data_stall_of_its_own_figures():
    output = run_script("scripts/bench_loader.py", "--device", "cpu", "--model", "resnet18", "--batch-size", "4", "--workers", "1",
                        "--steps", "2", "--warmup", "1", "--samples", "16", "--image-size", "32")  # fmt: skip
    rate = {name: float(value) for name, value in re.findall(r"^(loader|model alone|loader \+ model) +([0-9.]+)$", output, re.MULTILINE)}
    ((stall, need),) = re.findall(r"data stall: ([0-9]+)% of step time waiting for data \(loader alone ([0-9.]+)x", output)
    # (a loader + model faster than the model alone, the timing noise of short runs, is no stall: 0%)
    # The percentage is rounded, and computed from the unrounded rates, which are printed to 0.05
    # images/s: the stall recomputed from the printed ones may differ by that rounding too.
    with_model, alone = rate["loader + model"], rate["model alone"]
    printed_rounding = 100 * 0.05 * (1 / alone + with_model / alone**2)
    assert abs(int(stall) - 100 * max(0.0, 1 - with_model / alone)) <= 0.5 + printed_rounding, output
    assert abs(float(need) - rate["loader"] / rate["model alone"]) <= 0.005 + 0.1 / rate["model alone"] * float(need), output


def test_bench_loss_overhead_prints_one_line_per_case():
    output = run_script("scripts/bench_loss_overhead.py", "--device", "cpu", "--cases", "cifar100", "--batch-size", "4",
                        "--width", "4", "--repeats", "1", "--warmup", "1", "--loss-repeats", "1")  # fmt: skip
    (line,) = [line for line in output.splitlines() if line.startswith("cifar100")]
    median = {name: float(value) for name, value in re.findall(r"(ce|ls|zipf) ([0-9.]+)", line.split("median ms")[1].split("time")[0])}
    (printed,) = re.findall(r"time zipf/ce ([0-9.]+)", line.split("| min ms")[0])
    assert abs(float(printed) - median["zipf"] / median["ce"]) < 0.002 + 0.1 / median["ce"], line  # medians printed to 0.1 ms
    assert "isolated loss ms" in line, line


def test_bench_methods_prints_every_method_against_ce():
    output = run_script("scripts/bench_methods.py", "--device", "cpu", "--width", "4", "--batch", "4", "--classes", "10",
                        "--dataset", "cifar100", "--rounds", "1", "--warmup", "0", "--methods", "ce,pskd,ban")  # fmt: skip
    rows = {line.split()[0]: line.split() for line in output.splitlines() if line.split() and line.split()[0] in ("ce", "pskd", "ban")}
    assert sorted(rows) == ["ban", "ce", "pskd"], output
    for name, row in rows.items():  # the "x CE" column: this method's ms/step over CE's (ms printed to 0.1)
        assert abs(float(row[2]) - float(row[1]) / float(rows["ce"][1])) <= 0.005 + 0.1 / float(rows["ce"][1]), row


def test_profile_step_lists_kernels_and_the_difference_to_ce():
    # (eager only: a compiled variant adds 40 s of CPU compilation and no code path of the script)
    output = run_script("scripts/profile_step.py", "--device", "cpu", "--width", "4", "--batch-size", "4", "--steps", "1",
                        "--warmup", "1", "--compile", "false", "--top", "3", "--losses", "ce,zipf,zipf+loss.kernel=torch")  # fmt: skip
    for loss in ("ce", "zipf", "zipf+loss.kernel=torch"):
        assert f"== loss={loss}, compile=false:" in output, output
    for loss in ("zipf", "zipf\\+loss.kernel=torch"):
        assert re.search(rf"-- loss={loss} minus loss=ce, compile=false: [+-][0-9.]+ us/step in all", output), output


def test_gpu_check_is_valid_bash():
    subprocess.run(["bash", "-n", "scripts/gpu_check.sh"], cwd=REPO, check=True)


def test_the_demo_reports_the_run_it_trained_not_the_newest_one(tiny_pack_root, tmp_path):
    """`make demo` (scripts/demo.py) prints the result and folder of its own run: rerun after another
    run, it printed whichever summary was newest. Its data folder's name is one a laptop's folders
    have (accents, an apostrophe, brackets, a comma): Hydra's override grammar refused it unquoted
    (and a comma unquoted makes a sweep)."""
    data = tmp_path / "Jane's dätä (copy), v2"
    shutil.copytree(tiny_pack_root, data)
    tiny = ["dataset.num_classes=10", "dataset.num_classes_subset=5", "dataset.train_per_class=8", "dataset.val_per_class=4",
            "model.options.width=8", "trainer.epochs=1", "trainer.batch_size=8", "trainer.device=cpu", "trainer.progress_bar=false"]
    demo = ["scripts/demo.py", "--data", str(data), *tiny]
    first = run_script(*demo, f"hydra.run.dir={tmp_path}/seed0")
    assert f"Run folder:       {tmp_path}/seed0" in first
    run_script(*demo, "seed=1", f"hydra.run.dir={tmp_path}/seed1")
    again = run_script(*demo, f"hydra.run.dir={tmp_path}/seed0")  # finished: reported, not retrained
    assert "run already finished" in again and f"Run folder:       {tmp_path}/seed0" in again
    best = re.search(r"Demo finished: best val top-1 ([0-9.]+)%", again).group(1)
    assert best == re.search(r"Demo finished: best val top-1 ([0-9.]+)%", first).group(1)


def test_dependency_floors_are_read_from_the_project_and_the_test_extra(tmp_path):
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        from check_dependency_floors import declared_floors
    finally:
        sys.path.remove(str(REPO / "scripts"))
    (tmp_path / "pyproject.toml").write_text(
        '[project]\ndependencies = ["torch>=2.8,<=2.14.1", "timm>=1.0.31", "Pillow >= 9.0", "hydra-core>=1.3,<1.4", "tqdm"]\n'
        '[project.optional-dependencies]\ntest = ["pytest>=7.4", "pillow>=10.2", "hydra-core[extra]>=1.2", "triton; sys_platform == \'linux\'"]\n'
    )
    # torch keeps the installed build; the test extra's higher Pillow floor wins, its lower Hydra one does not.
    assert declared_floors(tmp_path / "pyproject.toml") == {
        "timm": "1.0.31", "pillow": "10.2", "hydra-core": "1.3", "pytest": "7.4",
    }


def test_bench_sweep_times_the_same_sweep_under_both_launchers():
    output = run_script("scripts/bench_sweep.py", "--data", str(shared_data()), "--rounds", "1", "--losses", "ce,zipf", "--",
                        "trainer.epochs=1", "trainer.max_steps_per_epoch=1", "dataset.train_per_class=8", "trainer.batch_size=16",
                        "model.options.width=4")  # fmt: skip
    seconds = {name: float(re.search(rf"round 1 {name}\s+([0-9.]+) s", output).group(1)) for name in ("basic", "parallel")}
    assert_ratio_of_printed_times(ratio(output, "parallel/basic"), seconds["parallel"], seconds["basic"])
