"""Samples the committed demo model with diffusers, measures it with the scorer, writes the
sample grid and the reference tensors for the Rust tests.

    tools/fixtures/.venv-ref/bin/python tools/demo-model/sample.py [--seeds 8] [--sweep]

- accuracy: every held-out prompt (data.held_out_prompts: 18 = 6 colours x 3 shapes) x seeds
  0..N-1, each image generated alone as the `sd` CLI does (batch 1,
  generator=torch.Generator("cpu").manual_seed(seed)), at the default settings below;
- docs/img/demo-grid.png: rows = colours, columns = shapes x seeds 0-2;
- tests/fixtures/refs/demo_pipeline.safetensors: see REF_CASES and write_refs();
- --sweep: accuracy at other step counts / guidance scales (for choosing the defaults).
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(ROOT / "tools" / "fixtures"))

from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline  # noqa: E402

from common import save_tensors  # noqa: E402  (tools/fixtures/common.py)
from data import COLOURS, SHAPES, caption, held_out_prompts, render  # noqa: E402
from score import accuracy, largest_component, score_image  # noqa: E402

MODEL = ROOT / "models" / "demo"
# The `sd` CLI defaults for this model (see docs/demo-model.md).
STEPS = 20
GUIDANCE = 5.0
SIZE = 64
REF_CASES = [("a red circle on a white background", 0), ("a blue triangle on a black background", 1),
             ("a yellow square on a gray background", 2)]
IMG2IMG = dict(init=("red", "circle", "white", 28, 10, 18), prompt="a blue circle on a white background",
               strength=0.7, seed=0)


def load(model=MODEL):
    pipe = StableDiffusionPipeline.from_pretrained(model, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def to_u8(x):
    """[N, 3, H, W] float in [0, 1] (the pipeline's output_type="pt") -> uint8 [N, H, W, 3]."""
    return (x.clamp(0, 1) * 255 + 0.5).to(torch.uint8).permute(0, 2, 3, 1).numpy()


@torch.no_grad()
def generate(pipe, prompts, seeds, steps=STEPS, guidance=GUIDANCE, batch=18):
    """One image per (prompt, seed), each from its own generator (= batch-1 runs)."""
    jobs = [(p, s) for s in seeds for p in prompts]
    out = []
    for i in range(0, len(jobs), batch):
        chunk = jobs[i : i + batch]
        gens = [torch.Generator("cpu").manual_seed(s) for _, s in chunk]
        imgs = pipe([caption(*p) for p, _ in chunk], num_inference_steps=steps, guidance_scale=guidance,
                    height=SIZE, width=SIZE, generator=gens, output_type="pt").images
        out.extend(to_u8(imgs))
    return out, jobs


def report(pipe, seeds, steps=STEPS, guidance=GUIDANCE, verbose=False):
    prompts = held_out_prompts()
    imgs, jobs = generate(pipe, prompts, seeds, steps, guidance)
    acc = accuracy(imgs, [p for p, _ in jobs])
    if verbose:
        for (p, s), r in zip(jobs, acc["rows"]):
            if not (r["colour_ok"] and r["shape_ok"]):
                print(f"  miss: {caption(*p)!r} seed {s}: got colour {r['colour']} shape {r['shape']} "
                      f"({r['pixels']} px)")
    return acc, imgs, jobs


def per_group(acc, jobs):
    out = {}
    for key, pos in (("colour", 0), ("shape", 1), ("background", 2)):
        for name in sorted({p[pos] for p, _ in jobs}):
            rows = [r for (p, _), r in zip(jobs, acc["rows"]) if p[pos] == name]
            out[f"{key}={name}"] = (sum(r["colour_ok"] for r in rows) / len(rows),
                                    sum(r["shape_ok"] for r in rows) / len(rows))
    return out


def grid(imgs, jobs, path, seeds=(0, 1, 2), pad=2):
    by = {(p, s): im for (p, s), im in zip(jobs, imgs)}
    prompts = held_out_prompts()
    rows = list(COLOURS)
    cols = [(sh, s) for sh in SHAPES for s in seeds]
    W, H = len(cols) * (SIZE + pad) + pad, len(rows) * (SIZE + pad) + pad
    canvas = np.full((H, W, 3), 255, np.uint8)
    for i, c in enumerate(rows):
        for j, (sh, s) in enumerate(cols):
            p = next(q for q in prompts if q[0] == c and q[1] == sh)
            y, x = pad + i * (SIZE + pad), pad + j * (SIZE + pad)
            canvas[y : y + SIZE, x : x + SIZE] = by[(p, s)]
    path.parent.mkdir(parents=True, exist_ok=True)
    # 256-colour palette PNG: a third of the size, no visible difference at this scale
    Image.fromarray(canvas).quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(path, optimize=True)


@torch.no_grad()
def write_refs(pipe, path):
    """Exactly what `sd txt2img --prompt P --seed S` must reproduce with the defaults (batch 1,
    empty negative prompt, DPM++ 2M from the model's scheduler_config.json, 20 steps, guidance 5,
    64x64), plus one image-to-image case."""
    t = {}
    cases = []
    for k, (prompt, seed) in enumerate(REF_CASES):
        g = torch.Generator("cpu").manual_seed(seed)
        init = torch.randn((1, 4, SIZE // 4, SIZE // 4), generator=torch.Generator("cpu").manual_seed(seed))
        pe, ne = pipe.encode_prompt(prompt, "cpu", 1, True, None)
        lat = pipe(prompt, num_inference_steps=STEPS, guidance_scale=GUIDANCE, height=SIZE, width=SIZE,
                   generator=g, output_type="latent").images
        img = pipe.vae.decode(lat / pipe.vae.config.scaling_factor).sample
        img = (img / 2 + 0.5).clamp(0, 1)
        g = torch.Generator("cpu").manual_seed(seed)
        img2 = pipe(prompt, num_inference_steps=STEPS, guidance_scale=GUIDANCE, height=SIZE, width=SIZE,
                    generator=g, output_type="pt").images
        assert torch.allclose(img, img2, atol=1e-6), (img - img2).abs().max()
        t[f"txt2img.{k}.initial_latents"] = init
        t[f"txt2img.{k}.prompt_embeds"] = pe
        if k == 0:
            t["negative_prompt_embeds"] = ne  # the empty prompt's, shared by all cases
        else:
            assert torch.equal(ne, t["negative_prompt_embeds"])
        t[f"txt2img.{k}.final_latents"] = lat
        t[f"txt2img.{k}.image"] = img2
        r = score_image(to_u8(img2)[0])
        cases.append(dict(index=k, prompt=prompt, seed=seed, scored_colour=r["colour"], scored_shape=r["shape"]))
    # image-to-image: a drawn red circle -> "a blue circle", strength 0.7
    i2i = StableDiffusionImg2ImgPipeline(**pipe.components)
    i2i.set_progress_bar_config(disable=True)
    c, s, b, side, x0, y0 = IMG2IMG["init"]
    init_img = render(c, s, b, side, x0, y0)
    init_t = torch.from_numpy(np.array(init_img)).permute(2, 0, 1)[None].float() / 255
    g = torch.Generator("cpu").manual_seed(IMG2IMG["seed"])
    out = i2i(IMG2IMG["prompt"], image=init_t, strength=IMG2IMG["strength"], num_inference_steps=STEPS,
              guidance_scale=GUIDANCE, generator=g, output_type="pt").images
    t["img2img.init_image"] = init_t
    t["img2img.image"] = out
    r = score_image(to_u8(out)[0])
    (cx0, cy0), (cx1, cy1) = centroid(init_img), centroid(to_u8(out)[0])
    moved = float(np.hypot(cx1 - cx0, cy1 - cy0))
    meta = {
        "description": "demo model (models/demo) through diffusers' StableDiffusionPipeline at the sd CLI defaults: "
                       f"DPMSolverMultistepScheduler (DPM++ 2M, model's scheduler_config.json), {STEPS} steps, "
                       f"guidance {GUIDANCE}, {SIZE}x{SIZE}, empty negative prompt, batch 1, "
                       "generator=torch.Generator('cpu').manual_seed(seed). txt2img.K.*: initial_latents [1,4,16,16] "
                       "(torch.randn from the seed), prompt_embeds [1,77,64] (negative_prompt_embeds: the empty prompt's, shared), final_latents (before "
                       "VAE decoding, unscaled = output_type='latent'), image [1,3,64,64] in [0,1] (output_type='pt'). "
                       "img2img: StableDiffusionImg2ImgPipeline on init_image [1,3,64,64] in [0,1] (a drawn red circle, "
                       f"side {side} at x={x0}, y={y0}), prompt {IMG2IMG['prompt']!r}, strength {IMG2IMG['strength']}, "
                       f"seed {IMG2IMG['seed']}, same steps and guidance.",
        "cases": json.dumps(cases),
        "img2img": json.dumps(dict(IMG2IMG, scored_colour=r["colour"], scored_shape=r["shape"], centre_moved_px=moved)),
    }
    save_tensors(t, path, meta)
    return cases, r, moved


def centroid(img):
    """Centre (x, y) of the scorer's object (its largest foreground component)."""
    a = np.asarray(img, np.float64)
    h, w, _ = a.shape
    frame = np.ones((h, w), bool)
    frame[2 : h - 2, 2 : w - 2] = False
    obj = largest_component(np.sqrt(((a - np.median(a[frame], axis=0)) ** 2).sum(-1)) > 60)
    ys, xs = np.nonzero(obj)
    return (float(xs.mean()), float(ys.mean())) if len(xs) else (float("nan"),) * 2


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, default=MODEL)
    ap.add_argument("--seeds", type=int, default=8)
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--grid", type=Path, default=ROOT / "docs" / "img" / "demo-grid.png")
    ap.add_argument("--refs", type=Path, default=ROOT / "tests" / "fixtures" / "refs" / "demo_pipeline.safetensors")
    args = ap.parse_args()
    torch.set_num_threads(2)
    pipe = load(args.model)
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    acc, imgs, jobs = report(pipe, seeds, verbose=True)
    n = len(jobs)
    print(f"held-out: {len(held_out_prompts())} prompts x {len(seeds)} seeds = {n} images, DPM++ 2M {STEPS} steps, "
          f"guidance {GUIDANCE}: colour {acc['colour']:.3f} shape {acc['shape']:.3f} background {acc['background']:.3f}")
    for s in seeds:
        rows = [r for (_, sd), r in zip(jobs, acc["rows"]) if sd == s]
        print(f"  seed {s}: colour {sum(r['colour_ok'] for r in rows)}/{len(rows)} shape {sum(r['shape_ok'] for r in rows)}/{len(rows)}")
    for k, (c, s) in per_group(acc, jobs).items():
        print(f"  {k}: colour {c:.2f} shape {s:.2f}")
    if args.sweep:
        for steps, g in [(20, 3.0), (20, 7.5), (10, 5.0), (30, 5.0), (50, 7.5)]:
            a, _, _ = report(pipe, seeds, steps, g)
            print(f"sweep: steps {steps} guidance {g}: colour {a['colour']:.3f} shape {a['shape']:.3f}")
    if args.no_write:
        return
    grid(imgs, jobs, args.grid, seeds=tuple(seeds[:3]))
    cases, r, moved = write_refs(pipe, args.refs)
    print("refs:", cases)
    print(f"img2img: scored colour {r['colour']} shape {r['shape']}; object centre moved by {moved:.1f} px")


if __name__ == "__main__":
    main()
