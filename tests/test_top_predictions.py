"""Figure 4 (analysis/top_predictions.py): ranking and the drawing of images on hand examples, and the
command on real run folders, its numbers recomputed here in numpy and its soft labels from an
explicit per-pixel loop over the dense maps (the hierarchy itself: test_classes.py)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from zipfls_train.analysis.run_loading import load_run
from zipfls_train.analysis.top_predictions import Predictions, TopPredictionsError, main, pick_images, ranked

def test_ranked_breaks_ties_by_class_index():
    values, indices = ranked(torch.tensor([[1.0, 3.0, 3.0, 0.0], [0.0, 0.0, 0.0, 5.0]]), 3)
    assert indices.tolist() == [[1, 2, 0], [3, 0, 1]] and values.tolist() == [[3.0, 3.0, 1.0], [5.0, 0.0, 0.0]]


def _predictions(first: list[int]) -> Predictions:
    top = torch.tensor(first)[:, None]
    return Predictions(targets=torch.zeros(len(first), dtype=torch.long), top=top, top_p=top.float())


def test_disagree_draws_only_images_whose_top1_differs():
    a, b = _predictions([0, 1, 2, 3, 4, 5]), _predictions([0, 2, 2, 0, 4, 1])
    assert pick_images([a, b], 10, "disagree", seed=0).tolist() == [1, 3, 5]
    drawn = pick_images([a, b], 2, "disagree", seed=4).tolist()
    assert len(drawn) == 2 and set(drawn) <= {1, 3, 5} and drawn == sorted(drawn)
    assert pick_images([a, b], 2, "disagree", seed=4).tolist() == drawn  # the seed decides
    assert sorted(pick_images([a], 6, "random", seed=1).tolist()) == list(range(6))
    with pytest.raises(TopPredictionsError, match="agree on the top-1 class of all 6 val images"):
        pick_images([a, a], 2, "disagree", seed=0)
    with pytest.raises(TopPredictionsError, match="--pick disagree compares runs: pass at least 2"):
        pick_images([a], 2, "disagree", seed=0)


# --- the command on trained runs -------------------------------------------------------------------------
# The tiny pack's classes are n10000000 .. n10000009: pairs of siblings, (0, 1), (2, 3), ...
TINY_TREE = "".join(f"group{i // 2} n{10000000 + i:08d}\n" for i in range(10))


def test_the_command_prints_each_runs_numbers_and_the_zipf_soft_label_of_the_images_it_shows(run_tiny, tmp_path, capsys):
    _, ce = run_tiny("loss=ce", "trainer.max_steps_per_epoch=3", run_dir=tmp_path / "ce")
    _, zipf = run_tiny("loss=zipf", "trainer.epochs=3", run_dir=tmp_path / "zipf")  # (votes split between classes)
    tree = _write(tmp_path / "is_a.txt", TINY_TREE)
    words = _write(tmp_path / "words.txt", "".join(f"n{10000000 + i:08d}\tname{i}, other\n" for i in range(10)))
    png = tmp_path / "figure4.png"

    main([str(ce), str(zipf), "--images", "12", "--seed", "2", "--hierarchy", str(tree), "--similar-within", "1",
          "--class-names", str(words), "--out", str(png), "--device", "cpu"])  # fmt: skip

    out = capsys.readouterr().out
    assert png.stat().st_size > 10_000
    lines = {line.split(":")[0]: line for line in out.splitlines() if " val images " in line}
    assert set(lines) == {str(ce), str(zipf)}
    assert "soft label similar@5" in lines[str(zipf)] and "soft label" not in lines[str(ce)]
    # At random: each class has 1 sibling among its 9 others.
    assert "similar@5 by chance (non-target classes drawn at random): 0.111" in out
    for path in (ce, zipf):
        targets, logits, final_maps, classifier = _evaluate(path)
        printed = {key: float(value) for key, value in re.findall(r"(top-1|top-5|similar@5) ([0-9.]+)", lines[str(path)].split("soft label")[0])}
        order = np.argsort(-logits, axis=1, kind="stable")
        assert printed["top-1"] == pytest.approx(100 * np.mean(order[:, 0] == targets), abs=0.006)
        assert printed["top-5"] == pytest.approx(100 * np.mean((order[:, :5] == targets[:, None]).any(axis=1)), abs=0.006)
        # Siblings are the classes 2j and 2j + 1: the 5 most probable non-target classes hold at most one.
        non_target = [[c for c in row if c != t][:5] for row, t in zip(order, targets)]
        similar = np.mean([[c // 2 == t // 2 for c in row] for row, t in zip(non_target, targets)])
        assert printed["similar@5"] == pytest.approx(similar, abs=6e-4)
    # The Zipf run's soft labels from its own dense votes (per pixel, float64), for every val image:
    # similar@5 with a tie at the 5th place shared out in proportion.
    targets, labels = reference_soft_labels(zipf, ["final"])
    order = np.argsort(-labels, axis=1, kind="stable")
    fifth = labels[np.arange(len(labels)), order[:, 4]]
    expected = []
    for label, target, value in zip(labels, targets, fifth):
        similar = np.array([c // 2 == target // 2 and c != target for c in range(10)])
        above, tied = label > value, label == value
        expected.append(np.sum(above & similar) + (5 - above.sum()) * np.sum(tied & similar) / tied.sum())
    soft_similar = float(re.search(r"Zipf soft label similar@5 ([0-9.]+)", lines[str(zipf)]).group(1))
    assert soft_similar == pytest.approx(np.mean(expected) / 5, abs=6e-4)
    assert np.mean([np.sum(labels[i] == fifth[i]) > 1 for i in range(len(labels))]) > 0.2  # (ties at the 5th place: common)
    # The images shown (seed 2), each with its soft label's 5 largest classes, "*" where a tie goes on past the 5th.
    shown = [int(m) for m in re.findall(r"^val image (\d+) \(name\d\):$", out, flags=re.M)]
    assert len(shown) == 12 and shown == sorted(shown)
    soft_lines = [line for line in out.splitlines() if "Zipf soft label:" in line]
    assert len(soft_lines) == 12
    for position, line in zip(shown, soft_lines):
        entries = re.findall(r"name(\d)(\*?) ([0-9.]+)%", line.split("Zipf soft label:")[1])
        assert [int(c) for c, _, _ in entries] == order[position, :5].tolist()
        np.testing.assert_allclose([float(p) for _, _, p in entries], 100 * labels[position, order[position, :5]], atol=0.051)
        sixth = labels[position, order[position, 5]]
        assert [star == "*" for _, star, _ in entries] == (labels[position, order[position, :5]] == sixth).tolist()
    assert max(np.count_nonzero(labels[i] < labels[i].max()) for i in shown) >= 3  # (votes split: ranks not all tied)


def reference_soft_labels(run_dir: Path, stages: list[str], alpha: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Targets and Zipf soft labels (N x C, float64) of a run's val images, from SPEC.md's equations:
    each stage's map upsampled bilinearly x2 and classified pixel by pixel by its classifier (the
    final one's, or the stage's auxiliary head's), one vote per pixel, ranks 1 + #{larger counts}
    over all classes, P_c proportional to rank_c^-alpha off the target."""
    run = load_run(run_dir, None, torch.device("cpu"), aux_heads=True)
    model = run.model.eval().double()
    voters = {stage: model.classifier if stage == "final" else model.aux_heads[stage].fc for stage in stages}
    targets, labels = [], []
    with torch.no_grad():
        for batch in run.val.epoch(0):
            outputs = model(batch.inputs.double(), features=tuple(stages))
            for i, target in enumerate(batch.targets.tolist()):
                counts = np.zeros(model.num_classes)
                for stage, voter in voters.items():
                    upsampled = torch.nn.functional.interpolate(outputs.features[stage][i : i + 1], scale_factor=2, mode="bilinear",
                                                                align_corners=False)[0].numpy()  # fmt: skip
                    weight, bias = voter.weight.detach().numpy(), voter.bias.detach().numpy()
                    for y in range(upsampled.shape[1]):
                        for x in range(upsampled.shape[2]):
                            counts[int(np.argmax(weight @ upsampled[:, y, x] + bias))] += 1
                ranks = np.array([1 + np.sum(counts > c) for c in counts])
                label = ranks ** -alpha
                label[target] = 0
                labels.append(label / label.sum())
                targets.append(target)
    return np.array(targets), np.array(labels)


