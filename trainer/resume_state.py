"""Each rank's resume state in its own small files of a checkpoint, so that saving and resuming cost
every rank a constant amount however many ranks the run has.

A checkpoint folder holds, next to the engine's files and rank 0's small `trainer_state.json`:

    ranks/state-rank00042.json   {"rank", "world_size", "step", "data": Batches.state_dict(), "loss_window": [...]}
    ranks/rng-rank00042.json     {"rank", "world_size", "step", "rng": rng_state()}

The RNG states (~25 KB a rank) live apart from the loader positions (~1 KB) because a resume at
another world size reads the positions of several old ranks but the RNG of one. `trainer_state.json`
describes the parts (`rank_states`: folder, number of ranks, readers per rank, streams, and a sha256
over every rank's digest, gathered to rank 0 alone) and keeps what a resume at another world size
needs from all ranks as one value each, reduced at the save: the skip counts' totals and the step
losses' mean.

Resuming, a rank reads `trainer_state.json` and then:
- same world size and readers per rank: its own two files, nothing else;
- otherwise: the state files of the old ranks whose readers held its streams (`ranks_holding`: about
  streams-per-rank files at most, never all of them), merged and cut to its streams, and the RNG file
  of the old rank with its number when there is one.
Checkpoints of the earlier format (every rank's state inside `trainer_state.json`) still load.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.errors import UserError
from sharding.loader import merge_states, ranks_holding, select_streams

RANKS_DIR = "ranks"
FORMAT = 1  # of the parts; trainer_state.json without `rank_states` holds every rank's state itself (format 0)


def state_file(rank: int) -> str:
    return f"{RANKS_DIR}/state-rank{rank:05d}.json"


def rng_file(rank: int) -> str:
    return f"{RANKS_DIR}/rng-rank{rank:05d}.json"


@dataclass
class RankParts:
    """One rank's files of a checkpoint, serialized before the save so that their digest can go into the
    trainer state: {path relative to the checkpoint folder: bytes}."""

    files: dict[str, bytes]

    @property
    def sha256(self) -> str:
        digest = hashlib.sha256()
        for name in sorted(self.files):
            digest.update(hashlib.sha256(self.files[name]).digest())
        return digest.hexdigest()

    def write(self, directory: Path) -> None:
        """Into the checkpoint's (temporary) folder; called by every rank in the engine's write step."""
        (Path(directory) / RANKS_DIR).mkdir(exist_ok=True)
        for name, data in self.files.items():
            (Path(directory) / name).write_bytes(data)


def rank_parts(rank: int, world_size: int, step: int, data: dict[str, Any], loss_window: list[float], rng: dict[str, Any]) -> RankParts:
    header = {"rank": rank, "world_size": world_size, "step": step}
    return RankParts({
        state_file(rank): json.dumps({**header, "data": data, "loss_window": loss_window}).encode(),
        rng_file(rank): json.dumps({**header, "rng": rng}).encode(),
    })


def combined_digest(digests: list[str]) -> str:
    """sha256 over every rank's parts digest, in rank order."""
    return hashlib.sha256("".join(digests).encode()).hexdigest()


def parts_summary(digests: list[str], readers_per_rank: int, num_streams: int) -> dict[str, Any]:
    """`trainer_state.json`'s description of the per-rank parts (rank 0, from the gathered digests)."""
    return {"format": FORMAT, "folder": RANKS_DIR, "num_ranks": len(digests), "readers_per_rank": readers_per_rank,
            "num_streams": num_streams, "sha256": combined_digest(digests)}


@dataclass
class RankResume:
    """What one rank resumes from: `data` for Batches.load_state_dict, its RNG state (None: the old run had
    no rank with this number), its step losses since the last metrics record, and the files it read."""

    data: dict[str, Any]
    rng: dict[str, Any] | None
    loss_window: list[float]
    paths: list[Path] = field(default_factory=list)

    @property
    def num_bytes(self) -> int:
        return sum(path.stat().st_size for path in self.paths)


def _read_part(directory: Path, name: str, step: int, paths: list[Path]) -> dict[str, Any]:
    path = Path(directory) / name
    paths.append(path)
    try:
        part = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise UserError(f"checkpoint {directory} is damaged: its per-rank resume state {name} is missing") from None
    except (OSError, ValueError) as error:
        raise UserError(f"checkpoint {directory}: per-rank resume state {name} is unreadable or corrupt: {error}") from None
    if part.get("step") != step:
        raise UserError(f"checkpoint {directory}: {name} belongs to step {part.get('step')}, not to this checkpoint's step {step}")
    return part


