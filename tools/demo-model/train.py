"""Trains the demo model from scratch on CPU and writes an ordinary diffusers folder.

    nice -n 15 tools/fixtures/.venv-ref/bin/python tools/demo-model/train.py

Phases (a checkpoint in tools/demo-model/.work/ every few minutes; rerunning resumes):
1. VAE: AutoencoderKL trained alone on fresh random images (MSE + L1 + 1e-6 KL).
2. Latents: a fixed set of images encoded once (posterior mean and std); scaling_factor =
   1 / std of the sampled latents.
3. UNet + text encoder, jointly, epsilon objective on SD 1.5's scaled_linear schedule, with
   offset noise, Min-SNR-5 loss weighting, 10% empty captions (classifier-free guidance),
   AdamW with warmup and cosine decay, EMA weights (what gets exported).
4. Export (export.py): the EMA weights in float16, DPM++ 2M scheduler config, the real CLIP
   tokenizer; with the fine-tuned decoder of finetune_decoder.py when it exists (phase 3b).

Each phase ends at its step count or at its time budget, whichever comes first; the learning
rate follows progress = max(step / steps, elapsed / budget), so a run slowed down by other
work on the machine still finishes its cosine decay. `--vae-minutes 0 --unet-minutes 0` makes
the schedule depend on steps only (exactly reproducible).
"""

import argparse
import copy
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(ROOT / "tools" / "fixtures"))

from diffusers import (  # noqa: E402
    AutoencoderKL,
    DPMSolverMultistepScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel  # noqa: E402

from data import all_combinations, caption, held_out_prompts, make_dataset, random_sample  # noqa: E402
from models import make_tokenizer  # noqa: E402  (tools/fixtures/models.py)
from score import accuracy  # noqa: E402

PAD = "<|endoftext|>"  # SD 1.x pads with the end-of-text token


def build_vae():
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=64,
    )


def build_text_encoder():
    # As SD 1.5's CLIPTextModel (quick_gelu, eos_token_id 2: legacy argmax pooling), tiny.
    cfg = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
    )
    return CLIPTextModel(cfg)


def build_unet():
    return UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * 3,
        up_block_types=("CrossAttnUpBlock2D",) * 3,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        attention_head_dim=4,  # = number of heads in diffusers' naming
        cross_attention_dim=64,
        norm_num_groups=32,
    )


def train_scheduler_betas():
    # SD 1.5: scaled_linear from 0.00085 to 0.012 over 1000 steps.
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, 0).float()


def sampling_scheduler():
    return DPMSolverMultistepScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        algorithm_type="dpmsolver++",
        solver_order=2,
        steps_offset=1,
    )


def lr_at(progress, warm, peak, floor):
    if progress < warm:
        return peak * progress / warm
    p = min(1.0, (progress - warm) / (1 - warm))
    return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * p))


def to_tensor(imgs_uint8):
    return torch.from_numpy(imgs_uint8).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def log(msg, fh):
    line = f"[{time.strftime('%H:%M:%S')}] {msg}"
    print(line, flush=True)
    fh.write(line + "\n")
    fh.flush()


class Ckpt:
    def __init__(self, path):
        self.path = path

    def load(self):
        return torch.load(self.path, weights_only=False) if self.path.exists() else None

    def save(self, state):
        tmp = self.path.with_suffix(".tmp")
        torch.save(state, tmp)
        tmp.replace(self.path)


