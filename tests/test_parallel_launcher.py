"""hydra/launcher=parallel: a sweep's runs at once, each in its own process, on its own GPUs and
CPU cores (zipfls_train.engine.parallel_runs; hydra_plugins/zipfls_train_launcher)."""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, TINY_RUN
from zipfls_train.engine.config_checks import ConfigError
from zipfls_train.engine.parallel_runs import Job, Places, environment_for, run_jobs, split_cores, visible_gpus

# --- where runs go -------------------------------------------------------------------------------


def test_cores_are_split_in_consecutive_slices_that_differ_by_at_most_one():
    assert split_cores(range(8), 3) == [(0, 1, 2), (3, 4, 5), (6, 7)]
    assert split_cores([4, 5, 6, 7], 2) == [(4, 5), (6, 7)]
    assert split_cores([0, 1], 1) == [(0, 1)]
    assert split_cores([0, 1], 3) == [(0,), (1,), (0,)]  # fewer cores than places: shared, one each
    assert split_cores([], 2) == [(), ()]


def test_runs_spread_over_the_gpus_before_sharing_one_each_with_its_own_cores():
    places = Places(["0", "1"], per_gpu=2, cores=range(8))
    first, second, third = places.take(1), places.take(1), places.take(1)
    assert [(place.gpu, place.cores) for place in first + second + third] == [("0", (0, 1)), ("1", (2, 3)), ("0", (4, 5))]
    assert places.take(2) is None  # GPU 0 is full: a run of two GPUs waits
    places.give_back(first)
    both = places.take(2)
    assert sorted(place.gpu for place in both) == ["0", "1"]
    assert places.take(1) is None  # all four places taken
    assert sorted(environment_for(both)["CUDA_VISIBLE_DEVICES"].split(",")) == ["0", "1"]


def test_cpu_places_hold_cpu_runs_and_give_them_no_gpu():
    places = Places([], per_gpu=2, cores=[0, 1, 2])
    first, second = places.take(0), places.take(0)
    assert [(place.gpu, place.cores) for place in first + second] == [(None, (0, 1)), (None, (2,))]
    assert places.take(0) is None
    assert environment_for(first) == {"CUDA_VISIBLE_DEVICES": ""}  # auto must not find a GPU