def test_runs_of_other_classes_or_other_val_images_are_refused_before_any_is_evaluated(run_tiny, tmp_path):
    _, ten = run_tiny("loss=ce", "trainer.max_steps_per_epoch=1", run_dir=tmp_path / "ten")
    _, five = run_tiny("loss=ce", "trainer.max_steps_per_epoch=1", "dataset.num_classes_subset=5", run_dir=tmp_path / "five")
    with pytest.raises(SystemExit, match=rf"error: {re.escape(str(five))} classifies other classes than {re.escape(str(ten))} \(5 vs 10"):
        main([str(ten), str(five), "--out", str(tmp_path / "x.png"), "--device", "cpu"])
    _, fewer = run_tiny("loss=ce", "trainer.max_steps_per_epoch=1", "dataset.val_per_class=4", run_dir=tmp_path / "fewer")
    with pytest.raises(SystemExit, match=rf"error: {re.escape(str(fewer))} was not evaluated on the val images of {re.escape(str(ten))} \(40 vs 100 images"):
        main([str(ten), str(fewer), "--out", str(tmp_path / "x.png"), "--device", "cpu"])
    assert not (tmp_path / "x.png").exists()


def test_options_and_the_figure_path_are_checked_before_any_run_is_read(tmp_path):
    missing = str(tmp_path / "no-run")  # (never read: the options are refused first)
    for options, message in [
        (["--images", "65"], r"--images must be in \[1, 64\] \(a row of the figure each\), got 65"),
        (["--images", "0"], r"--images must be in \[1, 64\]"),
        (["--top", "0"], r"--top must be at least 1, got 0"),
        (["--pick", "disagree"], r"--pick disagree compares runs: pass at least 2"),
        (["--out", str(tmp_path)], rf"{re.escape(str(tmp_path))} is a folder: give the figure's file name"),
    ]:
        with pytest.raises(SystemExit, match=f"error: {message}"):
            main([missing, *options, "--device", "cpu"])


