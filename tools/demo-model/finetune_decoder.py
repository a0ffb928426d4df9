"""Phase 3b: fine-tunes the VAE decoder (and post_quant_conv) with the encoder frozen.

    nice -n 15 tools/fixtures/.venv-ref/bin/python tools/demo-model/finetune_decoder.py --minutes 50

The encoder defines the latent space the UNet learns, so it must not change once the UNet phase
has started; the decoder can keep improving independently, and runs alongside the UNet phase
(one thread) because on a shared 2-core machine the first VAE phase got too little CPU
(its reconstructions scored ~80% colour / ~82% shape). Trained on fresh random images,
decoding posterior samples (not the mean), MSE + L1, AdamW with warmup and cosine decay.
Writes tools/demo-model/.work/decoder_ft.pt (checkpointed; rerunning resumes).
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from data import make_dataset, random_sample  # noqa: E402
from score import accuracy  # noqa: E402
from train import Ckpt, build_vae, log, lr_at, to_tensor  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, default=HERE / ".work")
    ap.add_argument("--minutes", type=float, default=50)
    ap.add_argument("--steps", type=int, default=6000)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=10)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    fh = open(args.work / "decoder.log", "a")
    vae = build_vae()
    vae.load_state_dict(torch.load(args.work / "vae_done.pt", weights_only=False)["vae"])
    vae.eval()
    dec_params = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    for p in vae.parameters():
        p.requires_grad_(False)
    for p in dec_params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(dec_params, lr=args.lr, weight_decay=0.0)
    ckpt = Ckpt(args.work / "decoder_ckpt.pt")
    state = ckpt.load()
    step, elapsed, rng = 0, 0.0, np.random.default_rng(args.seed)
    torch.manual_seed(args.seed)
    if state:
        vae.load_state_dict(state["vae"])
        opt.load_state_dict(state["opt"])
        step, elapsed, rng = state["step"], state["elapsed"], state["rng"]
        log(f"decoder: resumed at step {step}", fh)
    log(f"decoder fine-tune: {vars(args)}", fh)
    budget = args.minutes * 60
    t_last = t_ckpt = time.time()
    run = None
    vae.decoder.train()
    while True:
        progress = max(step / args.steps, elapsed / budget if budget else 0.0)
        if progress >= 1:
            break
        lr = lr_at(progress, 0.03, args.lr, 0.02 * args.lr)
        for g in opt.param_groups:
            g["lr"] = lr
        x = to_tensor(np.stack([random_sample(rng)[0] for _ in range(args.batch)]))
        with torch.no_grad():
            z = vae.encode(x).latent_dist.sample()
        rec = vae.decode(z).sample
        loss = F.mse_loss(rec, x) + F.l1_loss(rec, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(dec_params, 1.0)
        opt.step()
        step += 1
        now = time.time()
        elapsed += now - t_last
        t_last = now
        run = loss.item() if run is None else 0.98 * run + 0.02 * loss.item()
        if step % 50 == 0:
            log(f"decoder step {step} loss {run:.5f} lr {lr:.2e} {elapsed/step:.3f} s/step {elapsed/60:.1f} min", fh)
        if now - t_ckpt > 240:
            ckpt.save(dict(vae=vae.state_dict(), opt=opt.state_dict(), step=step, elapsed=elapsed, rng=rng))
            torch.save(dict(vae=vae.state_dict(), step=step), args.work / "decoder_ft.pt")
            t_ckpt = now
    vae.eval()
    imgs, combos = make_dataset(540, seed=777)
    with torch.no_grad():
        rec = torch.cat([vae(to_tensor(imgs[i : i + 90]), sample_posterior=False).sample for i in range(0, 540, 90)])
    u8 = ((rec.clamp(-1, 1) + 1) * 127.5 + 0.5).byte().permute(0, 2, 3, 1).numpy()
    acc = accuracy(u8, combos)
    mse = F.mse_loss(rec, to_tensor(imgs)).item()
    log(f"decoder done: {step} steps, {elapsed/60:.1f} min; recon mse {mse:.5f}; scorer on 540 reconstructions: "
        f"colour {acc['colour']:.3f} shape {acc['shape']:.3f} background {acc['background']:.3f}", fh)
    torch.save(dict(vae=vae.state_dict(), step=step, recon=dict(mse=mse, colour=acc["colour"], shape=acc["shape"])),
               args.work / "decoder_ft.pt")


if __name__ == "__main__":
    main()
