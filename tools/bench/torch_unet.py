"""PyTorch twin of examples/unet_bench.rs: times diffusers' UNet2DConditionModel on the CPU.

    tools/fixtures/.venv-ref/bin/python tools/bench/torch_unet.py --config sd15 --latent 64 \
        --batch 2 --dtype f32 --runs 3 --warmup 1

Same flags and the same last line as the Rust example:
`SUMMARY median_s=<s> min_s=<s> gflop=<GFLOP of one forward> peak_rss_mib=<VmHWM>`.
`--config sd15|sd21|sdxl|refiner` builds the real config (crates/sd-unet/tests/data) with
diffusers' default random initialisation; `--model DIR` loads a diffusers `unet/` folder.
GFLOP is what torch's FlopCounterMode counts for one forward (on the meta device, so it costs
nothing); sd-unet's analytic count equals it. Threads are set to the core count.
"""

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parent.parent.parent
CONFIGS = {
    "sd15": "sd15_unet_config.json",
    "sd21": "sd21_unet_config.json",
    "sdxl": "sdxl_base_unet_config.json",
    "refiner": "sdxl_refiner_unet_config.json",
}
DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
SEQ_LEN = 77


def peak_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def inputs(config, batch, latent, dtype, device=None):
    g = torch.Generator().manual_seed(1)
    kw = dict(dtype=dtype, device=device)
    sample = torch.randn(batch, config.in_channels, latent, latent, generator=g).to(**kw)
    ehs = torch.randn(batch, SEQ_LEN, config.cross_attention_dim, generator=g).to(**kw)
    added = None
    if config.addition_embed_type == "text_time":
        # Only the shapes matter for timing: 6 time ids (SDXL base) when they fit, else 5.
        d, p = config.addition_time_embed_dim, config.projection_class_embeddings_input_dim
        n = 6 if p > 6 * d else 5
        added = {
            "text_embeds": torch.randn(batch, p - n * d, generator=g).to(**kw),
            "time_ids": torch.tensor(([1024.0, 0.0] * 3)[:n], **kw).repeat(batch, 1),
        }
    return sample, ehs, added


def gflop(config_dict, batch, latent):
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config_dict)
        sample, ehs, added = inputs(unet.config, batch, latent, torch.float32, "meta")
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            unet(sample, 999.0, encoder_hidden_states=ehs, added_cond_kwargs=added)
    return counter.get_total_flops() / 1e9


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="sd15", choices=sorted(CONFIGS))
    ap.add_argument("--model", type=Path)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--latent", type=int, default=64)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--dtype", default="f32", choices=sorted(DTYPES))
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count())
    dtype = DTYPES[args.dtype]

    t0 = time.perf_counter()
    if args.model:
        unet = UNet2DConditionModel.from_pretrained(args.model, torch_dtype=dtype)
        config_dict = dict(unet.config)
        what = str(args.model)
    else:
        config_dict = json.loads((ROOT / "crates/sd-unet/tests/data" / CONFIGS[args.config]).read_text())
        torch.manual_seed(0)
        unet = UNet2DConditionModel.from_config(config_dict).to(dtype)
        what = args.config
    unet.eval()
    print(f"model {what} ({args.dtype}, cpu, {torch.get_num_threads()} threads) built in "
          f"{time.perf_counter() - t0:.1f} s; batch {args.batch}, latent {args.latent}x{args.latent}, "
          f"{SEQ_LEN} tokens", flush=True)
    sample, ehs, added = inputs(unet.config, args.batch, args.latent, dtype)
    gf = gflop(config_dict, args.batch, args.latent)

    times = []
    with torch.inference_mode():
        for i in range(args.warmup + args.runs):
            t = time.perf_counter()
            unet(sample, 999.0, encoder_hidden_states=ehs, added_cond_kwargs=added)
            dt = time.perf_counter() - t
            if i < args.warmup:
                print(f"warmup {i + 1}: {dt:.3f} s", flush=True)
            else:
                print(f"run {i + 1 - args.warmup}: {dt:.3f} s ({gf / dt:.1f} GFLOP/s)", flush=True)
                times.append(dt)
    print(f"SUMMARY median_s={statistics.median(times):.4f} min_s={min(times):.4f} gflop={gf:.1f} "
          f"peak_rss_mib={peak_rss_mib():.0f}")


if __name__ == "__main__":
    main()