def test_top_above_the_class_count_says_so_and_a_name_without_suffix_gets_png(run_tiny, tmp_path, capsys):
    _, run = run_tiny("loss=ce", "trainer.max_steps_per_epoch=1")
    main([str(run), "--top", "50", "--images", "1", "--out", str(tmp_path / "figure"), "--device", "cpu"])
    out = capsys.readouterr().out
    assert "--top 50: the runs have 10 classes, so 9 non-target classes at the most: showing 9" in out
    assert "top-9 " in out and (tmp_path / "figure.png").stat().st_size > 5_000 and f"plot: {tmp_path / 'figure.png'}" in out


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _evaluate(run_dir: Path):  # noqa: ANN202
    """Targets, float64 logits, final maps (float64) and classifier (numpy) of the run's val set."""
    run = load_run(run_dir, None, torch.device("cpu"))
    model = run.model.eval().double()
    targets, logits, maps = [], [], []
    with torch.no_grad():
        for batch in run.val.epoch(0):
            outputs = model(batch.inputs.double(), features=("final",))
            targets.append(batch.targets.numpy())
            logits.append(outputs.logits.numpy())
            maps.append(outputs.features["final"])
    classifier = model.classifier
    return (np.concatenate(targets), np.concatenate(logits), torch.cat(maps),
            (classifier.weight.detach().numpy(), classifier.bias.detach().numpy()))  # fmt: skip


