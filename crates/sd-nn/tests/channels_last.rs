//! The channels-last layers (packed convolution, group norm) against candle's NCHW ops on the
//! same weights, loaded from a real safetensors file: every convolution form SD uses (3x3
//! padding 1, stride 2, the VAE encoder's right/bottom padding, nearest 2x and odd-size
//! resizes, per-image bias, residual, 1x1) in f32 and bf16, and the f16 fallback path.

use candle_core::{DType, Device, Tensor};
use sd_core::VarBuilder;
use sd_nn::ops::conv2d;
use sd_nn::{Conv2d, ConvArgs, GroupNorm};

struct Weights {
    _dir: tempdir::Dir,
    vb: VarBuilder,
}

mod tempdir {
    /// A directory removed on drop.
    pub struct Dir(pub std::path::PathBuf);
    impl Dir {
        pub fn new(tag: &str) -> Self {
            let p = std::env::temp_dir().join(format!(
                "sd-nn-{tag}-{}-{:?}",
                std::process::id(),
                std::thread::current().id()
            ));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir_all(&p).expect("temp dir");
            Dir(p)
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

fn weights(tag: &str, tensors: &[(&str, &Tensor)], dtype: DType) -> anyhow::Result<Weights> {
    let dir = tempdir::Dir::new(tag);
    let path = dir.0.join("w.safetensors");
    let map: std::collections::HashMap<String, Tensor> = tensors
        .iter()
        .map(|(k, t)| (k.to_string(), (*t).clone()))
        .collect();
    candle_core::safetensors::save(&map, &path)?;
    let vb = VarBuilder::from_paths(&[path], dtype, &Device::Cpu)?;
    Ok(Weights { _dir: dir, vb })
}

/// NHWC -> NCHW and back.
fn nchw(x: &Tensor) -> anyhow::Result<Tensor> {
    Ok(x.permute((0, 3, 1, 2))?.contiguous()?)
}
fn nhwc(x: &Tensor) -> anyhow::Result<Tensor> {
    Ok(x.permute((0, 2, 3, 1))?.contiguous()?)
}

fn max_excess(got: &Tensor, want: &Tensor, rel: f64, abs: f64) -> anyhow::Result<f32> {
    let got = got.to_dtype(DType::F32)?;
    let want = want.to_dtype(DType::F32)?;
    let excess = ((got - &want)?.abs()? - want.abs()?.affine(rel, abs)?)?;
    Ok(excess.max_all()?.to_scalar::<f32>()?)
}

#[test]
fn packed_convolutions_equal_candle_nchw() -> anyhow::Result<()> {
    let dev = Device::Cpu;
    let (cin, cout) = (24, 40);
    let w = Tensor::randn(0f32, 0.1, (cout, cin, 3, 3), &dev)?;
    let b = Tensor::randn(0f32, 0.5, cout, &dev)?;
    let w1 = Tensor::randn(0f32, 0.1, (cout, cin, 1, 1), &dev)?;
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        let ws = weights(
            &format!("conv-{dtype:?}"),
            &[
                ("c.weight", &w),
                ("c.bias", &b),
                ("p.weight", &w1),
                ("p.bias", &b),
            ],
            dtype,
        )?;
        // The references run in f32 on the same rounded weights.
        let wr = w.to_dtype(dtype)?.to_dtype(DType::F32)?;
        let br = b.to_dtype(dtype)?.to_dtype(DType::F32)?;
        let w1r = w1.to_dtype(dtype)?.to_dtype(DType::F32)?;
        let x = Tensor::randn(0f32, 1.0, (2, 7, 9, cin), &dev)?
            .to_dtype(dtype)?
            .to_dtype(DType::F32)?;
        let xd = x.to_dtype(dtype)?;
        // (description, layer, args, reference)
        let same = Conv2d::load(&ws.vb.pp("c"), cin, cout, 3, 1, 1)?;
        let strided = Conv2d::load(&ws.vb.pp("c"), cin, cout, 3, 2, 1)?;
        let vae_down = Conv2d::load_padded(&ws.vb.pp("c"), cin, cout, 3, 2, [0, 0, 1, 1])?;
        let point = Conv2d::load(&ws.vb.pp("p"), cin, cout, 1, 1, 0)?;
        let tb = Tensor::randn(0f32, 1.0, (2, cout), &dev)?
            .to_dtype(dtype)?
            .to_dtype(DType::F32)?;
        let reference = |xn: &Tensor, wr: &Tensor, stride, pad| -> anyhow::Result<Tensor> {
            nhwc(&conv2d(xn, wr, Some(&br), stride, pad)?)
        };
        let xn = nchw(&x)?;
        let mut checks: Vec<(&str, Tensor, Tensor)> = Vec::new();
        checks.push(("3x3", same.forward(&xd)?, reference(&xn, &wr, 1, 1)?));
        checks.push((
            "stride 2",
            strided.forward(&xd)?,
            reference(&xn, &wr, 2, 1)?,
        ));
        let xpad = xn.pad_with_zeros(3, 0, 1)?.pad_with_zeros(2, 0, 1)?;
        checks.push((
            "vae down",
            vae_down.forward(&xd)?,
            reference(&xpad, &wr, 2, 0)?,
        ));
        checks.push(("1x1", point.forward(&xd)?, reference(&xn, &w1r, 1, 0)?));
        let up = xn.upsample_nearest2d(14, 18)?;
        checks.push((
            "resize 2x",
            same.forward_with(
                &xd,
                &ConvArgs {
                    resize: Some((14, 18)),
                    ..ConvArgs::default()
                },
            )?,
            reference(&up, &wr, 1, 1)?,
        ));
        // An odd-size resize: torch's nearest index floor(i * in / out), 7x9 -> 11x10.
        let rows = Tensor::new(&[0u32, 0, 1, 1, 2, 3, 3, 4, 5, 5, 6], &dev)?;
        let cols = Tensor::new(&[0u32, 0, 1, 2, 3, 4, 5, 6, 7, 8], &dev)?;
        let odd = xn.index_select(&rows, 2)?.index_select(&cols, 3)?;
        checks.push((
            "resize 11x10",
            same.forward_with(
                &xd,
                &ConvArgs {
                    resize: Some((11, 10)),
                    ..ConvArgs::default()
                },
            )?,
            reference(&odd, &wr, 1, 1)?,
        ));
        let res = Tensor::randn(0f32, 1.0, (2, 7, 9, cout), &dev)?
            .to_dtype(dtype)?
            .to_dtype(DType::F32)?;
        let want =
            (reference(&xn, &wr, 1, 1)?.broadcast_add(&tb.reshape((2, 1, 1, cout))?)? + &res)?;
        checks.push((
            "time bias + residual",
            same.forward_with(
                &xd,
                &ConvArgs {
                    batch_bias: Some(&tb.to_dtype(dtype)?),
                    residual: Some(&res.to_dtype(dtype)?),
                    ..ConvArgs::default()
                },
            )?,
            want,
        ));
        for (what, got, want) in checks {
            assert_eq!(got.dims(), want.dims(), "{dtype:?} {what}");
            assert_eq!(got.dtype(), dtype, "{dtype:?} {what}");
            // f32: accumulation order only (measured <= 2e-6); bf16/f16: one rounding of the
            // output (2^-8 / 2^-11 relative) plus the f32 reference's own rounding of inputs.
            let (rel, abs) = match dtype {
                DType::F32 => (0.0, 1e-5),
                DType::BF16 => (1.0 / 128.0, 1e-2),
                _ => (1.0 / 512.0, 2e-3),
            };
            let e = max_excess(&got, &want, rel, abs)?;
            assert!(e <= 0.0, "{dtype:?} {what}: error exceeds its bound by {e}");
        }
    }
    Ok(())
}

#[test]
fn channels_last_group_norm_equals_candle() -> anyhow::Result<()> {
    let dev = Device::Cpu;
    let c = 64;
    let gamma = Tensor::randn(1f32, 0.2, c, &dev)?;
    let beta = Tensor::randn(0f32, 0.2, c, &dev)?;
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        let ws = weights(
            &format!("gn-{dtype:?}"),
            &[("n.weight", &gamma), ("n.bias", &beta)],
            dtype,
        )?;
        let norm = GroupNorm::load(&ws.vb.pp("n"), 32, c, 1e-6)?;
        let x = (Tensor::randn(0f32, 2.0, (2, 5, 7, c), &dev)? + 0.3)?.to_dtype(dtype)?;
        let reference = candle_nn::GroupNorm::new(
            gamma.to_dtype(dtype)?.to_dtype(DType::F32)?,
            beta.to_dtype(dtype)?.to_dtype(DType::F32)?,
            c,
            32,
            1e-6,
        )?;
        let want = nhwc(&candle_core::Module::forward(
            &reference,
            &nchw(&x.to_dtype(DType::F32)?)?,
        )?)?;
        let want_silu = candle_nn::ops::silu(&want)?;
        let (rel, abs) = match dtype {
            DType::F32 => (0.0, 2e-5),
            DType::BF16 => (1.0 / 128.0, 1e-2),
            _ => (1.0 / 256.0, 4e-3),
        };
        let got = norm.forward(&x)?;
        assert_eq!(got.dtype(), dtype);
        let e = max_excess(&got, &want, rel, abs)?;
        assert!(e <= 0.0, "{dtype:?} group norm exceeds its bound by {e}");
        let e = max_excess(&norm.forward_silu(&x)?, &want_silu, rel, abs)?;
        assert!(
            e <= 0.0,
            "{dtype:?} group norm + SiLU exceeds its bound by {e}"
        );
        // Tokens [B, L, C] are the same pixels.
        let tokens = norm.forward(&x.reshape((2, 35, c))?)?;
        let e = max_excess(&tokens.reshape((2, 5, 7, c))?, &want, rel, abs)?;
        assert!(
            e <= 0.0,
            "{dtype:?} group norm on tokens exceeds its bound by {e}"
        );
    }
    Ok(())
}
