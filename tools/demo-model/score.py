"""The scorer: what colour and what shape is the object in a generated 64x64 image?

Algorithm (ported as-is to the Rust functional test; all colour maths on 0..255 floats):
1. Background = per-channel median of the 2-pixel border frame (the 4*2*64 - 16 = 496 pixels
   with x < 2, x >= 62, y < 2 or y >= 62).
2. Foreground mask = pixels whose Euclidean RGB distance from the background is > 60.
3. Object = the largest 4-connected component of the mask (ties: the first found in
   row-major order). Fewer than 30 pixels: "no object" (scored wrong for both colour and shape).
4. Colour = the per-channel median of the object's pixels, then the nearest palette colour
   (Euclidean RGB) among the six.
5. Shape = the bounding box of the object (inclusive min/max row and column; w, h = extents);
   each pixel of the box is tested against three templates inscribed in the box, using the
   pixel centre u = (x - x0 + 0.5) / w, v = (y - y0 + 0.5) / h:
   square: always inside; circle: (u - 0.5)^2 + (v - 0.5)^2 <= 0.25;
   triangle (apex up): |u - 0.5| <= 0.5 * v.
   IoU(template, object pixels within the box); the shape is the template with the largest IoU
   (ties: square, circle, triangle order).
Also reported: background name = nearest of white/black/gray to the border median.
"""

import numpy as np

from data import BACKGROUNDS, COLOURS

BORDER = 2
THRESHOLD = 60.0
MIN_PIXELS = 30
SHAPE_ORDER = ["square", "circle", "triangle"]


def nearest(rgb, table):
    names = list(table)
    d = [float(np.sum((np.asarray(table[n], np.float64) - rgb) ** 2)) for n in names]
    return names[int(np.argmin(d))]


def largest_component(mask: np.ndarray) -> np.ndarray:
    h, w = mask.shape
    seen = np.zeros_like(mask, dtype=bool)
    best = []
    for y in range(h):
        for x in range(w):
            if not mask[y, x] or seen[y, x]:
                continue
            comp = []
            stack = [(y, x)]
            seen[y, x] = True
            while stack:
                cy, cx = stack.pop()
                comp.append((cy, cx))
                for ny, nx in ((cy - 1, cx), (cy + 1, cx), (cy, cx - 1), (cy, cx + 1)):
                    if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                        seen[ny, nx] = True
                        stack.append((ny, nx))
            if len(comp) > len(best):
                best = comp
    out = np.zeros_like(mask, dtype=bool)
    for y, x in best:
        out[y, x] = True
    return out


def templates(w: int, h: int):
    u = (np.arange(w) + 0.5) / w
    v = (np.arange(h) + 0.5) / h
    U, V = np.meshgrid(u, v)
    return {
        "square": np.ones((h, w), bool),
        "circle": (U - 0.5) ** 2 + (V - 0.5) ** 2 <= 0.25,
        "triangle": np.abs(U - 0.5) <= 0.5 * V,
    }


def score_image(img) -> dict:
    """img: uint8 or float array [64, 64, 3] in 0..255. Returns colour, shape, background (or None)."""
    a = np.asarray(img, dtype=np.float64)
    h, w, _ = a.shape
    frame = np.ones((h, w), bool)
    frame[BORDER : h - BORDER, BORDER : w - BORDER] = False
    bg = np.median(a[frame], axis=0)
    dist = np.sqrt(np.sum((a - bg) ** 2, axis=-1))
    obj = largest_component(dist > THRESHOLD)
    res = {"background": nearest(bg, BACKGROUNDS), "colour": None, "shape": None, "pixels": int(obj.sum())}
    if obj.sum() < MIN_PIXELS:
        return res
    res["colour"] = nearest(np.median(a[obj], axis=0), COLOURS)
    ys, xs = np.nonzero(obj)
    y0, y1, x0, x1 = ys.min(), ys.max(), xs.min(), xs.max()
    box = obj[y0 : y1 + 1, x0 : x1 + 1]
    ious = {}
    for name, t in templates(x1 - x0 + 1, y1 - y0 + 1).items():
        ious[name] = (box & t).sum() / (box | t).sum()
    res["shape"] = max(SHAPE_ORDER, key=lambda n: (ious[n], -SHAPE_ORDER.index(n)))
    res["ious"] = {k: float(v) for k, v in ious.items()}
    return res


def accuracy(images, combos):
    """Fractions of colour, shape and background matches, plus per-item results."""
    rows = []
    for img, (c, s, b) in zip(images, combos):
        r = score_image(img)
        rows.append(dict(r, want=(c, s, b), colour_ok=r["colour"] == c, shape_ok=r["shape"] == s,
                         background_ok=r["background"] == b))
    n = max(len(rows), 1)
    return {
        "colour": sum(r["colour_ok"] for r in rows) / n,
        "shape": sum(r["shape_ok"] for r in rows) / n,
        "background": sum(r["background_ok"] for r in rows) / n,
        "rows": rows,
    }


if __name__ == "__main__":
    # Validate the scorer on ground truth: 3,000 random training-style images.
    from data import make_dataset

    imgs, combos = make_dataset(3000, seed=12345)
    acc = accuracy(imgs, combos)
    print(f"ground truth: colour {acc['colour']:.4f} shape {acc['shape']:.4f} background {acc['background']:.4f}")
    bad = [r for r in acc["rows"] if not (r["colour_ok"] and r["shape_ok"] and r["background_ok"])]
    for r in bad[:10]:
        print(r)
