"""Synthetic MEG + EEG recordings for tests and demos (no real recording installs from a registry).

Real sensor geometry (mne's Neuromag-306 coil definitions and the standard 10-20 EEG montage,
both shipped inside mne), realistic content: a 1/f background per channel, alpha (10 Hz) bursts
shared across channels with per-channel gains, and 50 Hz line noise; amplitudes in SI units of
each channel type (T, T/m, V).

A second kind, `sinusoids`, is a predictable signal for testing forecasters end to end: every
channel a sinusoid of its own random period, phase and amplitude plus a little noise, so a
forecast that is aligned in time and scale beats the naive baselines by a wide margin.

A third, `labelled` / `annotated`, is for classifiers: recordings with and without alpha, labelled
by file name (alpha-XX / rest-XX) or by annotations of alternating segments (write_labelled_recordings).

    python -m sharding.synthetic_meg OUT_DIR [--kind meg|sinusoids|labelled|annotated] [--num-recordings 6] [--seconds 20]
"""

from __future__ import annotations

import argparse
import os

import numpy as np

EEG_CHANNELS = ("Fz", "Cz", "Pz", "Oz", "C3", "C4", "O1", "O2")
AMPLITUDE = {"mag": 2e-13, "grad": 5e-12, "eeg": 2e-5}  # typical background levels: T, T/m, V


def pink_noise(rng: np.random.Generator, num_channels: int, num_times: int, sfreq: float) -> np.ndarray:
    """(C, N) noise with a 1/f power spectrum, unit standard deviation per channel."""
    spectrum = np.fft.rfft(rng.standard_normal((num_channels, num_times)), axis=1)
    freqs = np.fft.rfftfreq(num_times, 1 / sfreq)
    freqs[0] = freqs[1]
    x = np.fft.irfft(spectrum / np.sqrt(freqs), n=num_times, axis=1)
    return x / x.std(axis=1, keepdims=True)


def make_raw(seconds: float = 10.0, sfreq: float = 1000.0, seed: int = 0, num_triplets: int = 8,
             eeg_channels: tuple[str, ...] = EEG_CHANNELS, head_shift_m: float = 0.0,
             alpha_envelope: np.ndarray | None = None) -> object:
    """An mne RawArray of `num_triplets` Neuromag sensor triplets (1 mag + 2 grads each) plus EEG.

    `head_shift_m` moves the head along z in the device frame (device->head transform), as a
    real head position would. `alpha_envelope` (N,) replaces the bursts' envelope: zeros for a
    recording without alpha, a 0/1 mask for alpha in chosen segments.
    """
    import mne

    rng = np.random.default_rng(seed)
    info = mne.pick_info(mne.channels.read_meg_canonical_info("neuromag", verbose="error"), list(range(3 * num_triplets)))
    # the canonical info says 1000 Hz; mne protects sfreq (no public setter), so unlock it to honour `sfreq`
    with info._unlock():
        info["sfreq"], info["lowpass"] = float(sfreq), float(sfreq) / 2
    trans = np.eye(4)
    trans[2, 3] = -head_shift_m
    info["dev_head_t"] = mne.transforms.Transform("meg", "head", trans)
    num_times = int(round(seconds * sfreq))
    t = np.arange(num_times) / sfreq
    envelope = np.clip(np.sin(2 * np.pi * 0.25 * t + rng.uniform(0, 2 * np.pi)), 0, None) ** 2  # bursts
    if alpha_envelope is not None:
        envelope = np.asarray(alpha_envelope, dtype=np.float64)
    alpha = envelope * np.sin(2 * np.pi * (10.0 + rng.uniform(-0.5, 0.5)) * t)
    line = np.sin(2 * np.pi * 50.0 * t)

    def channels(kinds: list[str]) -> np.ndarray:
        scale = np.array([AMPLITUDE[kind] for kind in kinds])[:, None]
        gains = rng.uniform(0.3, 1.5, size=(len(kinds), 1))
        return scale * (pink_noise(rng, len(kinds), num_times, sfreq) + gains * alpha + 0.3 * line)

    raw = mne.io.RawArray(channels(info.get_channel_types()), info, verbose="error")
    if eeg_channels:
        eeg = mne.io.RawArray(channels(["eeg"] * len(eeg_channels)), mne.create_info(list(eeg_channels), sfreq, "eeg"), verbose="error")
        eeg.set_montage("standard_1020", verbose="error")
        raw.add_channels([eeg], force_update_info=True)
    return raw


# periods of the sinusoids in samples at SINUSOID_SFREQ: whole multiples of 4 samples (a TOTEM token)
SINUSOID_PERIODS = (16, 20, 24, 28, 32)
SINUSOID_SFREQ = 100.0


