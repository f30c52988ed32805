"""environment.jsonl: what produced each attempt of a run (code, packages, machine, command)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

from conftest import REPO
from test_training import read_jsonl, run_until_the_epoch_checkpoint
from zipfls_train.engine.provenance import code_version

ARGS = ("loss=ce", "trainer.epochs=2", "trainer.max_steps_per_epoch=2", "trainer.zipf_fit_at_end=false")


def _git(root: Path, *arguments: str) -> str:
    return subprocess.run(["git", "-C", str(root), "-c", "user.name=t", "-c", "user.email=t@example.org", *arguments],
                          capture_output=True, text=True, check=True).stdout  # fmt: skip


def _project_checkout(root: Path) -> Path:
    """A checkout of the project with one commit: pyproject.toml beside src/zipfls_train (a link to
    the package these tests import)."""
    (root / "src").mkdir(parents=True)
    (root / "src" / "zipfls_train").symlink_to(Path(code_version.__code__.co_filename).resolve().parents[1])
    (root / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    (root / ".gitignore").write_text("src/zipfls_train\n")
    _git(root, "init", "-q")
    _git(root, "add", "pyproject.toml", ".gitignore")
    _git(root, "commit", "-q", "-m", "start")
    return root


def test_each_attempt_of_a_run_records_its_code_packages_machine_and_first_step(run_tiny, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    run_until_the_epoch_checkpoint(monkeypatch, run_tiny, *ARGS, run_dir=run_dir)
    (first,) = read_jsonl(run_dir / "environment.jsonl")
    assert first["from_step"] == 0
    run_tiny(*ARGS, run_dir=run_dir)  # resumed after epoch 1: 2 steps
    records = read_jsonl(run_dir / "environment.jsonl")
    assert [record["from_step"] for record in records] == [0, 2]
    assert records[0] == first  # (the first attempt's line is kept as it was)

    record = records[1]
    assert record["packages"]["torch"].split("+")[0] == torch.__version__.split("+")[0]
    assert record["python"] == platform.python_version()
    assert (record["processes"], record["device"].split(":")[0], record["cuda"]) == (1, "cpu", torch.version.cuda)
    assert 1 <= record["cpu_cores"] <= len(os.sched_getaffinity(0))
    assert record["command"][0] == sys.executable and record["cwd"] == os.getcwd()
    # The checkout these tests run from, as git itself says it is (none: a source archive).
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode != 0:
        assert record["code"]["git_commit"] is None
        return
    status = _git(REPO, "status", "--porcelain", "--untracked-files=normal").splitlines()
    assert record["code"]["git_commit"] == head.stdout.strip()
    assert record["code"]["dirty"] == bool(status)


def test_a_fresh_start_sets_the_earlier_attempts_records_aside_with_their_results(run_tiny, tmp_path):
    run_dir = tmp_path / "run"
    run_tiny(*ARGS, run_dir=run_dir)
    run_tiny(*ARGS, "trainer.resume=never", run_dir=run_dir)
    assert len(read_jsonl(run_dir / "earlier_attempt_1" / "environment.jsonl")) == 1
    assert [record["from_step"] for record in read_jsonl(run_dir / "environment.jsonl")] == [0]


def test_uncommitted_changes_are_named_and_digested(tmp_path):
    """A checkout of the project with a changed tracked file and a new one (a user's own method module)."""
    root = _project_checkout(tmp_path / "checkout")
    clean = code_version(root)
    assert (clean["git_commit"], clean["dirty"], clean["changed"], clean["diff_sha256"]) == (
        _git(root, "rev-parse", "HEAD").strip(), False, [], None)

    (root / "my_method.py").write_text("pass\n")  # a new file: its name and contents count
    untracked = code_version(root)
    assert (untracked["dirty"], untracked["changed"], len(untracked["diff_sha256"])) == (True, ["my_method.py"], 64)
    (root / "my_method.py").write_text("x = 1\n")
    digests = [untracked["diff_sha256"], code_version(root)["diff_sha256"]]

    (root / "pyproject.toml").write_text("[project]\nname = 'y'\n")
    changed = code_version(root)
    assert changed["dirty"] and sorted(changed["changed"]) == ["my_method.py", "pyproject.toml"]
    (root / "pyproject.toml").write_text("[project]\nname = 'z'\n")
    digests += [changed["diff_sha256"], code_version(root)["diff_sha256"]]
    assert len(set(digests)) == 4  # every change a digest of its own
    (root / "pyproject.toml").write_text("[project]\nname = 'y'\n")
    assert code_version(root)["diff_sha256"] == digests[2]  # the same changes, the same digest


def test_a_renamed_file_is_named_once_by_its_new_path(tmp_path):
    root = _project_checkout(tmp_path / "checkout")
    (root / "notes.txt").write_text("mine\n")
    _git(root, "add", "notes.txt")
    _git(root, "commit", "-q", "-m", "notes")
    _git(root, "mv", "notes.txt", "my notes.txt")  # (git status -z: "R  <new>\0<old>\0")
    assert code_version(root)["changed"] == ["my notes.txt"]


def test_a_copy_of_the_project_inside_another_repository_has_no_commit_of_its_own(tmp_path):
    outer = tmp_path / "experiments"
    (outer / "vendored" / "src").mkdir(parents=True)
    (outer / "vendored" / "src" / "zipfls_train").symlink_to(Path(code_version.__code__.co_filename).resolve().parents[1])
    (outer / "vendored" / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    (outer / "notes.txt").write_text("mine\n")
    _git(outer, "init", "-q")
    _git(outer, "add", "notes.txt")
    _git(outer, "commit", "-q", "-m", "the user's own repository")
    assert code_version(outer / "vendored")["git_commit"] is None


def test_file_names_that_are_not_utf8_and_a_git_that_hangs(tmp_path, monkeypatch):
    root = _project_checkout(tmp_path / "checkout")
    _git(root, "config", "core.quotePath", "false")
    (root / os.fsdecode(b"caf\xe9.txt")).write_text("Latin-1 name\n")
    record = code_version(root)
    assert record["dirty"] and record["changed"] == [os.fsdecode(b"caf\xe9.txt")] and json.dumps(record)
    # A git whose status does not answer: the commit is known, the changes unknown (not "clean").
    real_git = subprocess.run(["which", "git"], capture_output=True, text=True, check=True).stdout.strip()
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "git").write_text(f'#!/bin/sh\ncase " $* " in *" status "*) exit 124;; esac\nexec {real_git} "$@"\n')
    (fake / "git").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}{os.pathsep}{os.environ['PATH']}")
    stuck = code_version(root)
    assert stuck["git_commit"] == record["git_commit"] and (stuck["dirty"], stuck["changed"], stuck["diff_sha256"]) == (None, None, None)


def test_outside_a_checkout_of_the_project_or_without_git_the_commit_is_unknown(tmp_path, monkeypatch):
    _git(tmp_path, "init", "-q")  # some other project's checkout around the environment
    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'other'\n")
    assert code_version(tmp_path)["git_commit"] is None
    monkeypatch.setenv("PATH", str(tmp_path / "no_git_here"))
    assert code_version(REPO)["git_commit"] is None
    assert json.dumps(code_version(REPO))  # (still a record)
