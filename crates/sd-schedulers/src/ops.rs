//! Small float32 tensor helpers that round exactly as torch's `scalar * tensor` and
//! `tensor / scalar` do (one rounding per operation, true division).

use candle_core::{DType, Tensor};
use sd_core::Result;

/// The tensor in float32 (diffusers upcasts samples to float32 inside `step`).
pub(crate) fn f32(x: &Tensor) -> Result<Tensor> {
    Ok(if x.dtype() == DType::F32 {
        x.clone()
    } else {
        x.to_dtype(DType::F32)?
    })
}

/// `c * x` with `c` a float32 scalar.
pub(crate) fn scale(x: &Tensor, c: f32) -> Result<Tensor> {
    Ok(x.affine(c as f64, 0.0)?)
}

/// `x / d` with `d` a float32 scalar (a true division, not a multiplication by `1 / d`).
pub(crate) fn div(x: &Tensor, d: f32) -> Result<Tensor> {
    let d = Tensor::new(d, x.device())?.to_dtype(x.dtype())?;
    Ok(x.broadcast_div(&d)?)
}

/// `a * x + b * y`.
pub(crate) fn lin2(a: f32, x: &Tensor, b: f32, y: &Tensor) -> Result<Tensor> {
    Ok((scale(x, a)? + scale(y, b)?)?)
}

/// Checks that the model output and the sample have the same shape.
pub(crate) fn same_shape(model_output: &Tensor, sample: &Tensor) -> Result<()> {
    if model_output.dims() != sample.dims() {
        return Err(sd_core::Error::invalid_argument(
            "model_output",
            format!("shape {:?}", model_output.dims()),
            format!("the sample's shape {:?}", sample.dims()),
        ));
    }
    Ok(())
}

/// A step index checked against the schedule length (`name` names the caller's argument).
pub(crate) fn check_index(step_index: usize, len: usize) -> Result<()> {
    if step_index >= len {
        return Err(sd_core::Error::invalid_argument(
            "step_index",
            step_index,
            format!("an index below {len}, the number of timesteps (call set_timesteps first)"),
        ));
    }
    Ok(())
}

/// `sqrt(a) * x + sqrt(1 - a) * noise`: the forward process at `alphas_cumprod = a`
/// (DDPM/DDIM/PNDM `add_noise`).
pub(crate) fn add_noise_alpha(
    original: &Tensor,
    noise: &Tensor,
    alpha_prod: f32,
) -> Result<Tensor> {
    same_shape(noise, original)?;
    let dtype = original.dtype();
    let out = lin2(
        alpha_prod.sqrt(),
        &f32(original)?,
        (1.0 - alpha_prod).sqrt(),
        &f32(noise)?,
    )?;
    Ok(out.to_dtype(dtype)?)
}

/// `x + noise * sigma` (the sigma schedulers' `add_noise`).
pub(crate) fn add_noise_sigma(original: &Tensor, noise: &Tensor, sigma: f32) -> Result<Tensor> {
    same_shape(noise, original)?;
    let dtype = original.dtype();
    let out = (f32(original)? + scale(&f32(noise)?, sigma)?)?;
    Ok(out.to_dtype(dtype)?)
}

/// `sample / sqrt(sigma^2 + 1)`, the sigma schedulers' `scale_model_input`.
pub(crate) fn scale_input(sample: &Tensor, sigma: f32) -> Result<Tensor> {
    let dtype = sample.dtype();
    Ok(div(&f32(sample)?, (sigma * sigma + 1.0).sqrt())?.to_dtype(dtype)?)
}

/// `alphas_cumprod[t]` for the alpha-based schedulers (DDPM, DDIM, PNDM); `past_end` is the
/// value before the first training step (`t < 0`). A `t` beyond the schedule is an error that
/// names the likely cause: `leading` spacing plus `steps_offset` can reach `T` (SD 1.5's config
/// with 1000 steps gives t = 1000), where diffusers fails with torch's `IndexError`.
pub(crate) fn alpha_cumprod_at(
    schedule: &crate::schedule::NoiseSchedule,
    t: i64,
    past_end: f32,
    config: &crate::config::SchedulerConfig,
) -> Result<f32> {
    if t < 0 {
        return Ok(past_end);
    }
    schedule.alpha_cumprod(t).map_err(|_| {
        sd_core::Error::invalid_argument(
            "num_inference_steps",
            format!("a schedule reaching timestep {t}"),
            format!(
                "timesteps below num_train_timesteps ({}): with {:?} spacing and steps_offset {} \
                 the last steps run past the training schedule; use fewer steps, a smaller \
                 steps_offset or \"trailing\" spacing",
                schedule.len(),
                config.timestep_spacing,
                config.steps_offset
            ),
        )
    })
}

/// `num_inference_steps` must be at least 1.
pub(crate) fn check_positive_steps(n: usize) -> Result<()> {
    if n == 0 {
        return Err(sd_core::Error::invalid_argument(
            "num_inference_steps",
            n,
            "at least 1",
        ));
    }
    Ok(())
}
