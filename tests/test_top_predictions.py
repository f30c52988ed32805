"""Figure 4 (analysis/top_predictions.py): the class hierarchy's notion of "similar" on a hand-made
tree, ranking and the share of similar classes on hand examples, and the command on real run
folders, its numbers recomputed here in numpy and its Zipf soft labels from an explicit per-pixel
loop over the dense map."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from zipfls_train.analysis.run_loading import load_run
from zipfls_train.analysis.top_predictions import (
    Predictions,
    Similarity,
    TopPredictionsError,
    ancestors_within,
    main,
    pick_images,
    ranked,
    read_class_names,
    read_hierarchy,
    read_wordnet_nouns,
    wordnet_names,
)

# animal -> mammal -> dog -> {c0, c1};  mammal -> cat -> c2;  animal -> bird -> c3
# thing -> tool -> c4;  thing -> c5 and vehicle -> c5 (two parents, as in WordNet)
HAND_TREE = """animal mammal
mammal dog
mammal cat
dog c0
dog c1
cat c2
animal bird
bird c3
thing tool
tool c4

thing c5
vehicle c5
"""
CLASSES = ["c0", "c1", "c2", "c3", "c4", "c5"]


def hand_similarity(tmp_path: Path, within: int, classes=CLASSES) -> Similarity:  # noqa: ANN001
    path = tmp_path / "is_a.txt"
    path.write_text(HAND_TREE)
    return Similarity(classes, read_hierarchy(path), within, path)


def test_ancestors_follow_every_parent_up_to_the_step_limit(tmp_path):
    parents = read_hierarchy(_write(tmp_path / "is_a.txt", HAND_TREE))
    assert parents["c5"] == {"thing", "vehicle"} and parents["mammal"] == {"animal"}
    assert ancestors_within("c0", parents, 0) == {"c0"}
    assert ancestors_within("c0", parents, 2) == {"c0", "dog", "mammal"}
    assert ancestors_within("c0", parents, 9) == {"c0", "dog", "mammal", "animal"}
    assert ancestors_within("c5", parents, 1) == {"c5", "thing", "vehicle"}


@pytest.mark.parametrize(
    ("within", "similar_pairs"),
    [
        (1, {(0, 1)}),  # siblings only
        (2, {(0, 1), (0, 2), (1, 2), (4, 5)}),  # + cousins (mammal), and c4 (2 up) with c5 (1 up) under thing
        (3, {(0, 1), (0, 2), (1, 2), (4, 5), (0, 3), (1, 3), (2, 3)}),  # + every animal
    ],
)
def test_similar_classes_share_an_ancestor_within_the_steps(tmp_path, within, similar_pairs):
    similarity = hand_similarity(tmp_path, within)
    for a in range(6):
        for b in range(6):
            assert similarity(a, b) == ((min(a, b), max(a, b)) in similar_pairs), (a, b)


def test_the_share_of_similar_classes_of_a_hand_example(tmp_path):
    similarity = hand_similarity(tmp_path, 2)
    targets = torch.tensor([0, 4])
    chosen = torch.tensor([[1, 3, 2], [5, 0, 1]])  # similar: 1, 2 | 5  ->  3 of 6
    assert similarity.share(targets, chosen) == pytest.approx(0.5)
    # c0 has 2 similar classes among its 5 others, c3 none: at random, (2/5 + 0) / 2.
    assert similarity.chance(torch.tensor([0, 3])) == pytest.approx(0.2)
    assert similarity.chance(torch.tensor([0, 0, 3, 4])) == pytest.approx((0.4 + 0.4 + 0 + 0.2) / 4)


def test_a_class_outside_the_hierarchy_is_similar_to_none_and_a_file_of_other_ids_is_refused(tmp_path):
    similarity = hand_similarity(tmp_path, 5, classes=["c0", "c1", "zebra"])
    assert similarity.missing == ["zebra"] and similarity(0, 1) and not similarity(0, 2)
    with pytest.raises(TopPredictionsError, match=r"is_a.txt places none of the runs' 2 classes \(e.g. 'n1'\) under a parent"):
        hand_similarity(tmp_path, 2, classes=["n1", "n2"])
    with pytest.raises(TopPredictionsError, match="--similar-within must be at least 1"):
        hand_similarity(tmp_path, 0)


def test_malformed_files_name_the_file_and_line(tmp_path):
    with pytest.raises(TopPredictionsError, match=r"bad.txt, line 2: 'lonely' has one field, expected '<parent id> <child id>'"):
        read_hierarchy(_write(tmp_path / "bad.txt", "a b\nlonely\n"))
    with pytest.raises(TopPredictionsError, match=r"bad.txt, line 1: a 'b c' has more than two fields"):
        read_hierarchy(_write(tmp_path / "bad.txt", "a b c\n"))
    with pytest.raises(TopPredictionsError, match=r"cannot read .*absent.txt"):
        read_hierarchy(tmp_path / "absent.txt")


# Lines of WordNet 3.0's data.noun, as the file has them (two trailing spaces included).
WORDNET_LINES = """  1 This software and database is being provided to you, the LICENSEE, by  
  2 Princeton University under the following license.  By obtaining, using  
