//! The channels-last layers (packed convolution, group norm) against candle's NCHW ops on the
//! same weights, loaded from a real safetensors file: every convolution form SD uses (3x3
//! padding 1, stride 2, the VAE encoder's right/bottom padding, nearest 2x and odd-size
//! resizes, per-image bias, residual, 1x1) in f32 and bf16, and the f16 fallback path.

use candle_core::{DType, Device, Tensor};
use sd_core::noise::{NoiseSource, TorchGenerator};
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

/// Seeded N(mean, std^2) data, so that a failure reproduces.
fn randn(g: &mut TorchGenerator, mean: f64, std: f64, shape: &[usize]) -> anyhow::Result<Tensor> {
    Ok(g.randn_tensor(shape, DType::F32, &Device::Cpu)?
        .affine(std, mean)?)
}

fn max_excess(got: &Tensor, want: &Tensor, rel: f64, abs: f64) -> anyhow::Result<f32> {
    max_excess_scaled(got, want, &want.abs()?, rel, abs)
}

/// The largest `|got - want| - (rel * scale + abs)`, elementwise.
fn max_excess_scaled(
    got: &Tensor,
    want: &Tensor,
    scale: &Tensor,
    rel: f64,
    abs: f64,
) -> anyhow::Result<f32> {
    let got = got.to_dtype(DType::F32)?;
    let want = want.to_dtype(DType::F32)?;
    let excess = ((got - &want)?.abs()? - scale.affine(rel, abs)?)?;
    Ok(excess.max_all()?.to_scalar::<f32>()?)
}

#[test]
fn packed_convolutions_equal_candle_nchw() -> anyhow::Result<()> {
    let dev = Device::Cpu;
    let mut g = TorchGenerator::new(12);
    let (cin, cout) = (24, 40);
    let w = randn(&mut g, 0.0, 0.1, &[cout, cin, 3, 3])?;
    let b = randn(&mut g, 0.0, 0.5, &[cout])?;
    let w1 = randn(&mut g, 0.0, 0.1, &[cout, cin, 1, 1])?;
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
        // The references run in f32 on the same rounded weights and inputs.
        let rounded = |t: Tensor| t.to_dtype(dtype)?.to_dtype(DType::F32);
        let wr = rounded(w.clone())?;
        let br = rounded(b.clone())?;
        let w1r = rounded(w1.clone())?;
        let x = rounded(randn(&mut g, 0.0, 1.0, &[2, 7, 9, cin])?)?;
        let xd = x.to_dtype(dtype)?;
        let same = Conv2d::load(&ws.vb.pp("c"), cin, cout, 3, 1, 1)?;
        let strided = Conv2d::load(&ws.vb.pp("c"), cin, cout, 3, 2, 1)?;
        let vae_down = Conv2d::load_padded(&ws.vb.pp("c"), cin, cout, 3, 2, [0, 0, 1, 1])?;
        let point = Conv2d::load(&ws.vb.pp("p"), cin, cout, 1, 1, 0)?;
        let tb = rounded(randn(&mut g, 0.0, 1.0, &[2, cout])?)?;
        // (reference, scale): the reference output, and the sum of the magnitudes of the
        // terms it adds up (convolution, bias, ...). A path that rounds each partial sum
        // (candle's f16 convolution, then + bias, + time bias, + residual in f16) is off by
        // at most a unit roundoff of each partial sum, which that sum bounds; a single
        // rounding of the output is bounded by it too.
        let reference = |xn: &Tensor, wr: &Tensor, stride, pad| -> anyhow::Result<_> {
            let conv = nhwc(&conv2d(xn, wr, None, stride, pad)?)?;
            let want = conv.broadcast_add(&br)?;
            let scale = conv.abs()?.broadcast_add(&br.abs()?)?;
            Ok((want, scale))
        };
        let xn = nchw(&x)?;
        let mut checks: Vec<(&str, Tensor, (Tensor, Tensor))> = Vec::new();
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
        let res = rounded(randn(&mut g, 0.0, 1.0, &[2, 7, 9, cout])?)?;
        let (conv, scale) = reference(&xn, &wr, 1, 1)?;
        let tb4 = tb.reshape((2, 1, 1, cout))?;
        let want = (conv.broadcast_add(&tb4)? + &res)?;
        let scale = (scale.broadcast_add(&tb4.abs()?)? + res.abs()?)?;
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
            (want, scale),
        ));
        for (what, got, (want, scale)) in checks {
            assert_eq!(got.dims(), want.dims(), "{dtype:?} {what}");
            assert_eq!(got.dtype(), dtype, "{dtype:?} {what}");
            // f32: accumulation order only (measured <= 2e-6). bf16: the packed kernel
            // rounds the output once (unit roundoff 2^-8), bounded with a factor 2 of
            // margin. f16: candle's path rounds up to four partial sums (convolution,
            // + bias, + time bias, + residual), each by at most 2^-11 of the scale.
            let (rel, abs) = match dtype {
                DType::F32 => (0.0, 1e-5),
                DType::BF16 => (1.0 / 128.0, 1e-2),
                _ => (4.0 / 2048.0, 1e-3),
            };
            let e = max_excess_scaled(&got, &want, &scale, rel, abs)?;
            assert!(e <= 0.0, "{dtype:?} {what}: error exceeds its bound by {e}");
        }
    }
    Ok(())
}

