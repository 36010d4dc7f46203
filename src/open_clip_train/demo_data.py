"""A tiny COCO-captions-style dataset of rendered shape scenes, for CPU demos and tests.

    python -m open_clip_train.demo_data OUT_DIR [--num-train N] [--num-val M] [--image-size S] [--seed K]
    python -m open_clip_train.demo_data [OUT_DIR] --zeroshot-out DIR [--zeroshot-by shape|colour]
                                        [--zeroshot-per-class N]

Each image shows 1-3 coloured shapes at distinct positions (left/right/top/bottom/centre),
small or large, on a plain background. Its 5 captions name every object's colour and
shape, in varied templates, orders and synonyms, some adding positions, sizes, the count
or the background. 8 colours x 6 shapes x 5 positions x 2 sizes per object make most
captions identify their image among a few hundred, yet a tiny CLIP learns it in minutes.
Output is deterministic given the seed: every image has its own RNG keyed by (seed, id).

`--zeroshot-out DIR` also writes a labelled ImageFolder for zero-shot evaluation
(`--zeroshot-data DIR --zeroshot-classnames DIR/classnames.txt --zeroshot-templates
DIR/templates.txt`): one-object scenes filed by the object's shape (or colour), one folder per
class, with the class names and prompt templates in the captions' vocabulary.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {
    "red": (220, 40, 40), "orange": (245, 140, 30), "yellow": (240, 220, 40), "green": (40, 170, 60),
    "blue": (40, 90, 230), "purple": (140, 60, 190), "white": (245, 245, 245), "black": (20, 20, 20),
}
BACKGROUNDS = {"gray": (128, 128, 128), "white": (250, 250, 250), "black": (15, 15, 15)}
BACKGROUND_WORDS = {"gray": ("gray", "grey"), "white": ("white", "light"), "black": ("black", "dark")}
SHAPE_WORDS = {  # singular, plural; the first is the usual name
    "circle": (("circle", "circles"), ("disc", "discs"), ("round dot", "round dots")),
    "square": (("square", "squares"), ("box", "boxes"), ("block", "blocks")),
    "triangle": (("triangle", "triangles"),),
    "diamond": (("diamond", "diamonds"), ("rhombus", "rhombuses")),
    "star": (("star", "stars"),),
    "cross": (("cross", "crosses"), ("plus sign", "plus signs")),
}
POSITIONS = {"left": (0.18, 0.5), "right": (0.82, 0.5), "top": (0.5, 0.18), "bottom": (0.5, 0.82),
             "centre": (0.5, 0.5)}
POSITION_WORDS = {
    "left": ("on the left", "at the left", "in the left part"),
    "right": ("on the right", "at the right", "in the right part"),
    "top": ("at the top", "near the top", "in the upper part"),
    "bottom": ("at the bottom", "near the bottom", "in the lower part"),
    "centre": ("in the centre", "in the middle", "at the center"),
}
SIZES = {"small": 0.09, "large": 0.14}  # radius as a fraction of the image side
SIZE_WORDS = {"small": ("small", "little"), "large": ("large", "big")}
COUNT_WORDS = {1: "one", 2: "two", 3: "three"}
CAPTIONS_PER_IMAGE = 5
SUPERSAMPLE = 2  # draw at 2x and downscale: anti-aliased edges at little cost
VAL_ID_BASE = 1_000_000_000  # val ids never collide with train ids, whatever num_train is


@dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    position: str
    size: str


@dataclass(frozen=True)
class Scene:
    background: str
    objects: tuple[Obj, ...]


@dataclass(frozen=True)
class DemoPaths:
    root: Path
    train_annotations: Path
    val_annotations: Path
    train_images: Path
    val_images: Path


def random_scene(rng: random.Random) -> Scene:
    background = rng.choice(sorted(BACKGROUNDS))
    count = rng.choices((1, 2, 3), weights=(3, 4, 3))[0]
    positions = rng.sample(sorted(POSITIONS), count)
    colours = [c for c in sorted(COLOURS) if c != background]  # stay visible on the background
    objects = tuple(
        Obj(rng.choice(sorted(SHAPE_WORDS)), rng.choice(colours), pos, rng.choice(sorted(SIZES)))
        for pos in positions
    )
    return Scene(background, objects)


def _shape_points(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "triangle":
        return [(cx, cy - r), (cx + 0.95 * r, cy + 0.75 * r), (cx - 0.95 * r, cy + 0.75 * r)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + 0.75 * r, cy), (cx, cy + r), (cx - 0.75 * r, cy)]
    if shape == "star":
        return [
            (cx + (r if k % 2 == 0 else 0.45 * r) * math.sin(k * math.pi / 5),
             cy - (r if k % 2 == 0 else 0.45 * r) * math.cos(k * math.pi / 5))
            for k in range(10)
        ]
    if shape == "cross":
        t = 0.38 * r
        return [(cx - t, cy - r), (cx + t, cy - r), (cx + t, cy - t), (cx + r, cy - t), (cx + r, cy + t),
                (cx + t, cy + t), (cx + t, cy + r), (cx - t, cy + r), (cx - t, cy + t), (cx - r, cy + t),
                (cx - r, cy - t), (cx - t, cy - t)]
    raise ValueError(f"unknown polygon shape {shape!r}")


def _jitter(rgb: tuple[int, int, int], rng: random.Random, amount: int) -> tuple[int, ...]:
    return tuple(min(255, max(0, v + rng.randint(-amount, amount))) for v in rgb)


def render(scene: Scene, size: int, rng: random.Random) -> Image.Image:
    """Draw the scene; small position/colour jitter so no two renders are pixel-identical."""
    side = size * SUPERSAMPLE
    image = Image.new("RGB", (side, side), _jitter(BACKGROUNDS[scene.background], rng, 8))
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        fx, fy = POSITIONS[obj.position]
        cx, cy = (fx + rng.uniform(-0.02, 0.02)) * side, (fy + rng.uniform(-0.02, 0.02)) * side
        r = SIZES[obj.size] * side
        fill = _jitter(COLOURS[obj.colour], rng, 12)
        if obj.shape == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        elif obj.shape == "square":
            h = 0.82 * r  # similar area to the other shapes
            draw.rectangle((cx - h, cy - h, cx + h, cy + h), fill=fill)
        else:
            draw.polygon(_shape_points(obj.shape, cx, cy, r), fill=fill)
    return image.resize((size, size), Image.Resampling.BOX)


# ---- captions -------------------------------------------------------------------------

def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _noun(obj: Obj, rng: random.Random, with_size: bool = False, with_article: bool = True) -> str:
    """e.g. 'a small red circle'; the usual shape name most of the time, else a synonym."""
    names = SHAPE_WORDS[obj.shape]
    shape = names[0][0] if rng.random() < 0.6 else rng.choice(names)[0]
    words = ([rng.choice(SIZE_WORDS[obj.size])] if with_size else []) + [obj.colour, shape]
    phrase = " ".join(words)
    return f"{_article(phrase)} {phrase}" if with_article else phrase


def _where(obj: Obj, rng: random.Random) -> str:
    return rng.choice(POSITION_WORDS[obj.position])


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _ordered(scene: Scene, rng: random.Random) -> list[Obj]:
    objects = list(scene.objects)
    rng.shuffle(objects)
    return objects


def _bg(scene: Scene, rng: random.Random) -> str:
    return rng.choice(BACKGROUND_WORDS[scene.background])


def _t_listing(scene: Scene, rng: random.Random) -> str:
    prefix = rng.choice(("", "a picture of ", "an image showing ", "a drawing of "))
    sized = rng.random() < 0.5
    return prefix + _join([f"{_noun(o, rng, sized)} {_where(o, rng)}" for o in _ordered(scene, rng)])


def _t_count(scene: Scene, rng: random.Random) -> str:
    n = len(scene.objects)
    nouns = _join([_noun(o, rng) for o in _ordered(scene, rng)])
    if n == 1:
        noun = _noun(scene.objects[0], rng, with_article=False)
        return f"a single {noun} on a {_bg(scene, rng)} background"
    kind = rng.choice(("shapes", "objects", "figures"))
    return f"{COUNT_WORDS[n]} {kind}: {nouns}"


def _t_background(scene: Scene, rng: random.Random) -> str:
    parts = [f"{_noun(o, rng, rng.random() < 0.5)} {_where(o, rng)}" for o in _ordered(scene, rng)]
    return f"a {_bg(scene, rng)} background with {_join(parts)}"


def _t_there_is(scene: Scene, rng: random.Random) -> str:
    objects = _ordered(scene, rng)
    if len(objects) == 1:
        return f"there is {_noun(objects[0], rng, True)} {_where(objects[0], rng)}"
    parts = [f"{_noun(o, rng)} {_where(o, rng)}" for o in objects]
    return f"there are {COUNT_WORDS[len(objects)]} shapes, {_join(parts)}"


def _t_where_first(scene: Scene, rng: random.Random) -> str:
    return "; ".join(f"{_where(o, rng)} {_noun(o, rng)}" for o in _ordered(scene, rng))


def _t_sizes(scene: Scene, rng: random.Random) -> str:
    nouns = _join([_noun(o, rng, with_size=True) for o in _ordered(scene, rng)])
    return f"{nouns} against a {_bg(scene, rng)} backdrop"


TEMPLATES = (_t_listing, _t_count, _t_background, _t_there_is, _t_where_first, _t_sizes)


def captions_for(scene: Scene, rng: random.Random, n: int = CAPTIONS_PER_IMAGE) -> list[str]:
    """n different captions, each naming every object's colour and shape."""
    captions: list[str] = []
    templates = rng.sample(TEMPLATES, len(TEMPLATES))
    for attempt in range(100):
        caption = templates[attempt % len(templates)](scene, rng)
        if caption not in captions:
            captions.append(caption)
            if len(captions) == n:
                return captions
    raise RuntimeError(f"could not write {n} different captions for {scene}")