00060548 04 n 02 Hegira 1 Hejira 1 001 @i 00058743 n 0000 | the flight of Muhammad from Mecca to Medina in 622 which marked the beginning of the Muslim era; the Muslim calendar begins in that year  
01443537 05 n 02 goldfish 0 Carassius_auratus 0 003 @ 01439121 n 0000 #m 01443398 n 0000 ~ 01443736 n 0000 | small golden or orange-red freshwater fishes of Eurasia used as pond or aquarium fishes  
02121620 05 n 02 cat 0 true_cat 0 003 @ 02120997 n 0000 ~ 02121808 n 0000 ~ 02124623 n 0000 | feline mammal usually having thick soft fur and no ability to roar: domestic cats; wildcats  
02121808 05 n 04 domestic_cat 0 house_cat 0 Felis_domesticus 0 Felis_catus 0 005 @ 02121620 n 0000 @ 01317541 n 0000 #m 02121234 n 0000 ~ 02123045 n 0000 ~ 02124075 n 0000 | any domesticated member of the genus Felis  
02123045 05 n 02 tabby 1 tabby_cat 0 001 @ 02121808 n 0000 | a cat with a grey or tawny coat mottled with black  
02124075 05 n 01 Egyptian_cat 0 001 @ 02121808 n 0000 | a domestic cat of Egypt  
"""


def test_wordnets_data_noun_gives_each_synset_its_hypernyms_as_imagenet_ids(tmp_path):
    path = _write(tmp_path / "data.noun", WORDNET_LINES)
    parents = read_hierarchy(path)  # (the file's name says how to read it)
    assert parents == read_wordnet_nouns(path) == {
        "n00060548": {"n00058743"},  # an instance hypernym (@i)
        "n01443537": {"n01439121"},  # not the member holonym (#m) nor the hyponyms (~)
        "n02121620": {"n02120997"},
        "n02121808": {"n02121620", "n01317541"},  # domestic cat: a cat and a domestic animal
        "n02123045": {"n02121808"},
        "n02124075": {"n02121808"},
    }
    similarity = Similarity(["n02123045", "n02124075", "n01443537"], parents, 1, path)
    assert similarity(0, 1) and not similarity(0, 2)  # tabby and Egyptian cat: both domestic cats
    with pytest.raises(TopPredictionsError, match=r"data.noun, line 2: not a WordNet data.noun entry"):
        read_hierarchy(_write(tmp_path / "bad" / "data.noun", "02124075 05 n 01 Egyptian_cat 0 001 @ 02121808 n 0000 | ok\n02123045 05 n\n"))


def test_class_names_take_the_first_name_of_words_txt_lines(tmp_path):
    words = _write(tmp_path / "words.txt", "c0\tLabrador retriever, lab\nc1\tbeagle\nother\tnot ours\n")
    assert read_class_names(words, ["c0", "c1", "c9"]) == ["Labrador retriever", "beagle", "c9"]
    with pytest.raises(TopPredictionsError, match=r"words.txt names none of the runs' 2 classes \(e.g. 'x'\)"):
        read_class_names(words, ["x", "y"])


def test_wordnet_ids_are_named_by_their_first_lemma_without_a_file():
    # WordNet 3.0: n01443537 "goldfish, Carassius auratus"; n02123045 "tabby, tabby cat".
    assert wordnet_names(["n01443537", "n02123045", "cat", "n99999999"]) == ["goldfish", "tabby", "cat", "n99999999"]


def test_ranked_breaks_ties_by_class_index():
    values, indices = ranked(torch.tensor([[1.0, 3.0, 3.0, 0.0], [0.0, 0.0, 0.0, 5.0]]), 3)
    assert indices.tolist() == [[1, 2, 0], [3, 0, 1]] and values.tolist() == [[3.0, 3.0, 1.0], [5.0, 0.0, 0.0]]


def _predictions(first: list[int]) -> Predictions:
    top = torch.tensor(first)[:, None]
    return Predictions(targets=torch.zeros(len(first), dtype=torch.long), top=top, top_p=top.float(), non_target=top)


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
    # The images shown (seed 2), and the Zipf run's soft label of each from its own dense votes: the
    # bilinear x2 map classified pixel by pixel in float64, ranks with ties at the smallest, 1/rank.
    shown = [int(m) for m in re.findall(r"^val image (\d+) \(name\d\):$", out, flags=re.M)]
    assert len(shown) == 12 and shown == sorted(shown)
    soft_lines = [line for line in out.splitlines() if "Zipf soft label:" in line]
    assert len(soft_lines) == 12
    targets, _, final_maps, (weight, bias) = _evaluate(zipf)
    voted = []
    for position, line in zip(shown, soft_lines):
        upsampled = torch.nn.functional.interpolate(final_maps[position : position + 1], scale_factor=2, mode="bilinear", align_corners=False)[0]
        counts = np.zeros(10)
        for y in range(upsampled.shape[1]):
            for x in range(upsampled.shape[2]):
                counts[int(np.argmax(weight @ upsampled[:, y, x].numpy() + bias))] += 1
        voted.append(int(np.count_nonzero(counts)))
        ranks = np.array([1 + np.sum(counts > c) for c in counts])
        label = 1.0 / ranks
        label[targets[position]] = 0
        label /= label.sum()
        expected = np.argsort(-label, kind="stable")[:5]
        entries = re.findall(r"name(\d) ([0-9.]+)%", line.split("Zipf soft label:")[1])
        assert [int(c) for c, _ in entries] == expected.tolist()
        np.testing.assert_allclose([float(p) for _, p in entries], 100 * label[expected], atol=0.051)
    assert max(voted) >= 3  # (3 epochs: the votes of an image are split, so the ranks are not all tied)


def test_runs_of_other_val_images_are_refused(run_tiny, tmp_path):
    _, ten = run_tiny("loss=ce", "trainer.max_steps_per_epoch=1", run_dir=tmp_path / "ten")
    _, five = run_tiny("loss=ce", "trainer.max_steps_per_epoch=1", "dataset.num_classes_subset=5", run_dir=tmp_path / "five")
    with pytest.raises(SystemExit, match=rf"error: {re.escape(str(five))} was not evaluated on the val images of {re.escape(str(ten))}"):
        main([str(ten), str(five), "--out", str(tmp_path / "x.png"), "--device", "cpu"])
    assert not (tmp_path / "x.png").exists()


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


def test_a_dense2_run_shows_the_soft_label_of_its_final_map_and_says_so(run_tiny, tmp_path, capsys):
    # Its auxiliary head (the penultimate map's voter) is training-only: the checkpoint's model leaves it out.
    _, dense2 = run_tiny("loss=zipf_dense2", "trainer.max_steps_per_epoch=1", run_dir=tmp_path / "dense2")
    main([str(dense2), "--images", "2", "--top", "3", "--out", str(tmp_path / "x.png"), "--device", "cpu"])
    out = capsys.readouterr().out
    assert "top-3 " in out and "(soft label from the final map's votes alone; the run voted with ['final', 'penultimate'])" in out
    soft = [line for line in out.splitlines() if "Zipf soft label:" in line]
    assert len(soft) == 2 and all(line.count("%") == 3 for line in soft)
