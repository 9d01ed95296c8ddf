"""`tokfleet prepare` for tables of time series (source.kind timeseries) on Ray, the series_forecast task's
batches and model sizes, and bad inputs.

The series are real ones that statsmodels ships: yearly sunspot numbers 1700-2008 (written as a CSV
with its rows shuffled, so the time column has to sort them), the Mauna Loa weekly CO2 record
1958-2001 (Parquet, 59 empty weeks) and the US quarterly macro data 1959-2009 (several columns).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import statsmodels.datasets as sm_datasets
import torch
import yaml

from conftest import cli_error
from core.config import PrepareConfig, ShardsConfig, SourceConfig, TimeseriesConfig, TrainConfig, load_config, save_config
from core.errors import UserError
from sharding.manifest import Manifest
from sharding.shard_build import verify_dataset
from sharding.shards import read_shard, source_sample_key
from sharding.timeseries import prepare_timeseries
from trainer.data import TASK_BATCHES, collate, num_tokens
from trainer.series_forecast import series_model_args, window_sizes

REPO = Path(__file__).resolve().parents[1]
PREPARE_YAML = REPO / "configs" / "timeseries" / "prepare_sunspots.yaml"
TRAIN_YAML = REPO / "configs" / "timeseries" / "train_transformer_sunspots.yaml"


def sunspots() -> pd.DataFrame:
    return sm_datasets.sunspots.load_pandas().data  # YEAR 1700.0 ... 2008.0, SUNACTIVITY


def co2() -> pd.DataFrame:
    return sm_datasets.co2.load_pandas().data.rename_axis("date").reset_index()  # weekly, 2284 rows, 59 NaN


def macrodata() -> pd.DataFrame:
    return sm_datasets.macrodata.load_pandas().data  # 203 quarters, 14 columns


def read_split(manifest: Manifest, output: str, split: str) -> list[dict]:
    return [sample for shard in manifest.shards_of(split) for sample in read_shard(os.path.join(output, shard.name))]


@pytest.fixture(scope="module")
def tables(tmp_path_factory):
    root = tmp_path_factory.mktemp("tables")
    sunspots().sample(frac=1.0, random_state=0).to_csv(root / "sunspots.csv", index=False)  # shuffled rows
    record = co2()
    for index, era in enumerate(np.array_split(np.arange(len(record)), 3)):  # three consecutive eras
        record.iloc[era].to_parquet(root / f"co2-{index}.parquet")
    macrodata().to_csv(root / "macro.csv", index=False)
    return root


@pytest.fixture(scope="module")
def sunspot_dataset(ray_session, tables, tmp_path_factory):  # ray_session: the test session's Ray (conftest.py)
    """(config, report) of configs/timeseries/prepare_sunspots.yaml: 309 years, the last 62 held out, 48 windows a shard."""
    output = tmp_path_factory.mktemp("sunspots")
    cfg = load_config(PREPARE_YAML, PrepareConfig, [f"source.paths=['{tables / 'sunspots.csv'}']", f"shards.output={output}"])
    return cfg, prepare_timeseries(cfg, progress=False)


def test_sunspot_windows_are_the_sorted_normalised_series(sunspot_dataset, tables):
    cfg, report = sunspot_dataset
    manifest, output = report.manifest, cfg.shards.output
    series = sunspots()  # in time order: what the shuffled CSV must be sorted back into
    years, values = series["YEAR"].to_numpy(), series["SUNACTIVITY"].to_numpy()
    num_train_rows = 309 - round(309 * 0.2)  # 247: 1700-1946
    center, scale = values[:num_train_rows].mean(), values[:num_train_rows].std()
    assert manifest.kind == "timeseries_windows" and manifest.seq_len == 60
    assert manifest.stats["normalization"] == {"method": "zscore", "fitted_on": "train rows",
                                               "columns": {"SUNACTIVITY": {"center": pytest.approx(center, rel=1e-12),
                                                                           "scale": pytest.approx(scale, rel=1e-12)}}}
    assert manifest.stats["num_rows"] == {"train": 247, "val": 62} and manifest.stats["num_filled"] == {"SUNACTIVITY": 0}
    assert manifest.fields["context.npy"] == {"dtype": "float32", "shape": [48, 1], "columns": ["SUNACTIVITY"]}
    assert manifest.fields["target.npy"] == {"dtype": "float32", "shape": [12, 1], "columns": ["SUNACTIVITY"]}
    assert window_sizes(manifest) == {"context_length": 48, "input_size": 1, "pred_length": 12, "output_size": 1}
    # train windows lie in the first 247 rows (188 of them); a val window's 12 targets lie in the last 62 rows
    assert [(s.split, s.num_samples) for s in manifest.shards] == [("train", 48)] * 3 + [("train", 44), ("val", 48), ("val", 3)]
    normalised = ((values - center) / scale).astype(np.float32)
    source = str(tables / "sunspots.csv")
    for split, starts, first in (("train", range(0, 188), 0), ("val", range(199, 250), 188)):
        samples = read_split(manifest, output, split)
        assert [s["meta"]["start_row"] for s in samples] == list(starts)
        assert [s["__key__"] for s in samples] == [source_sample_key(source, first + i) for i in range(len(starts))]
        for sample in samples:
            start = sample["meta"]["start_row"]
            np.testing.assert_array_equal(sample["context"][:, 0], normalised[start:start + 48])
            np.testing.assert_array_equal(sample["target"][:, 0], normalised[start + 48:start + 60])
            assert sample["last_value"][0] == normalised[start + 47] and sample["meta"]["start_time"] == years[start]
    assert years[199 + 48] == 1947.0 and years[187 + 59] == 1946.0  # the first val target, the last train target
    assert verify_dataset(output) == []
    assert report.summary().startswith(f"dataset {output}: 1 files -> 188 train + 51 val windows of 60 steps in 6 shards")


def test_rerun_builds_nothing(sunspot_dataset):
    cfg, report = sunspot_dataset
    again = prepare_timeseries(cfg, progress=False)
    assert again.num_built_shards == 0 and again.manifest.to_json() == report.manifest.to_json()


def test_co2_parquet_split_by_file_interpolated_and_robust(ray_session, tables, tmp_path):
    """Three eras of the CO2 record, the middle one held out; its 59 empty weeks filled linearly."""
    cfg = PrepareConfig(
        source=SourceConfig(kind="timeseries", paths=[str(tables / "co2-*.parquet")]),
        timeseries=TimeseriesConfig(input_columns=["co2"], time_column="date", context_length=52, pred_length=13, stride=4,
                                    split="file", normalization="robust", missing="interpolate"),
        shards=ShardsConfig(output=str(tmp_path / "co2"), name="co2", val_fraction=0.34, source_bytes_per_shard=1),
    )
    manifest = prepare_timeseries(cfg, progress=False).manifest
    record = co2()
    eras = [record.iloc[era].reset_index(drop=True) for era in np.array_split(np.arange(len(record)), 3)]
    filled = [era["co2"].interpolate(limit_direction="both").to_numpy() for era in eras]  # pandas as the reference
    train = np.concatenate([filled[0], filled[2]])
    q25, median, q75 = np.percentile(train, [25, 50, 75])
    stats = manifest.stats["normalization"]["columns"]["co2"]
    assert stats == {"center": pytest.approx(median, rel=1e-12), "scale": pytest.approx((q75 - q25) / 1.349, rel=1e-12)}
    assert manifest.stats["num_filled"] == {"co2": 59} == {"co2": int(record["co2"].isna().sum())}
    sources = [str(tables / f"co2-{i}.parquet") for i in range(3)]
    assert [(s.split, s.sources) for s in manifest.shards] == [("train", [sources[0]]), ("val", [sources[1]]), ("train", [sources[2]])]
    per_file = (len(eras[1]) - 65) // 4 + 1  # every window of the held-out file, its context inside it
    assert manifest.num_samples("val") == per_file and manifest.stats["num_rows"]["val"] == len(eras[1])
    for split in ("train", "val"):
        for sample in read_split(manifest, cfg.shards.output, split):
            era = sources.index(sample["meta"]["source"])
            start = sample["meta"]["start_row"]
            window = (filled[era][start:start + 65] - stats["center"]) / stats["scale"]
            np.testing.assert_allclose(np.concatenate([sample["context"][:, 0], sample["target"][:, 0]]), window, rtol=1e-6)
            assert sample["meta"]["start_time"] == eras[era]["date"][start].isoformat()


def test_columns_batches_and_model_sizes(ray_session, tables, tmp_path):
    """Three macro series in, the CPI out (not an input): what the series_forecast task feeds a model."""
    cfg = PrepareConfig(
        source=SourceConfig(kind="timeseries", paths=[str(tables / "macro.csv")]),
        timeseries=TimeseriesConfig(input_columns=["realgdp", "realcons", "realinv"], target_columns=["cpi"],
                                    context_length=16, pred_length=4, stride=2),
        shards=ShardsConfig(output=str(tmp_path / "macro"), name="macro", val_fraction=0.2),
    )
    manifest = prepare_timeseries(cfg, progress=False).manifest
    data = macrodata()
    stats = manifest.stats["normalization"]["columns"]
    assert sorted(stats) == ["cpi", "realcons", "realgdp", "realinv"]
    samples = read_split(manifest, cfg.shards.output, "train")
    assert len(samples) == (203 - 41 - 20) // 2 + 1  # 41 = round(203 * 0.2) held out
    sample = samples[5]
    start = sample["meta"]["start_row"]
    assert start == 10 and "start_time" not in sample["meta"]  # no time column: the file's row order
    cpi = (data["cpi"].to_numpy() - stats["cpi"]["center"]) / stats["cpi"]["scale"]
    np.testing.assert_allclose(sample["target"][:, 0], cpi[start + 16:start + 20], rtol=1e-6)
    np.testing.assert_allclose(sample["last_value"], cpi[start + 15:start + 16], rtol=1e-6)
    realinv = (data["realinv"].to_numpy() - stats["realinv"]["center"]) / stats["realinv"]["scale"]
    np.testing.assert_allclose(sample["context"][:, 2], realinv[start:start + 16], rtol=1e-6)

    fields = collate(samples[:8])
    batch = TASK_BATCHES["series_forecast"](fields, torch.device("cpu"))
    assert sorted(batch) == ["context", "target"]
    assert batch["context"].shape == (8, 16, 3) and batch["target"].shape == (8, 4, 1) and batch["context"].dtype == torch.float32
    assert num_tokens(fields) == 8 * 16  # context steps: TransformerForecaster.num_flops_per_token's unit

    fields_of_model = {"input_size", "output_size", "context_length", "pred_length", "d_model"}
    args = series_model_args("TransformerForecaster", "series_forecast", fields_of_model, {"d_model": 32}, manifest, "macro")
    assert args == {"d_model": 32, "context_length": 16, "input_size": 3, "pred_length": 4, "output_size": 1}
    with pytest.raises(UserError, match=r"^model.args.input_size=4 does not match the windows of data.dataset macro \(input_size 3"):
        series_model_args("TransformerForecaster", "series_forecast", fields_of_model, {"input_size": 4}, manifest, "macro")
    with pytest.raises(UserError, match="holds time-series windows: train a series_forecast model on it"):
        series_model_args("gpt", "causal_lm", {"vocab_size"}, {}, manifest, "macro")
    manifest.kind = "text_tokens"
    with pytest.raises(UserError, match="forecasts time-series windows .* holds text_tokens; prepare one with source.kind timeseries"):
        series_model_args("TransformerForecaster", "series_forecast", fields_of_model, {}, manifest, "text")


# ------------------------------------------------------------------ bad inputs


def bad_macro(path):
    data = macrodata()
    data["cpi"] = data["cpi"].astype(object)
    data.loc[16, "cpi"] = "1.2.3"
    data.to_csv(path, index=False)


def repeated_year(path):
    data = sunspots()
    pd.concat([data, data.iloc[[100]]]).to_csv(path, index=False)


BAD_INPUTS = {  # name -> (file name, writer or None (the real file), timeseries options, the line's ending)
    "missing column": ("sunspots.csv", None, {"input_columns": ["SUNACTIVITY", "sunspots"], "time_column": "YEAR"},
                       "sunspots.csv: no column 'sunspots' (the file has 'YEAR', 'SUNACTIVITY')"),
    "non-numeric column": ("macro.csv", bad_macro, {"input_columns": ["realgdp", "cpi"]},
                           "macro.csv: column 'cpi' is not numeric: data row 17 holds '1.2.3'"),
    "file not found": ("nowhere/sunspots.csv", None, {"input_columns": ["SUNACTIVITY"]}, "/nowhere/sunspots.csv']"),
    "window longer than the series": ("sunspots.csv", None, {"input_columns": ["SUNACTIVITY"], "context_length": 300},
                                      "has 309 rows, 62 of them held out for val; a window is timeseries.context_length "
                                      "+ pred_length = 324 rows"),
    "empty cell": ("co2-0.parquet", None, {"input_columns": ["co2"], "time_column": "date"},
                   "co2-0.parquet: column 'co2' is empty at row 7 in time order (53 empty cells): fill them, or set "
                   "timeseries.missing: interpolate"),
    "repeated time": ("years.csv", repeated_year, {"input_columns": ["SUNACTIVITY"], "time_column": "YEAR"},
                      "years.csv: time column 'YEAR' holds 1800.0 more than once: one row per time step (one series per file)"),
    "not a table": ("notes.txt", lambda path: path.write_text("1 2 3\n"), {"input_columns": ["x"]},
                    "notes.txt: not a table: source.kind timeseries reads .csv, .tsv and .parquet files; leave others "
                    "out with source.exclude"),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_exits_2_with_one_line_and_writes_nothing(tables, tmp_path, capsys, name):
    file_name, writer, options, ending = BAD_INPUTS[name]
    path = (tmp_path if writer else tables) / file_name
    if writer:
        writer(path)
    output = tmp_path / "dataset"
    config = {"source": {"kind": "timeseries", "paths": [str(path)]},
              "timeseries": {"pred_length": 24, **options},
              "shards": {"output": str(output), "val_fraction": 0.2}}
    (tmp_path / "prepare.yaml").write_text(yaml.safe_dump(config))
    line = cli_error(capsys, ["prepare", str(tmp_path / "prepare.yaml")])
    assert line.endswith(ending), line
    assert not output.exists()  # every input is checked before anything is written


# ------------------------------------------------------------------ TransformerForecaster on the sunspots


@pytest.fixture(scope="module")
def sunspot_run(sunspot_dataset, tmp_path_factory):
    """configs/timeseries/train_transformer_sunspots.yaml, the debug flavor 30 steps: (run root, summary)."""
    from trainer.loop import Trainer

    cfg, _ = sunspot_dataset
    root = tmp_path_factory.mktemp("sunspot-run")
    overrides = {"run.output_dir": root / "run", "run.max_steps": 30, "run.seed": 3, "run.device": "cpu", "model.flavor": "debug",
                 "data.dataset": cfg.shards.output, "optim.lr": 3e-3, "optim.warmup_steps": 5, "optim.micro_batch_size": 16,
                 "engine.peak_flops": 1e11, "checkpoint.every_steps": 0, "checkpoint.keep_best": None,
                 "logging.every_steps": 1, "logging.progress": False, "eval.every_steps": 30}
    config = load_config(TRAIN_YAML, TrainConfig, [f"{k}={'null' if v is None else v}" for k, v in overrides.items()])
    save_config(config, root / "train.yaml")
    summary = Trainer(config).train()
    return root, summary


def test_transformer_learns_the_sunspots_and_beats_the_last_value(sunspot_run, capsys):
    from trainer.checkpoint import read_trainer_state
    from trainer.metrics import read_metrics

    root, summary = sunspot_run
    run = root / "run"
    records = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 31))
    assert records[-1]["loss"] < 0.5 * records[0]["loss"]  # 0.90 -> 0.34 here
    assert records[-1]["mfu"] > 0 and records[-1]["tokens"] == 30 * 16 * 48  # context steps
    assert records[-1]["attention_kernel"] == "standard"  # the debug flavor's att_type, as the model ran it
    args = read_trainer_state(summary["checkpoint"])["model"]["args"]
    assert (args["input_size"], args["output_size"], args["context_length"], args["pred_length"]) == (1, 1, 48, 12)

    capsys.readouterr()
    from launch.cli import main

    main(["forecast", str(run), "--num-windows", "64", "--out", str(root / "forecast")])
    out = capsys.readouterr().out
    assert "forecast TransformerForecaster, 51 windows of" in out and "persistence" in out
    report = json.loads((root / "forecast" / "forecast.json").read_text())
    model, naive = (report["metrics"][name]["normalized"]["mse"] for name in ("model", "persistence"))
    assert report["finite"] and report["num_windows"] == 51 and report["horizon"] == {"steps": 12}
    assert model < 0.9 * naive  # 3.5 vs 4.5: the last value is a poor guess 12 years ahead of an 11-year cycle
    assert report["baselines_vs_model"]["persistence"]["mse_ratio_to_model"] == pytest.approx(naive / model)
    # the table's units: the sunspot number, so MSE scales by the normalisation's scale squared
    scale = Manifest.read(str(report["data"]).split(" [")[0]).stats["normalization"]["columns"]["SUNACTIVITY"]["scale"]
    assert report["metrics"]["model"]["physical"]["SUNACTIVITY"]["mse"] == pytest.approx(model * scale ** 2, rel=1e-9)
    for path in report["outputs"]:
        assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_window_size_mismatches_exit_2(sunspot_run, capsys):
    root, _ = sunspot_run
    line = cli_error(capsys, ["train", str(root / "train.yaml"), "--set", "model.args.context_length=32",
                              "--set", f"run.output_dir={root / 'other'}"])
    assert "model.args.context_length=32 does not match the windows of data.dataset" in line
    assert line.endswith("(context_length 48, context.npy shape [48, 1]): leave it out, it comes from the data")
    line = cli_error(capsys, ["forecast", str(root / "run"), "--horizon", "13", "--out", str(root / "x")])
    assert line.endswith("hold the true values of 12 steps after the context")


def test_forecast_refuses_windows_normalised_otherwise(sunspot_run, sunspot_dataset, capsys):
    """The same years, windows and sizes, but robust statistics: the model's inputs would be off scale."""
    root, _ = sunspot_run
    cfg, _ = sunspot_dataset
    robust = load_config(PREPARE_YAML, PrepareConfig, [f"source.paths={cfg.source.paths}", f"shards.output={root / 'robust'}",
                                                       "timeseries.normalization=robust"])
    prepare_timeseries(robust, progress=False)
    line = cli_error(capsys, ["forecast", str(root / "run"), "--data", str(root / "robust"), "--out", str(root / "x")])
    assert line.endswith(f"--data {root / 'robust'}: normalised with other statistics (robust) than the windows the model "
                         f"trained on (zscore, {cfg.shards.output})")
    assert not (root / "x").exists()