def test_a_dense2_runs_soft_label_counts_the_votes_of_its_auxiliary_head_too(run_tiny, tmp_path, capsys):
    # The penultimate map votes through its auxiliary head's classifier, which the checkpoint keeps.
    _, dense2 = run_tiny("loss=zipf_dense2", "trainer.epochs=2", run_dir=tmp_path / "dense2")
    main([str(dense2), "--images", "6", "--out", str(tmp_path / "x.png"), "--device", "cpu"])
    out = capsys.readouterr().out
    targets, labels = reference_soft_labels(dense2, ["final", "penultimate"])
    _, final_only = reference_soft_labels(dense2, ["final"])
    shown = [int(m) for m in re.findall(r"^val image (\d+) ", out, flags=re.M)]
    soft_lines = [line for line in out.splitlines() if "Zipf soft label:" in line]
    assert len(shown) == len(soft_lines) == 6
    differs = 0
    for position, line in zip(shown, soft_lines):
        probabilities = sorted((float(p) for p in re.findall(r"([0-9.]+)%", line.split("Zipf soft label:")[1])), reverse=True)
        expected = np.sort(labels[position])[::-1][:5]
        np.testing.assert_allclose(probabilities, 100 * expected, atol=0.051)
        differs += not np.allclose(np.sort(final_only[position])[::-1][:5], expected)
    assert differs > 0  # (the penultimate votes change some labels: a final-map-only label would fail above)


def test_soft_labels_ranked_by_logits_or_drawn_at_random_are_named_so(run_tiny, tmp_path, capsys):
    _, by_logits = run_tiny("loss=zipf", "loss.rank_by=logits", "trainer.max_steps_per_epoch=2", run_dir=tmp_path / "logits")
    _, random = run_tiny("loss=zipf", "loss.distribution=random_uniform", "trainer.max_steps_per_epoch=2", run_dir=tmp_path / "random")
    main([str(by_logits), str(random), "--images", "1", "--out", str(tmp_path / "x.png"), "--device", "cpu"])
    out = capsys.readouterr().out
    assert "(logits): Zipf soft label, ranked by logits: " in out and "(random): random_uniform soft label: " in out
    # Ranked by logits: the label is 1 / rank of the logits, off the target (here: of the image shown).
    position = int(re.search(r"^val image (\d+) ", out, flags=re.M).group(1))
    run = load_run(by_logits, None, torch.device("cpu"))
    with torch.no_grad():
        batch = next(iter(run.val.epoch(0)))
        logits = run.model.eval().double()(batch.inputs.double()).logits[position].numpy()
    target = int(batch.targets[position])
    ranks = np.array([1 + np.sum(logits > v) for v in logits])
    label = 1.0 / ranks
    label[target] = 0
    label /= label.sum()
    line = next(line for line in out.splitlines() if "ranked by logits:" in line)
    printed = [float(p) for p in re.findall(r"([0-9.]+)%", line.split("ranked by logits:")[1])]
    np.testing.assert_allclose(printed, 100 * np.sort(label)[::-1][:5], atol=0.051)


def test_a_run_is_titled_by_its_method_and_folder_and_a_checkpoint_file_by_its_run_too(tmp_path):
    from types import SimpleNamespace

    from zipfls_train.analysis.run_loading import run_title

    run = SimpleNamespace(cfg=SimpleNamespace(loss=SimpleNamespace(name="zipf")))
    (tmp_path / "seed=1" / "checkpoints").mkdir(parents=True)
    (tmp_path / "seed=1" / "checkpoints" / "best.pt").write_bytes(b"")
    (tmp_path / "elsewhere.pt").write_bytes(b"")
    assert run_title(tmp_path / "seed=1", run) == "zipf (seed=1)"
    assert run_title(tmp_path / "seed=1" / "checkpoints" / "best.pt", run) == "zipf (seed=1/best.pt)"
    assert run_title(tmp_path / "elsewhere.pt", run) == "zipf (elsewhere.pt)"
