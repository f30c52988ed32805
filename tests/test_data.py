"""Dataset readers on fixtures in the official layouts and on ../shared/data, subsets, augmentation
and the in-memory loader."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import APPLEDOUBLE, shared_data, write_cifar100, write_tinyimagenet_pack, write_tinyimagenet_tree
from zipfls_train.data import DatasetError, ImageTensors, LoaderOptions, TensorLoader
from zipfls_train.data.augment import boxes_to_spans, crop_and_resize, normalize, random_crop_with_padding, random_resized_crop_boxes
from zipfls_train.data.cifar100 import read_cifar100
from zipfls_train.data.images import take_subset
from zipfls_train.data.seeds import _splitmix64, mix_seed
from zipfls_train.data.tinyimagenet import read_pack, read_tinyimagenet, read_tree

WNIDS = ["n02000001", "n01000002", "n03000003"]


def test_tree_reader_sorts_wnids_and_reads_every_image(tmp_path):
    root = write_tinyimagenet_tree(tmp_path, WNIDS, train_per_class=4, val_per_class=2)
    train = read_tree(root, "train")
    val = read_tree(root, "val")
    assert train.classes == sorted(WNIDS)
    assert train.images.shape == (12, 3, 64, 64) and train.images.dtype == torch.uint8
    assert train.targets.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    # val_annotations.txt lists wnids; our label is the sorted position.
    rows = (root / "tiny-imagenet-200/val/val_annotations.txt").read_text().splitlines()
    expected = [sorted(WNIDS).index(row.split("\t")[1]) for row in rows]
    assert val.targets.tolist() == expected
    # Pixels are the decoded JPEG, not something else.
    first = np.array(Image.open(root / f"tiny-imagenet-200/train/{sorted(WNIDS)[0]}/images/{sorted(WNIDS)[0]}_0.JPEG").convert("RGB"))
    assert torch.equal(train.images[0], torch.from_numpy(first).permute(2, 0, 1))


def test_tree_reader_orders_a_classs_images_by_their_number_not_as_strings(tmp_path):
    # 12 images per class: as strings, n..._10 and n..._11 would come before n..._2. The official
    # numbering (0..499) is the order the pack tiles them in and the one "first N per class" keeps.
    root = write_tinyimagenet_tree(tmp_path, WNIDS[:2], train_per_class=12, val_per_class=1)
    train = read_tree(root, "train")
    wnid = sorted(WNIDS[:2])[0]
    for k in range(12):
        pixels = np.array(Image.open(root / f"tiny-imagenet-200/train/{wnid}/images/{wnid}_{k}.JPEG").convert("RGB"))
        assert torch.equal(train.images[k], torch.from_numpy(pixels).permute(2, 0, 1)), k


def test_tree_reader_skips_macos_appledouble_files(tmp_path):
    """pathlib's glob('*.JPEG') matches '._n..._0.JPEG', the metadata file a copy from a Mac leaves
    beside each image: the reader failed decoding it. Hidden files are not images."""
    root = write_tinyimagenet_tree(tmp_path, WNIDS[:2], train_per_class=3, val_per_class=1)
    for image in list((root / "tiny-imagenet-200/train").rglob("*.JPEG")):
        (image.parent / f"._{image.name}").write_bytes(APPLEDOUBLE)
    train = read_tree(root, "train")
    assert len(train) == 6 and train.targets.tolist() == [0, 0, 0, 1, 1, 1]


def test_official_subset_from_shared_data(official_subset_root):
    train = read_tree(official_subset_root, "train")
    val = read_tree(official_subset_root, "val")
    wnids = (official_subset_root / "tiny-imagenet-200/wnids.txt").read_text().split()
    assert len(wnids) == 20 and train.classes == sorted(wnids)
    assert len(train) == 20 * 60 and len(val) == 20 * 50
    assert torch.bincount(val.targets).tolist() == [50] * 20
    # Grayscale JPEGs in the official set come out as 3 equal channels, each the grey image.
    assert train.images.shape[1:] == (3, 64, 64)
    rows = (official_subset_root / "tiny-imagenet-200/val/val_annotations.txt").read_text().splitlines()
    grey = 0
    for index, row in enumerate(rows):  # val images in val_annotations.txt's order
        with Image.open(official_subset_root / "tiny-imagenet-200/val/images" / row.split("\t")[0]) as image:
            if image.mode != "L":
                continue
            pixels = torch.from_numpy(np.array(image))
        grey += 1
        assert all(torch.equal(val.images[index, channel], pixels) for channel in range(3)), row
    assert grey > 0  # (18 of the subset's val images are grayscale)


def test_pack_matches_official_tree_labels_on_shared_data(official_subset_root):
    """The pack against the official tree, image by image: every val image of the 20 classes in the
    tree (read here with PIL from val_annotations.txt, not by our reader), averaged 2x2 to 32 px,
    is the pack's tile of the same class at the same place (tiles follow ascending val_<k> numbers).
    Measured on the shared data: at most 10.9/255 mean absolute difference (JPEG), while the next
    tile of the same class is at least 24.5 away: a label or order off by one shows."""
    import torch.nn.functional as F

    data = shared_data()
    meta = json.loads((data / "tinyimagenet-32/meta.json").read_text())
    pack_val = read_pack(data, "val")
    assert len(pack_val) == 10_000 and len(pack_val.classes) == 200
    base = official_subset_root / "tiny-imagenet-200/val"
    numbers: dict[str, list[int]] = {}
    for line in (base / "val_annotations.txt").read_text().splitlines():
        file, wnid = line.split("\t")[:2]
        numbers.setdefault(wnid, []).append(int(Path(file).stem.split("_")[1]))
    assert len(numbers) == 20
    for wnid, ks in numbers.items():
        tiles = pack_val.images[pack_val.targets == meta["wnids"].index(wnid)].float()
        assert len(tiles) == len(ks) == 50
        for tile, k in zip(tiles, sorted(ks)):
            with Image.open(base / "images" / f"val_{k}.JPEG") as image:
                source = torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1).float()
            assert (F.avg_pool2d(source[None], 2)[0] - tile).abs().mean() < 16.0, (wnid, k)


def test_pack_reader_tiles_in_row_major_order(tmp_path):
    root = write_tinyimagenet_pack(tmp_path, num_classes=2, train_per_class=30, val_per_class=12)
    train = read_pack(root, "train")
    assert train.images.shape == (60, 3, 32, 32)
    grid = np.asarray(Image.open(root / f"tinyimagenet-32/train_{train.classes[0]}.jpg").convert("RGB"))
    tile_27 = grid[32:64, 2 * 32 : 3 * 32]  # tile 27 of a 25-wide grid: row 1, column 2
    assert torch.equal(train.images[27], torch.from_numpy(tile_27.copy()).permute(2, 0, 1))


def test_missing_dataset_names_path_layout_and_source(tmp_path):
    with pytest.raises(DatasetError) as error:
        read_tinyimagenet(tmp_path / "nowhere", "train")
    message = str(error.value)
    assert "nowhere" in message and "val_annotations.txt" in message and "tiny-imagenet-200.zip" in message


def test_format_tree_with_only_the_pack_says_how_to_get_the_tree_or_use_the_pack(tmp_path):
    # The paper-table experiments ask for the 64 px originals; a root holding only the pack must not
    # fall back to it silently (auto would) nor claim that nothing is there.
    root = write_tinyimagenet_pack(tmp_path, num_classes=2, train_per_class=2, val_per_class=1)
    assert read_tinyimagenet(root, "val", "auto").images.shape[0] == 2
    with pytest.raises(DatasetError) as error:
        read_tinyimagenet(root, "val", "tree")
    message = str(error.value)
    assert "dataset.format=tree" in message and "tiny-imagenet-200" in message and "dataset.format=pack" in message


def test_corrupt_image_names_the_file(tmp_path):
    root = write_tinyimagenet_tree(tmp_path, WNIDS[:2], train_per_class=2, val_per_class=1)
    bad = root / f"tiny-imagenet-200/train/{sorted(WNIDS[:2])[1]}/images/{sorted(WNIDS[:2])[1]}_1.JPEG"
    bad.write_bytes(b"not a jpeg")
    with pytest.raises(DatasetError, match=bad.name):
        read_tree(root, "train")


def test_empty_class_folder_is_named(tmp_path):
    root = write_tinyimagenet_tree(tmp_path, WNIDS[:2], train_per_class=2, val_per_class=1)
    folder = root / f"tiny-imagenet-200/train/{sorted(WNIDS[:2])[0]}/images"
    for file in folder.iterdir():
        file.unlink()
    with pytest.raises(DatasetError, match="empty or missing class folder"):
        read_tree(root, "train")


@pytest.mark.parametrize("bytes_keys", [True, False])
def test_cifar100_pickles_with_bytes_or_str_keys(tmp_path, bytes_keys):
    root = write_cifar100(tmp_path, train_per_class=3, test_per_class=2, num_classes=100, bytes_keys=bytes_keys)
    train = read_cifar100(root, "train")
    test = read_cifar100(root, "val")
    assert train.images.shape == (300, 3, 32, 32) and len(test) == 200
    assert train.classes[5] == "class_5"
    # Row-major CHW layout of the pickle: first 1024 bytes are the red plane.
    import pickle

    with (root / "cifar-100-python/train").open("rb") as handle:
        record = pickle.load(handle, encoding="bytes")
    data = record[b"data" if bytes_keys else "data"]
    assert torch.equal(train.images[7, 0].flatten(), torch.from_numpy(data[7, :1024]))
    # Labels are the fine labels (100 classes), image by image: the writer put 3 images of class k at 3k..3k+2.
    assert train.targets.tolist() == [k for k in range(100) for _ in range(3)]
    assert test.targets.tolist() == [k for k in range(100) for _ in range(2)]


def test_cifar100_missing_without_download_explains(tmp_path):
    with pytest.raises(DatasetError, match="cifar-100-python"):
        read_cifar100(tmp_path, "train", download=False)


def test_label_out_of_range_is_rejected():
    with pytest.raises(DatasetError, match="label out of range"):
        ImageTensors(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), torch.tensor([0, 5]), ["a", "b"])


def test_subset_keeps_first_classes_and_first_images_per_class():
    targets = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])
    images = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 3, 2, 2).contiguous()
    subset = take_subset(ImageTensors(images, targets, ["a", "b", "c"]), num_classes=2, per_class=2)
    assert subset.classes == ["a", "b"]
    assert subset.images[:, 0, 0, 0].tolist() == [0, 1, 3, 4]
    assert subset.targets.tolist() == [0, 1, 0, 1]


def test_crop_with_padding_matches_an_explicit_crop():
    images = torch.randint(0, 256, (6, 3, 8, 8), dtype=torch.uint8)
    generator = torch.Generator().manual_seed(3)
    out = random_crop_with_padding(images, 8, 4, generator)
    # Recover the offsets the same generator drew and crop by hand.
    offsets = (torch.rand((6, 2), generator=torch.Generator().manual_seed(3)) * 9).long().clamp(max=8)
    padded = torch.nn.functional.pad(images, (4, 4, 4, 4))
    for i in range(6):
        y, x = offsets[i].tolist()
        assert torch.equal(out[i], padded[i, :, y : y + 8, x : x + 8])


def test_random_resized_crop_boxes_stay_inside_and_follow_scale_and_ratio():
    boxes = random_resized_crop_boxes(4000, 64, 64, torch.Generator().manual_seed(0), torch.device("cpu"))
    w = boxes[:, 2] - boxes[:, 0]
    h = boxes[:, 3] - boxes[:, 1]
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= 64).all() and (boxes[:, 3] <= 64).all()
    area = w * h / 64**2
    assert area.min() >= 0.07 and area.min() < 0.09 and area.max() <= 1.0  # scale (0.08, 1)
    ratio = w / h
    assert ratio.min() > 0.7 and ratio.max() < 1.45  # 3/4..4/3 up to rounding
    # The distribution of torchvision's own boxes (RandomResizedCrop.get_params, 4000 draws): the
    # area and aspect-ratio quantiles agree to sampling noise and the integer rounding of its boxes.
    from torchvision.transforms import RandomResizedCrop

    torch.manual_seed(0)
    image = torch.zeros(3, 64, 64)
    reference = torch.tensor([RandomResizedCrop.get_params(image, (0.08, 1.0), (3 / 4, 4 / 3))[2:] for _ in range(4000)], dtype=torch.float64)
    reference_area, reference_ratio = reference[:, 0] * reference[:, 1] / 64**2, reference[:, 1] / reference[:, 0]
    levels = torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9], dtype=torch.float64)
    torch.testing.assert_close(area.double().quantile(levels), reference_area.quantile(levels), atol=0.03, rtol=0)
    torch.testing.assert_close(ratio.double().log().quantile(levels), reference_ratio.log().quantile(levels), atol=0.05, rtol=0)



def test_random_resized_crop_box_offsets_reach_the_far_edges():
    """A box of one size (scale and ratio pinned: 6 x 6 on a 10 wide, 8 high image) is placed as
    torchvision places it, ``torch.randint(0, width - w + 1)`` and ``(0, height - h + 1)``: every
    left offset 0..4 and top offset 0..2 is drawn, about equally often, so boxes touching the
    right and bottom edges occur (an offset range one short never reaches them)."""
    from torchvision.transforms import RandomResizedCrop

    width, height, n = 10, 8, 3000
    scale, ratio = (36 / 80, 36 / 80), (1.0, 1.0)
    boxes = random_resized_crop_boxes(n, height, width, torch.Generator().manual_seed(0), torch.device("cpu"), scale=scale, ratio=ratio)
    assert ((boxes[:, 2] - boxes[:, 0]) == 6).all() and ((boxes[:, 3] - boxes[:, 1]) == 6).all()
    torch.manual_seed(0)
    image = torch.zeros(3, height, width)
    reference = [RandomResizedCrop.get_params(image, scale, ratio) for _ in range(n)]  # (i, j, h, w)
    for column, name, offsets in ((0, "left", [j for _, j, _, _ in reference]), (1, "top", [i for i, _, _, _ in reference])):
        ours = boxes[:, column].long()
        assert set(ours.tolist()) == set(offsets) == set(range((width if column == 0 else height) - 6 + 1)), name
        shares = torch.bincount(ours).double() / n
        assert (shares - 1 / len(shares)).abs().max() < 0.03, (name, shares)


@pytest.mark.parametrize(("height", "width"), [(100, 10), (10, 100), (10, 10)], ids=["tall", "wide", "square"])
def test_random_resized_crop_boxes_fall_back_to_torchvisions_central_crop(height, width):
    """With a scale no try can fit (a box larger than the image's short side), every box is
    torchvision's fallback (get_params itself, deterministic here): the central crop with the
    aspect ratio clamped into 3/4..4/3: 10 x 13 of a 10 x 100 image, 13 x 10 of a 100 x 10 one,
    the whole image when its ratio is in range."""
    from torchvision.transforms import RandomResizedCrop

    scale = (1.5, 2.0) if height == width else (0.5, 1.0)
    boxes = random_resized_crop_boxes(50, height, width, torch.Generator().manual_seed(0), torch.device("cpu"), scale=scale)
    i, j, h, w = RandomResizedCrop.get_params(torch.zeros(3, height, width), scale, (3 / 4, 4 / 3))
    expected = {(100, 10): (43, 0, 13, 10), (10, 100): (0, 43, 10, 13), (10, 10): (0, 0, 10, 10)}[(height, width)]
    assert (i, j, h, w) == expected  # the hand values, from the fallback's rule
    assert (boxes == torch.tensor([j, i, j + w, i + h], dtype=boxes.dtype)).all()

def test_loader_crop_pads_4_pixels_as_cifars_random_crop():
    """crop_pad at 32 px (the CIFAR recipe, RandomCrop(32, padding=4)): on images of one flat level,
    a view's zero border is the padding its offset shows: 0 to 4 columns on the left or on the right
    (never both), every width in 0..4 drawn, and the same for rows."""
    count = 400
    images = torch.full((count, 3, 32, 32), 200, dtype=torch.uint8)
    data = ImageTensors(images, torch.arange(count) % 2, ["a", "b"])
    options = LoaderOptions(batch_size=100, eval_batch_size=100, device=torch.device("cpu"), seed=3)
    loader = TensorLoader(data, options, train=True, augment="crop_pad", image_size=32, mean=[0.0] * 3, std=[1.0] * 3)
    borders = {"left": set(), "right": set(), "top": set(), "bottom": set()}
    for batch in loader.epoch(0):
        inside = batch.inputs[:, 0] > 0.5  # the image's pixels (200/255), not the zero padding
        columns, rows = inside.any(dim=1), inside.any(dim=2)
        for column, row in zip(columns, rows):
            left, right = int(column.float().argmax()), int(column.flip(0).float().argmax())
            top, bottom = int(row.float().argmax()), int(row.flip(0).float().argmax())
            assert min(left, right) == 0 and min(top, bottom) == 0
            for side, width in zip(borders, (left, right, top, bottom)):
                borders[side].add(width)
    assert all(widths == {0, 1, 2, 3, 4} for widths in borders.values()), borders


@pytest.mark.parametrize("height, width", [(64, 64), (32, 32), (48, 40)])
def test_crop_and_resize_is_torchvisions_antialiased_resized_crop(height, width):
    # Every box: crop, then torch's antialiased bilinear resize (torchvision's Resize on tensors),
    # computed image by image; and torchvision's own uint8 resized_crop to its rounding.
    from torchvision.transforms import functional as TF

    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (64, 3, height, width), dtype=torch.uint8, generator=generator)
    boxes = random_resized_crop_boxes(64, height, width, generator, torch.device("cpu"))
    boxes[0] = torch.tensor([0.0, 0.0, width, height])  # the whole image: unchanged at 32 x 32
    out = crop_and_resize(images.float(), boxes_to_spans(boxes), 32)
    for i, (x1, y1, x2, y2) in enumerate(boxes.long().tolist()):
        crop = images[i : i + 1, :, y1:y2, x1:x2].float()
        expected = torch.nn.functional.interpolate(crop, size=(32, 32), mode="bilinear", antialias=True, align_corners=False)[0]
        torch.testing.assert_close(out[i], expected, rtol=0, atol=1e-3)
        torchvision_uint8 = TF.resized_crop(images[i], y1, x1, y2 - y1, x2 - x1, [32, 32], antialias=True)
        assert (out[i] - torchvision_uint8.float()).abs().max() <= 0.5 + 1e-3
    if (height, width) == (32, 32):
        torch.testing.assert_close(out[0], images[0].float(), rtol=0, atol=1e-4)


def test_data_streams_of_different_seeds_and_epochs_never_share_a_seed():
    # SplitMix64's first output from state 0 (the published reference value).
    assert _splitmix64(0) == 0xE220A8397B1DCDAF
    # A Table 2 sweep: seeds 0-4 x 200 epochs x the loader's streams (order/augmentation, pairs).
    keys = [(seed, epoch, *stream) for seed in range(10) for epoch in range(300) for stream in ((), (1,))]
    assert len({mix_seed(*key) for key in keys}) == len(keys)
    assert mix_seed(0, 0) != mix_seed(1, 65)  # collided under the previous additive mix
    assert all(0 <= mix_seed(*key) < 2**63 for key in keys[:50])


def test_normalize_matches_torchvision_definition():
    pixels = torch.tensor([[[[0]], [[128]], [[255]]]], dtype=torch.uint8)
    out = normalize(pixels, [0.5, 0.5, 0.5], [0.25, 0.5, 1.0])
    assert out.flatten().tolist() == pytest.approx([(0 - 0.5) / 0.25, (128 / 255 - 0.5) / 0.5, (1 - 0.5) / 1.0], abs=1e-6)


def _loader(data: ImageTensors, *, train: bool, rank: int = 0, world: int = 1, batch: int = 4, **extra) -> TensorLoader:
    options = LoaderOptions(batch_size=batch, eval_batch_size=batch, device=torch.device("cpu"), seed=7, rank=rank, world_size=world, **extra)
    return TensorLoader(data, options, train=train, augment="crop_pad", image_size=8, mean=[0.5] * 3, std=[0.5] * 3)


def _numbered(count: int, classes: int = 3) -> ImageTensors:
    images = torch.randint(0, 256, (count, 3, 8, 8), dtype=torch.uint8)
    return ImageTensors(images, torch.arange(count) % classes, [str(i) for i in range(classes)])


def test_loader_is_deterministic_and_resumes_mid_epoch():
    data = _numbered(40)
    full = list(_loader(data, train=True).epoch(3))
    resumed = list(_loader(data, train=True).epoch(3, start_step=6))
    assert len(full) == 10 and len(resumed) == 4
    for a, b in zip(full[6:], resumed):
        assert torch.equal(a.inputs, b.inputs) and torch.equal(a.indices, b.indices)
    other_epoch = next(_loader(data, train=True).epoch(4))
    assert not torch.equal(full[0].indices, other_epoch.indices)


def test_train_shards_are_disjoint_and_val_shards_count_every_sample_once():
    data = _numbered(23)
    shards = [torch.cat([b.indices for b in _loader(data, train=True, rank=r, world=2).epoch(0)]) for r in range(2)]
    assert not set(shards[0].tolist()) & set(shards[1].tolist())
    val = [torch.cat([b.indices for b in _loader(data, train=False, rank=r, world=2, batch=5).epoch(0)]) for r in range(2)]
    assert sorted(torch.cat(val).tolist()) == list(range(23))


@pytest.mark.parametrize("augment", ["crop_pad", "random_resized_crop"])
def test_an_image_is_augmented_alike_whatever_the_processes_and_accumulation(augment):
    """The global batch of an optimiser step, pixel for pixel, from 1 process, from 2 ranks (each its
    half), and from 1 process accumulating 2 micro-batches: augmentation parameters belong to the
    global sample slot, not to the process or micro-step that happens to load it."""
    data = _numbered(48)

    def loader(**options):
        options = LoaderOptions(device=torch.device("cpu"), seed=7, eval_batch_size=4, **options)
        return TensorLoader(data, options, train=True, augment=augment, image_size=8, mean=[0.5] * 3, std=[0.5] * 3)

    single = list(loader(batch_size=8).epoch(2))  # 6 steps of 8
    ranks = [list(loader(batch_size=4, rank=r, world_size=2).epoch(2)) for r in range(2)]
    accumulated = list(loader(batch_size=4, accumulate_steps=2).epoch(2))  # 12 micro-batches
    assert len(single) == 6 and len(ranks[0]) == 6 and len(accumulated) == 12
    for step, whole in enumerate(single):
        for parts in ([ranks[0][step], ranks[1][step]], accumulated[2 * step : 2 * step + 2]):
            assert torch.equal(torch.cat([p.indices for p in parts]), whole.indices)
            assert torch.equal(torch.cat([p.inputs for p in parts]), whole.inputs)
    # And an image's parameters are drawn afresh each epoch (not one crop per sample for the run).
    def views(batches):
        return {int(i): x for b in batches for i, x in zip(b.indices, b.inputs)}

    epoch2, epoch3 = views(single), views(loader(batch_size=8).epoch(3))
    assert sum(not torch.equal(epoch2[i], epoch3[i]) for i in epoch2.keys() & epoch3.keys()) > len(epoch2) // 2


def test_pairs_are_same_class_and_second_view_differs():
    data = _numbered(30)
    # Channel 0 of every image is one flat level naming its class (crop_pad's padding is 0, below
    # every level), so the class of each pair image (CS-KD's pair_inputs) can be read back.
    levels = 50 + 60 * data.targets
    data.images[:, 0] = levels.view(-1, 1, 1).to(torch.uint8)
    batch = next(_loader(data, train=True, pairs=True, two_views=True).epoch(0))
    pair_levels = ((batch.pair_inputs[:, 0].amax(dim=(1, 2)) * 0.5 + 0.5) * 255).round().long()
    assert torch.equal(pair_levels, levels[batch.indices])
    assert torch.equal(data.targets[batch.indices], batch.targets)
    assert batch.second_view.shape == batch.inputs.shape and not torch.equal(batch.second_view, batch.inputs)


def test_second_view_is_another_augmentation_of_the_same_image():
    """DDGSD's two views: each sample's second view is drawn from the same source image (here every
    image is one flat grey level of its own, so a view's pixels are that level or crop padding), with
    other crop parameters."""
    count = 24
    levels = 10 * torch.arange(count, dtype=torch.uint8) + 5  # 5, 15, ..., 235: one per image
    data = ImageTensors(levels.view(count, 1, 1, 1).expand(count, 3, 8, 8).contiguous(), torch.arange(count) % 3, ["0", "1", "2"])
    crops_differ = 0
    for batch in _loader(data, train=True, two_views=True, batch=8).epoch(0):
        for index, first, second in zip(batch.indices.tolist(), batch.inputs, batch.second_view):
            for view in (first, second):
                pixels = set(torch.round((view * 0.5 + 0.5) * 255).to(torch.int64).unique().tolist())
                assert int(levels[index]) in pixels and pixels <= {0, int(levels[index])}, (index, pixels)
            crops_differ += int(not torch.equal(first, second))
    assert crops_differ > count // 2


def test_horizontal_flip_mirrors_half_the_images_along_the_width_axis():
    """augment="flip" at the stored size: every view is its source image or that image mirrored
    left-right, about half of them mirrored."""
    count, size = 250, 8
    rows, cols = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    images = torch.empty(count, 3, size, size, dtype=torch.uint8)
    images[:, 0] = 10 * cols  # channel 0: the column, channel 1: the row, channel 2: the image
    images[:, 1] = 10 * rows
    images[:, 2] = torch.arange(count, dtype=torch.uint8)[:, None, None]
    data = ImageTensors(images, torch.arange(count) % 5, [str(i) for i in range(5)])
    options = LoaderOptions(batch_size=50, eval_batch_size=50, device=torch.device("cpu"), seed=11)
    loader = TensorLoader(data, options, train=True, augment="flip", image_size=size, mean=[0.0] * 3, std=[1.0] * 3)
    mirrored = draws = 0
    for epoch in range(8):
        for batch in loader.epoch(epoch):
            pixels = (batch.inputs.double() * 255).round().to(torch.uint8)
            for index, out in zip(batch.indices.tolist(), pixels):
                source = images[index]
                assert out[2].eq(index).all()  # the view is of the image the batch names
                assert out[1].equal(10 * rows)  # rows are never reversed (no vertical flip)
                if out.equal(source):
                    assert out[0].equal(10 * cols)
                else:
                    # The exact mirror: column c shows column size - 1 - c.
                    assert out[0].equal(10 * (size - 1 - cols)), f"image {index} is neither itself nor its mirror"
                    assert out.equal(source[:, :, torch.arange(size - 1, -1, -1)])
                    mirrored += 1
                draws += 1
    assert draws == 2000
    assert 0.45 <= mirrored / draws <= 0.55


def test_tinyimagenet_32px_test_images_are_torchvisions_antialiased_resize_of_the_64px_tree(tmp_path):
    """dataset=tinyimagenet at image_size 32 on the official 64 px tree: each val image is the source
    resized by torchvision's antialiased bilinear Resize (uint8 tensor), to 1/255 after undoing the
    normalisation. With train_augment=none the train views are that same resize, never mirrored."""
    from torchvision.transforms import functional as TF

    from conftest import compose
    from zipfls_train.data.builders import build_data

    root = write_tinyimagenet_tree(tmp_path, WNIDS, train_per_class=3, val_per_class=4, seed=5)
    base = root / "tiny-imagenet-200"
    # Overwrite every image with plain uniform noise (the sharpest test of the resampling filter).
    rng = np.random.default_rng(1)
    for path in sorted(base.rglob("*.JPEG")):
        Image.fromarray(rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)).save(path, quality=95)

    def decode(path: Path) -> torch.Tensor:
        with Image.open(path) as image:
            source = torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1).contiguous()
        assert source.shape == (3, 64, 64)
        return source

    def reference(path: Path) -> torch.Tensor:
        return TF.resize(decode(path), [32, 32], interpolation=TF.InterpolationMode.BILINEAR, antialias=True).double()

    cfg = compose(["dataset=tinyimagenet", f"dataset.root={root}", "dataset.num_classes=3", "dataset.train_augment=none"]).dataset
    assert cfg.image_size == 32 and cfg.test_transform == "resize"
    options = LoaderOptions(batch_size=3, eval_batch_size=5, device=torch.device("cpu"), seed=0)
    bundle = build_data(cfg, options)
    mean = torch.tensor(list(cfg.mean), dtype=torch.float64).view(3, 1, 1)
    std = torch.tensor(list(cfg.std), dtype=torch.float64).view(3, 1, 1)

    def pixels(normalised: torch.Tensor) -> torch.Tensor:
        return (normalised.double() * std + mean) * 255.0

    annotations = [line.split("\t") for line in (base / "val/val_annotations.txt").read_text().splitlines()]
    val_files = {int(Path(row[0]).stem.split("_")[1]): base / "val/images" / row[0] for row in annotations}
    seen = 0
    for batch in bundle.val.epoch(0):
        assert batch.inputs.shape[1:] == (3, 32, 32)
        for index, image in zip(batch.indices.tolist(), batch.inputs):
            expected = reference(val_files[index])
            assert (pixels(image) - expected).abs().max() <= 1.0 + 1e-3
            # The data can tell filters apart: nearest sampling (every other pixel) is far from it.
            assert (expected - decode(val_files[index])[:, ::2, ::2].double()).abs().max() > 20
            seen += 1
    assert seen == 12

    train_files = [base / "train" / wnid / "images" / f"{wnid}_{k}.JPEG" for wnid in sorted(WNIDS) for k in range(3)]
    seen = 0
    for batch in bundle.train.epoch(0):
        for index, image in zip(batch.indices.tolist(), batch.inputs):
            # train_augment=none: no augmentation at all, the mirror included (as a file dataset's none)
            assert (pixels(image) - reference(train_files[index])).abs().max() <= 1.0 + 1e-3
            seen += 1
    assert seen == 9


def test_in_memory_test_transform_is_read_and_checked(tmp_path):
    """dataset.test_transform of CIFAR-100/TinyImageNet: an unknown value is named before any file
    is read; "none" (as stored) at another image_size is refused, not silently resized; "resize"
    evaluates the 32 px CIFAR images at 16 px."""
    from conftest import compose
    from zipfls_train.data.builders import build_data

    options = LoaderOptions(batch_size=4, eval_batch_size=10, device=torch.device("cpu"), seed=0)
    empty = tmp_path / "empty"  # no dataset here: the value is refused before the readers look
    cfg = compose(["dataset=cifar100", f"dataset.root={empty}", "dataset.download=false", "dataset.test_transform=resize_center_crop"]).dataset
    with pytest.raises(DatasetError, match=r"dataset.test_transform must be one of \['none', 'resize'\] for cifar100.*'resize_center_crop'"):
        build_data(cfg, options)
    # the same for the train augmentation, which the loader reads only at the first batch
    cfg = compose(["dataset=cifar100", f"dataset.root={empty}", "dataset.download=false", "dataset.train_augment=jitter"]).dataset
    with pytest.raises(DatasetError, match=r"dataset.train_augment must be one of \['crop_pad', 'random_resized_crop', 'flip', 'none'\] for cifar100, got 'jitter'"):
        build_data(cfg, options)

    root = write_cifar100(tmp_path, train_per_class=2, test_per_class=1, num_classes=100)
    cfg = compose(["dataset=cifar100", f"dataset.root={root}", "dataset.download=false", "dataset.image_size=16"]).dataset
    assert cfg.test_transform == "none"
    with pytest.raises(DatasetError, match=r"test_transform=none keeps cifar100's val images as stored, 32x32 px, but dataset.image_size=16"):
        build_data(cfg, options)
    cfg = compose(["dataset=cifar100", f"dataset.root={root}", "dataset.download=false", "dataset.image_size=16", "dataset.test_transform=resize"]).dataset
    batch = next(iter(build_data(cfg, options).val.epoch(0)))
    assert tuple(batch.inputs.shape) == (10, 3, 16, 16)


def test_num_classes_is_the_whole_datasets_count_also_with_a_subset(tiny_pack_root):
    """dataset.num_classes declares the dataset's classes; num_classes_subset takes the first K of
    them. A num_classes that is not the dataset's was accepted beside a subset (and recorded in the
    run's config beside a classifier of another size)."""
    from conftest import compose
    from zipfls_train.data.builders import build_data

    options = LoaderOptions(batch_size=4, eval_batch_size=10, device=torch.device("cpu"), seed=0)
    base = ["dataset=tinyimagenet", f"dataset.root={tiny_pack_root}", "dataset.format=auto"]
    for wrong in (["dataset.num_classes=5", "dataset.num_classes_subset=8"], ["dataset.num_classes=200", "dataset.num_classes_subset=3"]):
        declared = wrong[0].split("=")[1]
        with pytest.raises(DatasetError, match=rf"dataset.num_classes is {declared} but the tinyimagenet files under .* hold 10 classes"):
            build_data(compose([*base, *wrong]).dataset, options)
    bundle = build_data(compose([*base, "dataset.num_classes=10", "dataset.num_classes_subset=3"]).dataset, options)
    assert bundle.num_classes == 3 and bundle.resolved == {"format": "pack"}
    # What tells this data from other data: the classes' names and the split sizes (40 and 10 per class).
    identity = bundle.identity()
    assert identity["num_classes"] == 3 and identity["train_size"] == 120 and identity["val_size"] == 30
    assert identity["classes_sha1"] == hashlib.sha1("\n".join(bundle.classes).encode()).hexdigest()[:12]


def test_a_missing_dataset_says_what_the_root_holds(tmp_path):
    """Beside the expected layout: what dataset.root holds, and where a root names the dataset's own
    folder (one level too deep), the root that was meant."""
    from zipfls_train.data.image_folder import read_image_folder
    from zipfls_train.data.tinyimagenet import find_format

    root = write_tinyimagenet_tree(tmp_path / "data", WNIDS, train_per_class=1, val_per_class=1)
    too_deep = root / "tiny-imagenet-200"
    held = ", ".join(sorted(f"{p.name}/" if p.is_dir() else p.name for p in too_deep.iterdir()))
    with pytest.raises(DatasetError, match=re.escape(f"Found: {held}; dataset.root is the folder that holds tiny-imagenet-200/: dataset.root={root}\n")):
        find_format(too_deep, "auto")
    with pytest.raises(DatasetError, match="\nFound: no such folder\n"):
        find_format(tmp_path / "typo", "auto")
    (tmp_path / "mine" / "train" / "cat").mkdir(parents=True)  # no val/ yet
    with pytest.raises(DatasetError, match="\nFound: train/\n"):
        read_image_folder(tmp_path / "mine")
