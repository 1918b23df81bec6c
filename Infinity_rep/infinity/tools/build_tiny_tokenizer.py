"""(Re)build the SentencePiece model of the embedded tiny T5 text encoder, deterministically.

A unigram model (vocabulary 1000, T5 special ids: <pad>=0, </s>=1, <unk>=2, no <s>) trained single-threaded on the
captions of the shipped prompt file, read in sorted-id order. Writes `infinity/assets/spiece.model` (the file name
transformers' T5 tokenizer looks for) and a provenance record next to it, both atomically.

    python -m infinity.tools.build_tiny_tokenizer            # rebuild the shipped asset
    python -m infinity.tools.build_tiny_tokenizer --check    # verify the shipped asset is reproduced
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import io
import json
import logging
import os
import sys
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets"
MODEL_NAME = "spiece.model"
PROVENANCE_NAME = "tiny_tokenizer_provenance.json"
VOCAB_SIZE = 1000


def default_prompts_path() -> Path:
    """The qdiff prompt file shipped with the quantization package (located without importing it)."""
    spec = importlib.util.find_spec("deepcompressor")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("cannot locate the deepcompressor package for its prompts; pass --prompts")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "prompts" / "qdiff.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"prompt file not found: {path}")
    return path


def read_captions(path: Path) -> list[str]:
    import yaml

    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict) or not data:
        raise ValueError(f"{path}: expected a non-empty mapping id -> caption")
    captions = [" ".join(str(data[k]).split()) for k in sorted(data, key=str)]
    return [c for c in captions if c]


def train_model(captions: list[str], vocab_size: int = VOCAB_SIZE) -> bytes:
    """Serialized SentencePiece unigram model; identical bytes for identical captions and library version."""
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(captions),
        model_writer=buf,
        model_type="unigram",
        vocab_size=vocab_size,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        character_coverage=1.0,
        normalization_rule_name="nmt_nfkc",
        shuffle_input_sentence=False,
        num_threads=1,
        minloglevel=2,
    )
    return buf.getvalue()


def provenance(model: bytes, prompts: Path, captions: list[str], vocab_size: int) -> dict:
    import sentencepiece as spm

    return {
        "model_file": MODEL_NAME,
        "model_sha256": hashlib.sha256(model).hexdigest(),
        "vocab_size": vocab_size,
        "model_type": "unigram",
        "special_ids": {"<pad>": 0, "</s>": 1, "<unk>": 2},
        "trained_on": prompts.name,
        "num_captions": len(captions),
        "captions_sha256": hashlib.sha256("\n".join(captions).encode("utf-8")).hexdigest(),
        "sentencepiece_version": spm.__version__,
    }


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)  # package data: readable by everyone, like a normal checkout
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def build(prompts: Path, out_dir: Path, vocab_size: int = VOCAB_SIZE) -> dict:
    captions = read_captions(prompts)
    logger.info("training a %d-piece unigram model on %d captions of %s", vocab_size, len(captions), prompts)
    model = train_model(captions, vocab_size)
    record = provenance(model, prompts, captions, vocab_size)
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_atomic(out_dir / MODEL_NAME, model)
    _write_atomic(out_dir / PROVENANCE_NAME, (json.dumps(record, indent=1) + "\n").encode("utf-8"))
    logger.info("wrote %s (sha256 %s)", out_dir / MODEL_NAME, record["model_sha256"])
    return record


def check(prompts: Path, out_dir: Path, vocab_size: int = VOCAB_SIZE) -> bool:
    shipped = (out_dir / MODEL_NAME).read_bytes()
    rebuilt = train_model(read_captions(prompts), vocab_size)
    same = shipped == rebuilt
    logger.info("shipped %s %s the rebuilt model", out_dir / MODEL_NAME, "matches" if same else "DIFFERS FROM")
    return same


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=Path, default=None, help="YAML id -> caption (default: qdiff.yaml)")
    parser.add_argument("--out-dir", type=Path, default=ASSETS_DIR)
    parser.add_argument("--vocab-size", type=int, default=VOCAB_SIZE)
    parser.add_argument("--check", action="store_true", help="only verify that the shipped model is reproduced")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    prompts = args.prompts or default_prompts_path()
    if args.check:
        return 0 if check(prompts, args.out_dir, args.vocab_size) else 1
    record = build(prompts, args.out_dir, args.vocab_size)
    print(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
