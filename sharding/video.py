"""Videos -> fixed-size RGB clips (`source.kind: video`), decoded with PyAV (FFmpeg: mp4, webm, mkv, ...).

One video's first video stream is decoded in order; then

    frame times (pts) -> one frame per tick of video.fps (the nearest source frame; fps 0 keeps
    every frame) -> clips of clip_frames frames starting every stride_frames frames (a short tail
    is dropped) -> each frame resized to height x width (crop: cover then center-crop; stretch)

Only frames that land in a clip are converted to RGB. Each clip is one sample, keyed
`{stem}-{hash8}-{clip:06d}` (source file + clip index):

    video.npy   uint8 (T, H, W, 3)  RGB, T = clip_frames
    meta.json   {"source", "clip", "start_s", "fps", "source_fps", "source_size": [height, width]}
"""

from __future__ import annotations

from fractions import Fraction
from typing import Any, Iterator

import numpy as np

from core.config import VideoConfig
from sharding.shard_build import SkipInput, first_line
from sharding.shards import source_sample_key

MANIFEST_KIND = "video_clips"
SAMPLE_UNIT = "clips"
OPTIONS = VideoConfig


def check_options(cfg: VideoConfig) -> None:
    """Every VideoConfig is usable as it is (its own __post_init__ checks ranges)."""


def sequence_length(cfg: VideoConfig) -> int:
    """Frames per clip (the manifest's seq_len)."""
    return cfg.clip_frames


def num_clips(num_frames: int, clip_frames: int, stride_frames: int) -> int:
    return 0 if num_frames < clip_frames else (num_frames - clip_frames) // stride_frames + 1


def field_notes(cfg: VideoConfig) -> dict[str, dict[str, Any]]:
    return {"video.npy": {"layout": "THWC", "color": "rgb24", "fps": cfg.fps or "source", "resize": cfg.resize}}


def resample_times(frames: Iterator[tuple[float, Any]], fps: float) -> Iterator[Any]:
    """One frame per tick k / fps (k = 0, 1, ...) of `(time_s, frame)` in time order: the nearest frame.

    Ticks after the last frame are not produced; a frame may repeat (fps above the source's) or
    be left out (below it).
    """
    tick = 0
    previous: tuple[float, Any] | None = None
    for time, frame in frames:
        while tick / fps <= time:
            target = tick / fps
            is_nearer = previous is None or time - target <= target - previous[0]
            yield frame if is_nearer else previous[1]
            tick += 1
        previous = (time, frame)


def resize_frame(frame: Any, cfg: VideoConfig) -> np.ndarray:
    """(H, W, 3) uint8 RGB of a PyAV frame, resized by swscale (area averaging when shrinking)."""
    if cfg.resize == "stretch":
        return frame.reformat(width=cfg.width, height=cfg.height, format="rgb24", interpolation="AREA").to_ndarray()
    scale = max(cfg.height / frame.height, cfg.width / frame.width)
    width = max(cfg.width, round(frame.width * scale))
    height = max(cfg.height, round(frame.height * scale))
    image = frame.reformat(width=width, height=height, format="rgb24", interpolation="AREA").to_ndarray()
    top, left = (height - cfg.height) // 2, (width - cfg.width) // 2
    return np.ascontiguousarray(image[top:top + cfg.height, left:left + cfg.width])


def _timed_frames(container: Any, stream: Any) -> Iterator[tuple[float, Any]]:
    """(seconds since the first frame, frame) in presentation order."""
    rate = stream.average_rate or stream.guessed_rate or Fraction(25)
    first = None
    for index, frame in enumerate(container.decode(stream)):
        time = frame.time if frame.time is not None else index / float(rate)
        first = time if first is None else first
        yield time - first, frame


def read_samples(source: str, path: str, cfg: VideoConfig) -> Iterator[dict[str, Any]]:
    """The clip samples of the video at local `path` (read from `source`); SkipInput when it gives none."""
    import av

    try:
        container = av.open(path)
    except Exception as error:  # noqa: BLE001 - FFmpeg's failures to open (corrupt, truncated, not a video) skip the file
        raise SkipInput(f"unreadable video: {first_line(error)}") from None
    with container:
        if not container.streams.video:
            raise SkipInput("no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        source_fps = float(stream.average_rate or stream.guessed_rate or 0)
        fps = cfg.fps or source_fps
        if fps <= 0:
            raise SkipInput("unknown frame rate: set video.fps")
        frames = _timed_frames(container, stream)
        ticks = resample_times(frames, cfg.fps) if cfg.fps else (frame for _, frame in frames)
        count, size = 0, None
        images: dict[int, np.ndarray] = {}  # frame index -> image, for the clips not yet complete
        try:
            for index, frame in enumerate(ticks):
                if index % cfg.stride_frames >= cfg.clip_frames:
                    continue  # in the gap between clips (stride_frames > clip_frames)
                size = size or [frame.height, frame.width]
                images[index] = resize_frame(frame, cfg)
                start = count * cfg.stride_frames
                if index < start + cfg.clip_frames - 1:
                    continue
                yield {
                    "__key__": source_sample_key(source, count),
                    "video.npy": np.stack([images[i] for i in range(start, start + cfg.clip_frames)]),
                    "meta.json": {"source": source, "clip": count, "start_s": start / fps, "fps": fps,
                                  "source_fps": source_fps, "source_size": size},
                }
                count += 1
                images = {i: image for i, image in images.items() if i >= count * cfg.stride_frames}
                if count == cfg.max_clips_per_file:
                    return
        except av.error.FFmpegError as error:
            raise SkipInput(f"undecodable video: {first_line(error)}") from None
        if count == 0:
            raise SkipInput(f"shorter than one clip of video.clip_frames={cfg.clip_frames} frames at {fps:g} fps")
