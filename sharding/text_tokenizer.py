"""The text tokenizer of a dataset: a byte-level BPE trained on the corpus, or a local HF tokenizer.

Either way the dataset root gets a copy at `{output}/tokenizer/` (an HF tokenizer folder that
`transformers.AutoTokenizer.from_pretrained` loads) plus `provenance.json`, the block the
manifest records. A re-run whose tokenizer inputs are unchanged (same config, same corpus or
same source folder) reuses the saved tokenizer instead of training again, so the shards built
with it stay valid. `<|endoftext|>` (or the tokenizer's own EOS) separates documents.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import asdict
from typing import Any, Iterable

from core.config import TokenizerConfig
from core.errors import UserError
from sharding import storage

log = logging.getLogger(__name__)

EOS_TOKEN = "<|endoftext|>"
TOKENIZER_DIR = "tokenizer"
TOKENIZER_FILE = "tokenizer.json"
PROVENANCE_FILE = "provenance.json"


def train_bpe(texts: Iterable[str], vocab_size: int, min_frequency: int = 2, num_texts: int | None = None) -> Any:
    """Train a byte-level BPE (GPT-2 style pre-tokenization) with `<|endoftext|>` as id 0."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 257:
        raise UserError(f"tokenizer.vocab_size must be >= 257 (256 bytes + {EOS_TOKEN}), got {vocab_size}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer, length=num_texts)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS_TOKEN)


def load_pretrained(path: str) -> Any:
    """A local HF tokenizer folder as a fast tokenizer; UserError naming `path` when it is not one."""
    from transformers import AutoTokenizer

    if not os.path.isdir(path):
        raise UserError(f"tokenizer.path: {path!r} is not a folder")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as error:  # noqa: BLE001 - transformers raises many kinds; all mean "not a tokenizer"
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise UserError(f"tokenizer.path: {path!r} is not an HF tokenizer folder: {first_line}") from None
    if not getattr(tokenizer, "is_fast", False):
        raise UserError(f"tokenizer.path: {path!r} has no fast (tokenizers) version; save it with tokenizer.json")
    return tokenizer


def eos_id(tokenizer: Any) -> int:
    """The document separator: the tokenizer's EOS token, else `<|endoftext|>`."""
    if tokenizer.eos_token_id is not None:
        return int(tokenizer.eos_token_id)
    token_id = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    if token_id is None or token_id == tokenizer.unk_token_id:
        raise UserError(f"tokenizer {tokenizer.name_or_path!r} has no EOS token and no {EOS_TOKEN}")
    return int(token_id)


def load_tokenizer(url: str, storage_options: dict[str, Any] | None = None) -> tuple[Any, int]:
    """(fast tokenizer, EOS id) from a tokenizer folder or a dataset root holding `tokenizer/`."""
    if storage.exists(storage.join(url, TOKENIZER_DIR, TOKENIZER_FILE), storage_options):
        url = storage.join(url, TOKENIZER_DIR)
    if storage.is_local(url):
        tokenizer = load_pretrained(storage.local_path(url))
        return tokenizer, eos_id(tokenizer)
    with tempfile.TemporaryDirectory(prefix="tokfleet-tokenizer-") as local:
        for name in storage.ls(url, storage_options):
            with open(os.path.join(local, name), "wb") as handle:
                handle.write(storage.read_bytes(storage.join(url, name), storage_options))
        tokenizer = load_pretrained(local)
    return tokenizer, eos_id(tokenizer)


def _folder_sha256(path: str) -> str:
    digest = hashlib.sha256()
    for name in sorted(os.listdir(path)):
        file_path = os.path.join(path, name)
        if os.path.isfile(file_path):
            digest.update(name.encode() + b"\0")
            with open(file_path, "rb") as handle:
                digest.update(hashlib.sha256(handle.read()).digest())
    return digest.hexdigest()


def save_tokenizer(tokenizer: Any, url: str, storage_options: dict[str, Any] | None = None) -> str:
    """Write the HF tokenizer folder to `url` (each file atomically); sha256 of its tokenizer.json."""
    with tempfile.TemporaryDirectory(prefix="tokfleet-tokenizer-") as local:
        tokenizer.save_pretrained(local)
        sha256 = ""
        for name in sorted(os.listdir(local)):
            with open(os.path.join(local, name), "rb") as handle:
                data = handle.read()
            if name == TOKENIZER_FILE:
                sha256 = hashlib.sha256(data).hexdigest()
            storage.write_bytes_atomic(storage.join(url, name), data, storage_options)
    assert sha256, "save_pretrained of a fast tokenizer always writes tokenizer.json"
    return sha256


def _saved_provenance(url: str, storage_options: dict[str, Any] | None) -> dict[str, Any] | None:
    """The provenance of the tokenizer saved at `url` if its tokenizer.json still matches it."""
    try:
        provenance = json.loads(storage.read_text(storage.join(url, PROVENANCE_FILE), storage_options))
        sha256 = storage.sha256_of(storage.join(url, TOKENIZER_FILE), storage_options)
    except UserError:  # refused credentials, missing bucket: fail now, not after training a tokenizer
        raise
    except (FileNotFoundError, ValueError):
        return None
    return provenance if isinstance(provenance, dict) and provenance.get("sha256") == sha256 else None


def ensure_tokenizer(
    cfg: TokenizerConfig,
    texts: Iterable[str],
    corpus_fingerprint: str,
    output_url: str,
    storage_options: dict[str, Any] | None = None,
    num_texts: int | None = None,
) -> tuple[Any, dict[str, Any]]:
    """(tokenizer, provenance) of the dataset at `output_url`: reused, trained or copied.

    `texts` is consumed only when a BPE must be trained; `corpus_fingerprint` names the
    documents it would be trained on, so a changed corpus retrains.
    """
    url = storage.join(output_url, TOKENIZER_DIR)
    if cfg.kind == "bpe":
        inputs = {"kind": "bpe", "config": asdict(cfg), "trained_on": corpus_fingerprint}
    else:
        if not cfg.path:
            raise UserError("tokenizer.path: required when tokenizer.kind is 'pretrained'")
        if not os.path.isdir(cfg.path):
            raise UserError(f"tokenizer.path: {cfg.path!r} is not a folder")
        inputs = {"kind": "pretrained", "config": asdict(cfg), "source_sha256": _folder_sha256(cfg.path)}
    saved = _saved_provenance(url, storage_options)
    if saved is not None and all(saved.get(key) == value for key, value in inputs.items()):
        log.info("reusing the tokenizer at %s (sha256 %s)", url, saved["sha256"][:12])
        tokenizer, _ = load_tokenizer(url, storage_options)
        return tokenizer, saved
    if cfg.kind == "bpe":
        tokenizer = train_bpe(texts, cfg.vocab_size, cfg.min_frequency, num_texts)
        if tokenizer.backend_tokenizer.get_vocab_size() <= 257:
            raise UserError("source: the corpus has no readable text to train a tokenizer on")
    else:
        tokenizer = load_pretrained(cfg.path)
    sha256 = save_tokenizer(tokenizer, url, storage_options)
    provenance = {
        **inputs,
        "path": TOKENIZER_DIR,
        "sha256": sha256,
        "vocab_size": len(tokenizer),
        "eos_token": tokenizer.convert_ids_to_tokens(eos_id(tokenizer)),
        "eos_id": eos_id(tokenizer),
    }
    storage.write_text_atomic(storage.join(url, PROVENANCE_FILE), json.dumps(provenance, indent=1) + "\n", storage_options)
    return tokenizer, provenance
