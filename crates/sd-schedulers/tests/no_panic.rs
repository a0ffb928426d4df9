//! Inputs that used to panic (issue 16) now give errors that say what was received and what was
//! expected: `leading` timesteps past the training schedule, huge `steps_offset`, empty inputs
//! of the public schedule helpers, and step counts that would only allocate.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use sd_core::{Error, RecordedNoise};
use sd_schedulers::schedule::{
    dpm_timesteps, interp, np_linspace, sigma_to_t, spaced_timesteps, torch_linspace_f32,
    MAX_INFERENCE_STEPS,
};
use sd_schedulers::{from_config_json, SchedulerKind, TimestepSpacing};

fn sd15() -> String {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/sd15_scheduler_config.json");
    std::fs::read_to_string(p).expect("read the SD 1.5 scheduler config")
}

fn latents() -> Tensor {
    Tensor::zeros((1, 4, 2, 2), DType::F32, &Device::Cpu).expect("zeros")
}

fn invalid_argument(e: Error) -> (String, String, String) {
    match e {
        Error::InvalidArgument {
            name,
            value,
            expected,
        } => (name, value, expected),
        other => panic!("expected InvalidArgument, got {other}"),
    }
}

/// SD 1.5's own config (leading, steps_offset 1) at 1000 steps: the first timestep is 1000,
/// one past alphas_cumprod. diffusers fails at the first `step` (torch IndexError); sd-rs
/// returns an error there too, from step and from add_noise, instead of panicking.
#[test]
fn leading_spacing_with_offset_past_the_schedule_is_an_error_not_a_panic() {
    for kind in [
        SchedulerKind::Ddpm,
        SchedulerKind::Ddim,
        SchedulerKind::Pndm,
    ] {
        let mut s = from_config_json(&sd15(), Path::new("sd15.json"), Some(kind)).expect("build");
        s.set_timesteps(1000)
            .expect("as diffusers, set_timesteps accepts 1000 steps");
        assert_eq!(s.timesteps()[0], 1000.0, "{kind:?}: leading + offset 1");
        let x = latents();
        let mut noise = RecordedNoise::new([vec![0.0; 16]]);
        let err = s
            .step(&x, 0, &x, &mut noise)
            .expect_err("t = 1000 is out of range");
        let (name, value, expected) = invalid_argument(err);
        assert_eq!(name, "num_inference_steps", "{kind:?}");
        assert!(value.contains("timestep 1000"), "{kind:?}: {value}");
        assert!(
            expected.contains("num_train_timesteps (1000)")
                && expected.contains("steps_offset 1")
                && expected.contains("trailing"),
            "{kind:?}: {expected}"
        );
        assert!(
            s.add_noise(&x, &x, 0).is_err(),
            "{kind:?}: add_noise at t = 1000"
        );
        // The steps after the first are inside the schedule: img2img that starts later works,
        // as in diffusers.
        let last = s.timesteps().len() - 1;
        let out = s
            .step(&x, last, &x, &mut noise)
            .expect("last step is in range");
        assert_eq!(out.prev_sample.dims(), x.dims());
        s.add_noise(&x, &x, last)
            .expect("add_noise at the last step");
    }
}

#[test]
fn steps_offset_at_or_past_the_schedule_is_a_config_error() {
    for offset in ["1000", "1000000", "18446744073709551615"] {
        let json = sd15().replace(
            "\"steps_offset\": 1",
            &format!("\"steps_offset\": {offset}"),
        );
        for kind in [
            SchedulerKind::Ddpm,
            SchedulerKind::Ddim,
            SchedulerKind::Pndm,
        ] {
            match from_config_json(&json, Path::new("s.json"), Some(kind)) {
                Err(Error::Config { key, reason, .. }) => {
                    assert_eq!(key.as_deref(), Some("steps_offset"));
                    assert!(reason.contains(offset), "{reason}");
                    assert!(reason.contains("num_train_timesteps (1000)"), "{reason}");
                }
                Err(e) => panic!("{kind:?}: expected a config error, got {e}"),
                Ok(_) => panic!("{kind:?}: steps_offset {offset} accepted"),
            }
        }
        // The sigma schedulers interpolate (clamped) with `leading` timesteps past T, as
        // diffusers does; only an offset that overflows the integer range is an error.
        let leading = json.replace(
            "\"_class_name\"",
            "\"timestep_spacing\": \"leading\", \"_class_name\"",
        );
        let mut s = from_config_json(&leading, Path::new("s.json"), Some(SchedulerKind::Euler))
            .expect("build Euler");
        match s.set_timesteps(10) {
            Ok(()) if offset != "18446744073709551615" => {
                let top = s.sigmas().expect("sigmas")[0];
                assert!(
                    top.is_finite() && top > 10.0,
                    "clamped to the largest sigma: {top}"
                );
            }
            Err(e) if offset == "18446744073709551615" => {
                assert_eq!(invalid_argument(e).0, "steps_offset")
            }
            r => panic!("offset {offset}: {r:?}"),
        }
    }
}

