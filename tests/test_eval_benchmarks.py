"""Prompt sets of the quality benchmark (evaluation/benchmarks.py) on tiny fake MJHQ / sDCI folders."""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from pathlib import Path

import pytest

from evaluation.benchmarks import (
    BENCHMARKS,
    SMOKE,
    DatasetMissingError,
    Sample,
    canonical_benchmark,
    check_benchmark,
    load_samples,
    smoke_samples,
    stratified_subset,
)

SAFE = re.compile(r"^[A-Za-z0-9._-]+$")
MJHQ_SIZES = {"animals": 6, "people": 10, "food": 4}  # 20 in all


def make_mjhq(root: Path, layout: str | None = None, sizes: dict[str, int] = MJHQ_SIZES) -> dict:
    """A fake MJHQ-30K folder; ``layout``: "zip" (mjhq30k_imgs/<cat>/<id>.jpg), "flat" (<cat>/<id>.jpg) or None."""
    root.mkdir(parents=True, exist_ok=True)
    meta = {}
    for category, count in sizes.items():
        for i in range(count):
            pid = f"{category[:2]}{i:03d}deadbeef"
            meta[pid] = {"category": category, "prompt": f"A {category} picture number {i}", "extra": 1}
            if layout is not None:
                folder = root / ("mjhq30k_imgs" if layout == "zip" else "") / category
                folder.mkdir(parents=True, exist_ok=True)
                (folder / f"{pid}.jpg").write_bytes(b"jpg")
    (root / "meta_data.json").write_text(json.dumps(meta), encoding="utf-8")
    return meta


def make_dci(root: Path, count: int = 12, images: str | None = None, fmt: str = "yaml") -> dict[str, str]:
    root.mkdir(parents=True, exist_ok=True)
    prompts = {f"sa_{1000 + i}": f"A densely described scene {i}" for i in range(count)}
    if fmt == "yaml":
        text = "".join(f"{pid}: {caption}\n" for pid, caption in prompts.items())
        (root / "sDCI.yaml").write_text(text, encoding="utf-8")
    else:
        (root / "sDCI.json").write_text(json.dumps(prompts), encoding="utf-8")
    if images is not None:
        (root / images).mkdir(parents=True, exist_ok=True)
        for pid in list(prompts)[::2]:
            (root / images / f"{pid}.jpg").write_bytes(b"jpg")
    return prompts


# -- names ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, canonical", [
    ("MJHQ", "MJHQ"), ("mjhq", "MJHQ"), ("MJHQ-30K", "MJHQ"), ("mjhq30k", "MJHQ"), ("mjhq_30k", "MJHQ"),
    ("DCI", "DCI"), ("dci", "DCI"), ("sDCI", "DCI"), ("SDCI", "DCI"), ("smoke", "smoke"), ("SMOKE", "smoke"),
])
def test_canonical_names(name, canonical):
    assert canonical_benchmark(name) == canonical
    assert BENCHMARKS == ("MJHQ", "DCI") and SMOKE == "smoke"


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match=r"unknown benchmark 'coco'.*MJHQ, DCI, smoke"):
        canonical_benchmark("coco")
    with pytest.raises(ValueError, match="unknown benchmark"):
        check_benchmark("coco", "/nowhere", "eval.x_root")


# -- missing datasets ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("root", [None, "", "  "])
def test_root_not_set(root):
    with pytest.raises(DatasetMissingError) as info:
        check_benchmark("MJHQ", root, "eval.mjhq_root")
    message = str(info.value)
    assert "eval.mjhq_root is not set" in message and "playgroundai/MJHQ-30K" in message
    assert "meta_data.json" in message and "mjhq30k_imgs" in message and "\n" not in message


def test_root_missing_folder(tmp_path):
    with pytest.raises(DatasetMissingError, match=r"eval\.dci_root: folder .*nope does not exist.*"
                                                  r"mit-han-lab/svdquant-datasets.*sDCI\.yaml"):
        check_benchmark("DCI", tmp_path / "nope", "eval.dci_root")


def test_root_is_a_file(tmp_path):
    make_mjhq(tmp_path)
    with pytest.raises(DatasetMissingError, match=r"is a file; set eval\.mjhq_root to the folder"):
        check_benchmark("MJHQ", tmp_path / "meta_data.json", "eval.mjhq_root")


