"""Small objects (analysis/small_objects.py, the paper's section 5): box files of the three formats
read against hand-computed areas, the choice of each class's smallest objects and the size
quintiles on hand examples, the placing of a pack's val images, and the command on runs trained on
the official Tiny ImageNet slice (its real boxes) and on ImageNet photographs (VOC boxes and
Kaggle's csv), its accuracies recomputed here."""

from __future__ import annotations

import csv
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import compose
from PIL import Image
from test_file_datasets import TWO_STEPS, flat_val_truth, write_imagenet

from zipfls_train.analysis.run_loading import load_run
from zipfls_train.analysis.small_objects import (
    SmallObjectsError,
    box_share,
    class_maps,
    main,
    read_boxes,
    size_bins,
    smallest_per_class,
    val_stems,
)


def voc(filename: str, width: int, height: int, objects: list[tuple[str, int, int, int, int]]) -> str:
    boxes = "".join(f"<object><name>{name}</name><pose>Unspecified</pose><bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin>"
                    f"<xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>" for name, x0, y0, x1, y1 in objects)  # fmt: skip
    return (f"<annotation><folder>val</folder><filename>{filename}</filename><size><width>{width}</width>"
            f"<height>{height}</height><depth>3</depth></size>{boxes}</annotation>")  # fmt: skip


def test_box_share_counts_pixels_inclusively_and_caps_at_the_image():
    assert box_share(0, 0, 63, 63, 64, 64) == 1.0
    assert box_share(10, 20, 19, 21, 64, 64) == pytest.approx(10 * 2 / 4096)
    assert box_share(0, 0, 500, 375, 500, 375) == 1.0  # (a 0-based exclusive box of the whole image)


def test_voc_folder_csv_and_tinyimagenet_annotations_give_each_image_its_boxes(tmp_path):
    folder = tmp_path / "xml"
    folder.mkdir()
    (folder / "ILSVRC2012_val_00000001.xml").write_text(voc("ILSVRC2012_val_00000001", 500, 400, [("n1", 0, 0, 99, 39), ("n2", 10, 10, 259, 209)]))
    (folder / "ILSVRC2012_val_00000002.xml").write_text(voc("ILSVRC2012_val_00000002.JPEG", 200, 100, [("n3", 0, 0, 199, 99)]))
    assert read_boxes(folder, lambda stem: None) == {
        "ILSVRC2012_val_00000001": [("n1", 100 * 40 / 200_000), ("n2", 250 * 200 / 200_000)],
        "ILSVRC2012_val_00000002": [("n3", 1.0)],
    }
    solution = tmp_path / "LOC_val_solution.csv"
    solution.write_text("ImageId,PredictionString\nILSVRC2012_val_00000001,n1 0 0 99 39 n1 0 0 9 9 \nILSVRC2012_val_00000077,n5 1 1 2 2\n")
    sizes = {"ILSVRC2012_val_00000001": (500, 400)}
    assert read_boxes(solution, sizes.get) == {"ILSVRC2012_val_00000001": [("n1", 4000 / 200_000), ("n1", 100 / 200_000)]}
    annotations = tmp_path / "val_annotations.txt"
    annotations.write_text("val_0.JPEG\tn03444034\t0\t32\t44\t62\nval_1.JPEG\tn04067472\t52\t55\t57\t59\n")
    assert read_boxes(annotations, lambda stem: None) == {
        "val_0": [("n03444034", 45 * 31 / 4096)],
        "val_1": [("n04067472", 6 * 5 / 4096)],
    }


def test_malformed_box_files_name_the_file_and_line(tmp_path):
    bad = tmp_path / "val_annotations.txt"
    bad.write_text("val_0.JPEG\tn1\t0\t0\t1\t1\nval_1.JPEG\tn1\t0\t0\n")
    with pytest.raises(SmallObjectsError, match=r"val_annotations.txt, line 2: expected '<file>\\t<wnid>"):
        read_boxes(bad, lambda stem: None)
    csv_file = tmp_path / "solution.csv"
    csv_file.write_text("ImageId,PredictionString\nx,n1 0 0 1\n")
    with pytest.raises(SmallObjectsError, match=r"solution.csv, line 2: expected '<wnid> <x0> <y0> <x1> <y1>' \(repeated for more boxes\) with numbers"):
        read_boxes(csv_file, lambda stem: (10, 10))
    (tmp_path / "xml").mkdir()
    (tmp_path / "xml" / "a.xml").write_text("<annotation><filename>a</filename></annotation>")
    with pytest.raises(SmallObjectsError, match=r"a.xml: not a PASCAL VOC annotation"):
        read_boxes(tmp_path / "xml", lambda stem: None)
    with pytest.raises(SmallObjectsError, match=r"absent does not exist"):
        read_boxes(tmp_path / "absent", lambda stem: None)
    for name in ("binary.txt", "binary.csv"):
        (tmp_path / name).write_bytes(b"\xff\xfe\x00\x01")
        with pytest.raises(SmallObjectsError, match=rf"{name} \(or a file in it\) is not UTF-8 text"):
            read_boxes(tmp_path / name, lambda stem: (10, 10))


