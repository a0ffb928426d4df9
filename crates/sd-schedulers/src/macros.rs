//! Trait methods shared verbatim by the sigma-based schedulers (Euler, Euler Ancestral, Heun,
//! LMS): each keeps a `sched: SigmaSchedule` and a `config` with `timestep_spacing` and
//! `prediction_type`, and differs only in `set_timesteps` and `step`.

/// Expands, inside `impl Scheduler for X`, to `timesteps`, `sigmas`, `init_noise_sigma`,
/// `scale_model_input` (divide by `sqrt(sigma^2 + 1)`), `add_noise` (`x + sigma * noise`),
/// `num_train_timesteps` and `prediction_type`.
macro_rules! sigma_scheduler_methods {
    () => {
        fn timesteps(&self) -> &[f64] {
            &self.sched.timesteps
        }

        fn sigmas(&self) -> Option<&[f64]> {
            Some(&self.sched.sigmas_f64)
        }

        fn init_noise_sigma(&self) -> f64 {
            $crate::schedule::init_noise_sigma(&self.sched.sigmas, self.config.timestep_spacing)
        }

        fn scale_model_input(
            &self,
            sample: &candle_core::Tensor,
            step_index: usize,
        ) -> sd_core::Result<candle_core::Tensor> {
            $crate::ops::check_index(step_index, self.sched.timesteps.len())?;
            $crate::ops::scale_input(sample, self.sched.sigmas[step_index])
        }

        fn add_noise(
            &self,
            original: &candle_core::Tensor,
            noise: &candle_core::Tensor,
            step_index: usize,
        ) -> sd_core::Result<candle_core::Tensor> {
            $crate::ops::check_index(step_index, self.sched.timesteps.len())?;
            $crate::ops::add_noise_sigma(original, noise, self.sched.sigmas[step_index])
        }

        fn num_train_timesteps(&self) -> usize {
            self.sched.schedule.len()
        }

        fn prediction_type(&self) -> $crate::PredictionType {
            self.config.prediction_type
        }
    };
}
