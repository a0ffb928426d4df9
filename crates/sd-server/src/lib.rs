//! `sd serve`: sd-rs behind an HTTP API compatible with AUTOMATIC1111's `/sdapi/v1` (1.10).
//!
//! The model stays loaded; requests wait in a bounded FIFO [`queue`] (beyond it: 503 with
//! `Retry-After` at once) and one worker thread runs one generation at a time, so the HTTP side
//! (progress, interrupt, the listings) always answers. Every check that can fail on the
//! request's fault runs before queueing ([`plan`]), and is answered with AUTOMATIC1111's error
//! JSON naming the field ([`ApiError`]). See docs/server.md for the endpoints.
//!
//! ```no_run
//! # fn main() -> sd_pipeline::core::Result<()> {
//! use sd_pipeline::{core::LoadOptions, StableDiffusion};
//! let dir = std::path::Path::new("models/demo");
//! let sd = StableDiffusion::load(dir, &LoadOptions::default())?;
//! let model = sd_server::Model::new(sd, "demo", dir, 20, 5.0)?;
//! let server = sd_server::Server::start(model, sd_server::ServerConfig::default())?;
//! println!("{}", server.url());
//! server.wait_for_ctrl_c();
//! # Ok(()) }
//! ```
#![warn(missing_docs)]
#![warn(clippy::unwrap_used)]

pub mod api;
mod error;
mod models;
pub mod plan;
mod preview;
pub mod queue;
mod routes;
mod worker;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use sd_pipeline::core::{Error, LoadOptions, Result};
use sd_pipeline::{SchedulerKind, StableDiffusion};

pub use error::ApiError;
pub use models::Models;
pub use sd_pipeline::parse_infotext;

/// A loaded model and its generation defaults.
#[derive(Debug, Clone)]
pub struct Model {
    /// The pipeline.
    pub sd: StableDiffusion,
    /// The name written in infotexts (`Model:`) and listed by `/sd-models`: what was passed as
    /// `--model`.
    pub name: String,
    /// The model's folder.
    pub path: PathBuf,
    /// Steps when a request gives none.
    pub default_steps: usize,
    /// Guidance scale when a request gives none.
    pub default_cfg: f64,
    /// The model's own scheduler (used when a request names no sampler).
    pub scheduler: SchedulerKind,
    /// An SDXL refiner (loaded with [`StableDiffusion::load_refiner`]) and its name, used when
    /// a request names it in `refiner_checkpoint`.
    pub refiner: Option<(StableDiffusion, String)>,
    /// What [`Model::with_embeddings_dir`] found (empty without `--embeddings-dir`).
    pub embeddings: sd_pipeline::EmbeddingsDir,
}

impl Model {
    /// Wraps a loaded pipeline; reads its scheduler kind.
    pub fn new(
        sd: StableDiffusion,
        name: impl Into<String>,
        path: &Path,
        default_steps: usize,
        default_cfg: f64,
    ) -> Result<Self> {
        let scheduler = sd.scheduler_kind()?;
        Ok(Self {
            sd,
            name: name.into(),
            path: path.to_path_buf(),
            default_steps,
            default_cfg,
            scheduler,
            refiner: None,
            embeddings: Default::default(),
        })
    }

    /// Adds the embeddings of `dir` that fit the model (AUTOMATIC1111's `--embeddings-dir`:
    /// trigger word = file stem), replacing those read before; the others are listed as
    /// skipped. See [`StableDiffusion::with_embeddings_dir`].
    pub fn with_embeddings_dir(mut self, dir: &Path) -> Result<Self> {
        let (sd, found) = self.sd.without_embeddings().with_embeddings_dir(dir)?;
        if !found.loaded.is_empty() {
            log::info!(
                "{}: {} embedding(s) from {}: {}",
                self.name,
                found.loaded.len(),
                dir.display(),
                found
                    .loaded
                    .iter()
                    .map(|e| e.token())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        for s in &found.skipped {
            log::info!("{}: embedding {} skipped: {}", self.name, s.name, s.reason);
        }
        self.sd = sd;
        self.embeddings = found;
        Ok(self)
    }

    /// Adds an SDXL refiner (the base + refiner ensemble), named `name` in requests and
    /// infotexts; its UNet must take the base's latent channels.
    pub fn with_refiner(
        mut self,
        refiner: StableDiffusion,
        name: impl Into<String>,
    ) -> Result<Self> {
        sd_pipeline::Ensemble::new(&self.sd, &refiner, 0.8)?;
        self.refiner = Some((refiner, name.into()));
        Ok(self)
    }

    /// AUTOMATIC1111's checkpoint title (its name; sd-rs computes no hash).
    pub fn title(&self) -> &str {
        &self.name
    }

    /// True when `name` designates this model (its title, name or folder name, as clients pass
    /// `sd_model_checkpoint`).
    pub fn answers_to(&self, name: &str) -> bool {
        let name = name.trim();
        name == self.name
            || self
                .path
                .file_name()
                .is_some_and(|f| f.to_string_lossy() == name)
            || self.path.to_string_lossy() == name
    }

    /// (width, height) of a request: given sides, else the model's native size.
    pub fn size(&self, width: Option<usize>, height: Option<usize>) -> (usize, usize) {
        let (h, w) = self.sd.native_size();
        (width.unwrap_or(w), height.unwrap_or(h))
    }
}

/// What a request may ask for at most.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest width or height in pixels.
    pub max_size: usize,
    /// Most denoising steps.
    pub max_steps: usize,
    /// Most images per request (batch_size × n_iter).
    pub max_batch: usize,
    /// Largest request body in bytes.
    pub max_body_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_size: 2048,
            max_steps: 150,
            max_batch: 16,
            max_body_bytes: 64 << 20,
        }
    }
}