/// At 32x34 with 32 input channels (272 output tiles) an f32 3x3 convolution takes the
/// Winograd path (`sd_kernels::winograd_pays`): the same results as candle's, with the fused
/// resize, time bias and residual, and a second call reusing the transformed weight.
#[test]
fn winograd_sized_convolutions_equal_candle_nchw() -> anyhow::Result<()> {
    let mut g = TorchGenerator::new(14);
    let (cin, cout) = (32, 48);
    let w = randn(&mut g, 0.0, 0.1, &[cout, cin, 3, 3])?;
    let b = randn(&mut g, 0.0, 0.5, &[cout])?;
    let ws = weights("winograd", &[("c.weight", &w), ("c.bias", &b)], DType::F32)?;
    let conv = Conv2d::load(&ws.vb.pp("c"), cin, cout, 3, 1, 1)?;
    let x = randn(&mut g, 0.0, 1.0, &[1, 32, 34, cin])?;
    let small = randn(&mut g, 0.0, 1.0, &[1, 16, 17, cin])?;
    let tb = randn(&mut g, 0.0, 1.0, &[1, cout])?;
    let res = randn(&mut g, 0.0, 1.0, &[1, 32, 34, cout])?;
    let reference = |xn: &Tensor| -> anyhow::Result<(Tensor, Tensor)> {
        let conv = nhwc(&conv2d(xn, &w, None, 1, 1)?)?;
        let tb4 = tb.reshape((1, 1, 1, cout))?;
        let want = (conv.broadcast_add(&b)?.broadcast_add(&tb4)? + &res)?;
        let scale = (conv
            .abs()?
            .broadcast_add(&b.abs()?)?
            .broadcast_add(&tb4.abs()?)?
            + res.abs()?)?;
        Ok((want, scale))
    };
    let args = |resize| ConvArgs {
        resize,
        batch_bias: Some(&tb),
        residual: Some(&res),
    };
    let checks = [
        (
            "32x34",
            conv.forward_with(&x, &args(None))?,
            reference(&nchw(&x)?)?,
        ),
        (
            "16x17 resized 2x",
            conv.forward_with(&small, &args(Some((32, 34))))?,
            reference(&nchw(&small)?.upsample_nearest2d(32, 34)?)?,
        ),
    ];
    for (what, got, (want, scale)) in checks {
        assert_eq!(got.dims(), want.dims(), "{what}");
        // Accumulation order and the transforms' roundings: measured at most 5.7e-6 here
        // (outputs up to about 10, where an f32 ulp is 9.5e-7; the direct convolution is off
        // by one ulp), within the 1e-5 of the direct f32 test above.
        let e = max_excess_scaled(&got, &want, &scale, 0.0, 1e-5)?;
        assert!(e <= 0.0, "{what}: error exceeds its bound by {e}");
    }
    Ok(())
}

#[test]
fn channels_last_group_norm_equals_candle() -> anyhow::Result<()> {
    let c = 64;
    let mut g = TorchGenerator::new(13);
    let gamma = randn(&mut g, 1.0, 0.2, &[c])?;
    let beta = randn(&mut g, 0.0, 0.2, &[c])?;
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        let ws = weights(
            &format!("gn-{dtype:?}"),
            &[("n.weight", &gamma), ("n.bias", &beta)],
            dtype,
        )?;
        let norm = GroupNorm::load(&ws.vb.pp("n"), 32, c, 1e-6)?;
        let x = randn(&mut g, 0.3, 2.0, &[2, 5, 7, c])?.to_dtype(dtype)?;
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