def test_the_smallest_objects_of_each_class_ties_to_the_earlier_image():
    shares = np.array([0.5, 0.1, np.nan, 0.1, 0.3, 0.2, 0.05])
    targets = np.array([0, 0, 0, 0, 1, 1, 2])
    assert smallest_per_class(shares, targets, 1).tolist() == [1, 5, 6]
    assert smallest_per_class(shares, targets, 2).tolist() == [1, 3, 4, 5, 6]
    assert smallest_per_class(shares, targets, 9).tolist() == [0, 1, 3, 4, 5, 6]  # never the image without a box


def test_size_quintiles_of_a_hand_example():
    shares = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, np.nan])
    edges, bins = size_bins(shares)
    np.testing.assert_allclose(edges, [0.28, 0.46, 0.64, 0.82])  # numpy's linear quantiles of 0.1 .. 1.0
    assert bins.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, -1]
    # An image on an edge is in the quintile that edge closes ("<= edge"), however many share it.
    edges, bins = size_bins(np.array([0.1, 0.2, 0.2, 0.2, 0.2, 0.5, 0.6, 0.7, 0.8, 1.0]))
    np.testing.assert_allclose(edges, [0.2, 0.2, 0.54, 0.72])
    assert bins.tolist() == [0, 0, 0, 0, 0, 2, 3, 3, 4, 4]


def test_a_packs_val_images_are_placed_by_their_file_numbers_within_each_class():
    boxes = {"val_3": [("b", 0.1)], "val_1": [("a", 0.1)], "val_10": [("a", 0.1)], "val_2": [("b", 0.1)], "val_7": [("a", 0.1)]}
    run = SimpleNamespace(val=object(), cfg=SimpleNamespace(dataset=SimpleNamespace(name="tinyimagenet")), classes=["a", "b"])
    # The pack: class by class, each class's files in number order (10 after 7, not before 2).
    assert val_stems(run, np.array([0, 0, 0, 1, 1]), boxes) == ["val_1", "val_7", "val_10", "val_2", "val_3"]
    # The official tree: every val image in number order; a class's images keep their order.
    assert val_stems(run, np.array([0, 1, 1, 0, 0]), boxes) == ["val_1", "val_2", "val_3", "val_7", "val_10"]
    with pytest.raises(SmallObjectsError, match="the boxes list 2 val image"):
        val_stems(run, np.array([1, 1, 1]), boxes)
    boxes["val_99"] = []  # (a VOC file listing no object: no class to place it in)
    assert val_stems(run, np.array([0, 0, 0, 1, 1]), boxes) == ["val_1", "val_7", "val_10", "val_2", "val_3"]
    run.classes = ["a", "b", "c"]  # a class the boxes do not list: its images have none
    assert val_stems(run, np.array([0, 2, 1]), boxes) == ["val_1", None, "val_2"]
    run.cfg.dataset.name = "cifar100"
    with pytest.raises(SmallObjectsError, match="dataset=cifar100 has no bounding boxes"):
        val_stems(run, np.array([0]), boxes)


# --- the command on trained runs -------------------------------------------------------------------------
def printed(out: str, run: Path) -> dict[str, float]:
    (line,) = [line for line in out.splitlines() if line.startswith(f"{run}: ")]
    return {"smallest": float(re.search(r"per class: top-1 ([0-9.]+)%", line).group(1)),
            "all": float(re.search(r"all val images: ([0-9.]+)%", line).group(1)),
            "boxed": float(re.search(r"those with a box: ([0-9.]+)%", line).group(1))}  # fmt: skip


