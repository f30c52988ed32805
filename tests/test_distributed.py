"""DDP on CPU (gloo, 2 processes) and exact resume after SIGKILL."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, TINY_RUN, compose
from zipfls_train.engine.checkpoint import load_checkpoint
from zipfls_train.engine.run import run_training

# GroupNorm: per-sample statistics, so splitting a batch over processes changes nothing but the
# gradient all-reduce, which is what these tests check (BatchNorm would see half-batches per rank).
# A small lr: float differences of the all-reduce order (~1e-8) are amplified by every step of a
# large-lr start (x100 per step at lr 0.1 on this tiny net), which would test chaos, not DDP.
# fp32 (trainer.precision=auto is bf16 on CPUs with AMX): bf16 rounds each split of the batch its
# own way. NCHW: the CPU's NHWC convolutions (oneDNN) sum a batch's weight gradients in an order that
# depends on the batch (32 in one process, 16 per rank), 1-ulp differences that three steps of this
# net grow to 1e-5; NCHW ones agree to the all-reduce's rounding. channels_last: its own test below.
DDP_RUN = [*TINY_RUN, "model.options.norm=group", "trainer.batch_size=32", "trainer.epochs=1", "loss=ce", "optim.lr=0.02",
           "dataset.num_classes_subset=5", "dataset.val_per_class=7", "trainer.eval_batch_size=4", "trainer.channels_last=false",
           "trainer.precision=fp32"]


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run_dir / "checkpoints/last.pt")["model"]


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_two_process_ddp_matches_one_process_on_the_global_batch(tiny_pack_root, tmp_path):
    common = [*DDP_RUN, f"dataset.root={tiny_pack_root}", "trainer.max_steps_per_epoch=3"]
    run_training(compose([*common, "trainer.devices=1"]), tmp_path / "single")
    summary = run_training(compose([*common, "trainer.devices=2"]), tmp_path / "ddp")
    # The spawned run returns what one process returns: the summary rank 0 wrote.
    assert summary == json.loads((tmp_path / "ddp" / "summary.json").read_text()) and summary["processes"] == 2
    single, ddp = _weights(tmp_path / "single"), _weights(tmp_path / "ddp")
    # The tolerance: the same one-process run with 1 or 2 threads (another summation order) ends 2.8e-4
    # apart (the stem's weights, after these 3 steps; the earlier 1e-5 held only for some
    # OMP_NUM_THREADS), while ranks that skipped the gradient average (a half batch each) end 2.3e-2 apart.
    for name, tensor in single.items():
        torch.testing.assert_close(ddp[name], tensor, rtol=1e-4, atol=2e-3, msg=name)
    # 35 val images over 2 ranks (18 + 17): each counted once, so accuracies agree exactly.
    a, b = _metrics(tmp_path / "single")[-1], _metrics(tmp_path / "ddp")[-1]
    assert a["val_images"] == b["val_images"] == 35  # (a rank scoring the whole set would count 70)
    assert a["val_top1"] == b["val_top1"] and a["val_top5"] == b["val_top5"]
    correct = a["val_top1"] * 35 / 100
    assert abs(correct - round(correct)) < 1e-9  # a whole number of images out of 35


def test_two_process_ddp_trains_the_heads_of_a_frozen_backbone_as_one_process(tiny_pack_root, tmp_path):
    # optim.backbone_lr_factor=0 takes the backbone's gradients away before DDP registers the
    # parameters: frozen after, DDP would wait for their gradients and fail at the second step.
    common = [*DDP_RUN, f"dataset.root={tiny_pack_root}", "trainer.max_steps_per_epoch=3", "optim.backbone_lr_factor=0"]
    run_training(compose([*common, "trainer.devices=1"]), tmp_path / "single")
    run_training(compose([*common, "trainer.devices=2"]), tmp_path / "ddp")
    single, ddp = _weights(tmp_path / "single"), _weights(tmp_path / "ddp")
    for name, tensor in single.items():
        if name.startswith("backbone."):  # the same initial weights (rank 0's, broadcast), never moved
            assert torch.equal(ddp[name], tensor), name
        else:
            torch.testing.assert_close(ddp[name], tensor, rtol=1e-4, atol=2e-3, msg=name)


def test_two_process_ddp_trains_channels_last_models_as_one_process(tiny_pack_root, tmp_path, monkeypatch):
    # DDP's gradient buckets hold channels_last gradients as views in the parameters' own strides:
    # one step agrees to float rounding (a wrong layout would scramble each 4-d weight's gradient).
    common = [*DDP_RUN, f"dataset.root={tiny_pack_root}", "trainer.max_steps_per_epoch=1", "trainer.channels_last=true"]
    run_training(compose([*common, "trainer.devices=1"]), tmp_path / "single")
    monkeypatch.setenv("MASTER_ADDR", "head.cluster.example")  # the caller's own (the ranks use loopback)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    summary = run_training(compose([*common, "trainer.devices=2"]), tmp_path / "ddp")
    assert os.environ["MASTER_ADDR"] == "head.cluster.example" and "MASTER_PORT" not in os.environ  # as the caller had them
    # The spawned run returns what one process returns: the summary rank 0 wrote.
    assert summary == json.loads((tmp_path / "ddp" / "summary.json").read_text()) and summary["processes"] == 2
    single, ddp = _weights(tmp_path / "single"), _weights(tmp_path / "ddp")
    assert single["backbone.stem.0.weight"].is_contiguous(memory_format=torch.channels_last)  # the layout under test
    for name, tensor in single.items():
        torch.testing.assert_close(ddp[name], tensor, rtol=1e-6, atol=1e-7, msg=name)


def test_torchrun_two_processes_match_one_process(tiny_pack_root, tmp_path):
    common = [*DDP_RUN, f"dataset.root={tiny_pack_root}", "trainer.max_steps_per_epoch=3"]
    run_training(compose(common), tmp_path / "single")
    torchrun = Path(sys.executable).with_name("torchrun")
    # trainer.devices asks for 3: torchrun's 2 processes are what runs, said once and recorded.
    result = subprocess.run([str(torchrun), "--standalone", "--nproc-per-node=2", "train.py", *common, "trainer.devices=3",
                             f"hydra.run.dir={tmp_path}/torchrun"], cwd=REPO, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    warned = [line for line in result.stderr.splitlines() if line.startswith("warning: trainer.devices=3 is not used under torchrun")]
    assert len(warned) == 1 and "which started 2 process(es) per node" in warned[0], result.stderr[-3000:]
    assert "devices: 2" in (tmp_path / "torchrun/config.yaml").read_text()
    assert json.loads((tmp_path / "torchrun/summary.json").read_text())["processes"] == 2
    single, ranked = _weights(tmp_path / "single"), _weights(tmp_path / "torchrun")
    # The tolerance of the spawned DDP test above: torchrun gives its ranks OMP_NUM_THREADS=1, and
    # with OMP_NUM_THREADS=1 in the test's own process too (another summation order) 1e-5 failed.
    for name, tensor in single.items():
        torch.testing.assert_close(ranked[name], tensor, rtol=1e-4, atol=2e-3, msg=name)
    ranked_metrics, single_metrics = _metrics(tmp_path / "torchrun")[-1], _metrics(tmp_path / "single")[-1]
    assert ranked_metrics["val_images"] == single_metrics["val_images"] == 35
    assert ranked_metrics["val_top1"] == single_metrics["val_top1"]


def test_under_torchrun_a_user_error_is_one_line_not_one_per_rank(tiny_pack_root, tmp_path):
    """Every rank of a node raises the same user error (a config value, the node's data): its first
    rank says it; torchrun's own report of the failed processes follows, as torchrun prints it."""
    torchrun = Path(sys.executable).with_name("torchrun")
    result = subprocess.run([str(torchrun), "--standalone", "--nproc-per-node=2", "train.py", *DDP_RUN, f"dataset.root={tiny_pack_root}",
                             "trainer.precision=fp8", f"hydra.run.dir={tmp_path}/run"], cwd=REPO, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: trainer.precision must be one of ['auto', 'fp32', 'bf16', 'fp16'], got 'fp8'"], result.stderr[-3000:]


def test_under_torchrun_one_ranks_own_error_is_said_by_that_rank_and_in_torchruns_report(tiny_pack_root, tmp_path):
    """A user error only rank 1 meets (here its data root, which differs by LOCAL_RANK; in a cluster a
    corrupt image in its shard, or a node without the data) used to be said by no one: only each
    node's first rank printed errors, and rank 0 only lost its peer. Now the rank that meets it says
    it, once, and writes it where torchrun's failure report reads it; rank 0, on the same node, adds
    nothing."""
    (tmp_path / "root0").symlink_to(tiny_pack_root)
    torchrun = Path(sys.executable).with_name("torchrun")
    result = subprocess.run([str(torchrun), "--standalone", "--nproc-per-node=2", "train.py", *DDP_RUN,
                             f"dataset.root={tmp_path}/root${{oc.env:LOCAL_RANK}}", f"hydra.run.dir={tmp_path}/run"],
                            cwd=REPO, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode != 0
    said = f"TinyImageNet not found under dataset.root='{tmp_path}/root1'"
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {said} (resolved: {tmp_path}/root1)."], result.stderr[-3000:]
    assert f"DatasetError: {said}" in result.stderr  # the report's traceback of rank 1, from its error file
    assert "another rank's process ended" not in result.stderr


def test_on_two_nodes_the_one_without_the_data_says_so_and_the_other_says_it_lost_it(tiny_pack_root, tmp_path):
    """Two torchrun "nodes" of one rank each on this machine (static rendezvous), node 1 without the
    data (its root differs by an environment variable, as a node's own disk would): node 1 says its
    error, node 0, whose rank only lost its peer, says one line pointing there; neither waits."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    torchrun = Path(sys.executable).with_name("torchrun")
    nodes = [
        subprocess.Popen([str(torchrun), "--nnodes=2", f"--node-rank={node}", "--nproc-per-node=1", "--master-addr=127.0.0.1",
                          f"--master-port={port}", "train.py", *DDP_RUN, "dataset.root=${oc.env:NODE_DATA}", f"hydra.run.dir={tmp_path}/run"],
                         cwd=REPO, env={**os.environ, "NODE_DATA": str(root)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for node, root in enumerate([tiny_pack_root, tmp_path / "not_on_this_node"])
    ]  # fmt: skip
    outputs = [node.communicate(timeout=300)[1] for node in nodes]
    assert all(node.returncode != 0 for node in nodes)
    errors = [[line for line in output.splitlines() if line.startswith(("error:", "[zipfls-train] stopped"))] for output in outputs]
    assert errors[1] == [f"error: TinyImageNet not found under dataset.root='{tmp_path}/not_on_this_node' "
                         f"(resolved: {tmp_path}/not_on_this_node)."], outputs[1][-3000:]  # fmt: skip
    assert errors[0] == ["[zipfls-train] stopped: another rank's process ended (the output of its node, and torchrun's failure "
                         "report there, say why)"], outputs[0][-3000:]  # fmt: skip


def test_slurm_launcher_runs_a_sweep_through_submitit_local_executor(tiny_pack_root, tmp_path):
    """hydra/launcher=submitit_slurm shares everything with submitit_local but the cluster: the local
    executor pickles and runs our job function in fresh processes, as SLURM nodes would."""
    result = subprocess.run(
        [sys.executable, "train.py", "-m", "hydra/launcher=submitit_local", *TINY_RUN, f"dataset.root={tiny_pack_root}",
         "trainer.epochs=1", "trainer.max_steps_per_epoch=2", "loss=ce,zipf", f"hydra.sweep.dir={tmp_path}/sweep",
         "hydra.launcher.timeout_min=10"],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(list((tmp_path / "sweep").glob("*/summary.json"))) == 2


def test_slurm_preset_asks_one_task_with_the_run_gpus():
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from conftest import CONFIG_DIR

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = hydra_compose("train", overrides=["hydra/launcher=slurm", "trainer.devices=4"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert launcher.gpus_per_node == 4 and launcher.tasks_per_node == 1 and launcher.nodes == 1


def _launch(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "train.py", *args], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def _kill_mid_epoch(args: list[str], checkpoint: Path, timeout: float = 300) -> None:
    """Start a run and SIGKILL its whole process group once a mid-epoch checkpoint exists."""
    process = _launch(args)
    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None:
        if checkpoint.exists():
            state = load_checkpoint(checkpoint)
            if state["progress"]["step_in_epoch"] > 0 and state["progress"]["epoch"] >= 1:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                return
        time.sleep(0.01)  # (the window: epoch 2's 9 mid-epoch checkpoints; with 3, a fast machine passed it in ~0.1 s)
    process.kill()
    pytest.fail(f"run ended or timed out before a mid-epoch checkpoint: {process.stderr.read()[-2000:]}")


@pytest.mark.parametrize("loss", ["pskd", "zipf_random_uniform"])
def test_sigkill_mid_epoch_then_same_command_ends_identically(tiny_pack_root, tmp_path, loss):
    """Under DDP (2 processes), killed mid-epoch 2, the rerun ends with the same weights, method
    state and metrics: with a stateful method (PS-KD's per-sample memory, all-gathered across ranks)
    and with one that draws from torch's global generator on every rank (random soft labels), which
    needs each rank's own random state back."""
    base = [*TINY_RUN, f"dataset.root={tiny_pack_root}", "trainer.epochs=2", "trainer.max_steps_per_epoch=10",
            "trainer.checkpoint_every_steps=1", f"loss={loss}", "trainer.devices=2", "model.options.norm=group"]
    straight = tmp_path / "straight"
    killed = tmp_path / "killed"
    done = subprocess.run([sys.executable, "train.py", *base, f"hydra.run.dir={straight}"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    _kill_mid_epoch([*base, f"hydra.run.dir={killed}"], killed / "checkpoints/last.pt")
    again = subprocess.run([sys.executable, "train.py", *base, f"hydra.run.dir={killed}"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "run resumed in epoch 2/2 after step " in again.stdout
    a, b = _weights(straight), _weights(killed)
    for name, tensor in a.items():
        assert torch.equal(tensor, b[name]), name
    ma, mb = _metrics(straight), _metrics(killed)
    assert [m["epoch"] for m in mb] == [1, 2]
    for key in ("val_top1", "val_top5", "train_loss", "best_val_top1"):
        assert mb[-1][key] == pytest.approx(ma[-1][key], rel=1e-6), key
    sa = load_checkpoint(straight / "checkpoints/last.pt")["method"]
    sb = load_checkpoint(killed / "checkpoints/last.pt")["method"]
    assert sa or loss != "pskd", "PS-KD keeps its memory in the method state"
    for name, tensor in sa.items():
        assert torch.equal(tensor, sb[name]), name


def test_sigterm_to_the_launching_process_stops_every_rank_at_one_step_with_a_checkpoint(tiny_pack_root, tmp_path):
    """SIGTERM to train.py alone (as `kill <pid>` sends it): it forwards the signal to its 2 spawned
    ranks, which agree on a step, save there and stop with one line; the rerun ends as a straight run."""
    base = [*TINY_RUN, f"dataset.root={tiny_pack_root}", "trainer.epochs=2", "trainer.max_steps_per_epoch=6",
            "trainer.checkpoint_every_steps=1", "trainer.log_every=1", "loss=ce", "trainer.devices=2", "model.options.norm=group"]
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    done = subprocess.run([sys.executable, "train.py", *base, f"hydra.run.dir={straight}"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    process = _launch([*base, f"hydra.run.dir={stopped}"])
    deadline = time.time() + 300
    while not (stopped / "checkpoints/last.pt").exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 1, stderr[-3000:]
    (line,) = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert re.fullmatch(r"error: interrupted \(SIGTERM\) in epoch \d/2, after step \d/6; saved .*last.pt: rerun the same command to resume", line), line
    assert len([line for line in stderr.splitlines() if line.startswith("[zipfls-train] SIGTERM:")]) == 1  # rank 0's
    assert "Traceback" not in stderr
    again = subprocess.run([sys.executable, "train.py", *base, f"hydra.run.dir={stopped}"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    a, b = _weights(straight), _weights(stopped)
    for name, tensor in a.items():
        assert torch.equal(tensor, b[name]), name


def _spawned_ranks(parent: int) -> list[int]:
    """Pids of the DDP ranks a train.py process spawned (multiprocessing's resource tracker left out).
    A process that ends while it is looked at is left out: between the listing of the children and
    the reading of one's command line, a short-lived child (a compile worker, say) can be gone (seen
    in CI), and the parent too."""
    ranks = []
    with contextlib.suppress(FileNotFoundError, ProcessLookupError):
        children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
        for child in children:
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                if "spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ").decode():
                    ranks.append(int(child))
    return sorted(ranks)


def test_a_rank_killed_from_outside_is_one_line_naming_it_and_the_checkpoint(tiny_pack_root, tmp_path):
    """The kernel's out-of-memory killer (here: SIGKILL) ends one spawned rank: one line names the
    rank, the signal and the checkpoint to resume from; it was a Hydra report and torch's traceback."""
    run_dir = tmp_path / "run"
    base = [*TINY_RUN, f"dataset.root={tiny_pack_root}", "trainer.epochs=50", "trainer.checkpoint_every_steps=1",
            "loss=ce", "trainer.devices=2", "model.options.norm=group", f"hydra.run.dir={run_dir}"]  # fmt: skip
    process = _launch(base)
    deadline = time.time() + 300
    while not (run_dir / "checkpoints/last.pt").exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    ranks = _spawned_ranks(process.pid)
    assert len(ranks) == 2, ranks
    os.kill(ranks[1], signal.SIGKILL)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 1, stderr[-3000:]
    assert "Traceback" not in stderr and "Error executing job" not in stderr, stderr[-3000:]
    (line,) = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert re.fullmatch(rf"error: rank 1 \(pid {ranks[1]}\) was killed by SIGKILL from outside the run \(out of memory, say: "
                        rf"check the kernel log\); the other ranks were stopped; its last checkpoint, {run_dir}/checkpoints/last.pt, "
                        r"is where the same command resumes", line), line  # fmt: skip


def test_ctrl_c_while_the_ranks_start_is_one_line(tiny_pack_root, tmp_path):
    """Ctrl-C (SIGINT to the whole process group, as a terminal sends it) while the spawned ranks are
    still starting: one line, no KeyboardInterrupt traceback from each rank and the launcher."""
    run_dir = tmp_path / "run"
    process = _launch([*TINY_RUN, f"dataset.root={tiny_pack_root}", "trainer.devices=2", "model.options.norm=group",
                       f"hydra.run.dir={run_dir}"])  # fmt: skip
    deadline = time.time() + 120
    while len(_spawned_ranks(process.pid)) < 2 and time.time() < deadline and process.poll() is None:
        time.sleep(0.01)
    os.killpg(process.pid, signal.SIGINT)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 1, stderr[-3000:]
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr[-3000:]
    (line,) = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert line == "error: interrupted (SIGINT) before the ranks saved a checkpoint; no checkpoint was written yet", line


def _stop_in_the_second_epoch(monkeypatch, overrides: list[str], run_dir: Path, error: Exception, message: str) -> None:  # noqa: ANN001
    """Train ``overrides`` into ``run_dir`` until ``error`` is raised at the first step of epoch 2
    (2 steps an epoch), which must end the run with ``message``; epoch 1 is saved."""
    from zipfls_train.engine.trainer import Trainer

    real_step, steps = Trainer.train_step, []

    def fail_in_the_second_epoch(self, batches):  # noqa: ANN001, ANN202
        steps.append(1)
        if len(steps) > 2:
            raise error
        return real_step(self, batches)

    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "train_step", fail_in_the_second_epoch)
        with pytest.raises(RuntimeError, match=message):
            run_training(compose(overrides), run_dir)
    assert [record["epoch"] for record in _metrics(run_dir)] == [1]


def test_a_run_saved_by_one_process_resumes_on_two(tiny_pack_root, tmp_path, monkeypatch):
    """A run stopped after its first epoch on one process and resumed with trainer.devices=2 ends as
    the same run uninterrupted on one process: the global batch order and the weights carry over, and
    rank 1, which the checkpoint has no RNG state of, starts from its own seed (a restore of the
    missing state crashed it)."""
    common = [*DDP_RUN, f"dataset.root={tiny_pack_root}", "trainer.max_steps_per_epoch=2", "trainer.epochs=2"]
    run_training(compose(common), tmp_path / "uninterrupted")
    _stop_in_the_second_epoch(monkeypatch, common, tmp_path / "resumed", RuntimeError("stopped in epoch 2"), "stopped in epoch 2")
    summary = run_training(compose([*common, "trainer.devices=2"]), tmp_path / "resumed")
    assert summary["processes"] == 2 and [record["epoch"] for record in _metrics(tmp_path / "resumed")] == [1, 2]
    expected, resumed = _weights(tmp_path / "uninterrupted"), _weights(tmp_path / "resumed")
    for name, tensor in expected.items():  # the tolerance of the one-vs-two-process test above
        torch.testing.assert_close(resumed[name], tensor, rtol=1e-4, atol=2e-3, msg=name)


def test_a_run_resumes_with_more_micro_batches_as_the_same_run(tiny_pack_root, tmp_path, monkeypatch):
    """Out of memory in epoch 2, a run resumes with trainer.accumulate_steps=2 (what the message
    advises) and ends as the same run uninterrupted with the whole batch at once."""
    common = [*DDP_RUN, f"dataset.root={tiny_pack_root}", "trainer.max_steps_per_epoch=2", "trainer.epochs=2"]
    run_training(compose(common), tmp_path / "uninterrupted")
    _stop_in_the_second_epoch(monkeypatch, common, tmp_path / "resumed", torch.OutOfMemoryError("CUDA out of memory."),
                              "trainer.accumulate_steps=2 makes that 16")  # fmt: skip
    run_training(compose([*common, "trainer.accumulate_steps=2"]), tmp_path / "resumed")
    assert [record["epoch"] for record in _metrics(tmp_path / "resumed")] == [1, 2]
    expected, resumed = _weights(tmp_path / "uninterrupted"), _weights(tmp_path / "resumed")
    for name, tensor in expected.items():  # the tolerance of the accumulation test below
        torch.testing.assert_close(resumed[name], tensor, rtol=1e-3, atol=1e-3, msg=name)


def test_gradient_accumulation_equals_the_whole_batch_at_once(tiny_pack_root, tmp_path):
    common = [*DDP_RUN, f"dataset.root={tiny_pack_root}", "trainer.max_steps_per_epoch=3"]
    run_training(compose(common), tmp_path / "whole")
    run_training(compose([*common, "trainer.accumulate_steps=2"]), tmp_path / "accumulated")
    whole, accumulated = _weights(tmp_path / "whole"), _weights(tmp_path / "accumulated")
    # float32 summation order only: one step's gradients agree to 3e-6 (to 1e-14 in float64), and
    # three SGD steps through the stem's per-sample norm grow that to ~2e-4 in the stem's weights
    # (2.1e-4 with torch 2.14.1+cu130's CPU kernels, which an atol of 1e-4 failed). A wrong
    # accumulation is far outside 1e-3: missing the 1/K (measured as the same run at twice the lr)
    # moves the stem's weights by 1.4e-2.
    for name, tensor in whole.items():
        torch.testing.assert_close(accumulated[name], tensor, rtol=1e-3, atol=1e-3, msg=name)
    a, b = _metrics(tmp_path / "whole")[-1], _metrics(tmp_path / "accumulated")[-1]
    assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-4)


def test_ddp_train_loss_is_the_global_batch_mean(tiny_pack_root, tmp_path):
    """Logged train losses are averaged over ranks: equal to the one-process loss of the same batches."""
    common = [*DDP_RUN, f"dataset.root={tiny_pack_root}", "trainer.max_steps_per_epoch=1"]
    run_training(compose(common), tmp_path / "single")
    run_training(compose([*common, "trainer.devices=2"]), tmp_path / "ddp")
    single, ddp = _metrics(tmp_path / "single")[-1], _metrics(tmp_path / "ddp")[-1]
    assert ddp["train_loss"] == pytest.approx(single["train_loss"], rel=1e-5)



def _window_means(rank: int, store: str, results) -> None:  # noqa: ANN001
    import torch.distributed as dist

    from zipfls_train.engine.metrics import TermAccumulator

    dist.init_process_group("gloo", init_method=store, rank=rank, world_size=2)
    try:
        running = TermAccumulator()
        running.add({"loss": torch.tensor(100.0)})  # before the window
        mark = running.mark()
        for step in range(2):  # rank 0: losses 1, 2; rank 1: 3, 4 (or a NaN)
            value = float("nan") if rank == 1 and step == 1 and results.get("nan") else 1.0 + 2 * rank + step
            running.add({"loss": torch.tensor(value)})
        results[rank] = (running.means(since=mark, across_ranks=True)["loss"], running.means(since=mark)["loss"])
    finally:
        dist.destroy_process_group()


def _on_two_gloo_ranks(target, *args, results: dict | None = None) -> dict:  # noqa: ANN001
    """``target(rank, store, *args, results)`` in 2 spawned gloo ranks, ``store`` being the
    init_method to meet at: a file:// store in a new folder (no port that another process could take
    between choosing it and rank 0 listening on it). Returns what the ranks put in ``results`` (a
    shared dict starting as the one given)."""
    import tempfile

    import torch.multiprocessing as mp

    shared = mp.Manager().dict(results or {})
    with tempfile.TemporaryDirectory() as folder:
        mp.spawn(target, args=(f"file://{folder}/store", *args, shared), nprocs=2, join=True)
    return dict(shared)


@pytest.mark.parametrize("nan", [False, True])
def test_logged_window_means_are_every_ranks_and_a_nan_reaches_all(nan):
    """The log steps' means (TensorBoard's train/* and the NaN check) average every rank's steps:
    (1 + 2 + 3 + 4) / 4 = 2.5 on both ranks, where rank 0 alone has 1.5; one rank's NaN is every rank's."""
    import math

    results = _on_two_gloo_ranks(_window_means, results={"nan": nan})
    if nan:
        assert all(math.isnan(results[rank][0]) for rank in (0, 1)) and results[0][1] == 1.5
    else:
        assert (results[0], results[1]) == ((2.5, 1.5), (2.5, 3.5))


def _saved_window(rank: int, store: str, results) -> None:  # noqa: ANN001
    import torch.distributed as dist

    from zipfls_train.engine.metrics import TermAccumulator

    dist.init_process_group("gloo", init_method=store, rank=rank, world_size=2)
    try:
        running = TermAccumulator()
        running.add({"loss": torch.tensor(100.0 + rank)})  # logged: the window restarts after it
        running.restart_window()
        running.add({"loss": torch.tensor(1.0 + rank)})
        running.all_reduce_mean()  # what a save does first
        state = running.state_dict()
        results[rank] = (float(state["sums"]["loss"]), float(state["window"]["sums"]["loss"]),
                         running.means(since=running.window, across_ranks=True)["loss"])  # fmt: skip
    finally:
        dist.destroy_process_group()


def test_a_save_averages_the_window_over_the_ranks_with_the_sums():
    """Rank r: 100 + r before the window, 1 + r after. A save's checkpoint holds rank 0's state for
    every rank, so the window's mark is averaged with the sums: 100.5 (and the sums 102) on both
    ranks; the next point is still the mean since the window, 1.5."""
    results = _on_two_gloo_ranks(_saved_window)
    assert results[0] == results[1] == (102.0, 100.5, 1.5)


def _buffers_after_broadcast(rank: int, store: str, results) -> None:  # noqa: ANN001
    import torch.distributed as dist

    from zipfls_train.engine.distributed import broadcast_buffers

    dist.init_process_group("gloo", init_method=store, rank=rank, world_size=2)
    try:
        norm = torch.nn.BatchNorm2d(3)
        norm.running_mean.fill_(float(rank + 1))  # each rank's own statistics, as after a DDP step
        norm.num_batches_tracked.fill_(10 * (rank + 1))
        broadcast_buffers(norm)
        results[rank] = (norm.running_mean.tolist(), int(norm.num_batches_tracked))
    finally:
        dist.destroy_process_group()


def test_evaluation_takes_rank_0s_batchnorm_statistics_on_every_rank():
    """Trainer.evaluate starts with broadcast_buffers: every rank then scores rank 0's model, the one
    it saves (each rank's last training forward moved its BatchNorm statistics its own way)."""
    results = _on_two_gloo_ranks(_buffers_after_broadcast)
    assert results == {0: ([1.0, 1.0, 1.0], 10), 1: ([1.0, 1.0, 1.0], 10)}


def _folder_views(rank: int, store: str, folders, results) -> None:  # noqa: ANN001
    import types

    import torch.distributed as dist

    from zipfls_train.engine.distributed import DistContext
    from zipfls_train.engine.resume import ResumeError
    from zipfls_train.engine.trainer import Trainer

    dist.init_process_group("gloo", init_method=store, rank=rank, world_size=2)
    try:
        run_dir = Path(folders[rank])
        trainer = types.SimpleNamespace(ctx=DistContext(rank=rank, world_size=2), run_dir=run_dir, checkpoint_dir=run_dir / "checkpoints")
        try:
            Trainer._check_ranks_see_one_folder(trainer)
            results[rank] = "agreed"
        except ResumeError as error:
            results[rank] = str(error)
    finally:
        dist.destroy_process_group()


def test_ranks_that_see_different_run_folders_stop_instead_of_hanging(tmp_path):
    """Nodes without a shared filesystem: rank 0 finds a checkpoint, rank 1 does not. Both stop with
    the reason (they would otherwise resume and start fresh, and hang in their first collective)."""
    (tmp_path / "node0" / "checkpoints").mkdir(parents=True)
    (tmp_path / "node0" / "checkpoints" / "last.pt").write_bytes(b"x")
    (tmp_path / "node1").mkdir()
    results = _on_two_gloo_ranks(_folder_views, [str(tmp_path / "node0"), str(tmp_path / "node1")])
    assert all("filesystem every node shares" in results[rank] for rank in (0, 1)), results


def test_spawned_ranks_meet_on_loopback_whatever_master_addr_says(tmp_path, monkeypatch):
    """A cluster shell's MASTER_ADDR must not send this machine's own ranks looking for another host
    (they would wait for it until gloo's timeout). The ranks start with loopback and the port of a
    store this process hosts, held while they start (a port looked up and released could be taken
    before rank 0 bound it), and the caller's variables are as they were afterwards. (The
    channels_last DDP test above trains with such an address set.)"""
    import socket

    from zipfls_train.engine import run as run_module

    seen = {}

    def record_environment(container, run_dir, devices, store_port):  # noqa: ANN001, ANN202
        seen.update(addr=os.environ["MASTER_ADDR"], port=os.environ["MASTER_PORT"], devices=devices, store_port=store_port)
        with socket.socket() as other_program, pytest.raises(OSError, match="in use"):
            other_program.bind(("127.0.0.1", store_port))
        (run_dir / "summary.json").write_text(json.dumps({"processes": devices}))

    monkeypatch.setattr(run_module, "_spawn_ranks", record_environment)
    monkeypatch.setenv("MASTER_ADDR", "10.255.255.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    (tmp_path / "run").mkdir()
    assert run_training(compose([*DDP_RUN, "trainer.devices=2"]), tmp_path / "run") == {"processes": 2}
    assert seen["addr"] == "127.0.0.1" and seen["devices"] == 2
    assert seen["port"] == str(seen["store_port"]) != "29500"
    assert (os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"]) == ("10.255.255.1", "29500")


def _vote_steps(rank: int, store: str, seconds_per_step: list[float], results) -> None:  # noqa: ANN001
    """Two ranks step through 100 steps (log steps every 50) on their own fake clocks; rank 1
    receives SIGTERM during step 12. Records at which step each rank decides to stop."""
    import torch.distributed as dist

    from zipfls_train.engine.interrupt import StopRequests, StopVotes

    dist.init_process_group("gloo", init_method=store, rank=rank, world_size=2)
    try:
        now = [0.0]
        requests = StopRequests()
        votes = StopVotes(requests, distributed=True, device=torch.device("cpu"), world_size=2,
                          log_every=50, within_s=4.5, clock=lambda: now[0])  # fmt: skip
        stopped_at, intervals = None, []
        for step in range(1, 101):
            now[0] += seconds_per_step[rank]
            if rank == 1 and step == 12:
                requests.signal_name = "SIGTERM"
            if votes.at_step(step, logged=step % 50 == 0):
                stopped_at = step
                break
            intervals.append(votes.every)
        results[rank] = (stopped_at, intervals[-1])
    finally:
        dist.destroy_process_group()


def test_ddp_ranks_vote_on_a_stop_every_few_seconds_not_only_at_log_steps():
    """With log steps every 50 steps, a stop requested at step 12 on one rank must not wait for step
    50: the ranks vote first at step 10 (measuring 1 s and 2 s per step: a mean of 1.5 s), then every
    int(4.5 / 1.5) = 3 steps, so both stop after step 13, the first vote after the request."""
    results = _on_two_gloo_ranks(_vote_steps, [1.0, 2.0])
    assert results == {0: (13, 3), 1: (13, 3)}


def test_steps_between_votes_cover_the_time_asked_within_the_log_interval():
    from zipfls_train.engine.interrupt import steps_between_votes

    assert steps_between_votes(0.01, 5.0, 50) == 50  # fast steps: the log steps already vote often enough
    assert steps_between_votes(1.0, 5.0, 50) == 5
    assert steps_between_votes(0.3, 5.0, 50) == 16
    assert steps_between_votes(30.0, 5.0, 50) == 1  # slower than the bound: vote at every step


def _bucket_view_step(rank: int, store: str, results) -> None:  # noqa: ANN001
    import torch.distributed as dist

    from zipfls_train.engine.distributed import wrap_ddp

    dist.init_process_group("gloo", init_method=store, rank=rank, world_size=2)
    try:
        torch.manual_seed(0)  # the same initial weights on both ranks
        model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
        ddp = wrap_ddp(model, torch.device("cpu"))
        optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1)
        for step in range(2):  # the trainer's pattern: grads set to None before each backward
            optimizer.zero_grad(set_to_none=True)
            inputs = torch.randn(4, 6, generator=torch.Generator().manual_seed(10 * step + rank))
            ddp(inputs).square().sum().backward()
            if step == 0:  # step 1's gradients are checked against the weights step 0 left
                optimizer.step()
        storages = {p.grad.untyped_storage().data_ptr() for p in model.parameters()}
        results[rank] = (len(storages), [p.grad.clone() for p in model.parameters()], [p.detach().clone() for p in model.parameters()])
    finally:
        dist.destroy_process_group()


def test_ddp_gradients_are_views_of_one_bucket_and_the_mean_over_ranks():
    """wrap_ddp: after a backward every gradient of a small model lives in one all-reduce bucket (one
    storage: DDP keeps no second copy), and is the mean of the two ranks' gradients, recomputed here
    in one process in float64 from the same weights and inputs."""
    results = _on_two_gloo_ranks(_bucket_view_step)
    (storages0, grads0, weights0), (storages1, grads1, _) = results[0], results[1]
    assert storages0 == storages1 == 1
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3)).double()
    with torch.no_grad():
        for param, weight in zip(model.parameters(), weights0):
            param.copy_(weight)
    expected = [torch.zeros_like(p) for p in model.parameters()]
    for rank in range(2):
        model.zero_grad()
        model(torch.randn(4, 6, generator=torch.Generator().manual_seed(10 + rank)).double()).square().sum().backward()
        for total, param in zip(expected, model.parameters()):
            total += param.grad / 2
    for got0, got1, want in zip(grads0, grads1, expected):
        assert torch.equal(got0, got1)
        torch.testing.assert_close(got0.double(), want, rtol=1e-5, atol=1e-6)


def test_ddp_ranks_vote_at_every_log_step_whatever_the_interval():
    """Log steps synchronise anyway, so the ranks vote there too: a stop requested before step 3
    stops after step 3 when step 3 is a log step, though the next timed vote is at step 10
    (FIRST_EVERY); a step that is not a log step waits for that vote. One process stands in for
    the ranks (all_reduce_sum is the identity without a process group)."""
    from zipfls_train.engine.interrupt import StopRequests, StopVotes

    requests = StopRequests()
    votes = StopVotes(requests, distributed=True, device=torch.device("cpu"), world_size=1, log_every=50, within_s=5.0, clock=lambda: 0.0)
    requests.signal_name = "SIGTERM"
    assert votes.at_step(2, logged=False) is False  # no vote before step 10
    assert votes.at_step(3, logged=True) is True