def test_zero2_two_ranks_resume_with_the_same_losses(sunspot_dataset, tmp_path):
    """2 ranks under the deepspeed launcher, ZeRO-2: 4 steps straight == 2 steps, stop, resume, 2 steps."""
    from test_distributed import Runs, losses

    cfg, _ = sunspot_dataset
    runs = Runs(tmp_path, cfg.shards.output, "zero2")
    sections = dict(model={"name": "TransformerForecaster", "flavor": "debug"}, run={"max_steps": 4},
                    checkpoint={"every_steps": 2}, data={"val_split": "train"}, eval={"every_steps": 0, "num_batches": 1})
    runs.run(2, runs.config("two", 2, **sections))
    runs.from_checkpoint("two", 2, "resumed")
    runs.run(2, runs.config("resumed", 2, **sections), "--resume", "auto")
    straight, resumed = losses(tmp_path / "two"), losses(tmp_path / "resumed")
    assert sorted(straight) == [1, 2, 3, 4] and resumed == straight  # bit for bit
    state = json.loads((tmp_path / "two" / "checkpoints" / "step-00000004" / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and state["engine_info"]["zero_stage"] == 2


def test_a_series_shorter_than_a_window_is_skipped_or_with_strict_an_error(ray_session, tables, tmp_path, capsys):
    sunspots().iloc[:50].to_csv(tmp_path / "short.tsv", sep="\t", index=False)  # 1700-1749: 50 rows < 60
    (tmp_path / "sunspots.csv").write_bytes((tables / "sunspots.csv").read_bytes())
    overrides = [f"source.paths=['{tmp_path}/*.csv', '{tmp_path}/*.tsv']", f"shards.output={tmp_path / 'out'}"]
    report = prepare_timeseries(load_config(PREPARE_YAML, PrepareConfig, overrides), progress=False)
    reason = "shorter than one window: 50 rows (40 train), context_length + pred_length = 60 needed"
    assert [(s.path, s.reason) for s in report.manifest.skipped] == [(str(tmp_path / "short.tsv"), reason)]
    assert report.manifest.num_samples("train") == 188 and report.manifest.stats["num_rows"] == {"train": 247, "val": 62}
    (tmp_path / "prepare.yaml").write_text(yaml.safe_dump(
        {**yaml.safe_load(PREPARE_YAML.read_text()), "source": {"kind": "timeseries", "paths": [str(tmp_path / "*.tsv"),
                                                                                              str(tmp_path / "*.csv")]},
         "shards": {"output": str(tmp_path / "strict"), "val_fraction": 0.2}}))
    line = cli_error(capsys, ["prepare", str(tmp_path / "prepare.yaml"), "--strict"])
    assert line.endswith(f"--strict: {tmp_path / 'short.tsv'}: {reason}") and not (tmp_path / "strict").exists()
