//! Noise sources, and a CPU generator that draws the same numbers as PyTorch.
//!
//! [`TorchGenerator`] reproduces `torch.Generator("cpu").manual_seed(seed)` followed by
//! `torch.randn(shape, generator=g, dtype=torch.float32)`: the mt19937 engine, and torch's two
//! normal-sampling paths (tensors of 16 or more elements: 24-bit float uniforms transformed by
//! Box-Muller in blocks of 16, with the last partial block redrawn; smaller tensors: 53-bit
//! double uniforms, one Box-Muller pair per two values with the second value cached in the
//! generator, as `at::normal_distribution<double>` does).

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};

/// A source of standard normal noise, drawn in the order the pipeline asks for it.
///
/// The pipeline and the stochastic schedulers take their noise from here, never from a hidden
/// global generator, so that seeds are reproducible and tests can inject recorded noise.
pub trait NoiseSource: Send {
    /// Draws `shape.iter().product()` values from N(0, 1), row-major.
    fn randn(&mut self, shape: &[usize]) -> Result<Vec<f32>>;

    /// Draws a tensor of `shape` in `dtype` on `device` (sampled in f32, then converted).
    fn randn_tensor(&mut self, shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor> {
        let v = self.randn(shape)?;
        Ok(Tensor::from_vec(v, shape, &Device::Cpu)?
            .to_dtype(dtype)?
            .to_device(device)?)
    }
}

const N: usize = 624;
const M: usize = 397;

/// A PyTorch-compatible CPU random generator (mt19937 plus torch's normal samplers).
#[derive(Clone)]
pub struct TorchGenerator {
    state: [u32; N],
    index: usize,
    next_double_normal: Option<f64>,
}

impl std::fmt::Debug for TorchGenerator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TorchGenerator")
            .field("index", &self.index)
            .finish()
    }
}

impl TorchGenerator {
    /// Same state as `torch.Generator("cpu").manual_seed(seed)` (torch keeps the low 32 bits).
    pub fn new(seed: u64) -> Self {
        let mut state = [0u32; N];
        state[0] = seed as u32;
        for i in 1..N {
            let prev = state[i - 1];
            state[i] = 1_812_433_253u32
                .wrapping_mul(prev ^ (prev >> 30))
                .wrapping_add(i as u32);
        }
        Self {
            state,
            index: N,
            next_double_normal: None,
        }
    }

    fn twist(&mut self) {
        for i in 0..N {
            let y = (self.state[i] & 0x8000_0000) | (self.state[(i + 1) % N] & 0x7fff_ffff);
            let mut v = self.state[(i + M) % N] ^ (y >> 1);
            if y & 1 != 0 {
                v ^= 0x9908_b0df;
            }
            self.state[i] = v;
        }
        self.index = 0;
    }

    /// The next raw 32-bit output of mt19937.
    pub fn next_u32(&mut self) -> u32 {
        if self.index >= N {
            self.twist();
        }
        let mut y = self.state[self.index];
        self.index += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^= y >> 18;
        y
    }

    /// torch's `random64`: two draws, the first one high.
    fn next_u64(&mut self) -> u64 {
        let hi = self.next_u32() as u64;
        let lo = self.next_u32() as u64;
        (hi << 32) | lo
    }

    /// Uniform in [0, 1) with 24 random bits, as torch's `uniform_real_distribution<float>`.
    fn uniform_f32(&mut self) -> f32 {
        (self.next_u32() & ((1 << 24) - 1)) as f32 * (1.0 / (1u32 << 24) as f32)
    }

    /// Uniform in [0, 1) with 53 random bits, as torch's `uniform_real_distribution<double>`.
    fn uniform_f64(&mut self) -> f64 {
        (self.next_u64() & ((1u64 << 53) - 1)) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// One sample of torch's scalar `normal_distribution<double>` (used for tensors under 16).
    fn normal_f64(&mut self) -> f64 {
        if let Some(v) = self.next_double_normal.take() {
            return v;
        }
        let u1 = self.uniform_f64();
        let u2 = self.uniform_f64();
        let r = (-2.0 * (-u2).ln_1p()).sqrt();
        let theta = 2.0 * std::f64::consts::PI * u1;
        self.next_double_normal = Some(r * theta.sin());
        r * theta.cos()
    }

    /// `n` standard normal values, exactly as `torch.randn(n, generator=g)` in float32.
    pub fn randn(&mut self, n: usize) -> Vec<f32> {
        if n < 16 {
            return (0..n).map(|_| self.normal_f64() as f32).collect();
        }
        let mut data: Vec<f32> = (0..n).map(|_| self.uniform_f32()).collect();
        for start in (0..n - 15).step_by(16) {
            box_muller_16(&mut data[start..start + 16]);
        }
        if !n.is_multiple_of(16) {
            let tail = n - 16;
            for v in &mut data[tail..] {
                *v = self.uniform_f32();
            }
            box_muller_16(&mut data[tail..]);
        }
        data
    }
}

/// torch's `normal_fill_16`: the first 8 values pair with the last 8.
fn box_muller_16(d: &mut [f32]) {
    for j in 0..8 {
        let u1 = 1.0 - d[j];
        let u2 = d[j + 8];
        let radius = (-2.0 * u1.ln()).sqrt();
        let theta = 2.0 * std::f32::consts::PI * u2;
        d[j] = radius * theta.cos();
        d[j + 8] = radius * theta.sin();
    }
}

impl NoiseSource for TorchGenerator {
    fn randn(&mut self, shape: &[usize]) -> Result<Vec<f32>> {
        Ok(TorchGenerator::randn(self, shape.iter().product()))
    }
}

/// Noise recorded elsewhere (e.g. exported from PyTorch), handed out in order: for tests and
/// for callers that bring their own noise.
#[derive(Debug, Clone, Default)]
pub struct RecordedNoise {
    queue: std::collections::VecDeque<Vec<f32>>,
}

impl RecordedNoise {
    /// A source that returns `draws` one after the other.
    pub fn new(draws: impl IntoIterator<Item = Vec<f32>>) -> Self {
        Self {
            queue: draws.into_iter().collect(),
        }
    }
}

impl NoiseSource for RecordedNoise {
    fn randn(&mut self, shape: &[usize]) -> Result<Vec<f32>> {
        let n: usize = shape.iter().product();
        match self.queue.pop_front() {
            Some(v) if v.len() == n => Ok(v),
            Some(v) => Err(Error::invalid_argument(
                "recorded noise",
                format!("a draw of {} values", v.len()),
                format!("{n} values for shape {shape:?}"),
            )),
            None => Err(Error::invalid_argument(
                "recorded noise",
                "no draws left",
                format!("a draw for shape {shape:?}"),
            )),
        }
    }
}
