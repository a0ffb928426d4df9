//! The bounded FIFO queue in front of the one generation worker, and the progress it reports.
//!
//! The HTTP side submits jobs and never waits on the worker except through the job's reply
//! channel; the worker thread pops one job at a time. A job's flags (interrupt, skip, abandoned)
//! are read by the run's `Cancel` (checked in the prompt encoding, before every step and in the
//! VAE decode), so a job stops promptly in any phase.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Instant;

use axum::http::StatusCode;
use base64::Engine;
use sd_pipeline::core::candle_core::Tensor;
use sd_pipeline::ModelFamily;
use serde_json::Value;
use tokio::sync::oneshot;

use crate::error::ApiError;
use crate::plan::Plan;

/// What a job answers: the response JSON, or an error.
pub type Reply = Result<Value, ApiError>;

/// One accepted request.
#[derive(Debug)]
pub struct Job {
    /// Unique per server.
    pub id: u64,
    /// What to generate, validated.
    pub plan: Plan,
    /// `/interrupt`: stop this job (the images done so far are returned).
    pub interrupted: AtomicBool,
    /// `/skip`: stop the current image and go on with the next.
    pub skipped: AtomicBool,
    /// The client went away: stop and answer no one.
    pub abandoned: AtomicBool,
    reply: Mutex<Option<oneshot::Sender<Reply>>>,
}

impl Job {
    /// True when the job must stop (interrupted or abandoned).
    pub fn stopping(&self) -> bool {
        self.interrupted.load(Ordering::Relaxed) || self.abandoned.load(Ordering::Relaxed)
    }

    /// Sends the answer (once; later calls do nothing).
    pub fn answer(&self, r: Reply) {
        if let Some(tx) = lock(&self.reply).take() {
            // The receiver is gone when the client disconnected: nothing to do.
            let _ = tx.send(r);
        }
    }
}

/// What `/sdapi/v1/progress` reports about the running job.
#[derive(Debug, Clone, Default)]
pub struct Progress {
    /// Images in the running job (A1111's job_count), 0 when idle.
    pub job_count: usize,
    /// Index of the image being generated.
    pub job_no: usize,
    /// Steps done in the current image.
    pub sampling_step: usize,
    /// Steps the current image runs.
    pub sampling_steps: usize,
    /// When the job started.
    pub started: Option<Instant>,
    /// `YYYYmmddHHMMSS`-like stamp of the job start (seconds since the epoch here).
    pub job_timestamp: String,
    /// The running job's id.
    pub job: Option<u64>,
    /// `/interrupt` was called on the running job.
    pub interrupted: bool,
    /// `/skip` was called on the running image.
    pub skipped: bool,
    /// The running image's latest latents (the scheduler's x0 estimate when it forms one, as
    /// AUTOMATIC1111 previews the denoised latents) and its model family: kept (an `Arc`, no
    /// copy) so that a preview is made only when `/progress` asks for one.
    pub latent: Option<(Tensor, ModelFamily)>,
    /// The previous image's last latents (`show_progress_every_n_steps` = -1 previews them).
    pub finished_latent: Option<(Tensor, ModelFamily)>,
    /// The live preview (base64 PNG), kept for the job, and the step it was made at.
    pub preview: Option<String>,
    /// `sampling_step` when `preview` was made (0 at each image's start).
    pub preview_step: usize,
}

#[derive(Debug, Default)]
struct Inner {
    waiting: VecDeque<Arc<Job>>,
    running: Option<Arc<Job>>,
    progress: Progress,
    shutdown: bool,
}

