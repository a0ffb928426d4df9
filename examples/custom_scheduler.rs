//! A scheduler written outside sd-rs, against the public `Scheduler` trait: first checked
//! against the built-in Euler in a small loop with a dummy model, then plugged into the real
//! pipeline (`StableDiffusion::generate_with`) on the tiny sd1 fixture model.
//!
//!     cargo run --example custom_scheduler

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use sd_rs::core::{LoadOptions, NoiseSource, TorchGenerator};
use sd_rs::pipeline::{Flow, GenerateRequest, StableDiffusion, StepInfo};
use sd_rs::schedulers::schedule::{
    interp, spaced_timesteps, BetaSchedule, NoiseSchedule, TimestepSpacing,
};
use sd_rs::schedulers::{PredictionType, Scheduler, SchedulerKind, StepOutput};

/// Plain deterministic Euler on Stable Diffusion's schedule, with "trailing" timesteps.
struct MyEuler {
    train_sigmas: Vec<f32>,
    timesteps: Vec<f64>,
    sigmas: Vec<f64>,
}

impl MyEuler {
    fn new() -> sd_rs::core::Result<Self> {
        let betas = BetaSchedule::ScaledLinear {
            start: 0.00085,
            end: 0.012,
        };
        let schedule = NoiseSchedule::new(&betas, 1000, false)?;
        Ok(Self {
            train_sigmas: schedule.train_sigmas(),
            timesteps: vec![],
            sigmas: vec![],
        })
    }
}

impl Scheduler for MyEuler {
    fn set_timesteps(&mut self, n: usize) -> sd_rs::core::Result<()> {
        self.timesteps = spaced_timesteps(TimestepSpacing::Trailing, 1000, n, 0, true)?;
        self.sigmas = self
            .timesteps
            .iter()
            .map(|&t| interp(t, &self.train_sigmas))
            .collect::<sd_rs::core::Result<_>>()?;
        self.sigmas.push(0.0);
        Ok(())
    }

    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn sigmas(&self) -> Option<&[f64]> {
        Some(&self.sigmas)
    }

    fn init_noise_sigma(&self) -> f64 {
        self.sigmas[0]
    }

    fn scale_model_input(&self, sample: &Tensor, i: usize) -> sd_rs::core::Result<Tensor> {
        Ok((sample / (self.sigmas[i].powi(2) + 1.0).sqrt())?)
    }

    fn step(
        &mut self,
        eps: &Tensor,
        i: usize,
        x: &Tensor,
        _noise: &mut dyn NoiseSource,
    ) -> sd_rs::core::Result<StepOutput> {
        let (sigma, next) = (self.sigmas[i], self.sigmas[i + 1]);
        let x0 = (x - (eps * sigma)?)?;
        let prev = (x + (eps * (next - sigma))?)?; // x + (x - x0) / sigma * (next - sigma)
        Ok(StepOutput {
            prev_sample: prev,
            pred_original_sample: Some(x0),
        })
    }

    fn add_noise(&self, x: &Tensor, noise: &Tensor, i: usize) -> sd_rs::core::Result<Tensor> {
        Ok((x + (noise * self.sigmas[i])?)?)
    }

    fn num_train_timesteps(&self) -> usize {
        1000
    }

    fn prediction_type(&self) -> PredictionType {
        PredictionType::Epsilon
    }
}

/// The denoising loop, as the pipeline runs it (a dummy "model" predicts the noise).
fn denoise(
    scheduler: &mut dyn Scheduler,
    steps: usize,
    model: impl Fn(&Tensor, f64) -> Result<Tensor>,
) -> Result<Tensor> {
    scheduler.set_timesteps(steps)?;
    let mut rng = TorchGenerator::new(42);
    let mut x = rng.randn_tensor(&[1, 4, 8, 8], DType::F32, &Device::Cpu)?;
    x = x.affine(scheduler.init_noise_sigma(), 0.0)?;
    for i in 0..scheduler.timesteps().len() {
        let input = scheduler.scale_model_input(&x, i)?;
        let eps = model(&input, scheduler.timesteps()[i])?;
        x = scheduler.step(&eps, i, &x, &mut rng)?.prev_sample;
    }
    Ok(x)
}

fn main() -> Result<()> {
    // a stand-in for the UNet: "the noise is 90% of the scaled input"
    let model = |x: &Tensor, _t: f64| Ok(x.affine(0.9, 0.0)?);
    let mine = denoise(&mut MyEuler::new()?, 20, model)?;
    // the built-in Euler on the same schedule, for comparison
    let json = r#"{"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "timestep_spacing": "trailing"}"#;
    let mut builtin = sd_rs::schedulers::from_config_json(
        json,
        "inline.json".as_ref(),
        Some(SchedulerKind::Euler),
    )?;
    let theirs = denoise(builtin.as_mut(), 20, model)?;
    let diff = (&mine - &theirs)?.abs()?.max_all()?.to_scalar::<f32>()?;
    println!("custom Euler vs sd-rs Euler after 20 steps: max abs difference {diff:.2e}");
    println!(
        "final latent std {:.4}",
        mine.flatten_all()?.var(0)?.sqrt()?.to_scalar::<f32>()?
    );

    // The same scheduler in the pipeline (tiny random-weight fixture model, so the image is noise).
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models/sd1");
    let sd = StableDiffusion::load(&dir, &LoadOptions::default())?;
    let mut req = GenerateRequest::new("a red circle on a white background");
    req.steps = 10;
    let mut on_step = |s: StepInfo<'_>| {
        println!("step {}/{} at t={:.1}", s.step + 1, s.total, s.timestep);
        Flow::Continue
    };
    let out = sd.generate_with(
        &req,
        &mut MyEuler::new()?,
        &mut TorchGenerator::new(0),
        &mut on_step,
    )?;
    println!(
        "pipeline with MyEuler: latents {:?}, image {:?}",
        out.latents.dims(),
        out.images.map(|i| i.dims().to_vec())
    );
    Ok(())
}
