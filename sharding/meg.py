"""MEG/EEG recordings -> normalised fixed-length windows with sensor metadata (`source.kind: meg`).

One recording (any file `mne.io.read_raw` opens: FIF, EDF, BDF, BrainVision, EEGLAB, ...) is
read whole, then

    pick channel types (minus bad channels) -> notch -> band-pass -> resample to meg.sfreq
    -> drop flat / non-finite channels -> per-channel center and scale over the recording
    -> windows of window_s at a stride of window_s - overlap_s (a short tail is dropped)

Each window is one sample, keyed `{stem}-{hash8}-{window:06d}` (source file + window index):

    signal.npy       float32 (C, T)  (x - norm_center) / norm_scale, x the filtered signal in SI units
    norm_center.npy  float32 (C,)    per-channel center of this recording (T, T/m or V)
    norm_scale.npy   float32 (C,)    per-channel scale: x = signal * norm_scale + norm_center
    pos.npy          float32 (C, 6)  sensor position (m) and unit direction: the coil normal of a
                                     magnetometer (or axial gradiometer), the gradient direction of a
                                     planar gradiometer (the two of a triplet differ), 0 for EEG; in head
                                     coordinates when the recording has a device->head transform
    sensor_type.npy  int64   (C,)    index into SENSOR_TYPES (0 mag, 1 grad, 2 eeg, ...)
    meta.json        {"source", "window", "start_s", "sfreq", "ch_names"}
    label.npy        int64   ()      with a `labels` config only: the window's class index (sharding.labels);
                                     a window without a label is left out

C varies between recordings (channel sets, bad channels); T = window_s * sfreq is fixed.
"""

from __future__ import annotations

import os
from typing import Any, Iterator

import numpy as np

from core.config import MegConfig
from sharding.shard_build import SkipInput, first_line
from sharding.shards import source_sample_key

MANIFEST_KIND = "meg_windows"
SAMPLE_UNIT = "windows"
OPTIONS = MegConfig
# the value of sensor_type.npy is the index here; append only, so stored datasets keep their meaning
SENSOR_TYPES = ("mag", "grad", "eeg", "seeg", "ecog", "dbs", "eog", "ecg", "emg", "misc")
ROBUST_SCALE = 1.349  # IQR / 1.349 is the standard deviation of a normal distribution


def check_options(cfg: MegConfig) -> None:
    unknown = [name for name in cfg.channel_types if name not in SENSOR_TYPES]
    if unknown:
        raise ValueError(f"meg.channel_types: unknown {unknown}; choose from {list(SENSOR_TYPES)}")


def sequence_length(cfg: MegConfig) -> int:
    """Samples per window (the manifest's seq_len)."""
    return round(cfg.window_s * cfg.sfreq)


def window_stride(cfg: MegConfig) -> int:
    return sequence_length(cfg) - round(cfg.overlap_s * cfg.sfreq)


def num_windows(num_times: int, window: int, stride: int) -> int:
    return 0 if num_times < window else (num_times - window) // stride + 1


def field_notes(cfg: MegConfig) -> dict[str, dict[str, Any]]:
    """What the manifest says about fields beyond dtype and shape."""
    return {
        "signal.npy": {"sfreq": cfg.sfreq, "normalization": cfg.normalization},
        "pos.npy": {"columns": ["x", "y", "z", "dx", "dy", "dz"], "unit": "m"},
        "sensor_type.npy": {"values": {name: index for index, name in enumerate(SENSOR_TYPES)}},
    }


# ------------------------------------------------------------------ reading


