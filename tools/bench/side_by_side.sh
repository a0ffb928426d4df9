#!/usr/bin/env bash
# sd-rs and PyTorch side by side, in one run (docs/performance.md): the SD 1.5 UNet (batch 2,
# 64x64) in f32 and bf16, a 20-step 512x512 image, the SDXL VAE decode at 1024x1024.
# Build first: cargo build --release --example unet_bench --example pipeline_bench
# BEFORE=path/to/an/older/unet_bench adds that binary's UNet runs (a before/after pair).
# Run it on an otherwise idle machine; it takes about 30 minutes on 2 cores.
set -u
cd "$(dirname "$0")/../.."
PY=${PY:-tools/fixtures/.venv-ref/bin/python}
echo "host: $(lscpu | grep 'Model name' | sed 's/ \+/ /g')"; date
for d in f32 bf16; do
  echo "== unet sd15 b2 64 $d torch"
  $PY tools/bench/torch_unet.py --config sd15 --latent 64 --batch 2 --dtype $d --runs 2 --warmup 1 2>&1 | tail -3
  if [ -n "${BEFORE:-}" ]; then
    echo "== unet sd15 b2 64 $d before"
    "$BEFORE" --config sd15 --latent 64 --batch 2 --dtype $d --runs 2 --warmup 1 2>&1 | grep -E "path|SUMMARY"
  fi
  echo "== unet sd15 b2 64 $d sd-rs"
  ./target/release/examples/unet_bench --config sd15 --latent 64 --batch 2 --dtype $d --runs 2 --warmup 1 2>&1 | grep -E "path|SUMMARY"
done
for d in f32 bf16; do
  echo "== pipeline sd15 512 20 $d torch"
  $PY tools/bench/torch_pipeline.py --config sd15 --size 512 --steps 20 --dtype $d 2>&1 | tail -2
  echo "== pipeline sd15 512 20 $d sd-rs"
  ./target/release/examples/pipeline_bench --config sd15 --size 512 --steps 20 --dtype $d 2>&1 | tail -2
done
for d in f32 bf16; do
  echo "== vae sdxl 1024 $d torch"
  $PY tools/bench/torch_pipeline.py --config sdxl --stage vae --size 1024 --dtype $d 2>&1 | tail -1
  echo "== vae sdxl 1024 $d sd-rs"
  ./target/release/examples/pipeline_bench --config sdxl --stage vae --size 1024 --dtype $d 2>&1 | tail -1
done
date