def test_missing_meta_data_json(tmp_path):
    (tmp_path / "people").mkdir()
    with pytest.raises(DatasetMissingError) as info:
        load_samples("MJHQ-30K", root=tmp_path, num_samples=0, seed=0, key="eval.mjhq_root")
    message = str(info.value)
    assert message.startswith("eval.mjhq_root: ") and str(tmp_path / "meta_data.json") in message
    assert "https://huggingface.co/datasets/playgroundai/MJHQ-30K" in message


def test_missing_dci_prompt_file(tmp_path):
    (tmp_path / "images").mkdir()
    with pytest.raises(DatasetMissingError) as info:
        check_benchmark("sDCI", tmp_path, "eval.dci_root")
    message = str(info.value)
    assert message.startswith("eval.dci_root: no sDCI.yaml or sDCI.json in")
    assert "mit-han-lab/svdquant-datasets" in message and "sDCI.gz" in message and "<root>/<id>.jpg" in message


# -- malformed files -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, match", [
    ("{not json", r"meta_data\.json: invalid JSON"),
    ("[1, 2]", "non-empty JSON object"),
    ('{"a1": {"category": "people"}}', r"entry 'a1' has no 'prompt'"),
    ('{"a1": {"prompt": "x"}}', r"entry 'a1' has no valid 'category'"),
    ('{"a1": {"category": "../x", "prompt": "x"}}', r"entry 'a1' has no valid 'category'"),
    ('{"a1": "x"}', r"entry 'a1' must be an object"),
    ('{"a1": {"category": "p", "prompt": "x"}, "a1": {"category": "p", "prompt": "y"}}', r"duplicate id 'a1'"),
])
def test_malformed_mjhq_meta(tmp_path, text, match):
    (tmp_path / "meta_data.json").write_text(text, encoding="utf-8")
    with pytest.raises(ValueError, match=match):
        check_benchmark("MJHQ", tmp_path, "eval.mjhq_root")


@pytest.mark.parametrize("text, match", [
    ("a: [1, 2\n", "invalid YAML"),
    ("- a\n- b\n", "non-empty YAML mapping"),
    ("a: one\na: two\n", r"line 2: duplicate id 'a' \(first on line 1\)"),
    ("a: one\nb:\n", r"line 2: empty caption for id 'b'"),
    ("a: {x: 1}\n", r"caption of id 'a' must be text"),
    ("a/b: one\na_b: two\n", r"ids 'a/b' and 'a_b' both become the file name 'a_b'"),
])
def test_malformed_dci_yaml(tmp_path, text, match):
    (tmp_path / "sDCI.yaml").write_text(text, encoding="utf-8")
    with pytest.raises(ValueError, match=match) as info:
        check_benchmark("DCI", tmp_path, "eval.dci_root")
    assert "sDCI.yaml" in str(info.value)


def test_negative_num_samples(tmp_path):
    make_dci(tmp_path)
    with pytest.raises(ValueError, match="num_samples"):
        load_samples("DCI", root=tmp_path, num_samples=-1, seed=0, key="eval.dci_root")


# -- stratified subsets --------------------------------------------------------------------------------------------


def _items(sizes: dict[str, int]) -> list[tuple[str, int]]:
    return [(c, i) for c, count in sizes.items() for i in range(count)]


def test_stratified_subset_deterministic_and_seeded():
    items = _items({"a": 30, "b": 50, "c": 20})
    first = stratified_subset(items, lambda t: t[0], 25, seed=7)
    assert first == stratified_subset(items, lambda t: t[0], 25, seed=7)
    assert first != stratified_subset(items, lambda t: t[0], 25, seed=8)
    assert len(first) == len(set(first)) == 25 and set(first) <= set(items)
    assert first == [t for t in items if t in set(first)]  # in the order of items


