"""Next-token evaluation of a causal sequence model (gpt, the FlatGPT family, BrainOmniCausalForecast)
on a split of token shards, next to the split's unigram baseline (`tokfleet eval` of a causal_lm run).

The batches are the trainer's: packed token sequences through trainer.data.causal_lm_batch, token grids
(stored codes, or raw windows/clips tokenized on the fly by the run's tokenizer) through
trainer.token_tasks.GridTask and the family's layout. Each target's RVQ level comes from an index grid
of the same canonical (B, T, H, W, Q) shape holding q, laid out and shifted exactly like the codes, so
it is right whatever the family does with levels (FlatGPTEmbedsRVQ interleaves them in the sequence;
FlatGPTRVQ / MixRVQ / BrainOmniCausalForecast keep them on a trailing axis).

Metrics, overall and per level: mean cross-entropy (nats), perplexity = exp(loss), accuracy (argmax),
top-5 accuracy. The unigram baseline takes the evaluated targets' own code frequencies, per level: its
loss is their entropy, its accuracy the most frequent code's share, its top-5 accuracy the five most
frequent codes' share. A model that ignores its context cannot beat it (it is fitted on the very
targets it scores). Overall values are the target-weighted means of the per-level ones (perplexity:
exp of the overall loss), for the model and the baseline alike.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F

from core.errors import UserError
from modeling.registry import get_model_spec
from sharding.manifest import Manifest
from sharding.token_grid import TOKENS_FIELD, TokenGrid
from trainer.checkpoint import read_trainer_state
from trainer.data import causal_lm_batch, collate
from trainer.inference import load_model, resolve_checkpoint, tokenizer_folder
from trainer.token_tasks import RAW_KINDS, GridSource, GridTask, learned_tokenizer

TOP_K = 5
ROWS_BUDGET = 1 << 24  # logits entries scored at once: bounds the softmax's copy for big vocabularies
RAW_FIELDS = {"meg_windows": "signal", "video_clips": "video"}  # raw dataset kind -> the field a batch stacks


def checkpoint_task(path: str | Path) -> tuple[str, str]:
    """(model name, registry task) of the checkpoint (or run dir's newest checkpoint) at `path`."""
    if not Path(path).exists():
        raise UserError(f"checkpoint not found: {path}")
    name = read_trainer_state(resolve_checkpoint(path))["model"]["name"]
    try:
        return name, get_model_spec(name).task
    except ValueError as error:
        raise UserError(f"{path}: {error}") from None


# ------------------------------------------------------------------ statistics


class NextTokenStatistics:
    """Per-level sums over scored targets: count, cross-entropy, top-1 and top-k hits, code histogram."""

    def __init__(self, num_levels: int, vocab_size: int):
        self.num_targets = torch.zeros(num_levels, dtype=torch.int64)
        self.loss_sum = torch.zeros(num_levels, dtype=torch.float64)
        self.num_correct = torch.zeros(num_levels, dtype=torch.int64)
        self.num_top_k = torch.zeros(num_levels, dtype=torch.int64)
        self.counts = torch.zeros(num_levels, vocab_size, dtype=torch.int64)  # (Q, V) histogram of the targets

    def add(self, logits: torch.Tensor, targets: torch.Tensor, levels: torch.Tensor) -> None:
        """logits (..., V) against targets (...) whose RVQ level is levels (...); targets of -1 are skipped."""
        num_levels, vocab_size = self.counts.shape
        logits_NV = logits.reshape(-1, logits.shape[-1])
        targets_N, levels_N = targets.reshape(-1), levels.reshape(-1)
        rows = max(1, ROWS_BUDGET // logits_NV.shape[-1])
        for start in range(0, targets_N.numel(), rows):
            target = targets_N[start:start + rows]
            keep = target >= 0
            chunk = logits_NV[start:start + rows][keep].float()  # (n, V) fp32
            target, level = target[keep], levels_N[start:start + rows][keep].cpu()
            nll = F.cross_entropy(chunk, target, reduction="none").double().cpu()
            is_correct = (chunk.argmax(dim=-1) == target).cpu()
            top = chunk.topk(min(TOP_K, chunk.shape[-1]), dim=-1).indices  # (n, k)
            is_top_k = (top == target[:, None]).any(dim=-1).cpu()
            self.num_targets += torch.bincount(level, minlength=num_levels)
            self.loss_sum.index_add_(0, level, nll)
            self.num_correct += torch.bincount(level[is_correct], minlength=num_levels)
            self.num_top_k += torch.bincount(level[is_top_k], minlength=num_levels)
            cells = level * vocab_size + target.cpu()
            self.counts += torch.bincount(cells, minlength=num_levels * vocab_size).view(num_levels, vocab_size)

    def _unigram(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per level: entropy (nats), top-1 share, top-k share of the targets' own histogram."""
        total = self.counts.sum(dim=1, keepdim=True).clamp_min(1).double()
        probs = self.counts.double() / total  # (Q, V)
        entropy = -(probs * torch.log(probs.clamp_min(1e-300))).sum(dim=1)
        ranked = probs.sort(dim=1, descending=True).values
        return entropy, ranked[:, 0], ranked[:, :TOP_K].sum(dim=1)

    @staticmethod
    def _metrics(loss: float, accuracy: float, top_k: float, num_targets: int) -> dict[str, Any]:
        return {"loss": loss, "perplexity": math.exp(loss), "accuracy": accuracy, f"top{TOP_K}_accuracy": top_k,
                "num_targets": num_targets}

    def report(self) -> dict[str, Any]:
        """{"metrics": {"model", "unigram"}} overall, and "levels": one entry per level with scored targets
        (empty for one-level codes)."""
        n = self.num_targets.double()
        total = int(self.num_targets.sum())
        if total == 0:
            raise UserError("no targets to score: every target is -1 (ignored)")
        entropy, top1_share, top_k_share = self._unigram()
        weights = n / total
        overall = {
            "model": self._metrics(float(self.loss_sum.sum()) / total, int(self.num_correct.sum()) / total,
                                   int(self.num_top_k.sum()) / total, total),
            "unigram": self._metrics(float((weights * entropy).sum()), float((weights * top1_share).sum()),
                                     float((weights * top_k_share).sum()), total),
        }
        levels = []
        if len(n) > 1:  # codes with RVQ levels: each level that has scored targets
            for q in range(len(n)):
                count, denominator = int(n[q]), float(n[q])
                if count == 0:
                    continue  # not predicted (BrainOmniCausalForecast with num_quantizers_used < Q)
                levels.append({
                    "level": q,
                    "model": self._metrics(float(self.loss_sum[q]) / denominator, int(self.num_correct[q]) / denominator,
                                           int(self.num_top_k[q]) / denominator, count),
                    "unigram": self._metrics(float(entropy[q]), float(top1_share[q]), float(top_k_share[q]), count),
                })
        return {"metrics": overall, "levels": levels}


# ------------------------------------------------------------------ what the model reads


def _trained_vocab_size(state: dict[str, Any]) -> tuple[int, bool]:
    """(the model's vocab_size, whether it is the training data's: the trainer takes it from the data
    unless model.args gives one, which may be larger)."""
    vocab_size = int(state["model"]["args"].get("vocab_size", 0))
    is_exact = "vocab_size" not in state["config"]["model"].get("args", {})
    return vocab_size, is_exact


def _check_packed(state: dict[str, Any], manifest: Manifest, url: str, tokenizer_dir: Path | None) -> None:
    """UserError unless `manifest` holds packed token sequences the model was trained on the like of."""
    name = state["model"]["name"]
    if manifest.kind in RAW_KINDS:
        raise UserError(f"{url}: raw {manifest.kind} are read by a tokenizer, and model {name!r} is not a tokenizer model: "
                        "it was trained on packed token sequences (give it token shards of its vocabulary)")
    grid = TokenGrid.from_manifest(manifest, url)
    if grid is not None:
        raise UserError(f"{url}: a {manifest.kind!r} dataset of codes {grid.describe()}; {name} was trained on packed token sequences")
    field = manifest.fields.get(TOKENS_FIELD)
    if field is None or len(field.get("shape", [])) != 1 or not manifest.vocab_size:
        raise UserError(f"{url}: a {manifest.kind!r} dataset without packed token sequences ({TOKENS_FIELD} of shape [seq_len + 1])")
    vocab_size, is_exact = _trained_vocab_size(state)
    if manifest.vocab_size > vocab_size or (is_exact and manifest.vocab_size != vocab_size):
        raise UserError(f"{url}: vocabulary of {manifest.vocab_size} tokens; {name} was trained on a vocabulary of {vocab_size}")
    sequence_len = state["model"]["args"].get("sequence_len")
    if sequence_len is not None and manifest.seq_len > sequence_len:
        raise UserError(f"{url}: sequences of {manifest.seq_len} inputs; {name} reads at most sequence_len={sequence_len}")
    expected = manifest.tokenizer.get("sha256")
    if expected and tokenizer_dir is not None and (tokenizer_dir / "tokenizer.json").is_file():
        from trainer.tokenizer_runner import file_sha256

        if file_sha256(tokenizer_dir / "tokenizer.json") != expected:
            raise UserError(f"{url}: tokenized by another tokenizer (tokenizer.json sha256 {expected[:12]}) than the run's "
                            f"{tokenizer_dir} ({name}): the same ids mean other tokens")


def _grid_source(state: dict[str, Any], manifest: Manifest, url: str) -> GridSource:
    """The dataset's grid, checked against the one the model was trained on (state["token_grid"])."""
    name, trained = state["model"]["name"], state["token_grid"]
    trained_grid = TokenGrid.from_json(trained)
    if TokenGrid.from_manifest(manifest, url) is None and manifest.kind not in RAW_KINDS:
        raise UserError(f"{url}: a {manifest.kind!r} dataset of packed sequences; {name} was trained on codes "
                        f"{trained_grid.describe()} of vocabulary {trained_grid.vocab_size}")
    args = {**state["model"]["args"], **state["config"]["model"].get("args", {})}
    if manifest.kind in RAW_KINDS and learned_tokenizer(args) is None:
        args["tokenizer_path"] = trained["tokenizer"].get("checkpoint")  # the tokenizer that made the training codes
    source = GridSource(manifest, args, url)
    if source.grid != trained_grid:
        raise UserError(f"{url}: codes {source.grid.describe()} of vocabulary {source.grid.vocab_size}; {name} was trained "
                        f"on codes {trained_grid.describe()} of vocabulary {trained_grid.vocab_size}")
    made_by, trained_by = source.describe()["tokenizer"], trained.get("tokenizer") or {}
    if made_by.get("model") != trained_by.get("model") or (
            made_by.get("sha256") and trained_by.get("sha256") and made_by["sha256"] != trained_by["sha256"]):
        raise UserError(f"{url}: codes of tokenizer {made_by.get('model')} (sha256 {str(made_by.get('sha256'))[:12]}); {name} "
                        f"was trained on codes of {trained_by.get('model')} (sha256 {str(trained_by.get('sha256'))[:12]})")
    return source


def _samples(manifest: Manifest, url: str, split: str, storage_options: dict[str, Any] | None) -> Iterator[dict[str, Any]]:
    """The split's samples, shards in manifest order, each shard read when reached."""
    from sharding import storage
    from sharding.shards import read_shard

    for record in manifest.shards_of(split):
        yield from read_shard(storage.join(url, record.name), storage_options)


def _check_codes(codes: torch.Tensor, vocab_size: int, url: str) -> None:
    low, high = int(codes.min()), int(codes.max())
    if low < 0 or high >= vocab_size:
        raise UserError(f"{url}: code {high if high >= vocab_size else low} outside the model's vocabulary [0, {vocab_size})")


# ------------------------------------------------------------------ evaluate


@torch.inference_mode()
def evaluate_causal(checkpoint: str, dataset: str, *, split: str = "val", num_batches: int = 8, batch_size: int = 8,
                    device: torch.device | str = "cpu", storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Next-token metrics of the causal model at `checkpoint` on the first num_batches batches of `split`
    (shards in manifest order; a batch holds neighbouring samples of one shape, the last may be short),
    next to the unigram baseline of the same targets: a JSON-ready report."""
    from core.config import DataConfig
    from core.schema import from_dict
    from sharding.pretokenize_signals import same_shape_batches

    if num_batches < 1 or batch_size < 1:
        raise UserError(f"--num-batches and --batch-size must be >= 1, got {num_batches}, {batch_size}")
    directory = resolve_checkpoint(checkpoint)
    state = read_trainer_state(directory)
    name = state["model"]["name"]
    if get_model_spec(name).task != "causal_lm":
        raise UserError(f"{directory}: model {name!r} is not a causal sequence model (task {get_model_spec(name).task})")
    trained_data = from_dict(DataConfig, state["config"]["data"])
    if storage_options is None and dataset == trained_data.dataset:
        storage_options = trained_data.storage_options  # the run's endpoint for its own dataset (no credentials)
    manifest = Manifest.read(dataset, storage_options)
    if not manifest.shards_of(split):
        raise UserError(f"--split: {dataset} has no {split!r} shards (splits: {sorted({s.split for s in manifest.shards})})")

    source = None  # the data is checked before the weights are loaded
    if state.get("token_grid") is None:
        _check_packed(state, manifest, dataset, tokenizer_folder(directory, state))
        num_levels, field_name = 1, "tokens"
    else:
        source = _grid_source(state, manifest, dataset)
        num_levels, field_name = source.grid.num_levels, RAW_FIELDS.get(manifest.kind, "tokens")
    device = torch.device(device)
    model, state, _ = load_model(directory, device)
    model.float()  # fp32 scores whatever the training precision
    vocab_size = int(state["model"]["args"]["vocab_size"])
    task = None if source is None else GridTask(model, name, source, device)

    statistics = NextTokenStatistics(num_levels, vocab_size)
    num_samples = num_done = 0
    samples = _samples(manifest, dataset, split, storage_options)
    for batch in itertools.islice(same_shape_batches(samples, field_name, batch_size), num_batches):
        fields = collate(batch)
        if task is None:
            _check_codes(fields["tokens"], vocab_size, dataset)
            pair = causal_lm_batch(fields, device)
            levels = torch.zeros_like(pair["targets"])
        else:
            grid = task.grid_of(fields, device)  # (B, T, H, W, Q)
            _check_codes(grid, vocab_size, dataset)
            pair = task.pairs(grid)
            levels = task.pairs(torch.arange(num_levels, device=device).expand(grid.shape))["targets"]
        logits = model(pair["idx"])  # idx's shape + (V,); BrainOmniCausalForecast: (B, C, W, Qu, V)
        targets = pair["targets"]
        if logits.shape[:-1] != targets.shape:  # BrainOmniCausalForecast scores the first Qu of the Q levels
            num_predicted = logits.shape[-2]
            targets, levels = targets[..., :num_predicted], levels[..., :num_predicted]
        statistics.add(logits, targets, levels)
        num_samples += len(batch)
        num_done += 1

    scored = statistics.report()
    return {
        "checkpoint": str(directory), "model": name, "flavor": state["model"]["flavor"], "step": int(state["step"]),
        "task": "causal_lm", "dataset": dataset, "split": split,
        "is_training_dataset": manifest.fingerprint()[:16] == state["data"]["manifest_id"],
        "data": "packed" if task is None else "grid",
        "token_grid": None if task is None else task.grid.to_json(),
        "num_batches": num_done, "num_samples": num_samples, "vocab_size": vocab_size, "num_levels": num_levels,
        **scored,
    }


def format_causal_report(report: dict[str, Any]) -> str:
    """The causal eval report as a table: the model and the unigram baseline, overall and per level."""
    overall = report["metrics"]["model"]
    codes = "packed sequences" if report["token_grid"] is None else "codes " + TokenGrid.from_json(report["token_grid"]).describe()
    levels = f" x {report['num_levels']} levels" if report["num_levels"] > 1 else ""
    own = ", the run's own dataset" if report["is_training_dataset"] else ""
    lines = [f"eval {report['model']} ({report['flavor']}, step {report['step']}) on {report['dataset']} [{report['split']}{own}]: "
             f"{report['num_samples']} samples in {report['num_batches']} batches, {overall['num_targets']} next-token targets, "
             f"{codes}, vocabulary {report['vocab_size']}{levels}",
             f"  {'level':6s} {'':8s} {'targets':>9s} {'loss':>8s} {'perplexity':>11s} {'accuracy':>9s} {'top-5':>7s}"]
    rows = [("all", report["metrics"])] + [(str(entry["level"]), entry) for entry in report["levels"]]
    for level, entry in rows:
        for who in ("model", "unigram"):
            m = entry[who]
            lines.append(f"  {level if who == 'model' else '':6s} {who:8s} {m['num_targets']:9d} {m['loss']:8.4f} "
                         f"{m['perplexity']:11.2f} {m['accuracy']:9.4f} {m[f'top{TOP_K}_accuracy']:7.4f}")
    return "\n".join(lines)