def test_the_gpus_are_those_cuda_visible_devices_names_or_a_list(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2, 5,GPU-1a2b")
    assert visible_gpus("auto") == ["2", "5", "GPU-1a2b"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert visible_gpus("auto") == []
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    assert visible_gpus([0, 3]) == ["0", "3"]
    assert visible_gpus(["GPU-5f0c"]) == ["GPU-5f0c"]  # (a UUID: CUDA refuses one that does not exist)
    for wrong in ("0,1", 2, None, True, [0, 0], [0.5]):
        with pytest.raises(ConfigError, match=r"hydra.launcher.gpus"):
            visible_gpus(wrong)
    # A GPU this process does not see would leave its runs training on the CPU (device auto).
    with pytest.raises(ConfigError, match=r"hydra.launcher.gpus=\[1, 4\]: 4 is not a GPU this process sees \(0, 1, 2, 3: "):
        visible_gpus([1, 4])


# --- running them ----------------------------------------------------------------------------------


def _report_where_it_runs(send, seconds: float) -> None:  # (module level: spawned processes import it)
    time.sleep(seconds)
    send.send({"gpus": os.environ.get("CUDA_VISIBLE_DEVICES"), "end": time.monotonic()})


def _starting(target, arguments=lambda job: (), then=lambda: None):
    """A run_jobs starter: ``target(send, *arguments(job))`` in a spawned process; ``then()`` after
    each start."""

    def start(job: Job):
        context = multiprocessing.get_context("spawn")
        receive, send = context.Pipe(duplex=False)
        process = context.Process(target=target, args=(send, *arguments(job)))
        process.start()
        send.close()
        then()
        return process, receive

    return start


def test_jobs_run_at_most_as_many_at_once_as_there_are_places_each_with_its_gpus():
    jobs = [Job(index, gpus=1, payload=None) for index in range(3)] + [Job(3, gpus=2, payload=None)]
    started: list[float] = []
    ended: list[Job] = []
    before = os.environ.get("CUDA_VISIBLE_DEVICES")
    start = _starting(_report_where_it_runs, lambda job: (1.0,), then=lambda: started.append(time.monotonic()))
    assert run_jobs(jobs, Places(["0", "1"], per_gpu=1, cores=[]), start, on_end=ended.append) is None
    assert os.environ.get("CUDA_VISIBLE_DEVICES") == before  # (set only while each process started)
    assert all(job.exitcode == 0 for job in jobs) and sorted(job.index for job in ended) == [0, 1, 2, 3]
    gpus = [job.outcome["gpus"] for job in jobs]
    assert gpus[:2] == ["0", "1"] and gpus[3] == "0,1"
    # Two places: the third job started on a GPU after the job that held it had ended; the fourth
    # (two GPUs) after every other had.
    (before_it,) = [job for job in jobs[:2] if job.outcome["gpus"] == gpus[2]]
    assert started[2] >= before_it.outcome["end"]
    assert started[3] >= max(job.outcome["end"] for job in jobs[:3])


# --- a sweep of train.py ---------------------------------------------------------------------------

LAUNCHER = ["hydra/launcher=parallel", "hydra.launcher.cpu_runs=2"]


def _sweep(tmp_path: Path, *overrides: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "train.py", "-m", *LAUNCHER, *TINY_RUN, f"hydra.sweep.dir={tmp_path}/sweep", *overrides],
                          cwd=REPO, capture_output=True, text=True, timeout=timeout)  # fmt: skip


def _usable_cores() -> int:
    from zipfls_train.engine.cpu_cores import usable_cpu_cores

    return usable_cpu_cores()


@pytest.mark.slow
def test_a_sweep_runs_two_at_once_each_on_half_the_cores_with_its_output_in_its_log(tiny_pack_root, tmp_path):
    result = _sweep(tmp_path, f"dataset.root={tiny_pack_root}", "trainer.epochs=1", "trainer.max_steps_per_epoch=2", "loss=ce,zipf,ls")
    assert result.returncode == 0, result.stderr[-3000:]
    sweep = tmp_path / "sweep"
    runs = sorted(sweep.glob("*/summary.json"))
    assert len(runs) == 3 and all(json.loads(path.read_text())["status"] == "finished" for path in runs)
    lines = [line for line in result.stderr.splitlines() if line.startswith("[zipfls-train]")]
    assert lines[0] == f"[zipfls-train] 3 run(s) on the CPU, 2 run(s) at once; each run's console output goes to {sweep}/logs/"
    assert lines[1:3] == ["[zipfls-train] started 1/3 on the CPU: loss=ce", "[zipfls-train] started 2/3 on the CPU: loss=zipf"]
    assert lines.index("[zipfls-train] started 3/3 on the CPU: loss=ls") > 3  # after one of the first two ended
    assert sum(line.startswith("[zipfls-train] finished ") and "best val top-1" in line for line in lines) == 3
    # Each run's own console output is in its log, named as its folder.
    for run in runs:
        log = (sweep / "logs" / f"{run.parent.name}.log").read_text()
        assert "epoch 1/1" in log and f"run started: {run.parent}" in log
    # The two places split the cores the sweep may use; each run's record says how many it had.
    cores = _usable_cores()
    halves = {cores // 2, cores - cores // 2} if cores > 1 else {1}
    had = {json.loads((run.parent / "environment.jsonl").read_text().splitlines()[0])["cpu_cores"] for run in runs}
    assert had <= halves
    # The same command again: the finished runs are told from their folders, no process started.
    again = _sweep(tmp_path, f"dataset.root={tiny_pack_root}", "trainer.epochs=1", "trainer.max_steps_per_epoch=2", "loss=ce,zipf,ls")
    assert again.returncode == 0, again.stderr[-3000:]
    assert [line for line in again.stderr.splitlines() if line.startswith("[zipfls-train]")] == [
        "[zipfls-train] all 3 run(s) finished before: nothing to run"]


@pytest.mark.slow
def test_failed_runs_of_a_sweep_are_named_at_its_end_and_the_others_finish(tiny_pack_root, tmp_path):
    result = _sweep(tmp_path, f"dataset.root={tiny_pack_root}", "trainer.max_steps_per_epoch=2", "trainer.epochs=1,0")
    assert result.returncode == 1
    expected = "trainer.epochs must be an integer >= 1, got 0"
    (error,) = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    failed = Path(error.removeprefix("error: ").removesuffix(f": {expected}"))
    assert failed.parent == tmp_path / "sweep" and "epochs=0" in failed.name
    assert not failed.exists()  # (a refused run leaves no folder behind)
    assert result.stderr.rstrip().splitlines()[-2:] == ["[zipfls-train] 1 run(s) of the sweep failed:", f"{failed}: {expected}"]
    assert len(list((tmp_path / "sweep").glob("*/summary.json"))) == 1


APP = '''
import os, signal, hydra

@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg):
    if cfg.x == 2:
        raise RuntimeError("boom")
    if cfg.x == 3:
        os.kill(os.getpid(), signal.SIGKILL)
    print(f"x is {cfg.x}")

if __name__ == "__main__":
    main()
'''


def test_a_run_that_crashes_or_is_killed_is_reported_with_its_log_and_fails_the_sweep(tmp_path):
    """Any Hydra app can use the launcher; a run's exception (not a user error of train.py) or death
    ends in Hydra's report of the failed job, after the other runs."""
    (tmp_path / "conf/hydra/launcher").mkdir(parents=True)
    (tmp_path / "conf/hydra/launcher/parallel.yaml").write_text((REPO / "configs/hydra/launcher/parallel.yaml").read_text())
    (tmp_path / "conf/config.yaml").write_text("x: 0\n")
    (tmp_path / "app.py").write_text(APP)
    result = subprocess.run([sys.executable, "app.py", "-m", *LAUNCHER, "hydra.launcher.gpus=[]", "x=1,2,3", "hydra.sweep.dir=sweep"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 1
    logs = "sweep/logs"  # (as given: relative; the runs' subfolders are Hydra's default, the job number)
    assert "x is 1" in (tmp_path / logs / "0.log").read_text()
    lines = result.stderr.splitlines()
    assert "[zipfls-train] finished 1/3 x=1" in lines
    crashed, killed = f"sweep/1: RuntimeError: boom (traceback in {logs}/1.log)", f"sweep/2: its process was killed by SIGKILL; its log: {logs}/2.log"
    assert f"error: {crashed}" in lines and f"error: {killed}" in lines
    assert 'raise RuntimeError("boom")' in (tmp_path / logs / "1.log").read_text()  # the traceback
    # Named again at the end, both (this app has no FailedRuns callback: the launcher says it).
    assert lines[-3] == "[zipfls-train] 2 run(s) of the sweep failed:" and set(lines[-2:]) == {crashed, killed}  # (as they ended)

@pytest.mark.slow
def test_ctrl_c_stops_the_running_runs_at_a_checkpoint_and_starts_no_other(tiny_pack_root, tmp_path):
    """SIGINT to the sweep's process alone (a terminal sends it to the runs too: they take the two as
    one request) goes on to the runs, which save and stop; the sweep then exits, naming what is left."""
    command = [sys.executable, "train.py", "-m", *LAUNCHER, *TINY_RUN, f"hydra.sweep.dir={tmp_path}/sweep", f"dataset.root={tiny_pack_root}",
               "trainer.epochs=200", "trainer.max_steps_per_epoch=2", "trainer.zipf_fit_at_end=false", "loss=ce,zipf,ls"]  # fmt: skip
    sweep = subprocess.Popen(command, cwd=REPO, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while len(list((tmp_path / "sweep").glob("*/metrics.jsonl"))) < 2:  # both first runs are training
            assert sweep.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
        sweep.send_signal(signal.SIGINT)
        _, stderr = sweep.communicate(timeout=120)
    finally:
        if sweep.poll() is None:
            sweep.kill()
    assert sweep.returncode == 1, stderr[-3000:]
    runs = sorted((tmp_path / "sweep").glob("*/checkpoints/last.pt"))
    assert len(runs) == 2 and not list((tmp_path / "sweep").glob("*loss=ls*"))
    lines = stderr.splitlines()
    assert sum(line.startswith("[zipfls-train] stopped ") and ": stopped; a rerun resumes it from " in line for line in lines) == 2
    assert lines[-1].startswith("[zipfls-train] SIGINT: the sweep stops here (1 run(s) not started); rerun the same command to go on")
    for log in (tmp_path / "sweep/logs").iterdir():
        assert "error: interrupted (SIGINT)" in log.read_text()


@pytest.mark.slow
def test_ban_generations_start_once_the_generation_they_distil_from_has_finished(tiny_pack_root, tmp_path):
    """Generation 2 distils from generation 1's best checkpoint, a sibling run of the sweep: with a
    place free it still waits for generation 1 to finish (started at once, it would find no
    checkpoint, or an early epoch's)."""
    result = _sweep(tmp_path, "experiment=ban_generations", f"dataset.root={tiny_pack_root}", "trainer.epochs=1",
                    "trainer.max_steps_per_epoch=2", "loss.generation=1,2", "seed=0,1")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stderr.splitlines()
    for seed in (0, 1):
        first = next(i for i, line in enumerate(lines) if line.startswith("[zipfls-train] finished ") and f"loss.generation=1 seed={seed}" in line)
        second = next(i for i, line in enumerate(lines) if line.startswith("[zipfls-train] started ") and f"loss.generation=2 seed={seed}" in line)
        assert second > first, lines
    assert len(list((tmp_path / "sweep").glob("*/summary.json"))) == 4


def _exit_with(send, code: int) -> None:
    send.close()
    sys.exit(code)


def test_a_job_after_one_that_did_not_end_well_never_starts_nor_do_those_after_it():
    # 0 fails; 1 comes after it, 2 after 1; 3 after 4, which ends well (a later job: order waits on it).
    jobs = [Job(0, 0, 1), Job(1, 0, 0, after=(0,)), Job(2, 0, 0, after=(1,)), Job(3, 0, 0, after=(4,)), Job(4, 0, 0)]
    ended: list[int] = []
    start = _starting(_exit_with, lambda job: (job.payload,))
    assert run_jobs(jobs, Places([], per_gpu=2, cores=[]), start, on_end=lambda job: ended.append(job.index)) is None
    assert [job.exitcode for job in jobs] == [1, None, None, 0, 0]
    assert (jobs[1].blocked_by, jobs[2].blocked_by) == (jobs[0], jobs[1])
    assert ended.index(3) > ended.index(4) and sorted(ended) == [0, 1, 2, 3, 4]


def _stopped_by_a_signal_held_while_it_started(send) -> None:
    got = []
    signal.signal(signal.SIGTERM, lambda number, frame: got.append(number))
    from zipfls_train.stop_signals import release_stop_signals

    release_stop_signals()
    deadline = time.monotonic() + 10
    while not got and time.monotonic() < deadline:
        time.sleep(0.05)
    send.send({"got_signal": bool(got)})


def test_a_signal_that_comes_while_a_run_starts_reaches_it_and_no_other_starts():
    """SIGTERM to the sweep's process alone (kill, a scheduler, timeout) while a run's process is
    being started: held back meanwhile, it must still reach that run."""

    # (held back here: the launcher starts runs with it blocked)
    start = _starting(_stopped_by_a_signal_held_while_it_started, then=lambda: os.kill(os.getpid(), signal.SIGTERM))
    jobs = [Job(0, 0, None), Job(1, 0, None)]
    assert run_jobs(jobs, Places([], per_gpu=1, cores=[]), start) == "SIGTERM"
    assert jobs[0].outcome == {"got_signal": True}
    assert not jobs[1].ended  # never started


def _send_a_large_outcome(send) -> None:
    send.send({"error": "x" * 1_000_000})  # (far more than a pipe holds: blocks until it is read)


def test_a_large_outcome_is_read_while_its_process_waits_to_send_it():
    def hung(number, frame):
        raise TimeoutError("run_jobs waited for a process that waited for it")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(60)
    try:
        jobs = [Job(0, 0, None)]
        assert run_jobs(jobs, Places([], per_gpu=1, cores=[]), _starting(_send_a_large_outcome)) is None
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert len(jobs[0].outcome["error"]) == 1_000_000 and jobs[0].exitcode == 0


def test_launcher_values_that_cannot_work_are_one_error_line(tmp_path):
    for value, expected in (("hydra.launcher.runs_per_gpu=0", "error: hydra.launcher.runs_per_gpu must be an integer >= 1, got 0"),
                            ("hydra.launcher.cpu_runs=two", "error: hydra.launcher.cpu_runs must be an integer >= 1, got 'two'"),
                            ("hydra.launcher.gpus=null", "error: hydra.launcher.gpus must be auto or a list of GPUs (indices or UUIDs, e.g. [0,1]), got None")):  # fmt: skip
        result = _sweep(tmp_path, value, "loss=ce,zipf", timeout=120)
        assert (result.returncode, result.stderr.strip().splitlines()[-1]) == (1, expected), result.stderr[-2000:]


def _sweep_process(tmp_path: Path, tiny_pack_root: Path, *overrides: str) -> subprocess.Popen:
    command = [sys.executable, "train.py", "-m", *LAUNCHER, *TINY_RUN, f"hydra.sweep.dir={tmp_path}/sweep", f"dataset.root={tiny_pack_root}",
               "trainer.zipf_fit_at_end=false", *overrides]  # fmt: skip
    return subprocess.Popen(command, cwd=REPO, stderr=subprocess.PIPE, text=True, start_new_session=True)


@pytest.mark.slow
@pytest.mark.parametrize("stop", ["SIGINT", "SIGTERM"])
def test_a_stop_while_the_runs_start_stops_them_quietly_with_nothing_saved(stop, tiny_pack_root, tmp_path):
    """The runs' processes get the terminal's SIGINT (or a scheduler's SIGTERM to the job) too, the
    same process group, while they import torch or set up: each stops without a traceback, and the
    sweep says that nothing was saved."""
    sweep = _sweep_process(tmp_path, tiny_pack_root, "trainer.epochs=2", "loss=ce,zipf,ls")
    try:
        for line in sweep.stderr:  # (read as it comes: the second run started)
            if line.startswith("[zipfls-train] started 2/3"):
                break
        os.killpg(sweep.pid, signal.Signals[stop])
        _, rest = sweep.communicate(timeout=120)
    finally:
        if sweep.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(sweep.pid, signal.SIGKILL)
    assert sweep.returncode == 1, rest[-3000:]
    lines = rest.splitlines()
    assert sum(line.endswith(": stopped before its first checkpoint; a rerun starts it over") for line in lines) == 2, rest
    assert lines[-1].startswith(f"[zipfls-train] {stop}: the sweep stops here (1 run(s) not started)")
    for log in (tmp_path / "sweep/logs").iterdir():
        text = log.read_text()
        assert "Traceback" not in text
        assert "stopped at once (" not in text or f"stopped at once ({stop})" in text  # (when it came in train.py's setup)


A_KILLED_SWEEP = """
import multiprocessing, os, signal, sys, threading, time


def run(path):
    from zipfls_train.engine.parallel_run_process import _stop_when_the_sweep_process_dies

    terms = []
    signal.signal(signal.SIGTERM, lambda number, frame: terms.append(time.monotonic()))
    _stop_when_the_sweep_process_dies()
    open(path + ".ready", "w").close()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not (terms and time.monotonic() - terms[0] > 2):
        time.sleep(0.05)
    with open(path, "w") as file:
        file.write(str(len(terms)))


if __name__ == "__main__":
    for _ in range(8):  # (a sweep's process has threads: Hydra's, the launcher's, torch's)
        threading.Thread(target=time.sleep, args=(60,), daemon=True).start()
    multiprocessing.get_context("spawn").Process(target=run, args=(sys.argv[1],)).start()
    while not os.path.exists(sys.argv[1] + ".ready"):
        time.sleep(0.05)
    os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's (prctl)")
def test_a_run_hears_once_that_its_sweep_process_was_killed_however_many_threads_it_had(tmp_path):
    """The kernel sends the parent-death signal again each time the run is handed on from one
    ending thread of the killed process to the next: as SIGTERM, the second one meant "stop at once,
    unsaved" (seen in CI). The run must get one SIGTERM."""
    script, result = tmp_path / "sweep.py", tmp_path / "terms"
    script.write_text(A_KILLED_SWEEP)
    subprocess.run([sys.executable, str(script), str(result)], cwd=REPO, timeout=120)
    deadline = time.monotonic() + 60
    while not result.exists() or not result.read_text():
        assert time.monotonic() < deadline, "the run process wrote nothing"
        time.sleep(0.1)
    assert result.read_text() == "1"


@pytest.mark.slow
def test_runs_whose_sweep_process_dies_save_and_stop_rather_than_train_on(tiny_pack_root, tmp_path):
    sweep = _sweep_process(tmp_path, tiny_pack_root, "trainer.epochs=200", "trainer.max_steps_per_epoch=2", "loss=ce,zipf")
    try:
        deadline = time.monotonic() + 120
        while len(list((tmp_path / "sweep").glob("*/metrics.jsonl"))) < 2:  # both runs are training
            assert sweep.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
        sweep.kill()  # (SIGKILL: it can pass nothing on)
        sweep.wait()
        logs = list((tmp_path / "sweep/logs").iterdir())
        while not all("error: interrupted (SIGTERM)" in log.read_text() for log in logs):
            assert time.monotonic() < deadline, [log.read_text()[-500:] for log in logs]
            time.sleep(0.2)
        time.sleep(1)  # (a second SIGTERM would stop a run at once, or land in its exit: a traceback)
        for log in logs:
            assert "stopped at once" not in log.read_text() and "Traceback" not in log.read_text(), log.read_text()[-1500:]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(sweep.pid, signal.SIGKILL)  # (whatever is left of the group)


def test_a_ban_generation_whose_teacher_run_failed_is_not_started_and_named_at_the_end(tiny_pack_root, tmp_path):
    result = _sweep(tmp_path, "experiment=ban_generations", f"dataset.root={tiny_pack_root}", "trainer.epochs=0", "loss.generation=1,2")
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 2, result.stderr[-3000:]
    teacher = Path(errors[0].removeprefix("error: ").split(": ")[0])
    assert "generation=1" in teacher.name and errors[0].endswith(": trainer.epochs must be an integer >= 1, got 0")
    assert "generation=2" in errors[1] and errors[1].endswith(f": not started: it distils from run 1/2 ({teacher}), which did not finish")
    assert result.stderr.splitlines()[-3] == "[zipfls-train] 2 run(s) of the sweep failed:"


@pytest.mark.slow
def test_a_run_placed_on_a_gpu_cuda_does_not_find_is_refused_not_trained_on_the_cpu(tiny_pack_root, tmp_path):
    """The sweep's own CUDA_VISIBLE_DEVICES names GPUs the launcher cannot check without CUDA (as a
    UUID in hydra.launcher.gpus): a run placed on one that does not exist would find no GPU and,
    with trainer.device=auto, train on the CPU while the console says GPU."""
    result = subprocess.run([sys.executable, "train.py", "-m", *LAUNCHER, *[item for item in TINY_RUN if item != "trainer.device=cpu"],
                             f"dataset.root={tiny_pack_root}", f"hydra.sweep.dir={tmp_path}/sweep", "trainer.max_steps_per_epoch=1",
                             "hydra.launcher.gpus=[GPU-00000000-0000-0000-0000-000000000000]", "loss=ce,zipf"],
                            cwd=REPO, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 1
    expected = ("the launcher placed this run on GPU GPU-00000000-0000-0000-0000-000000000000, but CUDA finds 0 of them: "
                "hydra.launcher.gpus or CUDA_VISIBLE_DEVICES names a GPU this machine does not have")  # fmt: skip
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 2 and errors[0].endswith(expected) and errors[1].endswith("the same error as the previous failed run")
    assert not list((tmp_path / "sweep").glob("*/metrics.jsonl"))  # nothing trained
