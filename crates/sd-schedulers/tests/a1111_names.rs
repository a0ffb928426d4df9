//! AUTOMATIC1111 sampler names and schedule types map onto sd-rs schedulers, and back.

use sd_core::Error;
use sd_schedulers::SchedulerKind;

#[test]
fn a1111_sampler_names() {
    let dpm = |karras| SchedulerKind::DpmSolverMultistep { karras };
    for (name, kind) in [
        ("Euler a", SchedulerKind::EulerAncestral),
        ("Euler", SchedulerKind::Euler),
        ("DPM++ 2M", dpm(false)),
        ("DPM++ 2M Karras", dpm(true)),
        ("dpm++ 2m karras", dpm(true)),
        ("DDIM", SchedulerKind::Ddim),
        ("PLMS", SchedulerKind::Pndm),
        ("LMS", SchedulerKind::Lms),
        ("Heun", SchedulerKind::Heun),
        // the existing names still work
        ("euler-a", SchedulerKind::EulerAncestral),
        ("DPMSolverMultistepScheduler", dpm(false)),
    ] {
        assert_eq!(SchedulerKind::parse(name).expect(name), kind, "{name}");
    }
    assert_eq!(
        SchedulerKind::from_a1111("DPM++ 2M", Some("Karras")).expect("karras"),
        dpm(true)
    );
    assert_eq!(
        SchedulerKind::from_a1111("Euler a", Some("Automatic")).expect("automatic"),
        SchedulerKind::EulerAncestral
    );
    assert!(SchedulerKind::from_a1111("Euler", Some("Karras")).is_err());
    assert!(SchedulerKind::from_a1111("DPM++ 2M", Some("Exponential")).is_err());
}

#[test]
fn unknown_sampler_lists_the_names() {
    let err = SchedulerKind::parse("DPM++ SDE").expect_err("not implemented");
    assert!(matches!(err, Error::InvalidArgument { .. }));
    let msg = err.to_string();
    for name in [
        "`Euler a`",
        "`DPM++ 2M Karras`",
        "`PLMS`",
        "dpm++2m",
        "EulerDiscreteScheduler",
    ] {
        assert!(msg.contains(name), "{msg} lacks {name}");
    }
}

#[test]
fn a1111_names_round_trip() {
    for kind in SchedulerKind::all() {
        let (name, schedule_type) = kind.a1111_name();
        let back = SchedulerKind::from_a1111(name, schedule_type).expect(name);
        assert_eq!(back, kind, "{name} {schedule_type:?}");
    }
    assert_eq!(
        SchedulerKind::DpmSolverMultistep { karras: true }.a1111_name(),
        ("DPM++ 2M", Some("Karras"))
    );
}