#[test]
fn public_schedule_helpers_reject_empty_inputs() {
    for spacing in [
        TimestepSpacing::Linspace,
        TimestepSpacing::Leading,
        TimestepSpacing::Trailing,
    ] {
        let (name, value, _) =
            invalid_argument(spaced_timesteps(spacing, 1000, 0, 1, true).expect_err("n = 0"));
        assert_eq!(
            (name.as_str(), value.as_str()),
            ("num_inference_steps", "0")
        );
        let (name, _, _) =
            invalid_argument(spaced_timesteps(spacing, 0, 10, 1, true).expect_err("T = 0"));
        assert_eq!(name, "num_train_timesteps");
        let (name, _, _) = invalid_argument(
            spaced_timesteps(spacing, 1000, MAX_INFERENCE_STEPS + 1, 0, false).expect_err("huge"),
        );
        assert_eq!(name, "num_inference_steps");
        assert!(dpm_timesteps(spacing, 1000, 1000, 0, 0).is_err());
        assert!(dpm_timesteps(spacing, 0, 0, 10, 0).is_err());
    }
    let (name, value, _) = invalid_argument(interp(0.5, &[]).expect_err("empty fp"));
    assert_eq!((name.as_str(), value.as_str()), ("fp", "an empty list"));
    assert_eq!(interp(0.5, &[2.0]).expect("one value"), 2.0);
    assert_eq!(interp(0.25, &[0.0, 4.0]).expect("two values"), 1.0);
    assert!(interp(f64::NAN, &[0.0, 4.0]).expect("NaN x").is_nan());
    assert!(sigma_to_t(1.0, &[]).is_err());
    assert!(sigma_to_t(1.0, &[0.5]).is_err());
    assert_eq!(sigma_to_t(1.0, &[0.0, 1.0]).expect("two sigmas"), 0.0);
    assert!(np_linspace(0.0, 1.0, 0).is_empty());
    assert!(torch_linspace_f32(0.0, 1.0, 0).is_empty());
    // Leading spacing with an offset that overflows usize.
    let (name, _, _) = invalid_argument(
        spaced_timesteps(TimestepSpacing::Leading, 1000, 10, usize::MAX, true)
            .expect_err("overflow"),
    );
    assert_eq!(name, "steps_offset");
}

#[test]
fn every_scheduler_refuses_zero_and_absurd_step_counts() {
    for kind in SchedulerKind::all() {
        let mut s = from_config_json(&sd15(), Path::new("sd15.json"), Some(kind)).expect("build");
        assert!(s.set_timesteps(0).is_err(), "{kind:?}: 0 steps");
        assert!(
            s.set_timesteps(usize::MAX).is_err(),
            "{kind:?}: usize::MAX steps would allocate"
        );
        s.set_timesteps(3).expect("3 steps");
    }
}

#[test]
fn num_train_timesteps_is_bounded_before_allocating() {
    let json = sd15().replace(
        "\"num_train_timesteps\": 1000",
        "\"num_train_timesteps\": 100000000000",
    );
    for kind in SchedulerKind::all() {
        match from_config_json(&json, Path::new("s.json"), Some(kind)) {
            Err(Error::Config { key, reason, .. }) => {
                assert_eq!(key.as_deref(), Some("num_train_timesteps"));
                assert!(reason.contains("100000000000"), "{reason}");
            }
            Err(e) => panic!("{kind:?}: expected a config error, got {e}"),
            Ok(_) => panic!("{kind:?}: 1e11 training steps accepted"),
        }
    }
}