# ---- dataset --------------------------------------------------------------------------

def _write_split(root: Path, split: str, first_id: int, count: int, image_size: int, seed: int) -> Path:
    image_dir = root / split
    image_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for image_id in range(first_id, first_id + count):
        rng = random.Random(f"{seed}:{image_id}")  # per-image stream: independent of split sizes
        scene = random_scene(rng)
        file_name = f"{image_id:012d}.jpg"
        render(scene, image_size, rng).save(image_dir / file_name, quality=90)
        images.append({"id": image_id, "file_name": file_name, "width": image_size, "height": image_size,
                       "scene": asdict(scene)})  # extra key: ground truth for tests and debugging
        annotations += [{"id": image_id * 10 + k, "image_id": image_id, "caption": c}
                        for k, c in enumerate(captions_for(scene, rng))]
    ann_file = root / "annotations" / f"captions_{split}.json"
    ann_file.parent.mkdir(parents=True, exist_ok=True)
    coco = {
        "info": {"description": f"open_clip_train demo shapes ({split}, seed {seed})", "version": "1.0"},
        "licenses": [],
        "images": images,
        "annotations": annotations,
    }
    ann_file.write_text(json.dumps(coco))
    return ann_file


def generate(out_dir: str | Path, num_train: int = 2000, num_val: int = 250, image_size: int = 64,
             seed: int = 0) -> DemoPaths:
    """Write the COCO-layout demo dataset under out_dir (overwriting its files)."""
    root = Path(out_dir)
    train = _write_split(root, "train2017", 1, num_train, image_size, seed)
    val = _write_split(root, "val2017", VAL_ID_BASE + 1, num_val, image_size, seed)
    return DemoPaths(root, train, val, root / "train2017", root / "val2017")