def make_sinusoid_raw(seconds: float = 60.0, seed: int = 0, num_channels: int = 8, noise: float = 0.05,
                      sfreq: float = SINUSOID_SFREQ) -> object:
    """An mne RawArray of `num_channels` magnetometers (real Neuromag geometry), channel c carrying
    A_c sin(2 pi t / P_c + phi_c) + noise * A_c * N(0, 1): P_c drawn from SINUSOID_PERIODS (samples),
    phi_c uniform, A_c log-normal around 1 pT."""
    import mne

    rng = np.random.default_rng(seed)
    canonical = mne.channels.read_meg_canonical_info("neuromag", verbose="error")
    info = mne.pick_info(canonical, mne.pick_types(canonical, meg="mag")[:num_channels])
    with info._unlock():
        info["sfreq"], info["lowpass"] = float(sfreq), float(sfreq) / 2
    n = np.arange(int(round(seconds * sfreq)))
    periods = rng.choice(SINUSOID_PERIODS, size=(num_channels, 1))
    phases = rng.uniform(0, 2 * np.pi, size=(num_channels, 1))
    amplitudes = 1e-12 * np.exp(rng.normal(0.0, 0.5, size=(num_channels, 1)))
    data = amplitudes * (np.sin(2 * np.pi * n / periods + phases) + noise * rng.standard_normal((num_channels, len(n))))
    return mne.io.RawArray(data, info, verbose="error")


def write_recordings(directory: str, num_recordings: int = 6, seconds: float = 20.0, kind: str = "meg") -> list[str]:
    """`rec-XX_raw.fif` files of slightly different lengths (and head positions); their paths."""
    os.makedirs(directory, exist_ok=True)
    paths = []
    for index in range(num_recordings):
        path = os.path.join(directory, f"rec-{index:02d}_raw.fif")
        if kind == "sinusoids":
            raw = make_sinusoid_raw(seconds=seconds + index, seed=index)
        else:
            raw = make_raw(seconds=seconds + index, seed=index, head_shift_m=0.01 * index)
        raw.save(path, overwrite=True, verbose="error")
        paths.append(path)
    return paths


EVENT_IDS = {"alpha": 1, "rest": 2}  # stim channel values of write_labelled_recordings(marks="events")


def write_labelled_recordings(directory: str, num_per_class: int = 4, seconds: float = 20.0, sfreq: float = 250.0,
                              segment_s: float = 0.0, num_triplets: int = 8, marks: str = "annotations") -> list[str]:
    """Recordings of two kinds for classifiers, magnetometers + gradiometers only; their paths.

    segment_s 0: `alpha-XX_raw.fif` with alpha bursts and `rest-XX_raw.fif` without (a class per
    file). segment_s > 0: `rec-XX_raw.fif` whose segments of segment_s seconds alternate between
    alpha (on throughout, from an odd recording's first segment on) and none, marked by annotations
    "alpha" / "rest" (marks "annotations") or by events EVENT_IDS on a stim channel "STI 014", a
    pulse of 5 samples 10 samples after each segment's start (marks "events").
    """
    import mne

    os.makedirs(directory, exist_ok=True)
    num_times = int(round(seconds * sfreq))
    paths = []
    for index in range(2 * num_per_class):
        options = dict(seconds=seconds, sfreq=sfreq, seed=100 + index, num_triplets=num_triplets, eeg_channels=())
        if segment_s <= 0:
            has_alpha = index < num_per_class
            name = f"{'alpha' if has_alpha else 'rest'}-{index % num_per_class:02d}_raw.fif"
            raw = make_raw(**options, alpha_envelope=None if has_alpha else np.zeros(num_times))
        else:
            segment = (np.arange(num_times) / sfreq // segment_s).astype(int)
            is_alpha = (segment + index) % 2 == 1
            raw = make_raw(**options, alpha_envelope=is_alpha.astype(np.float64))
            onsets = np.arange(segment.max() + 1) * segment_s
            kinds = ["alpha" if (k + index) % 2 == 1 else "rest" for k in range(len(onsets))]
            if marks == "events":
                stim = np.zeros((1, num_times))
                for onset, kind in zip(onsets, kinds):
                    first = int(round(onset * sfreq)) + 10
                    stim[0, first:first + 5] = EVENT_IDS[kind]
                raw.add_channels([mne.io.RawArray(stim, mne.create_info(["STI 014"], sfreq, "stim"), verbose="error")],
                                 force_update_info=True)
            else:
                raw.set_annotations(mne.Annotations(onsets, [segment_s] * len(onsets), kinds))
            name = f"rec-{index:02d}_raw.fif"
        path = os.path.join(directory, name)
        raw.save(path, overwrite=True, verbose="error")
        paths.append(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--kind", choices=("meg", "sinusoids", "labelled", "annotated"), default="meg",
                        help="meg: realistic MEG + EEG; sinusoids: a sinusoid per channel (a predictable signal); labelled: "
                             "half with alpha bursts (alpha-XX), half without (rest-XX); annotated: alpha in alternating "
                             "2-s segments annotated alpha / rest")
    parser.add_argument("--num-recordings", type=int, default=6)
    parser.add_argument("--seconds", type=float, default=20.0)
    args = parser.parse_args()
    if args.kind in ("labelled", "annotated"):
        paths = write_labelled_recordings(args.out_dir, max(1, args.num_recordings // 2), args.seconds,
                                          segment_s=2.0 if args.kind == "annotated" else 0.0)
    else:
        paths = write_recordings(args.out_dir, args.num_recordings, args.seconds, args.kind)
    print(f"wrote {len(paths)} recordings to {args.out_dir}")


if __name__ == "__main__":
    main()
