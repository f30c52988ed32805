"""Class names and similar classes (analysis/classes.py): a hand-made tree with two parents, WordNet's
own data.noun lines, hand-computed shares of similar classes with and without ties, and the names
WordNet gives ImageNet's ids."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from zipfls_train.analysis.classes import (
    Similarity,
    ancestors_within,
    read_class_names,
    read_hierarchy,
    wordnet_hypernyms,
    wordnet_names,
)
from zipfls_train.analysis.run_loading import AnalysisError


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


def test_similar_classes_among_the_k_highest_share_a_tie_out_in_proportion(tmp_path):
    similarity = hand_similarity(tmp_path, 2)  # similar: (c0 c1 c2), (c4 c5)
    scores = torch.tensor([
        [9.0, 5.0, 3.0, 3.0, 3.0, 1.0],  # target c0; top 2 of the others: c1 (similar), then one of c2 c3 c4 (1 of 3 similar)
        [0.0, 0.0, 0.0, 0.0, 7.0, 2.0],  # target c4: c5 (similar), then one of c0..c3 (none similar)
        [4.0, 0.0, 3.0, 2.0, 1.0, 0.0],  # target c1, no tie: c0, c2 (similar), c3
    ])  # fmt: skip
    targets = torch.tensor([0, 4, 1])
    expected = similarity.expected_similar(scores, targets, 2)
    assert expected.tolist() == pytest.approx([1 + 1 / 3, 1.0, 2.0])
    assert similarity.expected_similar(scores, targets, 3).tolist() == pytest.approx([1 + 2 * 1 / 3, 1.0, 2.0])
    assert similarity.expected_similar(scores, targets, 5).tolist() == pytest.approx([2.0, 1.0, 2.0])  # every other class
    # The target's own score never counts, however high (row 0's 9) or low.
    assert similarity.expected_similar(torch.tensor([[-5.0, 5.0, 1.0, 0.0, 0.0, 0.0]]), torch.tensor([0]), 1).tolist() == [1.0]
    # c0 has 2 similar classes among its 5 others, c3 none: at random, (2/5 + 0) / 2.
    assert similarity.chance(torch.tensor([0, 3])) == pytest.approx(0.2)
    assert similarity.chance(torch.tensor([0, 0, 3, 4])) == pytest.approx((0.4 + 0.4 + 0 + 0.2) / 4)


def test_a_class_outside_the_hierarchy_is_similar_to_none_and_a_file_of_other_ids_is_refused(tmp_path):
    similarity = hand_similarity(tmp_path, 5, classes=["c0", "c1", "zebra"])
    assert similarity.missing == ["zebra"] and similarity(0, 1) and not similarity(0, 2)
    with pytest.raises(AnalysisError, match=r"is_a.txt places none of the runs' 2 classes \(e.g. 'n1'\) under a parent"):
        hand_similarity(tmp_path, 2, classes=["n1", "n2"])
    with pytest.raises(AnalysisError, match="--similar-within must be at least 1"):
        hand_similarity(tmp_path, 0)


def test_malformed_files_name_the_file_and_line(tmp_path):
    with pytest.raises(AnalysisError, match=r"bad.txt, line 2: 'lonely' has one field, expected '<parent id> <child id>'"):
        read_hierarchy(_write(tmp_path / "bad.txt", "a b\nlonely\n"))
    with pytest.raises(AnalysisError, match=r"bad.txt, line 1: a 'b c' has more than two fields"):
        read_hierarchy(_write(tmp_path / "bad.txt", "a b c\n"))
    with pytest.raises(AnalysisError, match=r"cannot read .*absent.txt"):
        read_hierarchy(tmp_path / "absent.txt")
    with pytest.raises(AnalysisError, match=r"is a folder: expected a file of '<parent id> <child id>' lines"):
        read_hierarchy(tmp_path)
    (tmp_path / "binary.txt").write_bytes(b"\xff\xfe\x00a b")
    with pytest.raises(AnalysisError, match=r"binary.txt is not UTF-8 text"):
        read_hierarchy(tmp_path / "binary.txt")


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
    path = _write(tmp_path / "wordnet-3.0-nouns.txt", WORDNET_LINES)
    parents = read_hierarchy(path)  # (known by its first entry line, whatever its name)
    assert parents == wordnet_hypernyms(path, WORDNET_LINES) == {
        "n00060548": {"n00058743"},  # an instance hypernym (@i)
        "n01443537": {"n01439121"},  # not the member holonym (#m) nor the hyponyms (~)
        "n02121620": {"n02120997"},
        "n02121808": {"n02121620", "n01317541"},  # domestic cat: a cat and a domestic animal
        "n02123045": {"n02121808"},
        "n02124075": {"n02121808"},
    }
    similarity = Similarity(["n02123045", "n02124075", "n01443537"], parents, 1, path)
    assert similarity(0, 1) and not similarity(0, 2)  # tabby and Egyptian cat: both domestic cats
    with pytest.raises(AnalysisError, match=r"data.noun, line 2: not a WordNet data.noun entry"):
        read_hierarchy(_write(tmp_path / "bad" / "data.noun", "02124075 05 n 01 Egyptian_cat 0 001 @ 02121808 n 0000 | ok\n02123045 05 n\n"))


def test_class_names_take_the_first_name_of_words_txt_lines(tmp_path):
    words = _write(tmp_path / "words.txt", "c0\tLabrador retriever, lab\nc1\tbeagle\nother\tnot ours\n")
    assert read_class_names(words, ["c0", "c1", "c9"]) == ["Labrador retriever", "beagle", "c9"]
    with pytest.raises(AnalysisError, match=r"words.txt names none of the runs' 2 classes \(e.g. 'x'\)"):
        read_class_names(words, ["x", "y"])


def test_wordnet_ids_are_named_by_their_first_lemma_without_a_file():
    # WordNet 3.0: n01443537 "goldfish, Carassius auratus"; n02123045 "tabby, tabby cat".
    assert wordnet_names(["n01443537", "n02123045", "cat", "n99999999"]) == ["goldfish", "tabby", "cat", "n99999999"]


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path