/// The queue: at most `capacity` jobs waiting, one running.
#[derive(Debug)]
pub struct Queue {
    inner: Mutex<Inner>,
    ready: Condvar,
    capacity: usize,
    next_id: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic in a generation is caught by the worker; the data stays consistent.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Queue {
    /// A queue holding at most `capacity` waiting jobs.
    pub fn new(capacity: usize) -> Self {
        Self {
            inner: Mutex::new(Inner::default()),
            ready: Condvar::new(),
            capacity,
            next_id: AtomicU64::new(1),
        }
    }

    /// How many jobs may wait.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Accepts a job, or answers 503 with `Retry-After` at once when `capacity` jobs already wait.
    pub fn submit(&self, plan: Plan) -> Result<(Arc<Job>, oneshot::Receiver<Reply>), ApiError> {
        let mut inner = lock(&self.inner);
        if inner.shutdown {
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "ShuttingDown",
                "the server is shutting down",
            ));
        }
        // The queue is full when `capacity` jobs wait; a free worker takes one at once, so a
        // job only waits when another runs.
        if inner.waiting.len() >= self.capacity {
            let mut e = ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "QueueFull",
                format!(
                    "{} requests are already waiting (--queue {}); retry later",
                    inner.waiting.len(),
                    self.capacity
                ),
            );
            e.retry_after = Some(self.retry_after(&inner));
            return Err(e);
        }
        let (tx, rx) = oneshot::channel();
        let job = Arc::new(Job {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            plan,
            interrupted: AtomicBool::new(false),
            skipped: AtomicBool::new(false),
            abandoned: AtomicBool::new(false),
            reply: Mutex::new(Some(tx)),
        });
        inner.waiting.push_back(job.clone());
        drop(inner);
        self.ready.notify_one();
        Ok((job, rx))
    }

    /// A guess of how long until a slot frees: the running job's remaining time, at least 1 s.
    fn retry_after(&self, inner: &Inner) -> u64 {
        let p = &inner.progress;
        let eta = match p.started {
            Some(t) => {
                let done = fraction(p);
                let el = t.elapsed().as_secs_f64();
                if done > 0.0 {
                    el / done - el
                } else {
                    el
                }
            }
            None => 1.0,
        };
        eta.ceil().clamp(1.0, 600.0) as u64
    }

    /// The client of job `id` went away: drop it from the queue, or stop it if it runs.
    pub fn abandon(&self, id: u64) {
        let mut inner = lock(&self.inner);
        if let Some(pos) = inner.waiting.iter().position(|j| j.id == id) {
            if let Some(job) = inner.waiting.remove(pos) {
                job.abandoned.store(true, Ordering::Relaxed);
                log::info!("job {id}: client disconnected, dropped from the queue");
            }
        } else if let Some(job) = inner.running.as_ref().filter(|j| j.id == id) {
            if !job.abandoned.swap(true, Ordering::Relaxed) {
                log::info!("job {id}: client disconnected, stopping it");
            }
        }
    }

    /// The worker's next job; `None` once the queue shuts down.
    pub fn pop(&self) -> Option<Arc<Job>> {
        let mut inner = lock(&self.inner);
        loop {
            if inner.shutdown {
                return None;
            }
            if let Some(job) = inner.waiting.pop_front() {
                inner.running = Some(job.clone());
                inner.progress = Progress {
                    job_count: job.plan.seeds.len(),
                    started: Some(Instant::now()),
                    job_timestamp: timestamp(),
                    job: Some(job.id),
                    ..Progress::default()
                };
                return Some(job);
            }
            inner = self.ready.wait(inner).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// The running job finished.
    pub fn finish(&self) {
        let mut inner = lock(&self.inner);
        inner.running = None;
        inner.progress = Progress::default();
    }

    /// Records the current image and step of the running job.
    pub fn set_step(&self, job_no: usize, step: usize, steps: usize) {
        let mut inner = lock(&self.inner);
        let p = &mut inner.progress;
        if job_no != p.job_no {
            // a new image (AUTOMATIC1111's nextjob): its preview period starts again
            p.finished_latent = p.latent.take();
            p.preview_step = 0;
        }
        inner.progress.job_no = job_no;
        inner.progress.sampling_step = step;
        inner.progress.sampling_steps = steps;
    }

    /// Keeps `latent` (of a `family` model) for the live preview.
    pub fn store_latent(&self, latent: Tensor, family: ModelFamily) {
        lock(&self.inner).progress.latent = Some((latent, family));
    }

    /// `/progress`'s `current_image`: AUTOMATIC1111's `set_current_image`. With `every_n` > 0 a
    /// new preview is made from the latest latents once `every_n` steps passed since the last
    /// one; with -1 from the last latents of each finished image; 0 makes none. `None` when
    /// idle or before the first preview.
    pub fn preview(&self, every_n: i64) -> Option<String> {
        let mut inner = lock(&self.inner);
        inner.running.as_ref()?;
        let p = &mut inner.progress;
        let source = match every_n {
            -1 => p.finished_latent.take(),
            n if n > 0 && (p.sampling_step.saturating_sub(p.preview_step)) as i64 >= n => {
                p.latent.clone()
            }
            _ => None,
        };
        if let Some((latent, family)) = source {
            // A few microseconds for a 64x64 latent: made under the lock, on the HTTP side.
            match crate::preview::cheap_approximation(&latent, family)
                .and_then(|img| sd_pipeline::image::encode_png(&img, None))
            {
                Ok(png) => {
                    p.preview = Some(base64::engine::general_purpose::STANDARD.encode(png));
                    p.preview_step = p.sampling_step;
                }
                Err(e) => log::warn!("live preview: {e}"),
            }
        }
        p.preview.clone()
    }

    /// `/interrupt`: stops the running job (if any).
    pub fn interrupt(&self) {
        let mut inner = lock(&self.inner);
        if let Some(j) = &inner.running {
            j.interrupted.store(true, Ordering::Relaxed);
            inner.progress.interrupted = true;
        }
    }

    /// `/skip`: stops the running image (if any); the job goes on with the next.
    pub fn skip(&self) {
        let mut inner = lock(&self.inner);
        if let Some(j) = &inner.running {
            j.skipped.store(true, Ordering::Relaxed);
            inner.progress.skipped = true;
        }
    }

    /// Clears the skip mark shown by progress (the worker moved to the next image).
    pub fn clear_skip(&self) {
        lock(&self.inner).progress.skipped = false;
    }

    /// A snapshot of the progress, and the number of waiting jobs.
    pub fn snapshot(&self) -> (Progress, usize, bool) {
        let inner = lock(&self.inner);
        (
            inner.progress.clone(),
            inner.waiting.len(),
            inner.running.is_some(),
        )
    }

    /// Stops the worker: waiting jobs are answered 503, the running one is interrupted.
    pub fn shutdown(&self) {
        let mut inner = lock(&self.inner);
        inner.shutdown = true;
        for job in inner.waiting.drain(..) {
            job.answer(Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "ShuttingDown",
                "the server is shutting down",
            )));
        }
        if let Some(j) = &inner.running {
            j.interrupted.store(true, Ordering::Relaxed);
        }
        drop(inner);
        self.ready.notify_all();
    }
}

/// The fraction of the running job done, as AUTOMATIC1111 computes it.
pub fn fraction(p: &Progress) -> f64 {
    if p.job_count == 0 {
        return 0.0;
    }
    let n = p.job_count as f64;
    let mut f = p.job_no as f64 / n;
    if p.sampling_steps > 0 {
        f += p.sampling_step as f64 / p.sampling_steps as f64 / n;
    }
    f.min(1.0)
}

fn timestamp() -> String {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs().to_string())
        .unwrap_or_default()
}