def make_pipe(vae, te, unet, tokenizer):
    return StableDiffusionPipeline(
        vae=vae, text_encoder=te, tokenizer=tokenizer, unet=unet, scheduler=sampling_scheduler(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


@torch.no_grad()
def evaluate(pipe, seeds=(0,), steps=20, guidance=5.0):
    prompts = held_out_prompts()
    imgs, combos = [], []
    for seed in seeds:
        out = pipe([caption(*p) for p in prompts], num_inference_steps=steps, guidance_scale=guidance,
                   generator=torch.Generator("cpu").manual_seed(seed), output_type="np").images
        imgs.extend(np.clip(out * 255 + 0.5, 0, 255).astype(np.uint8))
        combos.extend(prompts)
    return accuracy(imgs, combos)


def phase_vae(args, state, ckpt, fh):
    vae = build_vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    step, elapsed = 0, 0.0
    rng = np.random.default_rng(args.seed)
    if state and state.get("phase") == "vae":
        vae.load_state_dict(state["vae"])
        opt.load_state_dict(state["opt"])
        step, elapsed, rng = state["step"], state["elapsed"], state["rng"]
        torch.set_rng_state(state["torch_rng"])
        log(f"vae: resumed at step {step}, {elapsed/60:.1f} min", fh)
    else:
        torch.manual_seed(args.seed)
        log(f"vae: {sum(p.numel() for p in vae.parameters())/1e6:.3f}M params", fh)
    vae.train()
    budget = args.vae_minutes * 60
    t_last, t_ckpt, run = time.time(), time.time(), None
    while True:
        progress = max(step / args.vae_steps, elapsed / budget if budget else 0.0)
        if progress >= 1.0:
            break
        lr = lr_at(progress, 0.03, args.vae_lr, 0.05 * args.vae_lr)
        for g in opt.param_groups:
            g["lr"] = lr
        x = to_tensor(np.stack([random_sample(rng)[0] for _ in range(args.vae_batch)]))
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        kl = post.kl().mean() / (4 * 16 * 16)
        loss = F.mse_loss(rec, x) + F.l1_loss(rec, x) + 1e-6 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        step += 1
        now = time.time()
        elapsed += now - t_last
        t_last = now
        run = loss.item() if run is None else 0.98 * run + 0.02 * loss.item()
        if step % 50 == 0:
            log(f"vae step {step} loss {run:.5f} lr {lr:.2e} {elapsed/step:.3f} s/step, {elapsed/60:.1f} min", fh)
        if now - t_ckpt > args.ckpt_minutes * 60:
            ckpt.save(dict(phase="vae", vae=vae.state_dict(), opt=opt.state_dict(), step=step,
                           elapsed=elapsed, rng=rng, torch_rng=torch.get_rng_state()))
            t_ckpt = now
    vae.eval()
    # Reconstruction quality as judged by the scorer (a ceiling for the whole model).
    imgs, combos = make_dataset(540, seed=777)
    with torch.no_grad():
        rec = torch.cat([vae(to_tensor(imgs[i : i + 90]), sample_posterior=False).sample for i in range(0, 540, 90)])
    rec_u8 = ((rec.clamp(-1, 1) + 1) * 127.5 + 0.5).byte().permute(0, 2, 3, 1).numpy()
    acc = accuracy(rec_u8, combos)
    mse = F.mse_loss(rec, to_tensor(imgs)).item()
    log(f"vae done: {step} steps, {elapsed/60:.1f} min; recon mse {mse:.5f}; scorer on 540 reconstructions: "
        f"colour {acc['colour']:.3f} shape {acc['shape']:.3f} background {acc['background']:.3f}", fh)
    return vae, dict(vae_steps=step, vae_minutes=elapsed / 60, vae_recon_mse=mse,
                     vae_recon_colour=acc["colour"], vae_recon_shape=acc["shape"])


@torch.no_grad()
def encode_dataset(vae, args, fh):
    t0 = time.time()
    imgs, combos = make_dataset(args.n_images, seed=args.seed + 1)
    means, stds = [], []
    for i in range(0, len(imgs), 250):
        d = vae.encode(to_tensor(imgs[i : i + 250])).latent_dist
        means.append(d.mean)
        stds.append(d.std)
    mean, std = torch.cat(means), torch.cat(stds)
    g = torch.Generator().manual_seed(args.seed + 2)
    sample = mean + std * torch.randn(mean.shape, generator=g)
    sf = float(1.0 / sample.std())
    index = {c: i for i, c in enumerate(all_combinations())}
    labels = torch.tensor([index[c] for c in combos])
    log(f"latents: {len(imgs)} images encoded in {time.time()-t0:.0f} s; latent std {sample.std():.4f} "
        f"mean {sample.mean():.4f} per-channel mean {sample.mean((0, 2, 3)).tolist()}; scaling_factor {sf:.5f}", fh)
    return dict(mean=mean, std=std, labels=labels, scaling_factor=sf)


def phase_unet(args, vae, lat, state, ckpt, fh, info):
    tok = make_tokenizer(PAD)
    captions = [caption(*c) for c in all_combinations()]
    ids = tok(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    empty = tok([""], padding="max_length", max_length=77, return_tensors="pt").input_ids[0]
    alphas_cumprod = train_scheduler_betas()
    snr = alphas_cumprod / (1 - alphas_cumprod)
    weight = torch.clamp(snr, max=5.0) / snr  # Min-SNR-5 for epsilon prediction

    torch.manual_seed(args.seed + 3)
    te, unet = build_text_encoder(), build_unet()
    ema_te, ema_unet = copy.deepcopy(te).eval(), copy.deepcopy(unet).eval()
    for p in list(ema_te.parameters()) + list(ema_unet.parameters()):
        p.requires_grad_(False)
    params = list(te.parameters()) + list(unet.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-2)
    step, elapsed = 0, 0.0
    if state and state.get("phase") == "unet":
        te.load_state_dict(state["te"]); unet.load_state_dict(state["unet"])
        ema_te.load_state_dict(state["ema_te"]); ema_unet.load_state_dict(state["ema_unet"])
        opt.load_state_dict(state["opt"])
        step, elapsed = state["step"], state["elapsed"]
        torch.set_rng_state(state["torch_rng"])
        log(f"unet: resumed at step {step}, {elapsed/60:.1f} min", fh)
    else:
        log(f"unet: {sum(p.numel() for p in unet.parameters())/1e6:.3f}M params, text encoder "
            f"{sum(p.numel() for p in te.parameters())/1e6:.3f}M", fh)
    ema_pairs = list(zip(list(ema_te.parameters()) + list(ema_unet.parameters()), params))
    te.train(); unet.train()
    sf = lat["scaling_factor"]
    n = lat["mean"].shape[0]
    budget = args.unet_minutes * 60
    t_last, t_ckpt, run = time.time(), time.time(), None
    pipe = make_pipe(vae, ema_te, ema_unet, tok)
    pipe.set_progress_bar_config(disable=True)
    while True:
        progress = max(step / args.unet_steps, elapsed / budget if budget else 0.0)
        if progress >= 1.0:
            break
        lr = lr_at(progress, 0.04, args.lr, 0.02 * args.lr)
        for g in opt.param_groups:
            g["lr"] = lr
        idx = torch.randint(0, n, (args.batch,))
        z = (lat["mean"][idx] + lat["std"][idx] * torch.randn(args.batch, 4, 16, 16)) * sf
        tokens = ids[lat["labels"][idx]].clone()
        drop = torch.rand(args.batch) < args.uncond_prob
        tokens[drop] = empty
        t = torch.randint(0, 1000, (args.batch,))
        noise = torch.randn_like(z) + args.offset_noise * torch.randn(args.batch, 4, 1, 1)
        ab = alphas_cumprod[t].view(-1, 1, 1, 1)
        noisy = ab.sqrt() * z + (1 - ab).sqrt() * noise
        pred = unet(noisy, t, te(tokens)[0]).sample
        loss = ((pred - noise) ** 2).mean((1, 2, 3))
        loss = (loss * weight[t]).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in ema_pairs:
                e.lerp_(p, 1 - decay)
        now = time.time()
        elapsed += now - t_last
        t_last = now
        run = loss.item() if run is None else 0.98 * run + 0.02 * loss.item()
        if step % 50 == 0:
            log(f"unet step {step} loss {run:.5f} lr {lr:.2e} {elapsed/step:.3f} s/step, {elapsed/60:.1f} min", fh)
        if step % args.eval_every == 0:
            t0 = time.time()
            acc = evaluate(pipe)
            log(f"  eval (EMA, 18 prompts x seed 0, DPM++ 2M 20 steps, guidance 5): colour {acc['colour']:.3f} "
                f"shape {acc['shape']:.3f} background {acc['background']:.3f} ({time.time()-t0:.0f} s)", fh)
            t_last = time.time()  # evaluation time does not count against the training budget
        if now - t_ckpt > args.ckpt_minutes * 60:
            ckpt.save(dict(phase="unet", te=te.state_dict(), unet=unet.state_dict(), ema_te=ema_te.state_dict(),
                           ema_unet=ema_unet.state_dict(), opt=opt.state_dict(), step=step, elapsed=elapsed,
                           torch_rng=torch.get_rng_state(), vae=vae.state_dict(), info=info))
            t_ckpt = now
    info.update(unet_steps=step, unet_minutes=elapsed / 60)
    acc = evaluate(pipe)
    log(f"unet done: {step} steps, {elapsed/60:.1f} min; final eval colour {acc['colour']:.3f} shape {acc['shape']:.3f} "
        f"background {acc['background']:.3f}", fh)
    return ema_te, ema_unet, tok


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "models" / "demo")
    ap.add_argument("--work", type=Path, default=HERE / ".work")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--vae-steps", type=int, default=2200)
    ap.add_argument("--vae-minutes", type=float, default=20)
    ap.add_argument("--vae-batch", type=int, default=16)
    ap.add_argument("--vae-lr", type=float, default=5e-4)
    ap.add_argument("--n-images", type=int, default=24000)
    ap.add_argument("--unet-steps", type=int, default=4600)
    ap.add_argument("--unet-minutes", type=float, default=70)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--ema", type=float, default=0.999)
    ap.add_argument("--uncond-prob", type=float, default=0.1)
    ap.add_argument("--offset-noise", type=float, default=0.1)
    ap.add_argument("--eval-every", type=int, default=500)
    ap.add_argument("--ckpt-minutes", type=float, default=4)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    fh = open(args.work / "train.log", "a")
    log(f"start: {vars(args)}; torch {torch.__version__}", fh)
    t0 = time.time()
    ckpt = Ckpt(args.work / "ckpt.pt")
    state = ckpt.load()
    vae_path, lat_path = args.work / "vae_done.pt", args.work / "latents.pt"
    if vae_path.exists():
        saved = torch.load(vae_path, weights_only=False)
        vae = build_vae()
        vae.load_state_dict(saved["vae"])
        info = saved["info"]
        log("vae: loaded the finished phase", fh)
    else:
        vae, info = phase_vae(args, state, ckpt, fh)
        torch.save(dict(vae=vae.state_dict(), info=info), vae_path)
    vae.eval().requires_grad_(False)
    if lat_path.exists():
        lat = torch.load(lat_path, weights_only=False)
    else:
        lat = encode_dataset(vae, args, fh)
        torch.save(lat, lat_path)
    info["scaling_factor"] = lat["scaling_factor"]
    vae.register_to_config(scaling_factor=lat["scaling_factor"])
    te, unet, _ = phase_unet(args, vae, lat, state, ckpt, fh, info)
    info.update(torch=torch.__version__, args={k: str(v) for k, v in vars(args).items()})
    torch.save(dict(te=te.state_dict(), unet=unet.state_dict(), vae=vae.state_dict(), info=info),
               args.work / "final_f32.pt")
    from export import main as export_main  # phase 4 (also run alone after finetune_decoder.py)

    export_main(args.work, args.out)
    log(f"total {(time.time()-t0)/60:.1f} min (this invocation)", fh)


if __name__ == "__main__":
    main()