def correct_in_val_order(run_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    run = load_run(run_dir, None, torch.device("cpu"))
    model = run.model.eval()
    targets, right = [], []
    with torch.no_grad():
        for batch in run.val.epoch(0):
            targets.append(batch.targets.numpy())
            right.append(model(batch.inputs).logits.argmax(dim=1).numpy() == batch.targets.numpy())
    return np.concatenate(targets), np.concatenate(right)


def test_on_the_official_tiny_imagenet_slice_the_smallest_objects_are_scored_by_its_real_boxes(official_subset_root, tmp_path, capsys):
    from zipfls_train.engine.run import run_training

    runs = []
    for loss in ("ce", "zipf"):
        cfg = compose(["dataset=tinyimagenet", "dataset.format=tree", f"dataset.root={official_subset_root}", "dataset.num_classes=20",
                       "model=cifar_resnet18", "model.options.width=8", f"loss={loss}", "trainer.device=cpu", "trainer.epochs=1",
                       "trainer.max_steps_per_epoch=4", "trainer.batch_size=32", "trainer.progress_bar=false", "trainer.zipf_fit_at_end=false"])  # fmt: skip
        run_training(cfg, tmp_path / loss)
        runs.append(tmp_path / loss)
    annotations = official_subset_root / "tiny-imagenet-200/val/val_annotations.txt"

    main([*map(str, runs), "--boxes", str(annotations), "--per-class", "5", "--device", "cpu"])

    out = capsys.readouterr().out
    assert "a box of their own class for 1000 of 1000 val images;" in out
    assert "the 5 smallest objects of each of 20 classes: 100 images" in out
    # Here: the official file, read with csv; the tree's val order is the files' number order.
    with annotations.open(newline="") as handle:
        rows = sorted(csv.reader(handle, delimiter="\t"), key=lambda row: int(row[0][4:-5]))
    wnids = sorted({row[1] for row in rows})
    area = np.array([(int(r[4]) - int(r[2]) + 1) * (int(r[5]) - int(r[3]) + 1) for r in rows])
    label = np.array([wnids.index(r[1]) for r in rows])
    chosen = [i for c in range(20) for i in sorted(np.flatnonzero(label == c), key=lambda i: (area[i], i))[:5]]
    assert sorted(area[chosen] / 4096)[-1] < np.median(area / 4096)  # (small objects indeed)
    shares = 100 * area[chosen] / 4096
    assert f"100 images, object area {shares.min():.1f}-{shares.max():.1f}% of the image" in out
    for run in runs:
        targets, right = correct_in_val_order(run)
        assert targets.tolist() == label.tolist()
        numbers = printed(out, run)
        assert numbers["smallest"] == pytest.approx(100 * right[chosen].mean(), abs=0.006)
        assert numbers["all"] == pytest.approx(100 * right.mean(), abs=0.006) == numbers["boxed"]
    # Boxes of half the classes: the other half's images are left out, and said to be.
    half = tmp_path / "val_annotations.txt"
    half.write_text("".join("\t".join(row) + "\n" for row in rows if row[1] in wnids[:10]))
    figure = tmp_path / "figure6.png"
    main([str(runs[0]), "--boxes", str(half), "--per-class", "5", "--device", "cpu", "--figure", str(figure), "--figure-images", "3"])
    out = capsys.readouterr().out
    assert figure.stat().st_size > 10_000 and f"figure: {figure}" in out
    assert "a box of their own class for 500 of 1000 val images (500 without: left out);" in out
    assert "the 5 smallest objects of each of 10 classes: 50 images" in out
    targets, right = correct_in_val_order(runs[0])
    assert printed(out, runs[0])["boxed"] == pytest.approx(100 * right[targets < 10].mean(), abs=0.006)


@pytest.mark.parametrize("boxes_format", ["voc", "csv"])
def test_imagenet_runs_are_scored_on_the_images_whose_object_is_smallest(tmp_path, capsys, boxes_format):
    from zipfls_train.engine.run import run_training

    root = write_imagenet(tmp_path / "imagenet", val="flat")
    wnid_of = flat_val_truth(root)
    names = sorted(wnid_of)  # the flat val folder's order
    # Image i's object: a box of (8 + 4 i) pixels square, in photographs of various sizes.
    sides = {name: 8 + 4 * i for i, name in enumerate(names)}
    sizes = {name: Image.open(root / "val" / name).size for name in names}
    if boxes_format == "voc":
        boxes = tmp_path / "xml"
        boxes.mkdir()
        for name in names:
            w, h = sizes[name]
            others = [("n00000000", 0, 0, w - 1, h - 1)]  # another class's box, the whole image: not the object
            (boxes / f"{Path(name).stem}.xml").write_text(voc(name, w, h, [(wnid_of[name], 0, 0, sides[name] - 1, sides[name] - 1), *others]))
    with (root / "LOC_val_solution.csv").open("w", newline="") as handle:  # the val labels, and boxes
        writer = csv.writer(handle)
        writer.writerow(["ImageId", "PredictionString"])
        for name in names:
            writer.writerow([Path(name).stem, f"{wnid_of[name]} 0 0 {sides[name] - 1} {sides[name] - 1}"])
    if boxes_format == "csv":
        boxes = root / "LOC_val_solution.csv"
    cfg = compose(["dataset=imagenet", "model=resnet18", "loss=ce", *TWO_STEPS, f"dataset.root={root}", "dataset.num_classes=24"])
    run_training(cfg, tmp_path / "run")

    main([str(tmp_path / "run"), "--boxes", str(boxes), "--per-class", "1", "--device", "cpu"])

    out = capsys.readouterr().out
    assert "a box of their own class for 24 of 24 val images;" in out
    # One val image per class: each is its class's smallest object; the quintiles split by the box's share.
    targets, right = correct_in_val_order(tmp_path / "run")
    numbers = printed(out, tmp_path / "run")
    assert numbers["smallest"] == pytest.approx(100 * right.mean(), abs=0.006) == numbers["all"]
    share = np.array([sides[n] ** 2 / (sizes[n][0] * sizes[n][1]) for n in names])
    edges = np.quantile(share, [0.2, 0.4, 0.6, 0.8])
    bins = np.searchsorted(edges, share, side="left")
    assert ("object-area quintiles, % of the image: " + " | ".join(f"<= {100 * e:.1f}" for e in edges) + f" | > {100 * edges[-1]:.1f}"
            + "  (images: " + " / ".join(str(int((bins == b).sum())) for b in range(5)) + ")") in out  # fmt: skip
    line = [line for line in out.splitlines() if line.startswith(f"{tmp_path / 'run'}: ")][0]
    by_bin = [float(v) for v in line.split("smallest first: ")[1].split(" / ")]
    np.testing.assert_allclose(by_bin, [100 * right[bins == b].mean() for b in range(5)], atol=0.006)


def test_options_runs_of_other_datasets_and_the_figure_path_are_refused_in_one_line(run_tiny, tmp_path, official_subset_root):
    annotations = str(official_subset_root / "tiny-imagenet-200/val/val_annotations.txt")
    for options, message in [
        (["--per-class", "0"], r"--per-class must be at least 1, got 0"),
        (["--figure-images", "0"], r"--figure-images must be at least 1, got 0"),
        (["--figure", str(tmp_path)], rf"{re.escape(str(tmp_path))} is a folder: give the figure's file name"),
    ]:
        with pytest.raises(SystemExit, match=f"error: {message}"):
            main([str(tmp_path / "no-run"), "--boxes", annotations, *options, "--device", "cpu"])
    _, ten = run_tiny("loss=ce", "trainer.max_steps_per_epoch=1", run_dir=tmp_path / "ten")
    _, five = run_tiny("loss=ce", "trainer.max_steps_per_epoch=1", "dataset.num_classes_subset=5", run_dir=tmp_path / "five")
    with pytest.raises(SystemExit, match=rf"error: {re.escape(str(five))} classifies other classes than"):
        main([str(ten), str(five), "--boxes", annotations, "--device", "cpu"])


def test_boxes_of_another_dataset_are_refused(official_subset_root, run_tiny, tmp_path):
    _, run = run_tiny("loss=ce", "trainer.max_steps_per_epoch=1")
    annotations = official_subset_root / "tiny-imagenet-200/val/val_annotations.txt"
    with pytest.raises(SystemExit, match=r"val_annotations.txt has a box of its own class for none of the 100 val images: not the boxes of this dataset\?"):
        main([str(run), "--boxes", str(annotations), "--device", "cpu"])


def test_class_maps_average_to_the_logit_and_are_the_classifier_on_each_pixel(run_tiny, tmp_path):
    _, run_dir = run_tiny("loss=zipf", "trainer.max_steps_per_epoch=2")
    run = load_run(run_dir, None, torch.device("cpu"))
    inputs = next(iter(run.val.epoch(0))).inputs[:4]
    classes = [3, 0, 9, 3]
    maps, logits = class_maps(run.model, inputs, classes)
    model = run.model.eval().double()
    with torch.no_grad():
        outputs = model(inputs.double(), features=("final",))
    final, weight, bias = outputs.features["final"], model.classifier.weight.detach().double(), model.classifier.bias.detach().double()
    assert maps.shape == (4, *final.shape[-2:])
    for i, c in enumerate(classes):
        # Pooling and the classifier are linear: the map's mean is the logit of its class.
        assert float(maps[i].double().mean()) == pytest.approx(float(outputs.logits[i, c]), abs=1e-4)
        y, x = 1, 2
        assert float(maps[i, y, x]) == pytest.approx(float(weight[c] @ final[i, :, y, x] + bias[c]), abs=1e-4)
    np.testing.assert_allclose(logits.numpy(), outputs.logits.numpy(), atol=1e-4)
