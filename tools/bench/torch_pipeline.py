"""PyTorch twin of examples/pipeline_bench.rs: a whole text-to-image generation with diffusers
components on the CPU (CLIP text encoder on the prompt and negative prompt, `--steps` UNet
evaluations with classifier-free guidance and Euler steps, VAE decode).

    tools/fixtures/.venv-ref/bin/python tools/bench/torch_pipeline.py --config sd15 --size 512 \
        --steps 20 --dtype f32
    tools/fixtures/.venv-ref/bin/python tools/bench/torch_pipeline.py --config sdxl --stage vae \
        --size 1024 --dtype bf16

Same flags and the same last line as the Rust example:
`SUMMARY total_s=<s> unet_s=<s> vae_s=<s> text_s=<s> peak_rss_mib=<VmHWM>`.
The components are built from the same real configs (examples/configs, crates/*/tests/data)
with the libraries' default random initialisation; timing does not depend on the values.
"""

import argparse
import json
import os
import time
from pathlib import Path

import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

ROOT = Path(__file__).resolve().parent.parent.parent
DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
SEQ_LEN = 77


def peak_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def load_json(path):
    return {k: v for k, v in json.loads(Path(path).read_text()).items() if not k.startswith("_")}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--config", default="sd15", choices=["sd15", "sdxl"])
    p.add_argument("--stage", default="all", choices=["all", "vae"])
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--dtype", default="f32", choices=list(DTYPES))
    p.add_argument("--tile", action="store_true")
    a = p.parse_args()
    if a.config != "sd15" and a.stage == "all":
        raise SystemExit(f"--config {a.config}: only sd15 has the whole pipeline here (use --stage vae)")
    torch.set_num_threads(os.cpu_count() or 1)
    dtype = DTYPES[a.dtype]
    latent = a.size // 8
    g = torch.Generator().manual_seed(1)

    vae_cfg = load_json(ROOT / "examples/configs" / f"{a.config}_vae_config.json")
    vae = AutoencoderKL.from_config(vae_cfg).to(dtype).eval()
    if a.tile:
        vae.enable_tiling()
    text_s = unet_s = 0.0
    with torch.inference_mode():
        if a.stage == "vae":
            latents = torch.randn(1, 4, latent, latent, generator=g).to(dtype)
        else:
            te_cfg = CLIPTextConfig(**load_json(ROOT / "examples/configs/sd15_text_encoder_config.json"))
            text_encoder = CLIPTextModel(te_cfg).to(dtype).eval()
            unet = UNet2DConditionModel.from_config(
                load_json(ROOT / "crates/sd-unet/tests/data/sd15_unet_config.json")
            ).to(dtype).eval()
            scheduler = EulerDiscreteScheduler.from_config(
                load_json(ROOT / "crates/sd-schedulers/tests/data/sd15_scheduler_config.json")
            )
            print(f"models built; {a.steps} steps at {a.size}x{a.size}, {a.dtype}", flush=True)

            t = time.perf_counter()
            ids = torch.full((2, SEQ_LEN), 49407, dtype=torch.long)
            ids[:, 0] = 49406
            ids[1, 1:21] = torch.arange(321, 341)
            context = text_encoder(ids)[0]
            text_s = time.perf_counter() - t

            t = time.perf_counter()
            scheduler.set_timesteps(a.steps)
            x = torch.randn(1, 4, latent, latent, generator=g) * scheduler.init_noise_sigma
            for ts in scheduler.timesteps:
                inp = scheduler.scale_model_input(torch.cat([x, x]), ts).to(dtype)
                eps = unet(inp, ts, encoder_hidden_states=context).sample.float()
                uncond, cond = eps.chunk(2)
                x = scheduler.step(uncond + 7.5 * (cond - uncond), ts, x, generator=g).prev_sample
            unet_s = time.perf_counter() - t
            print(f"text {text_s:.2f} s, {a.steps} UNet steps {unet_s:.2f} s", flush=True)
            latents = (x / vae.config.scaling_factor).to(dtype)

        t = time.perf_counter()
        vae.decode(latents).sample
        vae_s = time.perf_counter() - t
    print(f"vae decode {vae_s:.2f} s")
    print(
        f"SUMMARY total_s={text_s + unet_s + vae_s:.3f} unet_s={unet_s:.3f} vae_s={vae_s:.3f} "
        f"text_s={text_s:.3f} peak_rss_mib={peak_rss_mib():.0f}"
    )


if __name__ == "__main__":
    main()
