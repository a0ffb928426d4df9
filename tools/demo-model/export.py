"""Phase 4: writes models/demo/ from the trained weights (float16 safetensors, ~13.5 MB).

    tools/fixtures/.venv-ref/bin/python tools/demo-model/export.py

Reads tools/demo-model/.work/final_f32.pt (EMA text encoder and UNet, VAE with its scaling
factor, from train.py) and, when present, .work/decoder_ft.pt (the fine-tuned decoder from
finetune_decoder.py, whose encoder is the same frozen one). Writes an ordinary diffusers folder:
model_index.json, scheduler/ (DPM++ 2M), tokenizer/ (vocab.json, merges.txt,
special_tokens_map.json, tokenizer_config.json: the real CLIP vocabulary), text_encoder/,
unet/, vae/; and the training record tools/demo-model/training.json.
"""

import json
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(HERE))

from train import PAD, build_text_encoder, build_unet, build_vae, make_pipe  # noqa: E402
from models import make_tokenizer, write_legacy_tokenizer  # noqa: E402  (tools/fixtures/models.py)


def clean_scheduler_config(path: Path):
    """diffusers writes lambda_min_clipped = -inf as the non-JSON token -Infinity; drop it (absent
    means the same default) so that strict JSON readers such as serde_json accept the file."""
    cfg = json.loads(path.read_text())
    cfg = {k: v for k, v in cfg.items() if not (isinstance(v, float) and not (abs(v) < float("inf")))}
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def main(work=HERE / ".work", out=ROOT / "models" / "demo"):
    final = torch.load(work / "final_f32.pt", weights_only=False)
    info = dict(final["info"])
    vae, te, unet = build_vae(), build_text_encoder(), build_unet()
    vae.load_state_dict(final["vae"])
    te.load_state_dict(final["te"])
    unet.load_state_dict(final["unet"])
    dec = work / "decoder_ft.pt"
    if dec.exists():
        d = torch.load(dec, weights_only=False)
        sd = {k: v for k, v in d["vae"].items() if k.startswith(("decoder.", "post_quant_conv."))}
        enc_same = all(torch.equal(d["vae"][k], final["vae"][k]) for k in final["vae"] if k.startswith(("encoder.", "quant_conv.")))
        assert enc_same, "decoder_ft.pt was trained on a different encoder"
        vae.load_state_dict(sd, strict=False)
        info["decoder_finetune_steps"] = d["step"]
        info.update({f"decoder_finetune_recon_{k}": v for k, v in d.get("recon", {}).items()})
    vae.register_to_config(scaling_factor=info["scaling_factor"])
    pipe = make_pipe(vae.eval(), te.eval(), unet.eval(), make_tokenizer(PAD))
    pipe.to(torch.float16).save_pretrained(out, safe_serialization=True)
    write_legacy_tokenizer(out / "tokenizer", PAD, keep_tokenizer_json=False)
    clean_scheduler_config(out / "scheduler" / "scheduler_config.json")
    (out / "training.json").unlink(missing_ok=True)
    (HERE / "training.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"exported {out}: {size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
