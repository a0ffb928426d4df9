//! Config resolution and errors: class defaults under `from_config`, clear errors naming the
//! file and field, and dtypes other than float32.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use sd_core::{Error, RecordedNoise};
use sd_schedulers::{
    from_config_file, from_config_json, resolve_config_json, SchedulerKind, TimestepSpacing,
};

fn data(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join(format!("tests/data/{name}_scheduler_config.json"))
}

fn config_error(json: &str, kind: Option<SchedulerKind>) -> (PathBuf, Option<String>, String) {
    match from_config_json(json, Path::new("unet/scheduler_config.json"), kind) {
        Err(Error::Config { path, key, reason }) => (path, key, reason),
        Err(e) => panic!("expected a config error, got {e}"),
        Ok(_) => panic!("expected a config error for {json}"),
    }
}

#[test]
fn each_file_builds_its_own_class() {
    for (name, steps) in [("sd15", 11), ("sd21", 10), ("sdxl", 10)] {
        let mut s = from_config_file(&data(name), None).expect("build");
        s.set_timesteps(10).expect("set_timesteps");
        // PNDM with skip_prk_steps runs N + 1 model evaluations
        assert_eq!(s.timesteps().len(), steps, "{name}");
    }
}

#[test]
fn from_config_onto_another_class_takes_that_class_defaults() {
    let text = std::fs::read_to_string(data("sd15")).expect("read");
    // SD 1.5's file has no timestep_spacing: PNDM/DDIM default to leading, Euler to linspace
    let path = data("sd15");
    let ddim = resolve_config_json(&text, &path, Some(SchedulerKind::Ddim)).expect("ddim");
    let euler = resolve_config_json(&text, &path, Some(SchedulerKind::Euler)).expect("euler");
    assert_eq!(ddim.timestep_spacing, TimestepSpacing::Leading);
    assert_eq!(euler.timestep_spacing, TimestepSpacing::Linspace);
    let karras = resolve_config_json(
        &text,
        &path,
        Some(SchedulerKind::parse("dpm++2m-karras").expect("kind")),
    )
    .expect("dpm");
    assert!(karras.use_karras_sigmas);
}

#[test]
fn unknown_class_and_values_are_config_errors_naming_file_and_field() {
    let (path, key, reason) = config_error(r#"{"_class_name": "UniPCMultistepScheduler"}"#, None);
    assert_eq!(path, Path::new("unet/scheduler_config.json"));
    assert_eq!(key.as_deref(), Some("_class_name"));
    assert!(
        reason.contains("UniPCMultistepScheduler") && reason.contains("EulerDiscreteScheduler"),
        "{reason}"
    );

    let (_, key, reason) = config_error(
        r#"{"_class_name": "DDIMScheduler", "timestep_spacing": "middle"}"#,
        None,
    );
    assert_eq!(key.as_deref(), Some("timestep_spacing"));
    assert!(
        reason.contains("`middle`") && reason.contains("`trailing`"),
        "{reason}"
    );

    let (_, key, _) = config_error(
        r#"{"_class_name": "DDIMScheduler", "beta_schedule": "sigmoid"}"#,
        None,
    );
    assert_eq!(key.as_deref(), Some("beta_schedule"));

    let (_, key, _) = config_error(
        r#"{"_class_name": "DDIMScheduler", "beta_start": "small"}"#,
        None,
    );
    assert_eq!(key.as_deref(), Some("beta_start"));

    let (_, key, _) = config_error(r#"{"_class_name": "PNDMScheduler"}"#, None); // skip_prk_steps defaults to false
    assert_eq!(key.as_deref(), Some("skip_prk_steps"));

    let (_, key, _) = config_error(
        r#"{"algorithm_type": "sde-dpmsolver++"}"#,
        Some(SchedulerKind::DpmSolverMultistep { karras: false }),
    );
    assert_eq!(key.as_deref(), Some("algorithm_type"));
}

#[test]
fn python_infinity_and_unknown_keys_are_accepted() {
    // DPMSolverMultistepScheduler configs saved by diffusers hold a bare -Infinity
    let json = r#"{"_class_name": "DPMSolverMultistepScheduler", "lambda_min_clipped": -Infinity, "a_future_field": 1}"#;
    let mut s = from_config_json(json, Path::new("x.json"), None).expect("build");
    s.set_timesteps(20).expect("set_timesteps");
    assert_eq!(s.timesteps().len(), 20);
}

#[test]
fn short_and_class_names_parse() {
    for name in [
        "ddpm",
        "ddim",
        "pndm",
        "euler",
        "euler-a",
        "dpm++2m",
        "dpm++2m-karras",
        "heun",
        "lms",
        "HeunDiscreteScheduler",
    ] {
        SchedulerKind::parse(name).expect(name);
    }
    assert!(matches!(
        SchedulerKind::parse("unipc"),
        Err(Error::InvalidArgument { .. })
    ));
}

#[test]
fn half_precision_in_and_out_with_float32_maths() {
    let mut s = from_config_file(&data("sdxl"), None).expect("build");
    s.set_timesteps(10).expect("set_timesteps");
    let dev = Device::Cpu;
    let x = Tensor::arange(0f32, 16.0, &dev)
        .expect("t")
        .reshape((1, 4, 2, 2))
        .expect("r");
    let eps = (x.affine(-0.1, 0.5)).expect("eps");
    let mut noise = RecordedNoise::default();
    let f32_out = s.step(&eps, 3, &x, &mut noise).expect("f32").prev_sample;
    for dtype in [DType::F16, DType::BF16] {
        let out = s
            .step(
                &eps.to_dtype(dtype).expect("c"),
                3,
                &x.to_dtype(dtype).expect("c"),
                &mut noise,
            )
            .expect("half")
            .prev_sample;
        assert_eq!(out.dtype(), dtype);
        // the half inputs and output carry their own rounding (bf16: 2^-8); measured max abs
        // 3.7e-3 (f16, ratio 0.03) and 3.1e-2 (bf16, ratio 0.25) on values up to ~15
        sd_core::testing::assert_close(&out, &f32_out, 0.0, 1e-2, &format!("{dtype:?}"));
    }
}

#[test]
fn step_index_and_shapes_are_checked() {
    let mut s = from_config_file(&data("sd21"), None).expect("build");
    s.set_timesteps(10).expect("set_timesteps");
    let x = Tensor::zeros((1, 4, 2, 2), DType::F32, &Device::Cpu).expect("t");
    let y = Tensor::zeros((1, 4, 2, 3), DType::F32, &Device::Cpu).expect("t");
    let mut noise = RecordedNoise::default();
    assert!(matches!(
        s.step(&x, 10, &x, &mut noise),
        Err(Error::InvalidArgument { .. })
    ));
    assert!(matches!(
        s.step(&y, 0, &x, &mut noise),
        Err(Error::InvalidArgument { .. })
    ));
    assert!(matches!(
        s.start_index_for_strength(10, 1.5),
        Err(Error::InvalidArgument { .. })
    ));
    assert!(matches!(
        s.end_index_for_denoising_end(1.0),
        Err(Error::InvalidArgument { .. })
    ));
    assert!(matches!(
        s.set_timesteps(0),
        Err(Error::InvalidArgument { .. })
    ));
}