def check_edf_size(path: str) -> None:
    """SkipInput when the EDF/BDF file at `path` is shorter than its header promises.

    mne reads such a file up to its end with only a warning (a recording that was not stopped
    cleanly); a dataset should not take a cut-off recording silently. Header layout: EDF spec,
    bytes 184-192 header size, 236-244 number of data records, 252-256 number of signals ns,
    then per-signal fields, each an array of ns entries: samples per record (8 bytes each) start
    at 256 + ns * 216; 2 bytes per sample (EDF) or 3 (BDF).
    """
    with open(path, "rb") as handle:
        header = handle.read(256)
        try:
            header_bytes, num_records, num_signals = int(header[184:192]), int(header[236:244]), int(header[252:256])
        except ValueError:
            return  # unparsable header: mne reports it
        handle.seek(256 + num_signals * 216)
        try:
            samples_per_record = [int(handle.read(8)) for _ in range(num_signals)]
        except ValueError:
            return
    if num_records < 0:  # -1: the writer did not know the count when it wrote the header
        return
    bytes_per_sample = 3 if header[:1] == b"\xff" else 2  # BDF starts with 0xFF "BIOSEMI"
    expected = header_bytes + num_records * sum(samples_per_record) * bytes_per_sample
    actual = os.path.getsize(path)
    if actual < expected:
        raise SkipInput(f"truncated: {actual} bytes, the header promises {expected} ({num_records} records)")


def read_raw(path: str, cfg: MegConfig, labels: dict[str, Any] | None = None) -> Any:
    """The picked channels of the recording at `path`, loaded; SkipInput when unreadable or none are left.
    With labels from stim channel events (sharding.labels), the events become annotations before the pick."""
    import mne

    if path.lower().endswith((".edf", ".bdf")):
        check_edf_size(path)
    try:
        raw = mne.io.read_raw(path, preload=False, verbose="error")
    except Exception as error:  # noqa: BLE001 - every reader's failure (corrupt, truncated, unknown format) skips the file
        raise SkipInput(f"unreadable recording: {first_line(error)}") from None
    present = set(raw.get_channel_types())
    if not present & set(cfg.channel_types):
        raise SkipInput(f"no usable channels: none of types {cfg.channel_types} (has {sorted(present)})")
    bads = set(raw.info["bads"]) if cfg.exclude_bads else set()
    if all(name in bads for name, kind in zip(raw.ch_names, raw.get_channel_types()) if kind in cfg.channel_types):
        raise SkipInput(f"no usable channels: every channel of types {cfg.channel_types} is marked bad")
    if labels is not None and labels.get("events"):
        from sharding.labels import add_event_annotations

        add_event_annotations(raw, labels["stim_channel"])
    raw.pick(cfg.channel_types, exclude="bads" if cfg.exclude_bads else [], verbose="error")
    try:
        raw.load_data(verbose="error")
    except Exception as error:  # noqa: BLE001 - a truncated data block fails only here
        raise SkipInput(f"unreadable recording data: {first_line(error)}") from None
    return raw


def preprocess(raw: Any, cfg: MegConfig) -> None:
    """Notch, band-pass and resample `raw` in place (filters run at the recording's own rate, before resampling)."""
    nyquist = raw.info["sfreq"] / 2
    if cfg.h_freq is not None and cfg.h_freq >= nyquist:
        raise SkipInput(f"sampled at {raw.info['sfreq']:g} Hz: too slow for meg.h_freq={cfg.h_freq:g} Hz")
    notch = [freq for freq in cfg.notch_freqs if freq < nyquist]
    if notch:
        raw.notch_filter(notch, verbose="error")
    if cfg.l_freq is not None or cfg.h_freq is not None:
        raw.filter(cfg.l_freq, cfg.h_freq, verbose="error")
    if raw.info["sfreq"] != cfg.sfreq:
        raw.resample(cfg.sfreq, verbose="error")


