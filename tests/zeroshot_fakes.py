"""A model whose zero-shot answers can be worked out by hand, for tests/test_zeroshot.py.

Images are 24x24 with 6 vertical stripes of 4 pixels; the image feature is each stripe's mean
brightness. Class k is named `c<k>`; the prompt `t<j> c<k>` encodes to e_k, plus 0.5 e_{k+1}
for template 1, so the template average matters. Everything runs in float64.
"""
import re

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

NUM_CLASSES = 6
SIDE = 24
TEMPLATES = ["t0 {}", "t1 {}"]
CLASSNAMES = [f"c{k}" for k in range(NUM_CLASSES)]


def to_tensor(im: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(im, dtype=np.float64) / 255.0).permute(2, 0, 1)


def tokenize(texts):
    """[N, 2] = (template index, class index) read back from the prompt."""
    rows = []
    for t in texts:
        m = re.fullmatch(r"t(\d) c(\d+)", t)
        rows.append([int(m.group(1)), int(m.group(2))])
    return torch.tensor(rows)


class StripeModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.logit_scale = torch.nn.Parameter(torch.zeros((), dtype=torch.float64))

    def encode_image(self, images, normalize=False):
        f = images.double().mean(dim=(1, 2)).reshape(images.shape[0], NUM_CLASSES, SIDE // NUM_CLASSES).mean(-1)
        return F.normalize(f, dim=-1) if normalize else f

    def encode_text(self, tokens, normalize=False):
        eye = torch.eye(NUM_CLASSES, dtype=torch.float64)
        t, k = tokens[:, 0], tokens[:, 1]
        f = eye[k] + 0.5 * (t == 1).double().unsqueeze(1) * eye[(k + 1) % NUM_CLASSES]
        return F.normalize(f, dim=-1) if normalize else f


def write_stripes(root, n: int, seed: int):
    """n PNG images filed under c<label>/; half labelled with their brightest stripe, half at
    random, so top-1 is neither 0 nor 1. Returns [(path, label)]."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        levels = rng.uniform(0.0, 1.0, NUM_CLASSES)
        label = int(levels.argmax()) if i % 2 == 0 else int(rng.integers(NUM_CLASSES))
        pixels = np.repeat(np.repeat(levels, SIDE // NUM_CLASSES)[None, :], SIDE, axis=0)
        rgb = np.stack([pixels] * 3, axis=-1)
        folder = root / f"c{label}"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{i:04d}.png"
        Image.fromarray((rgb * 255).round().astype(np.uint8)).save(path)
        out.append((path, label))
    for k in range(NUM_CLASSES):  # every class has a folder, even an empty one
        (root / f"c{k}").mkdir(parents=True, exist_ok=True)
    return out