@pytest.mark.parametrize("sizes, n, expected", [
    ({"a": 30, "b": 50, "c": 20}, 10, {"a": 3, "b": 5, "c": 2}),          # exact
    ({"a": 30, "b": 50, "c": 20}, 7, {"a": 2, "b": 4, "c": 1}),           # 2.1 / 3.5 / 1.4: largest remainder to b
    ({"a": 1, "b": 1, "c": 1, "d": 1}, 2, {"a": 1, "b": 1}),              # equal remainders: category name order
    ({"x": 5, "y": 5, "z": 10}, 3, {"x": 1, "y": 1, "z": 1}),             # .75/.75/1.5: both .75 beat .5
    ({"y": 5, "x": 5, "z": 10}, 2, {"x": 1, "z": 1}),                     # .5/.5/1.0: tie x/y -> x
    ({"big": 97, "small": 3}, 10, {"big": 10}),                           # 9.7 / 0.3
])
def test_stratified_subset_proportional(sizes, n, expected):
    chosen = stratified_subset(_items(sizes), lambda t: t[0], n, seed=0)
    assert Counter(c for c, _ in chosen) == Counter(expected)


@pytest.mark.parametrize("n", [0, 20, 21, 1000])
def test_stratified_subset_all_items(n):
    items = _items({"a": 12, "b": 8})
    assert stratified_subset(items, lambda t: t[0], n, seed=3) == items


def test_single_group_draws_like_a_seeded_shuffle():
    items = [f"id{i:02d}" for i in range(40)]
    names = list(items)
    random.Random(0).shuffle(names)
    assert sorted(stratified_subset(items, lambda t: "", 9, seed=0)) == sorted(names[:9])


def test_mjhq_subset_stratified_and_sorted(tmp_path):
    make_mjhq(tmp_path)
    samples = load_samples("MJHQ", root=tmp_path, num_samples=10, seed=5, key="eval.mjhq_root")
    assert Counter(s.category for s in samples) == {"people": 5, "animals": 3, "food": 2}
    assert samples == sorted(samples, key=lambda s: (s.category, s.sample_id))
    assert all(isinstance(s, Sample) and s.benchmark == "MJHQ" for s in samples)
    again = load_samples("mjhq30k", root=str(tmp_path), num_samples=10, seed=5, key="eval.mjhq_root")
    other = load_samples("MJHQ", root=tmp_path, num_samples=10, seed=6, key="eval.mjhq_root")
    assert again == samples and other != samples
    everything = load_samples("MJHQ", root=tmp_path, num_samples=0, seed=5, key="eval.mjhq_root")
    assert len(everything) == 20
    assert load_samples("MJHQ", root=tmp_path, num_samples=500, seed=1, key="eval.mjhq_root") == everything


def test_dci_subset(tmp_path):
    prompts = make_dci(tmp_path, count=12)
    check_benchmark("sDCI", tmp_path, "eval.dci_root")
    samples = load_samples("sDCI", root=tmp_path, num_samples=5, seed=0, key="eval.dci_root")
    assert len(samples) == 5 and [s.sample_id for s in samples] == sorted(s.sample_id for s in samples)
    assert all(s.benchmark == "DCI" and s.category is None and s.caption == prompts[s.sample_id] for s in samples)
    names = list(prompts)
    random.Random(0).shuffle(names)
    assert [s.sample_id for s in samples] == sorted(names[:5])  # DeepCompressor's selection for seed 0


def test_dci_json_prompt_file(tmp_path):
    prompts = make_dci(tmp_path, count=4, fmt="json")
    samples = load_samples("DCI", root=tmp_path, num_samples=0, seed=0, key="eval.dci_root")
    assert {s.sample_id: s.caption for s in samples} == prompts


# -- calibration prompts -------------------------------------------------------------------------------------------


def test_calibration_captions_excluded_before_sampling(tmp_path):
    meta = make_mjhq(tmp_path)
    people = [record["prompt"] for record in meta.values() if record["category"] == "people"]
    exclude = ["  " + people[0].upper() + " ", people[1].lower(), "not a caption of the set"]
    samples = load_samples("MJHQ", root=tmp_path, num_samples=0, seed=0, key="eval.mjhq_root",
                           exclude_captions=exclude)
    assert len(samples) == 18 and not {people[0], people[1]} & {s.caption for s in samples}
    # 18 left (animals 6, people 8, food 4): 9 samples -> exactly 3 / 4 / 2
    half = load_samples("MJHQ", root=tmp_path, num_samples=9, seed=0, key="eval.mjhq_root", exclude_captions=exclude)
    assert Counter(s.category for s in half) == {"animals": 3, "people": 4, "food": 2}
    assert not {people[0], people[1]} & {s.caption for s in half}