def normalization_stats(x_CN: np.ndarray, method: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel (center, scale) of `x_CN` (float64): x = normalised * scale + center."""
    if method == "robust":
        q25, center, q75 = np.percentile(x_CN, [25, 50, 75], axis=1)
        return center, (q75 - q25) / ROBUST_SCALE
    if method == "zscore":
        return x_CN.mean(axis=1), x_CN.std(axis=1)
    assert method == "none", method
    return np.zeros(len(x_CN)), np.ones(len(x_CN))


def sensor_metadata(info: Any) -> tuple[np.ndarray, np.ndarray]:
    """(pos (C, 6) float32, sensor_type (C,) int64) of the channels of `info`.

    MEG coils carry their position and frame (loc[3:12]: ex, ey, ez = normal) in device
    coordinates: position and direction (ez for "mag" channels, ex, the measured gradient, for
    planar "grad" ones) move to head coordinates with the recording's device->head transform,
    where EEG electrodes already are.
    Unknown positions (NaN, e.g. EEG without a montage) become 0.
    """
    import mne

    types = info.get_channel_types()
    pos = np.zeros((len(types), 6))
    for index, channel in enumerate(info["chs"]):
        loc = np.asarray(channel["loc"], dtype=np.float64)
        pos[index, :3] = loc[:3]
        if types[index] == "mag":
            pos[index, 3:] = loc[9:12]
        elif types[index] == "grad":
            pos[index, 3:] = loc[3:6]
    is_meg = np.array([kind in ("mag", "grad") for kind in types])
    if is_meg.any() and info.get("dev_head_t") is not None:
        trans = info["dev_head_t"]
        pos[is_meg, :3] = mne.transforms.apply_trans(trans, pos[is_meg, :3], move=True)
        pos[is_meg, 3:] = mne.transforms.apply_trans(trans, pos[is_meg, 3:], move=False)
    pos = np.nan_to_num(pos, nan=0.0, posinf=0.0, neginf=0.0).astype(np.float32)
    sensor_type = np.array([SENSOR_TYPES.index(kind) for kind in types], dtype=np.int64)
    return pos, sensor_type


def read_samples(source: str, path: str, cfg: MegConfig, labels: dict[str, Any] | None = None) -> Iterator[dict[str, Any]]:
    """The window samples of the recording at local `path` (read from `source`); SkipInput when it gives none.
    `labels`: sharding.labels.plan_labels's plan, which labels each window."""
    raw = read_raw(path, cfg, labels)
    preprocess(raw, cfg)
    x_CN = raw.get_data()  # float64, SI units
    center, scale = normalization_stats(x_CN, cfg.normalization)
    # flat (e.g. a dead sensor: 0 after the high-pass) or broken channels carry nothing to normalise
    usable = np.isfinite(x_CN).all(axis=1) & (x_CN.std(axis=1) > 0) & np.isfinite(scale) & (scale > 0) & np.isfinite(center)
    if not usable.any():
        raise SkipInput(f"no usable channels: all {len(usable)} picked channels are flat or not finite")
    x_CN, center, scale = x_CN[usable], center[usable], scale[usable]
    if not usable.all():
        raw.pick(np.flatnonzero(usable), verbose="error")
    info = raw.info
    pos, sensor_type = sensor_metadata(info)
    ch_names = list(info["ch_names"])
    window, stride = sequence_length(cfg), window_stride(cfg)
    count = num_windows(x_CN.shape[1], window, stride)
    if count == 0:
        raise SkipInput(f"shorter than one window: {x_CN.shape[1] / cfg.sfreq:.2f} s < meg.window_s={cfg.window_s:g} s")
    center_f32, scale_f32 = center.astype(np.float32), scale.astype(np.float32)
    label_of = None
    if labels is not None:
        from sharding.labels import window_labeller

        label_of = window_labeller(labels, source, raw)
        if all(label_of(i * stride, i * stride + window) is None for i in range(count)):
            raise SkipInput(f"no labelled windows: none of its {count} windows holds a mapped annotation or event")
    for index in range(count):
        start = index * stride
        label = None if label_of is None else label_of(start, start + window)
        if label_of is not None and label is None:
            continue
        x_CT = x_CN[:, start:start + window]
        sample = {
            "__key__": source_sample_key(source, index),
            "signal.npy": ((x_CT - center[:, None]) / scale[:, None]).astype(np.float32),
            "norm_center.npy": center_f32,
            "norm_scale.npy": scale_f32,
            "pos.npy": pos,
            "sensor_type.npy": sensor_type,
            "meta.json": {"source": source, "window": index, "start_s": start / cfg.sfreq, "sfreq": float(cfg.sfreq),
                          "ch_names": ch_names},
        }
        if label is not None:
            sample["label.npy"] = np.array(label, dtype=np.int64)
        yield sample


def denormalize(sample: dict[str, Any]) -> np.ndarray:
    """(C, T) float64 signal in SI units of a decoded window sample."""
    return sample["signal"].astype(np.float64) * sample["norm_scale"][:, None] + sample["norm_center"][:, None]
