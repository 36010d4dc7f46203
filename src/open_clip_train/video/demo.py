"""A small synthetic MSR-VTT: short clips of one shape moving across a plain background.

Each clip shows a square or a circle of one colour moving left, right, up or down for 2-4 s at
15 fps on 64x64 frames. Its captions name the colour, the shape and the direction, and some name
only the direction ("moving from left to right"): telling left-to-right from right-to-left needs the
frames' order (a mean of frame features cannot, a temporal transformer can). Written in the
MSR-VTT layout (`msrvtt.py`): json (train videos `train`/`validate`, test videos `test`), 9k/7k
train csvs, a 1k-A-style test csv (first caption of each test video); the full-split-style test is
the json's `test` videos with all their captions. Everything is a function of the seed.
"""
from __future__ import annotations

import csv
import json
import random
from fractions import Fraction
from pathlib import Path

import numpy as np

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 80, 230), "yellow": (230, 210, 40),
           "white": (245, 245, 245), "purple": (150, 60, 190)}
SHAPES = ("square", "circle")
DIRECTIONS = {"right": (1, 0), "left": (-1, 0), "down": (0, 1), "up": (0, -1)}
PHRASES = {"right": "from left to right", "left": "from right to left", "down": "downwards", "up": "upwards"}
SIZE, FPS, OBJECT = 64, 15, 18


def write_video(path: str | Path, frames: np.ndarray, fps: int = FPS, quality: int = 2, codec: str = "mpeg4") -> None:
    """uint8 [n, H, W, 3] RGB (even H and W) -> an .mp4 (yuv420p). mpeg4 (MPEG-4 Part 2, `quality` =
    qscale, 1 = best): FFmpeg's own single-threaded encoder writes byte-identical files for the same
    frames, which libx264 occasionally did not within one process. libx264 (`quality` = crf) is what
    MSR-VTT's files use, for benchmarks."""
    import av

    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.options = {"qscale": str(quality)} if codec == "mpeg4" else {"crf": str(quality), "threads": "1"}
        stream.codec_context.thread_count = 1
        for i, f in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(rgb_to_yuv420p(f), format="yuv420p")
            frame.pts, frame.time_base = i, Fraction(1, fps)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def rgb_to_yuv420p(rgb: np.ndarray) -> np.ndarray:
    """BT.601 limited-range planar YUV 4:2:0 as PyAV's [H * 3 / 2, W] layout, computed here so the
    encoder's input never depends on the converter's code path (byte-identical files per seed)."""
    x = rgb.astype(np.float64)
    y = 16 + (65.481 * x[..., 0] + 128.553 * x[..., 1] + 24.966 * x[..., 2]) / 255
    u = 128 + (-37.797 * x[..., 0] - 74.203 * x[..., 1] + 112.0 * x[..., 2]) / 255
    v = 128 + (112.0 * x[..., 0] - 93.786 * x[..., 1] - 18.214 * x[..., 2]) / 255
    h, w = y.shape
    sub = lambda c: c.reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3)).reshape(h // 4, w)  # noqa: E731
    planes = np.concatenate([y, sub(u), sub(v)])
    return np.clip(np.rint(planes), 0, 255).astype(np.uint8)


def render_clip(colour: str, shape: str, direction: str, seconds: float, background: tuple[int, int, int],
                offset: int) -> np.ndarray:
    """The clip's frames: the object crosses the frame along `direction`, `offset` px off centre."""
    n = int(round(seconds * FPS))
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    dx, dy = DIRECTIONS[direction]
    lo, hi = 4 + OBJECT / 2, SIZE - 4 - OBJECT / 2
    frames = np.empty((n, SIZE, SIZE, 3), dtype=np.uint8)
    frames[:] = background
    for i in range(n):
        s = lo + (hi - lo) * i / max(1, n - 1)  # position along the motion axis
        along = s if (dx + dy) > 0 else SIZE - s
        cx, cy = (along, SIZE / 2 + offset) if dx else (SIZE / 2 + offset, along)
        if shape == "square":
            inside = (abs(xx - cx) <= OBJECT / 2) & (abs(yy - cy) <= OBJECT / 2)
        else:
            inside = (xx - cx) ** 2 + (yy - cy) ** 2 <= (OBJECT / 2) ** 2
        frames[i][inside] = COLOURS[colour]
    return frames


def captions_for(colour: str, shape: str, direction: str) -> list[str]:
    p = PHRASES[direction]
    return [f"a {colour} {shape} moves {p}", f"a {shape} that is {colour} moving {p}",
            f"something {colour} moving {p}", f"an object moving {p}", f"a {colour} {shape}"]


def write_demo(out: str | Path, num_train: int = 300, num_test: int = 60, seed: int = 0) -> dict:
    """Write the demo data set under `out` (see the module docstring); returns counts."""
    if num_train < 2 or num_test < 1:
        raise ValueError(f"need num_train >= 2 and num_test >= 1, got {num_train}, {num_test}")
    out = Path(out)
    (out / "videos").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    videos, sentences = [], []
    num_7k = max(1, round(num_train * 7 / 9))
    for k in range(num_train + num_test):
        vid = f"video{k}"
        colour, shape, direction = rng.choice(list(COLOURS)), rng.choice(SHAPES), rng.choice(list(DIRECTIONS))
        seconds = rng.choice((2.0, 2.5, 3.0, 3.5, 4.0))
        background = tuple(rng.randrange(20, 60) for _ in range(3))  # dark, varied a little
        frames = render_clip(colour, shape, direction, seconds, background, rng.randrange(-12, 13))
        write_video(out / "videos" / f"{vid}.mp4", frames)
        split = "test" if k >= num_train else ("train" if k < num_7k * 0.85 else "validate" if k < num_7k else "train")
        videos.append({"video_id": vid, "category": SHAPES.index(shape), "split": split, "id": k,
                       "url": f"synthetic://{seed}/{vid}", "start time": 0.0, "end time": seconds})
        for caption in captions_for(colour, shape, direction):
            sentences.append({"caption": caption, "video_id": vid, "sen_id": len(sentences)})
    (out / "MSRVTT_data.json").write_text(json.dumps({"videos": videos, "sentences": sentences}) + "\n")
    train = [v["video_id"] for v in videos if v["split"] != "test"]
    _write_csv(out / "MSRVTT_train.9k.csv", ["video_id"], [[v] for v in train])
    _write_csv(out / "MSRVTT_train.7k.csv", ["video_id"], [[v] for v in train[:num_7k]])
    first = {}
    for s in sentences:
        first.setdefault(s["video_id"], s["caption"])
    test = [v["video_id"] for v in videos if v["split"] == "test"]
    _write_csv(out / "MSRVTT_JSFUSION_test.csv", ["key", "vid_key", "video_id", "sentence"],
               [[f"ret{i}", f"msr{v[5:]}", v, first[v]] for i, v in enumerate(test)])
    return {"videos": len(videos), "train": len(train), "train_7k": num_7k, "test": len(test),
            "sentences": len(sentences)}


def _write_csv(path: Path, header: list[str], rows: list[list[str]]) -> None:
    with path.open("w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(header)
        w.writerows(rows)