/// How to serve.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Address to bind (127.0.0.1 by default: reachable from this machine only).
    pub host: String,
    /// Port (0: any free port; [`Server::url`] tells which).
    pub port: u16,
    /// How many requests may wait while one runs; more are answered 503.
    pub queue: usize,
    /// HTTP basic auth `(user, password)`, as AUTOMATIC1111's `--api-auth`.
    pub api_auth: Option<(String, String)>,
    /// Request limits.
    pub limits: Limits,
    /// Folder of further diffusers models, listed by `/sd-models` and loaded (then kept) when a
    /// request or `/options` names one in `sd_model_checkpoint`.
    pub models_dir: Option<PathBuf>,
    /// How `--models-dir` models are loaded (dtype, device, variant).
    pub load_options: LoadOptions,
    /// Folder of LoRA files, listed by `/loras` and loaded by the prompts' `<lora:NAME:W>` tags.
    pub lora_dir: Option<PathBuf>,
    /// Folder of textual-inversion embeddings: those that fit a model are added to it when it
    /// loads (trigger word: the file stem), all are listed by `/embeddings`, and
    /// `/refresh-embeddings` reads the folder again.
    pub embeddings_dir: Option<PathBuf>,
    /// SDXL's invisible watermark on SDXL images (on, as the `sd` command and diffusers;
    /// AUTOMATIC1111 never marks: `false` gives its images). See docs/watermark.md.
    pub watermark: bool,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".into(),
            port: 7860,
            queue: 4,
            api_auth: None,
            limits: Limits::default(),
            models_dir: None,
            load_options: LoadOptions::default(),
            lora_dir: None,
            embeddings_dir: None,
            watermark: true,
        }
    }
}

/// A running server: the HTTP side on a tokio runtime, the worker on its own thread.
pub struct Server {
    addr: SocketAddr,
    runtime: Option<tokio::runtime::Runtime>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    queue: Arc<queue::Queue>,
    worker: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server").field("addr", &self.addr).finish()
    }
}

impl Server {
    /// Binds `config.host:config.port` and starts serving `model`; returns once the socket
    /// listens (the model is already loaded).
    pub fn start(model: Model, config: ServerConfig) -> Result<Self> {
        let bind_err = |e: std::io::Error| {
            Error::io(PathBuf::from(format!("{}:{}", config.host, config.port)), e)
        };
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("sd-serve-http")
            .enable_all()
            .build()
            .map_err(|e| Error::io(PathBuf::from("tokio runtime"), e))?;
        let listener =
            std::net::TcpListener::bind((config.host.as_str(), config.port)).map_err(bind_err)?;
        listener.set_nonblocking(true).map_err(bind_err)?;
        let addr = listener.local_addr().map_err(bind_err)?;
        let listener = {
            let _guard = runtime.enter();
            tokio::net::TcpListener::from_std(listener).map_err(bind_err)?
        };
        let model = match &config.embeddings_dir {
            Some(dir) => model.with_embeddings_dir(dir)?,
            None => model,
        };
        let models = Arc::new(Models::new(
            model,
            config.models_dir.clone(),
            config.load_options.clone(),
            config.embeddings_dir.clone(),
        ));
        let queue = Arc::new(queue::Queue::new(config.queue));
        let worker = {
            let q = queue.clone();
            std::thread::Builder::new()
                .name("sd-serve-worker".into())
                .spawn(move || worker::run(q))
                .map_err(|e| Error::io(PathBuf::from("worker thread"), e))?
        };
        let app = routes::router(routes::AppState::new(models, queue.clone(), config));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        runtime.spawn(async move {
            let served = axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = stopped.await;
                })
                .await;
            if let Err(e) = served {
                log::error!("the HTTP server stopped: {e}");
            }
        });
        Ok(Self {
            addr,
            runtime: Some(runtime),
            stop: Some(stop),
            queue,
            worker: Some(worker),
        })
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://HOST:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Blocks until Ctrl-C (SIGINT) or, on Unix, SIGTERM (what container runtimes and
    /// service managers send), then shuts down.
    pub fn wait_for_ctrl_c(mut self) {
        if let Some(rt) = &self.runtime {
            rt.block_on(async {
                #[cfg(unix)]
                {
                    use tokio::signal::unix::{signal, SignalKind};
                    match signal(SignalKind::terminate()) {
                        Ok(mut term) => {
                            tokio::select! {
                                r = tokio::signal::ctrl_c() => {
                                    if let Err(e) = r {
                                        log::error!("cannot wait for Ctrl-C: {e}");
                                    }
                                }
                                _ = term.recv() => {}
                            }
                            return;
                        }
                        Err(e) => log::error!("cannot wait for SIGTERM: {e}"),
                    }
                }
                if let Err(e) = tokio::signal::ctrl_c().await {
                    log::error!("cannot wait for Ctrl-C: {e}");
                }
            });
        }
        self.stop_now();
    }

    /// Stops: waiting requests get 503, the running one is interrupted, the worker joined.
    pub fn shutdown(mut self) {
        self.stop_now();
    }

    fn stop_now(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        self.queue.shutdown();
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_timeout(std::time::Duration::from_secs(5));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop_now();
    }
}
