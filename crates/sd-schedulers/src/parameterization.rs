//! What the model predicts (`prediction_type`) and how to turn it into the clean sample `x0`
//! and the noise `eps`, for alpha-parameterised (DDPM, DDIM, PNDM, DPM-Solver) and
//! sigma-parameterised (Euler, Heun, LMS: `x = x0 + sigma * eps`) samplers.
//!
//! Scalars are float32, as diffusers keeps them; each formula follows the operation order of
//! the diffusers class named in its doc.

use candle_core::Tensor;
use sd_core::{Error, Result};

use crate::ops::{div, lin2, scale};

/// The model's prediction target (`prediction_type` in the config).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PredictionType {
    /// `epsilon`: the added noise (SD 1.x, SD 2 base 512, SDXL).
    Epsilon,
    /// `v_prediction`: `alpha * eps - sigma * x0` (SD 2.x 768).
    VPrediction,
    /// `sample`: the clean sample itself.
    Sample,
}

impl PredictionType {
    /// The config spelling (`epsilon`, `v_prediction`, `sample`).
    pub fn as_str(&self) -> &'static str {
        match self {
            PredictionType::Epsilon => "epsilon",
            PredictionType::VPrediction => "v_prediction",
            PredictionType::Sample => "sample",
        }
    }
}

/// `(x0, eps)` from a model output at a noise level `alpha_prod_t = alphas_cumprod[t]`, as
/// [`DDIMScheduler.step`](https://github.com/huggingface/diffusers/blob/main/src/diffusers/schedulers/scheduling_ddim.py).
///
/// # Shapes
/// `model_output`, `sample`: the same shape, float32; returns two tensors of that shape.
pub fn x0_and_eps_from_alpha(
    prediction: PredictionType,
    model_output: &Tensor,
    sample: &Tensor,
    alpha_prod_t: f32,
) -> Result<(Tensor, Tensor)> {
    let beta_prod_t = 1.0 - alpha_prod_t;
    let (sa, sb) = (alpha_prod_t.sqrt(), beta_prod_t.sqrt());
    Ok(match prediction {
        PredictionType::Epsilon => {
            let x0 = div(&(sample - scale(model_output, sb)?)?, sa)?;
            (x0, model_output.clone())
        }
        PredictionType::Sample => {
            let eps = div(&(sample - scale(model_output, sa)?)?, sb)?;
            (model_output.clone(), eps)
        }
        PredictionType::VPrediction => (
            lin2(sa, sample, -sb, model_output)?,
            lin2(sa, model_output, sb, sample)?,
        ),
    })
}

/// x0 from a model output at noise level `sigma` of the sigma parameterisation
/// (`x = x0 + sigma * eps` with the model input scaled by `1 / sqrt(sigma^2 + 1)`), as
/// [`EulerDiscreteScheduler.step`](https://github.com/huggingface/diffusers/blob/main/src/diffusers/schedulers/scheduling_euler_discrete.py).
///
/// # Shapes
/// `model_output`, `sample`: the same shape, float32.
pub fn x0_from_sigma(
    prediction: PredictionType,
    model_output: &Tensor,
    sample: &Tensor,
    sigma: f32,
) -> Result<Tensor> {
    Ok(match prediction {
        PredictionType::Epsilon => (sample - scale(model_output, sigma)?)?,
        PredictionType::VPrediction => {
            let c = -sigma / (sigma * sigma + 1.0).sqrt();
            (scale(model_output, c)? + div(sample, sigma * sigma + 1.0)?)?
        }
        PredictionType::Sample => model_output.clone(),
    })
}

/// `(alpha_t, sigma_t)` of the variance-preserving process at sigma `sigma`
/// (`alpha_t = 1 / sqrt(sigma^2 + 1)`, `sigma_t = sigma * alpha_t`).
pub fn alpha_sigma_of(sigma: f32) -> (f32, f32) {
    let alpha_t = 1.0 / (sigma * sigma + 1.0).sqrt();
    (alpha_t, sigma * alpha_t)
}

/// x0 (DPM-Solver++'s "data prediction") from a model output at sigma `sigma`, as
/// [`DPMSolverMultistepScheduler.convert_model_output`](https://github.com/huggingface/diffusers/blob/main/src/diffusers/schedulers/scheduling_dpmsolver_multistep.py).
pub fn x0_from_alpha_sigma(
    prediction: PredictionType,
    model_output: &Tensor,
    sample: &Tensor,
    sigma: f32,
) -> Result<Tensor> {
    let (alpha_t, sigma_t) = alpha_sigma_of(sigma);
    Ok(match prediction {
        PredictionType::Epsilon => div(&(sample - scale(model_output, sigma_t)?)?, alpha_t)?,
        PredictionType::Sample => model_output.clone(),
        PredictionType::VPrediction => lin2(alpha_t, sample, -sigma_t, model_output)?,
    })
}

/// Error for a prediction type a diffusers class rejects.
pub(crate) fn unsupported_prediction(class: &str, p: PredictionType) -> Error {
    Error::unsupported(format!(
        "prediction_type `{}` in {class} (as in diffusers)",
        p.as_str()
    ))
}
