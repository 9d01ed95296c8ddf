"""MFU against the right peak: the datasheet table for known GPUs, a measured peak elsewhere that
a quieter machine can never push above 1, and the peak named in every metrics record."""

from __future__ import annotations

import time

import pytest
import torch

from conftest import write_token_dataset
from trainer import metrics
from trainer.metrics import PeakFlops, datasheet_peak, matmul_precision, measure_peak_flops, read_metrics


@pytest.mark.parametrize("device_name, precision, expected", [
    ("NVIDIA H100 80GB HBM3", "bf16", (989.4e12, "H100-SXM")),
    ("NVIDIA H100 PCIe", "fp16", (756.5e12, "H100-PCIe")),
    ("NVIDIA H100 NVL", "tf32", (417.5e12, "H100-NVL")),
    ("NVIDIA H200", "bf16", (989.4e12, "H200-SXM")),
    ("NVIDIA H200 NVL", "bf16", (835.5e12, "H200-NVL")),
    ("NVIDIA A100-SXM4-80GB", "tf32", (156e12, "A100")),
    ("NVIDIA A100 80GB PCIe", "fp32", (19.5e12, "A100")),
    ("NVIDIA L40S", "fp16", (362.05e12, "L40S")),
    ("NVIDIA L4", "bf16", (121e12, "L4")),
    ("NVIDIA A10", "bf16", (125e12, "A10")),
    ("NVIDIA L40", "bf16", None),  # not in the table (and not an L4): measured
    ("NVIDIA A10G", "bf16", None),
    ("Tesla V100-SXM2-16GB", "bf16", None),  # no bf16 on a V100: measured
    ("NVIDIA GeForce RTX 4090", "bf16", None),
])
def test_datasheet_peak_from_device_name_and_precision(device_name, precision, expected):
    assert datasheet_peak(device_name, precision) == expected


def test_measured_peak_in_the_training_precision_on_cpu():
    cpu = torch.device("cpu")
    assert matmul_precision("fp32", cpu) == "fp32" and matmul_precision("bf16", cpu) == "bf16"
    assert PeakFlops(cpu, "fp32", configured=1e11).source == "config"
    start = time.perf_counter()
    bf16 = measure_peak_flops(cpu, "bf16", seconds=0.1)  # small matrices: bf16 is ~100x slower than fp32 here
    assert bf16 > 0 and time.perf_counter() - start < 5


def test_a_measured_peak_is_measured_again_and_never_below_an_achieved_rate(monkeypatch):
    peak = PeakFlops(torch.device("cpu"), "fp32")
    assert peak.is_measured and peak.source == "measured:cpu fp32" and peak.value > 0
    peak.value = 1.0  # as if measured on a machine busy at the start
    assert peak.mfu(5e9) == 1.0 and peak.value == 5e9  # an achieved rate raises it at once
    monkeypatch.setattr(metrics, "REMEASURE_INTERVAL_S", 0.0)
    peak.observe(1.0)  # due: measured again, the best of all kept
    assert peak.value > 5e9 and peak.mfu(5e9) < 1


def test_mfu_never_exceeds_one_when_the_start_measured_a_low_peak(tmp_path, monkeypatch):
    """A CPU run whose start-up peak is made 1000x too low (as on a machine busy at the start and quiet
    later): every logged mfu stays <= 1, and the records name the peak and where it came from."""
    from core.config import (CheckpointConfig, DataConfig, EngineConfig, EvalConfig, LoggingConfig, ModelConfig,
                             OptimConfig, RunConfig, TrainConfig)
    from trainer.loop import Trainer

    real_measure, calls = measure_peak_flops, []

    def low(device, precision="fp32", seconds=0.5):
        calls.append(precision)
        return real_measure(device, precision, 0.05) / 1000

    monkeypatch.setattr(metrics, "measure_peak_flops", low)
    dataset = write_token_dataset(tmp_path / "data", num_shards=2, samples_per_shard=16, seq_len=32)
    cfg = TrainConfig(
        data=DataConfig(dataset=dataset, num_streams=2),
        run=RunConfig(name="mfu", output_dir=str(tmp_path / "run"), max_steps=4, seed=0, device="cpu"),
        model=ModelConfig(name="gpt", flavor="debug"), optim=OptimConfig(warmup_steps=1, micro_batch_size=2),
        engine=EngineConfig(), checkpoint=CheckpointConfig(every_steps=0, save_final=False),
        logging=LoggingConfig(every_steps=1, progress=False, wandb=False), eval=EvalConfig(every_steps=0),
    )
    summary = Trainer(cfg).train()
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert len(records) == 4 and calls == ["fp32"]
    assert all(0 < r["mfu"] <= 1 and r["peak_source"] == "measured:cpu fp32" for r in records)
    assert records[0]["mfu"] == 1.0  # the too-low peak was raised to the first achieved rate
    peaks = [r["peak_flops"] for r in records]
    assert peaks == sorted(peaks) and summary["peak_flops"] == peaks[-1] and summary["peak_source"] == "measured:cpu fp32"
