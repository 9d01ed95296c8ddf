"""The report of `tokfleet analyze` (sharding/analysis.py): the statistics of the merged counts as JSON,
ids named by the dataset's tokenizer, and the few lines the command prints."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

import numpy as np

from sharding import storage
from sharding.manifest import Manifest
from sharding.token_counts import TOP, Counts, Table, conditional_entropy, decode_code, entropy, largest, sketch_estimate
from sharding.token_grid import CANONICAL_AXES, TokenGrid


def _usage(unigram: np.ndarray) -> dict[str, Any]:
    total = int(unigram.sum())
    used = int((unigram > 0).sum())
    return {"num_tokens": total, "used_ids": used, "used_fraction": used / len(unigram),
            "unigram_entropy_nats": entropy(unigram), "perplexity": math.exp(entropy(unigram))}


def summarize(counts: Counts, grid: TokenGrid | None, names: Callable[[list[int]], str] | None,
              patterns: dict[int, tuple[Table, int]] | None = None) -> dict[str, Any]:
    """The report's statistics; `patterns`: n -> (exact counts of candidate n-grams, at most how often any
    other n-gram occurs), see exact_patterns."""
    vocab = counts.vocab_size
    unigram = counts.unigram
    total = max(int(unigram.sum()), 1)
    used = np.flatnonzero(unigram)
    rarest = used[np.lexsort((-used, unigram[used]))][:TOP]  # the least used first, ties by larger id
    bigram_h = conditional_entropy(counts.transitions, vocab)
    report: dict[str, Any] = {
        "vocab_size": vocab,
        "num_samples": counts.num_samples,
        **_usage(unigram),
        "unigram_entropy_bits": entropy(unigram) / math.log(2),
        "max_entropy_nats": math.log(vocab),
        "bigram_conditional_entropy_nats": bigram_h,
        "bigram_perplexity": math.exp(bigram_h),
        "most_frequent": [_named({"ids": [int(i)], "count": int(unigram[i]), "fraction": float(unigram[i] / total)}, names)
                          for i in largest(unigram, TOP) if unigram[i] > 0],
        "least_frequent_used": [_named({"ids": [int(i)], "count": int(unigram[i])}, names)
                                for i in rarest],
    }
    codes, values = counts.transitions
    previous = (codes // np.uint64(vocab)).astype(np.int64)
    from_previous = np.bincount(previous, weights=values, minlength=vocab)
    top = largest(values, TOP * 2)
    report["top_transitions"] = [
        _named({"ids": decode_code(int(codes[i]), 2, vocab), "count": int(values[i]),
                "p_next_given_previous": float(values[i] / from_previous[previous[i]])}, names) for i in top]
    report["num_distinct_transitions"] = int(len(codes))
    # 2-grams straight from the exact transitions; 3/4-grams: the candidates pass 2 recounted
    patterns = {2: ((codes, values), 0), **(patterns or {})}
    report["patterns"], report["pattern_unlisted_max_count"], exact = {}, {}, True
    for n, ((pattern_codes, pattern_counts), bound) in sorted(patterns.items()):
        listed = largest(pattern_counts, TOP)  # ties: smaller code first (codes are sorted)
        report["patterns"][str(n)] = [
            _named({"ids": decode_code(int(pattern_codes[i]), n, vocab), "count": int(pattern_counts[i])}, names) for i in listed]
        # an n-gram not listed: counted exactly below the list, or not a candidate (at most `bound`)
        unlisted = max(bound, int(np.delete(pattern_counts, listed).max(initial=0)))
        report["pattern_unlisted_max_count"][str(n)] = unlisted
        exact &= unlisted == 0 or (len(listed) == TOP and unlisted <= int(pattern_counts[listed[-1]]))
    report["patterns_exact"] = bool(exact)
    distinct = {}
    exactly = {1: (int((unigram > 0).sum()), True), 2: (len(counts.transitions[0]), True)}
    for n in sorted({*exactly, *counts.sketches} & set(counts.ngram_totals)):
        number, exact = exactly[n] if n in exactly else sketch_estimate(counts.sketches[n])
        ngrams = counts.ngram_totals.get(n, 0)
        distinct[str(n)] = {"distinct": number, "total": ngrams, "distinct_fraction": number / max(ngrams, 1), "exact": exact}
    report["distinct_n"] = distinct
    if counts.by_height is not None:
        axes = {AXIS: size for AXIS, size in zip(CANONICAL_AXES, grid.canonical_shape)}
        report["grid"] = {"axes": list(grid.axes), "shape": list(grid.shape), "canonical": axes}
        report["by_channel"] = [_usage(row) for row in counts.by_height]
        report["by_level"] = [_usage(row) for row in counts.by_level]
    return report


def _named(entry: dict[str, Any], names: Callable[[list[int]], str] | None) -> dict[str, Any]:
    if names is not None:
        entry["text"] = names(entry["ids"])
    return entry


def text_names(root: str, manifest: Manifest, storage_options: dict | None) -> Callable[[list[int]], str] | None:
    """ids -> text, for a dataset that ships its BPE tokenizer."""
    if manifest.tokenizer.get("kind") != "bpe" or not manifest.tokenizer.get("path"):
        return None
    from tokenizers import Tokenizer  # the tokenizer file alone: no transformers import

    try:
        tokenizer = Tokenizer.from_str(storage.read_text(storage.join(root, manifest.tokenizer["path"], "tokenizer.json"), storage_options))
    except Exception:  # noqa: BLE001 - the names are a nicety; the report stands without them
        return None
    return lambda ids: tokenizer.decode(ids)


def format_report(report: dict[str, Any], out: str | Path) -> str:
    """The few lines `tokfleet analyze` prints."""
    distinct = report["distinct_n"]
    lines = [
        f"{report['dataset']} ({report['kind']}, {report['split']}): {report['num_samples']} samples, {report['num_tokens']} tokens, "
        f"{report['used_ids']} of {report['vocab_size']} ids used ({report['used_fraction']:.1%})",
        f"unigram entropy {report['unigram_entropy_nats']:.3f} nats ({report['unigram_entropy_bits']:.2f} bits, perplexity "
        f"{report['perplexity']:.1f}); H(next | previous) {report['bigram_conditional_entropy_nats']:.3f} nats "
        f"(perplexity {report['bigram_perplexity']:.1f}); log V {report['max_entropy_nats']:.3f}",
        "distinct-n: " + ", ".join(f"{n}: {entry['distinct_fraction']:.3f}{'' if entry['exact'] else ' (est.)'}" for n, entry in distinct.items()),
    ]
    for name, entries in report["outliers"].items():
        if entries:
            top = entries[0]
            lines.append(f"{name.replace('_', ' ')}: {top['key']} ({top['shard']}), bigram NLL {top['bigram_nll']:.3f} "
                         f"(z {top['bigram_z']:+.1f}), unigram NLL {top['unigram_nll']:.3f}")
    plots = ", ".join(Path(p).name for p in report["plots"]) or "none"
    lines.append(f"report: {Path(out) / 'analysis.json'}; plots: {plots}")
    return "\n".join(lines)