def saved_num_streams(state: dict[str, Any]) -> int | None:
    """The data.num_streams a checkpoint's loader positions were written with (None: it holds none)."""
    summary = state.get("rank_states")
    if isinstance(summary, dict):
        return summary["num_streams"]
    legacy = (state.get("data") or {}).get("rank_states")
    return legacy[0]["loader"]["num_streams"] if legacy else None


def read_rank_resume(directory: Path, state: dict[str, Any], rank: int, world_size: int, readers_per_rank: int,
                     streams: list[int]) -> RankResume:
    """Rank `rank` of `world_size` (`readers_per_rank` data readers owning `streams`) resuming from checkpoint
    `directory` whose trainer state is `state`: reads only the parts it needs (see the module docstring)."""
    summary = state.get("rank_states")
    if isinstance((state.get("data") or {}).get("rank_states"), list):
        return _legacy_resume(state, rank, world_size, streams)
    if not isinstance(summary, dict) or summary.get("format") != FORMAT:
        found = summary.get("format") if isinstance(summary, dict) else "none"
        raise UserError(f"checkpoint {directory}: per-rank resume state of format {found}, this tokfleet reads format "
                        f"{FORMAT} (ranks/*.json) or the single trainer_state.json of format 0")
    step, old_world, old_readers = state["step"], summary["num_ranks"], summary["readers_per_rank"]
    paths: list[Path] = []
    parts: dict[int, dict[str, Any]] = {}

    def part(old_rank: int) -> dict[str, Any]:
        if old_rank not in parts:
            parts[old_rank] = _read_part(directory, state_file(old_rank), step, paths)
        return parts[old_rank]

    if old_world == world_size and old_readers == readers_per_rank:
        data = part(rank)["data"]
    else:
        merged = merge_states(part(old)["data"]["loader"] for old in ranks_holding(streams, old_world, old_readers))
        loader = select_streams(merged, streams)
        if rank == 0:  # carries every old rank's skip counts, so that the sum over ranks stays right
            loader["skipped"] = state["data"].get("skipped", {"shards": 0, "samples": 0})
        data = {"epoch": loader["epoch"], "loader": loader}
    # the same ranks: each its own losses; other ranks: every rank the saved mean over ranks of each step,
    # so that the all-reduced mean of the next metrics record is the same
    window = part(rank)["loss_window"] if old_world == world_size else state.get("loss_window") or []
    rng = _read_part(directory, rng_file(rank), step, paths)["rng"] if rank < old_world else None
    return RankResume(data, rng, window, paths)


def _legacy_resume(state: dict[str, Any], rank: int, world_size: int, streams: list[int]) -> RankResume:
    """Format 0: every rank's loader state, RNG and losses inside trainer_state.json."""
    rank_states = state["data"]["rank_states"]
    merged = merge_states(s["loader"] for s in rank_states)
    loader = select_streams(merged, streams)
    if rank == 0 and "skipped" in merged:
        loader["skipped"] = merged["skipped"]
    windows = state.get("loss_window") or [[]]
    window = windows[rank] if len(windows) == world_size else [sum(losses) / len(losses) for losses in zip(*windows)]
    rng = state["rng"][rank] if rank < len(state["rng"]) else None
    return RankResume({"epoch": loader["epoch"], "loader": loader}, rng, window)


def all_loader_states(directory: Path, state: dict[str, Any]) -> list[dict[str, Any]]:
    """Every saved rank's loader state, in rank order (`tokfleet inspect`: reads all parts, one process)."""
    legacy = (state.get("data") or {}).get("rank_states")
    if isinstance(legacy, list):
        return [s["loader"] for s in legacy]
    return [_read_part(directory, state_file(rank), state["step"], [])["data"]["loader"]
            for rank in range(state["rank_states"]["num_ranks"])]


def parts_problems(directory: Path, state: dict[str, Any]) -> list[str]:
    """What is wrong with a checkpoint's per-rank parts ([] when nothing): every one there and the digest
    over them the one the trainer state records (`tokfleet inspect`; a resume reads only its own)."""
    summary = state.get("rank_states")
    if not isinstance(summary, dict):
        return []
    digests = []
    for rank in range(summary["num_ranks"]):
        files = {}
        for name in (state_file(rank), rng_file(rank)):
            try:
                files[name] = (Path(directory) / name).read_bytes()
            except OSError:
                return [f"{name} is missing or unreadable"]
        digests.append(RankParts(files).sha256)
    if combined_digest(digests) != summary["sha256"]:
        return [f"the per-rank parts in {RANKS_DIR}/ do not match the digest trainer_state.json records (changed after the save)"]
    return []
