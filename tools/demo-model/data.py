"""The procedural captioned data set of the demo model: palette, shapes, captions, rendering,
and the held-out evaluation prompts.

Every image is 64x64 RGB: one flat-coloured shape (circle, square or upright triangle, each
inscribed in a square bounding box of side 20-40 px at a random position) on a plain
background, drawn at 4x and box-downsampled (anti-aliased). Caption:
"a {colour} {shape} on a {background} background".
"""

import numpy as np
from PIL import Image, ImageDraw

# Six hues 60 degrees apart (well separated in RGB, and from the three backgrounds).
COLOURS = {
    "red": (225, 25, 25),
    "yellow": (245, 215, 30),
    "green": (30, 170, 50),
    "cyan": (30, 200, 215),
    "blue": (35, 70, 225),
    "purple": (170, 40, 200),
}
SHAPES = ["circle", "square", "triangle"]
BACKGROUNDS = {"white": (255, 255, 255), "black": (0, 0, 0), "gray": (128, 128, 128)}

SIZE = 64
MIN_SIDE, MAX_SIDE = 20, 40
MARGIN = 3
SUPERSAMPLE = 4


def caption(colour: str, shape: str, background: str) -> str:
    return f"a {colour} {shape} on a {background} background"


def all_combinations():
    return [(c, s, b) for c in COLOURS for s in SHAPES for b in BACKGROUNDS]


def held_out_prompts():
    """The evaluation list: every colour x shape once (18 prompts), the background rotating so
    that each background appears 6 times and with every colour and every shape twice."""
    bgs = list(BACKGROUNDS)
    out = []
    for i, c in enumerate(COLOURS):
        for j, s in enumerate(SHAPES):
            out.append((c, s, bgs[(i + j) % 3]))
    return out


def render(colour: str, shape: str, background: str, side: int, x0: int, y0: int) -> np.ndarray:
    """One image as uint8 [64, 64, 3]. The shape fills the square box [x0, x0+side) x [y0, y0+side)."""
    k = SUPERSAMPLE
    img = Image.new("RGB", (SIZE * k, SIZE * k), BACKGROUNDS[background])
    d = ImageDraw.Draw(img)
    fill = COLOURS[colour]
    a, b = x0 * k, y0 * k
    e = side * k - 1
    if shape == "circle":
        d.ellipse([a, b, a + e, b + e], fill=fill)
    elif shape == "square":
        d.rectangle([a, b, a + e, b + e], fill=fill)
    elif shape == "triangle":
        d.polygon([(a + e / 2, b), (a + e, b + e), (a, b + e)], fill=fill)
    else:
        raise ValueError(shape)
    return np.asarray(img.resize((SIZE, SIZE), Image.BOX))


def random_sample(rng: np.random.Generator, combo=None):
    """(image uint8 [64,64,3], (colour, shape, background)) with a random size and position."""
    if combo is None:
        combos = all_combinations()
        combo = combos[rng.integers(len(combos))]
    side = int(rng.integers(MIN_SIDE, MAX_SIDE + 1))
    x0 = int(rng.integers(MARGIN, SIZE - MARGIN - side + 1))
    y0 = int(rng.integers(MARGIN, SIZE - MARGIN - side + 1))
    return render(*combo, side, x0, y0), combo


def make_dataset(n: int, seed: int):
    """n images with balanced combinations (uint8 [n, 64, 64, 3]) and their combos."""
    rng = np.random.default_rng(seed)
    combos = all_combinations()
    order = [combos[i % len(combos)] for i in range(n)]
    rng.shuffle(order)
    imgs = np.stack([random_sample(rng, c)[0] for c in order])
    return imgs, order
