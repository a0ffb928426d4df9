//! Property tests of `scheduler_config.json` (issue 16): the real SD 1.5, SD 2.1 and SDXL files
//! with fields set to wrong types, out-of-range values or removed, built as any class and run
//! with any step count, give an `Err` with a message or a working scheduler, never a panic.
//! `PROPTEST_CASES` sets the number of cases (see docs/reliability.md).

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed};
use sd_core::testing::{edit_json, odd_json_values, proptest_cases, proptest_fixed_seed};
use sd_core::RecordedNoise;
use sd_schedulers::schedule::MAX_INFERENCE_STEPS;
use sd_schedulers::{from_config_json, SchedulerKind};

const KEYS: &[&str] = &[
    "_class_name",
    "num_train_timesteps",
    "beta_start",
    "beta_end",
    "beta_schedule",
    "trained_betas",
    "prediction_type",
    "timestep_spacing",
    "steps_offset",
    "rescale_betas_zero_snr",
    "clip_sample",
    "clip_sample_range",
    "set_alpha_to_one",
    "skip_prk_steps",
    "variance_type",
    "use_karras_sigmas",
    "sigma_min",
    "sigma_max",
    "final_sigmas_type",
    "solver_order",
    "solver_type",
    "lower_order_final",
    "euler_at_final",
    "lambda_min_clipped",
];

fn value() -> impl Strategy<Value = serde_json::Value> {
    let meaningful: Vec<serde_json::Value> = [
        "leading",
        "trailing",
        "linspace",
        "epsilon",
        "v_prediction",
        "sample",
        "scaled_linear",
        "squaredcos_cap_v2",
        "fixed_small_log",
        "fixed_large",
        "sigma_min",
        "heun",
        "EulerDiscreteScheduler",
        "DPMSolverMultistepScheduler",
    ]
    .into_iter()
    .map(serde_json::Value::from)
    .collect();
    // Mostly plausible values (so that many cases build and run), some of the wrong type.
    prop_oneof![
        1 => prop::sample::select(odd_json_values()),
        2 => prop::sample::select(meaningful),
        2 => (0.0..1.0f64).prop_map(serde_json::Value::from),
        2 => (0..2000u64).prop_map(serde_json::Value::from),
        1 => prop::collection::vec(0.0..1.0f64, 0..4).prop_map(|v| serde_json::json!(v)),
    ]
}

fn edits() -> impl Strategy<Value = Vec<(String, Option<serde_json::Value>)>> {
    prop::collection::vec(
        (
            prop::sample::select(KEYS).prop_map(str::to_owned),
            prop::option::weighted(0.8, value()),
        ),
        0..3,
    )
}

fn base(name: &str) -> serde_json::Value {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join(format!("tests/data/{name}_scheduler_config.json"));
    serde_json::from_str(&std::fs::read_to_string(p).expect("read")).expect("json")
}

fn config() -> Config {
    let mut c = Config {
        cases: proptest_cases(256),
        failure_persistence: None,
        ..Config::default()
    };
    if let Some(seed) = proptest_fixed_seed() {
        c.rng_seed = RngSeed::Fixed(seed);
    }
    c
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn scheduler_configs_build_or_fail_cleanly(
        file in prop::sample::select(vec!["sd15", "sd21", "sdxl"]),
        edits in edits(),
        kind in prop::option::of(prop::sample::select(SchedulerKind::all())),
        steps in prop_oneof![1..60usize, 995..1005usize, Just(0), Just(usize::MAX)],
        strength in 0.0..=1.0f64,
    ) {
        let json = edit_json(&base(file), &edits).to_string();
        let path = Path::new("scheduler/scheduler_config.json");
        let mut s = match from_config_json(&json, path, kind) {
            Ok(s) => s,
            Err(e) => {
                let msg = e.to_string();
                prop_assert!(msg.contains("scheduler_config.json"), "names the file: {msg}");
                return Ok(());
            }
        };
        if let Err(e) = s.set_timesteps(steps) {
            prop_assert!(e.to_string().contains("steps") || e.to_string().contains("timestep"), "{e}");
            return Ok(());
        }
        prop_assert!((1..=MAX_INFERENCE_STEPS).contains(&steps), "{} steps accepted", steps);
        let n = s.timesteps().len();
        prop_assert!(n >= 1, "{} steps give no timestep", steps);
        if let Some(sig) = s.sigmas() {
            prop_assert!(sig.len() > n, "one sigma per step plus the final one");
        }
        let x = Tensor::zeros((1, 1, 2, 2), DType::F32, &Device::Cpu).expect("x");
        let mut noise = RecordedNoise::new(vec![vec![0.5f32; 4]; 8]);
        for i in [0, n / 2, n - 1, n] {
            let scaled = s.scale_model_input(&x, i);
            let stepped = s.step(&x, i, &x, &mut noise);
            let noised = s.add_noise(&x, &x, i);
            if i == n {
                prop_assert!(stepped.is_err() && noised.is_err(), "index {} past the end", i);
            }
            for r in [scaled, stepped.map(|o| o.prev_sample), noised].into_iter().flatten() {
                prop_assert_eq!(r.dims(), x.dims());
            }
        }
        if let Ok(start) = s.start_index_for_strength(steps, strength) {
            prop_assert!(start <= steps * s.order(), "start {} of {}", start, n);
        }
        for f in [0.2, 0.8] {
            if let Ok(end) = s.end_index_for_denoising_end(f) {
                prop_assert!(end <= n);
            }
            if let Ok(start) = s.start_index_for_denoising_start(f) {
                prop_assert!(start <= n);
            }
        }
    }
}
