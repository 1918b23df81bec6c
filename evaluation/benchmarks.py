"""Prompt sets of the quality benchmark: MJHQ-30K, sDCI and the shipped smoke set.

Nothing is downloaded: a benchmark is read from a local folder (``eval.mjhq_root`` / ``eval.dci_root``) and a missing
or incomplete folder is a ``DatasetMissingError`` that says what to fetch and where to put it. No image is opened
here; a sample only carries the path of the dataset's real image when that file exists.

Dataset layouts (``<root>`` is the configured folder):

- MJHQ-30K, the Hugging Face dataset ``playgroundai/MJHQ-30K``:

  - ``<root>/meta_data.json``: a JSON object mapping image id -> ``{"category": str, "prompt": str, ...}``
    (required; the prompts alone are enough to generate);
  - images, optional (real images for FID): ``<root>/mjhq30k_imgs/<category>/<id>.jpg`` as ``mjhq30k_imgs.zip``
    unpacks, or ``<root>/<category>/<id>.jpg``; each sample looks in both.

- sDCI, the summarized Densely Captioned Images prompts of the SVDQuant / DeepCompressor evaluation, laid out as
  upstream DeepCompressor reads them (``deepcompressor/app/diffusion/dataset/data/DCI/DCI.py``: a YAML
  ``name: prompt`` mapping and the real image ``<image root>/<name>.jpg``), both from the Hugging Face dataset
  ``mit-han-lab/svdquant-datasets``:

  - ``<root>/sDCI.yaml``: a YAML mapping ``id: caption`` (required); ``<root>/sDCI.json`` (a JSON object
    ``id -> caption``) is read when there is no ``sDCI.yaml``;
  - images, optional: ``sDCI.gz`` of the same dataset unpacked (flat ``<id>.jpg`` files) into ``<root>/<id>.jpg``,
    ``<root>/sDCI/<id>.jpg`` or ``<root>/images/<id>.jpg``; each sample looks in all three.

- smoke: ``evaluation/data/smoke_prompts.yaml``, 16 short original prompts (``id: caption``), shipped with the code;
  the set used when no benchmark is given.

Subsets (``load_samples``, ``smoke_samples``): captions equal (stripped, case-folded) to one of ``exclude_captions``
(the calibration prompts) are dropped first; then ``num_samples`` of the rest are drawn with ``stratified_subset``
(MJHQ by category, the others as one group) and returned sorted by ``(category or "", sample_id)`` so every process
of a sharded run sees the same list. With a single group and seed 0 the drawn set is the one upstream DeepCompressor
draws (``random.Random(0).shuffle`` of the ids in file order, the first ``n``).
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

__all__ = [
    "BENCHMARKS",
    "SMOKE",
    "DatasetMissingError",
    "Sample",
    "canonical_benchmark",
    "check_benchmark",
    "load_samples",
    "prompt_file_samples",
    "smoke_samples",
    "stratified_subset",
]

T = TypeVar("T")

BENCHMARKS: tuple[str, ...] = ("MJHQ", "DCI")
SMOKE = "smoke"

SMOKE_FILE = Path(__file__).resolve().parent / "data" / "smoke_prompts.yaml"

MJHQ_META = "meta_data.json"
MJHQ_ZIP_DIR = "mjhq30k_imgs"
MJHQ_URL = "https://huggingface.co/datasets/playgroundai/MJHQ-30K"
DCI_PROMPT_FILES = ("sDCI.yaml", "sDCI.json")
DCI_IMAGE_DIRS = (".", "sDCI", "images")
DCI_URL = "https://huggingface.co/datasets/mit-han-lab/svdquant-datasets"

# Names as users write them, after case-folding and dropping "-", "_", " " -> canonical name.
_ALIASES = {
    "mjhq": "MJHQ",
    "mjhq30k": "MJHQ",
    "dci": "DCI",
    "sdci": "DCI",
    SMOKE: SMOKE,
}

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


class DatasetMissingError(Exception):
    """A benchmark's local folder or prompt file is missing; the message names the config key, what to download
    (URL / Hugging Face repo id) and the files and folders expected where."""


@dataclass(frozen=True)
class Sample:
    """One prompt of a benchmark."""

    benchmark: str  # canonical name: "MJHQ", "DCI" or "smoke"
    sample_id: str  # safe as a file name stem (only [A-Za-z0-9._-]); unique within its benchmark
    caption: str
    category: str | None  # MJHQ category (e.g. "people"), None elsewhere
    image_path: Path | None  # the dataset's real image when the dataset has one, else None


@dataclass(frozen=True)
class _Entry:
    raw_id: str  # the id as the dataset writes it (its image file name stem)
    caption: str
    category: str | None


def canonical_benchmark(name: str) -> str:
    """``"MJHQ"``, ``"DCI"`` or ``"smoke"`` for any accepted spelling (case-insensitive; ``MJHQ-30K``, ``mjhq30k``,
    ``sDCI`` ...); a ``ValueError`` listing the valid names otherwise."""
    folded = re.sub(r"[-_\s]", "", str(name)).casefold()
    try:
        return _ALIASES[folded]
    except KeyError:
        valid = ", ".join((*BENCHMARKS, SMOKE))
        raise ValueError(f"unknown benchmark {name!r}: valid names are {valid} (also MJHQ-30K, sDCI)") from None


def _download_hint(benchmark: str) -> str:
    if benchmark == "MJHQ":
        return (f"MJHQ-30K needs a local copy of the Hugging Face dataset playgroundai/MJHQ-30K ({MJHQ_URL}): "
                f"<root>/{MJHQ_META} (required) and, for real-image FID, mjhq30k_imgs.zip unpacked as "
                f"<root>/{MJHQ_ZIP_DIR}/<category>/<id>.jpg or <root>/<category>/<id>.jpg")
    return (f"sDCI needs sDCI.yaml of the Hugging Face dataset mit-han-lab/svdquant-datasets ({DCI_URL}) as "
            "<root>/sDCI.yaml (or an id -> caption JSON object <root>/sDCI.json) and, for real-image FID, sDCI.gz "
            "of the same dataset unpacked as <root>/<id>.jpg, <root>/sDCI/<id>.jpg or <root>/images/<id>.jpg")


def _resolve_root(benchmark: str, root: str | Path | None, key: str) -> Path:
    if root is None or not str(root).strip():
        raise DatasetMissingError(f"{key} is not set: {_download_hint(benchmark)}")
    path = Path(str(root).strip()).expanduser()
    if path.is_file():
        raise DatasetMissingError(f"{key}: {path} is a file; set {key} to the folder that holds it. "
                                  f"{_download_hint(benchmark)}")
    if not path.is_dir():
        raise DatasetMissingError(f"{key}: folder {path} does not exist. {_download_hint(benchmark)}")
    return path


def _safe_id(raw: str) -> str:
    """``raw`` made a file name stem: characters outside ``[A-Za-z0-9._-]`` become ``_``, and so does a leading dot
    (no hidden files, no ``.`` / ``..``)."""
    safe = _UNSAFE.sub("_", raw)
    if safe.startswith("."):
        safe = "_" + safe[1:]
    return safe


def _no_duplicate_keys(source: str) -> Callable[[list[tuple[str, object]]], dict]:
    def hook(pairs: list[tuple[str, object]]) -> dict:
        out: dict = {}
        for k, v in pairs:
            if k in out:
                raise ValueError(f"{source}: duplicate id {k!r}")
            out[k] = v
        return out

    return hook


def _read_json_object(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: cannot be read ({error})") from None
    try:
        data = json.loads(text, object_pairs_hook=_no_duplicate_keys(str(path)))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: invalid JSON (line {error.lineno}: {error.msg})") from None
    if not isinstance(data, dict) or not data:
        raise ValueError(f"{path}: must be a non-empty JSON object")
    return data


def _read_id_caption_yaml(path: Path, key: str = "eval.benchmarks") -> list[tuple[str, str]]:
    """``(id, caption)`` pairs of a YAML ``id: caption`` file, as every prompt file of the project is read
    (``parse_prompt_yaml``: ids kept as written, duplicate ids and empty captions refused)."""
    from deepcompressor.app.diffusion.capture import parse_prompt_yaml

    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: cannot be read ({error})") from None
    return parse_prompt_yaml(text, str(path), key)


def _mjhq_entries(root: Path, key: str) -> list[_Entry]:
    meta = root / MJHQ_META
    if not meta.is_file():
        raise DatasetMissingError(f"{key}: {meta} not found. {_download_hint('MJHQ')}")
    entries = []
    for pid, record in _read_json_object(meta).items():
        if not pid.strip():
            raise ValueError(f"{meta}: an image id is empty")
        fields = record if isinstance(record, dict) else None
        if fields is None:  # a data error, hence ValueError
            raise ValueError(f"{meta}: entry {pid!r} must be an object with 'category' and 'prompt'")
        category, prompt = fields.get("category"), fields.get("prompt")
        if not isinstance(category, str) or not category.strip() or _UNSAFE.search(category.strip()):
            raise ValueError(f"{meta}: entry {pid!r} has no valid 'category' (a folder name), got {category!r}")
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"{meta}: entry {pid!r} has no 'prompt' text")
        entries.append(_Entry(pid, prompt.strip(), category.strip()))
    return entries


def _dci_prompt_file(root: Path, key: str) -> Path:
    for name in DCI_PROMPT_FILES:
        if (root / name).is_file():
            return root / name
    raise DatasetMissingError(f"{key}: no {' or '.join(DCI_PROMPT_FILES)} in {root}. {_download_hint('DCI')}")


def _dci_entries(root: Path, key: str) -> list[_Entry]:
    path = _dci_prompt_file(root, key)
    if path.suffix == ".yaml":
        pairs = _read_id_caption_yaml(path, key)
    else:
        pairs = []
        for pid, caption in _read_json_object(path).items():
            if not pid.strip():
                raise ValueError(f"{path}: an id is empty")
            if not isinstance(caption, str) or not caption.strip():
                raise ValueError(f"{path}: entry {pid!r} must have a non-empty caption string")
            pairs.append((pid.strip(), caption.strip()))
    return [_Entry(pid, caption, None) for pid, caption in pairs]


def _smoke_entries() -> list[_Entry]:
    return [_Entry(pid, caption, None) for pid, caption in _read_id_caption_yaml(SMOKE_FILE)]


def _entries(benchmark: str, root: str | Path | None, key: str) -> tuple[list[_Entry], Path | None, Path]:
    """The entries of a benchmark in file order, its resolved root (None for smoke) and the file they came from."""
    if benchmark == SMOKE:
        return _smoke_entries(), None, SMOKE_FILE
    folder = _resolve_root(benchmark, root, key)
    if benchmark == "MJHQ":
        return _mjhq_entries(folder, key), folder, folder / MJHQ_META
    return _dci_entries(folder, key), folder, _dci_prompt_file(folder, key)


def _safe_ids(entries: Sequence[_Entry], source: Path) -> list[str]:
    ids, owner = [], {}
    for entry in entries:
        sid = _safe_id(entry.raw_id)
        if sid in owner:
            raise ValueError(f"{source}: ids {owner[sid]!r} and {entry.raw_id!r} both become the file name {sid!r}")
        owner[sid] = entry.raw_id
        ids.append(sid)
    return ids


def check_benchmark(name: str, root: str | Path | None, key: str) -> None:
    """Everything about benchmark ``name`` that can be checked without loading an image: ``root`` set and an
    existing folder, its prompt / meta file present and well-formed. ``DatasetMissingError`` (naming ``key``) for a
    missing folder or file, ``ValueError`` for a malformed one (naming the file and the entry)."""
    benchmark = canonical_benchmark(name)
    entries, _, source = _entries(benchmark, root, key)
    _safe_ids(entries, source)


def _image_path(benchmark: str, root: Path | None, entry: _Entry) -> Path | None:
    if root is None:
        return None
    if benchmark == "MJHQ":
        candidates = [root / MJHQ_ZIP_DIR / str(entry.category) / f"{entry.raw_id}.jpg",
                      root / str(entry.category) / f"{entry.raw_id}.jpg"]
    else:
        candidates = [root / sub / f"{entry.raw_id}.jpg" for sub in DCI_IMAGE_DIRS]
    return next((c for c in candidates if c.is_file()), None)


def _normalize(caption: str) -> str:
    return caption.strip().casefold()


def _subset(benchmark: str, entries: Sequence[_Entry], ids: Sequence[str], root: Path | None, num_samples: int,
            seed: int, exclude_captions: Collection[str]) -> list[Sample]:
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 0:
        raise ValueError(f"num_samples must be an integer >= 0 (0: all), got {num_samples!r}")
    excluded = {_normalize(c) for c in exclude_captions}
    kept = [(entry, sid) for entry, sid in zip(entries, ids) if _normalize(entry.caption) not in excluded]
    chosen = stratified_subset(kept, lambda pair: pair[0].category or "", num_samples, seed)
    samples = [Sample(benchmark, sid, entry.caption, entry.category, _image_path(benchmark, root, entry))
               for entry, sid in chosen]
    return sorted(samples, key=lambda s: (s.category or "", s.sample_id))


def load_samples(name: str, *, root: str | Path | None, num_samples: int, seed: int, key: str,
                 exclude_captions: Collection[str] = ()) -> list[Sample]:
    """A deterministic, seeded subset of ``num_samples`` samples of benchmark ``name`` (0 or more than there are:
    all), without the samples whose caption is one of ``exclude_captions`` (compared stripped and case-folded);
    MJHQ is stratified by category. Sorted by ``(category or "", sample_id)``. Errors as ``check_benchmark``."""
    benchmark = canonical_benchmark(name)
    entries, folder, source = _entries(benchmark, root, key)
    return _subset(benchmark, entries, _safe_ids(entries, source), folder, num_samples, seed, exclude_captions)


def smoke_samples(num_samples: int = 0, seed: int = 0, exclude_captions: Collection[str] = ()) -> list[Sample]:
    """The shipped smoke set (``evaluation/data/smoke_prompts.yaml``), subset like ``load_samples``."""
    entries = _smoke_entries()
    return _subset(SMOKE, entries, _safe_ids(entries, SMOKE_FILE), None, num_samples, seed, exclude_captions)


def prompt_file_samples(path: str | Path, num_samples: int = 0, seed: int = 0,
                        exclude_captions: Collection[str] = ()) -> list[Sample]:
    """A YAML ``id: caption`` file as a benchmark named after the file (e.g. the paper's figure prompts), subset
    like ``load_samples``."""
    path = Path(path)
    entries = [_Entry(pid, caption, None) for pid, caption in _read_id_caption_yaml(path)]
    return _subset(path.stem, entries, _safe_ids(entries, path), None, num_samples, seed, exclude_captions)


def stratified_subset(items: Sequence[T], category: Callable[[T], str], n: int, seed: int) -> list[T]:
    """``n`` of ``items``, drawn per category in proportion to its size, in the order of ``items``.

    Allocation: category ``c`` of ``n_c`` items gets ``floor(n * n_c / N)``; the ``n`` left over go one each to the
    categories with the largest remainders ``n * n_c mod N``, ties to the smaller category name. Within a category
    the items are shuffled with one ``random.Random(seed)``, categories taken in name order, and the first ones are
    kept (so a single category draws exactly like ``random.Random(seed).shuffle`` of the items). ``n <= 0`` or
    ``n >= len(items)``: all items. Deterministic for a seed and the order of ``items``."""
    total = len(items)
    if n <= 0 or n >= total:
        return list(items)
    groups: dict[str, list[int]] = {}
    for index, item in enumerate(items):
        groups.setdefault(category(item), []).append(index)
    names = sorted(groups)
    quota = {c: n * len(groups[c]) // total for c in names}
    left = n - sum(quota.values())
    by_remainder = sorted(names, key=lambda c: (-(n * len(groups[c]) % total), c))
    for c in by_remainder[:left]:
        quota[c] += 1
    rng = random.Random(seed)
    chosen: set[int] = set()
    for c in names:
        indices = list(groups[c])
        rng.shuffle(indices)
        chosen.update(indices[: quota[c]])
    return [items[i] for i in sorted(chosen)]