ZEROSHOT_BY = ("shape", "colour")
ZEROSHOT_TEMPLATES = {
    "shape": ("a picture of a {}", "a single {} on a plain background", "an image showing a {}", "there is a {}"),
    "colour": ("a picture of a {} shape", "a single {} object on a plain background", "an image showing a {} figure",
               "there is a {} shape"),
}


def zeroshot_scene(by: str, label: str, rng: random.Random) -> Scene:
    """One object whose `by` attribute is `label`; everything else random (colour never the background's)."""
    if by == "shape":
        background = rng.choice(sorted(BACKGROUNDS))
        colour = rng.choice([c for c in sorted(COLOURS) if c != background])
        shape = label
    else:
        background = rng.choice([b for b in sorted(BACKGROUNDS) if b != label])
        colour, shape = label, rng.choice(sorted(SHAPE_WORDS))
    return Scene(background, (Obj(shape, colour, rng.choice(sorted(POSITIONS)), rng.choice(sorted(SIZES))),))


def zeroshot_rng(seed: int, by: str, label: str, k: int) -> random.Random:
    """Image k of class `label`'s own stream: independent of --zeroshot-per-class."""
    return random.Random(f"{seed}:zeroshot:{by}:{label}:{k}")


def generate_zeroshot(out_dir: str | Path, by: str = "shape", per_class: int = 20, image_size: int = 64,
                      seed: int = 0) -> Path:
    """Write DIR/<class>/<k>.jpg, DIR/classnames.txt (the folders' sorted order) and DIR/templates.txt."""
    if by not in ZEROSHOT_BY:
        raise ValueError(f"by must be one of {ZEROSHOT_BY}, got {by!r}")
    root = Path(out_dir)
    classes = sorted(SHAPE_WORDS) if by == "shape" else sorted(COLOURS)
    for label in classes:
        folder = root / label
        folder.mkdir(parents=True, exist_ok=True)
        for k in range(per_class):
            rng = zeroshot_rng(seed, by, label, k)
            render(zeroshot_scene(by, label, rng), image_size, rng).save(folder / f"{k:06d}.jpg", quality=90)
    (root / "classnames.txt").write_text("".join(f"{c}\n" for c in classes))
    (root / "templates.txt").write_text("".join(f"{t}\n" for t in ZEROSHOT_TEMPLATES[by]))
    return root


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one clear line, exit 2 (argparse prints usage too)
        self.exit(2, f"{self.prog}: error: {message}\n")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = _OneLineParser(prog="python -m open_clip_train.demo_data", description=__doc__.split("\n")[0])
    parser.add_argument("out_dir", nargs="?", default=None, help="the COCO-layout captioned dataset")
    parser.add_argument("--num-train", type=int, default=2000)
    parser.add_argument("--num-val", type=int, default=250)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--zeroshot-out", default=None, metavar="DIR",
                        help="also write a labelled ImageFolder of one-object scenes for --zeroshot-data")
    parser.add_argument("--zeroshot-by", choices=ZEROSHOT_BY, default="shape", help="what the classes are")
    parser.add_argument("--zeroshot-per-class", type=int, default=20, metavar="N", help="images per class")
    args = parser.parse_args(argv)
    if args.out_dir is None and args.zeroshot_out is None:
        parser.error("give OUT_DIR (the captioned dataset), --zeroshot-out DIR, or both")
    if args.zeroshot_per_class < 1:
        parser.error(f"--zeroshot-per-class must be >= 1, got {args.zeroshot_per_class}")
    if not 1 <= args.num_train < VAL_ID_BASE:
        parser.error(f"--num-train must be between 1 and {VAL_ID_BASE - 1}, got {args.num_train}")
    if args.num_val < 1:
        parser.error(f"--num-val must be >= 1, got {args.num_val}")
    if not 16 <= args.image_size <= 1024:
        parser.error(f"--image-size must be between 16 and 1024, got {args.image_size}")
    if args.seed < 0:
        parser.error(f"--seed must be >= 0, got {args.seed}")
    for d in (args.out_dir, args.zeroshot_out):
        if d is not None and Path(d).is_file():
            parser.error(f"{d} is a file, not a directory")
    return args


def main(argv: list[str] | None = None) -> None:
    args = _parse(argv)
    start = time.perf_counter()
    if args.out_dir is not None:
        paths = generate(args.out_dir, args.num_train, args.num_val, args.image_size, args.seed)
        print(f"wrote {args.num_train} train + {args.num_val} val images ({args.image_size}px, "
              f"{CAPTIONS_PER_IMAGE} captions each) to {paths.root} in {time.perf_counter() - start:.1f}s")
    if args.zeroshot_out is not None:
        root = generate_zeroshot(args.zeroshot_out, args.zeroshot_by, args.zeroshot_per_class, args.image_size, args.seed)
        n = len((root / "classnames.txt").read_text().split())
        print(f"wrote a zero-shot ImageFolder of {n} {args.zeroshot_by} classes x {args.zeroshot_per_class} images to {root}")


if __name__ == "__main__":
    main()
