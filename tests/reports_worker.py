"""One rank of tests/test_reports.py's 2-rank check (run by torchrun): each rank feeds its own inputs
with known results to a real VectorQuantizer, MoE layer and tokenizer loss parts, sums two micro-batches
in a ReportWindow and reduces over the ranks; rank 0 writes the record as JSON to argv[1]."""

from __future__ import annotations

import json
import sys

import torch

from test_reports import build_cases, feed
from trainer import distributed
from trainer.reports import ReportWindow


def main() -> None:
    env = distributed.read_env()
    distributed.init_process_group(env, torch.device("cpu"), timeout_s=60)
    model = build_cases()
    window = ReportWindow(model)
    for micro_batch in range(2):
        feed(model, env.rank, micro_batch)
        window.add()
    record = window.reduce()
    if env.rank == 0:
        with open(sys.argv[1], "w") as handle:
            json.dump(record, handle)
    distributed.shutdown()


if __name__ == "__main__":
    main()