def test_calibration_captions_excluded_from_smoke():
    full = smoke_samples()
    dropped = {full[3].caption, full[9].caption}
    rest = smoke_samples(exclude_captions=[c.upper() for c in dropped])
    assert len(rest) == 14 and not dropped & {s.caption for s in rest}


# -- images --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["zip", "flat"])
def test_mjhq_image_layouts(tmp_path, layout):
    make_mjhq(tmp_path, layout=layout)
    samples = load_samples("MJHQ", root=tmp_path, num_samples=0, seed=0, key="eval.mjhq_root")
    prefix = tmp_path / "mjhq30k_imgs" if layout == "zip" else tmp_path
    assert all(s.image_path == prefix / s.category / f"{s.sample_id}.jpg" for s in samples)
    assert all(s.image_path.is_file() for s in samples)


def test_mjhq_without_images(tmp_path):
    make_mjhq(tmp_path)
    samples = load_samples("MJHQ", root=tmp_path, num_samples=4, seed=0, key="eval.mjhq_root")
    assert len(samples) == 4 and all(s.image_path is None for s in samples)


@pytest.mark.parametrize("images", [".", "sDCI", "images"])
def test_dci_image_layouts(tmp_path, images):
    prompts = make_dci(tmp_path, count=6, images=images)
    samples = load_samples("DCI", root=tmp_path, num_samples=0, seed=0, key="eval.dci_root")
    with_image = set(list(prompts)[::2])
    for s in samples:
        expected = (tmp_path / images / f"{s.sample_id}.jpg") if s.sample_id in with_image else None
        assert s.image_path == expected


# -- ids -----------------------------------------------------------------------------------------------------------


def test_sample_ids_file_name_safe(tmp_path):
    text = ('"0512": octal-looking id\n"a b/c": spaces and a slash\n".hidden": leading dot\n'
            '"..": dots only\n"caf\u00e9:1": accent and colon\nplain-id_1.x: already safe\n')
    (tmp_path / "sDCI.yaml").write_text(text, encoding="utf-8")
    samples = load_samples("DCI", root=tmp_path, num_samples=0, seed=0, key="eval.dci_root")
    ids = [s.sample_id for s in samples]
    assert len(set(ids)) == 6 and all(SAFE.match(i) and not i.startswith(".") for i in ids)
    assert {"0512", "a_b_c", "_hidden", "_.", "caf__1", "plain-id_1.x"} == set(ids)


def test_mjhq_ids_safe_and_unique(tmp_path):
    make_mjhq(tmp_path)
    ids = [s.sample_id for s in load_samples("MJHQ", root=tmp_path, num_samples=0, seed=0, key="eval.mjhq_root")]
    assert len(set(ids)) == len(ids) == 20 and all(SAFE.match(i) for i in ids)


# -- smoke ---------------------------------------------------------------------------------------------------------


def test_smoke_set():
    samples = smoke_samples()
    assert len(samples) == 16
    assert [s.sample_id for s in samples] == [f"s{i:02d}" for i in range(16)]
    assert len({s.caption.casefold() for s in samples}) == 16
    assert all(s.benchmark == "smoke" and s.category is None and s.image_path is None for s in samples)
    assert all(SAFE.match(s.sample_id) and 3 <= len(s.caption.split()) <= 30 for s in samples)


def test_smoke_subset():
    three = smoke_samples(3, seed=1)
    assert len(three) == 3 and three == smoke_samples(3, seed=1)
    assert [s.sample_id for s in three] == sorted(s.sample_id for s in three)
    assert any(smoke_samples(3, seed=s) != three for s in range(2, 6))
    assert smoke_samples(100) == smoke_samples(0) == smoke_samples()
    assert load_samples("smoke", root=None, num_samples=3, seed=1, key="unused") == three
    check_benchmark("SMOKE", None, "unused")


def test_prompt_file_as_a_benchmark(tmp_path):
    from evaluation.benchmarks import prompt_file_samples

    path = tmp_path / "figure.yaml"
    path.write_text("'0512': a fox\nb/1: a boat\nc: a tree\n", encoding="utf-8")
    samples = prompt_file_samples(path, exclude_captions=["A TREE"])
    assert [(s.benchmark, s.sample_id, s.caption) for s in samples] == [("figure", "0512", "a fox"),
                                                                      ("figure", "b_1", "a boat")]
    assert len(prompt_file_samples(path, num_samples=2, seed=3)) == 2
