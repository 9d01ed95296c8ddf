"""tests/bench/gpu_check.py, the prepared GPU run, kept working: its --smoke mode runs the same code on the
CPU (debug flavors). Here its one-step part: each tokenizer and FlatGPT variant takes three training
steps on the single-device engine and the tokenizers encode the batch."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_smoke_steps_train_every_tokenizer_and_flatgpt(tmp_path):
    sys.path.insert(0, str(ROOT / "tests" / "bench"))
    try:
        from gpu_check import FLATGPTS, TOKENIZERS
    finally:
        sys.path.remove(str(ROOT / "tests" / "bench"))
    result = subprocess.run([sys.executable, str(ROOT / "tests" / "bench" / "gpu_check.py"), "--dataset", str(tmp_path / "unused"),
                             "--out", str(tmp_path / "out"), "--smoke", "--only", "steps"],
                            capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert results["device"] == "cpu"
    for name in (*TOKENIZERS, *FLATGPTS):
        row = results[f"step_{name}"]
        assert "error" not in row, (name, row)
        assert len(row["losses"]) == 3 and all(math.isfinite(loss) for loss in row["losses"]), (name, row)
        assert row["parameters"] > 0 and row["step_s"] > 0
        assert ("encode_s" in row) == (name in TOKENIZERS), (name, row)
