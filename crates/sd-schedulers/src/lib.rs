//! sd-rs diffusion schedulers behind one Scheduler trait (DDPM, DDIM, PNDM, Euler, Euler Ancestral, DPM++ 2M, Heun, LMS)
#![warn(missing_docs)]
#![warn(clippy::unwrap_used)]
