//! The HTTP routes (AUTOMATIC1111 1.10's `/sdapi/v1/*` subset), basic auth and body parsing.

use std::path::Path;
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine;
use serde::de::DeserializeOwned;
use serde_json::{json, Map, Value};

use crate::api::{GenerationRequest, PngInfoRequest};
use crate::error::ApiError;
use crate::plan::{self, Mode, Options};
use crate::queue::{self, Queue};
use crate::{Models, ServerConfig};

/// What every handler sees.
#[derive(Debug)]
pub struct AppState {
    models: Arc<Models>,
    queue: Arc<Queue>,
    config: ServerConfig,
    options: Mutex<Options>,
}

impl AppState {
    pub fn new(models: Arc<Models>, queue: Arc<Queue>, config: ServerConfig) -> Arc<Self> {
        Arc::new(Self {
            models,
            queue,
            config,
            options: Mutex::new(Options::default()),
        })
    }

    fn options(&self) -> Options {
        self.options
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

type Shared = State<Arc<AppState>>;

/// Every route; `/health` and `/internal/ping` answer without auth (for load balancers).
pub fn router(state: Arc<AppState>) -> Router {
    let limit = state.config.limits.max_body_bytes;
    let api = Router::new()
        .route("/sdapi/v1/txt2img", post(txt2img))
        .route("/sdapi/v1/img2img", post(img2img))
        .route("/sdapi/v1/progress", get(progress))
        .route("/sdapi/v1/interrupt", post(interrupt))
        .route("/sdapi/v1/skip", post(skip))
        .route("/sdapi/v1/samplers", get(samplers))
        .route("/sdapi/v1/schedulers", get(schedulers))
        .route("/sdapi/v1/sd-models", get(sd_models))
        .route("/sdapi/v1/loras", get(loras))
        .route("/sdapi/v1/embeddings", get(embeddings))
        .route("/sdapi/v1/options", get(get_options).post(set_options))
        .route("/sdapi/v1/png-info", post(png_info))
        .route("/sdapi/v1/refresh-checkpoints", post(empty))
        .route("/sdapi/v1/refresh-loras", post(empty))
        .route("/sdapi/v1/refresh-embeddings", post(refresh_embeddings))
        .route_layer(middleware::from_fn_with_state(state.clone(), auth));
    Router::new()
        .route("/health", get(health))
        .route("/internal/ping", get(ping))
        .merge(api)
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state)
}

async fn not_found() -> Response {
    (StatusCode::NOT_FOUND, Json(json!({"detail": "Not Found"}))).into_response()
}

async fn empty() -> Json<Value> {
    Json(json!({}))
}

/// HTTP basic auth when `--api-auth` is set.
async fn auth(State(s): Shared, req: Request, next: Next) -> Response {
    let Some((user, pass)) = &s.config.api_auth else {
        return next.run(req).await;
    };
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
        .and_then(|b| {
            base64::engine::general_purpose::STANDARD
                .decode(b.trim())
                .ok()
        })
        .and_then(|b| String::from_utf8(b).ok());
    let ok =
        given.as_deref().and_then(|g| g.split_once(':')) == Some((user.as_str(), pass.as_str()));
    if ok {
        next.run(req).await
    } else {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "Unauthorized",
            "Incorrect username or password (HTTP basic auth, as --api-auth USER:PASS)",
        )
        .into_response()
    }
}

/// A JSON body: 413 beyond the limit, 400 when it is not JSON, 422 naming the field whose value
/// has the wrong type.
fn parse_body<T: DeserializeOwned>(body: Result<Bytes, BytesRejection>) -> Result<T, ApiError> {
    let bytes = body.map_err(|e| {
        let status = e.status();
        let kind = if status == StatusCode::PAYLOAD_TOO_LARGE {
            "PayloadTooLarge"
        } else {
            "BodyError"
        };
        ApiError::new(status, kind, e.body_text())
    })?;
    let mut de = serde_json::Deserializer::from_slice(&bytes);
    let value: T = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if inner.is_data() {
            ApiError::invalid(path.clone(), format!("{path}: {inner}"))
        } else {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "JSONDecodeError",
                format!("the body is not valid JSON: {inner}"),
            )
        }
    })?;
    de.end().map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "JSONDecodeError",
            format!("the body is not valid JSON: {e}"),
        )
    })?;
    Ok(value)
}

/// Drops the job from the queue (or stops it) when the client goes away before the answer:
/// hyper drops the handler's future when the connection closes.
struct AbandonOnDrop {
    queue: Arc<Queue>,
    id: u64,
}

impl Drop for AbandonOnDrop {
    fn drop(&mut self) {
        self.queue.abandon(self.id);
    }
}

async fn generate(
    s: Arc<AppState>,
    req: GenerationRequest,
    mode: Mode,
) -> Result<Json<Value>, ApiError> {
    // Validation decodes init images: off the async threads.
    let st = s.clone();
    let plan = tokio::task::spawn_blocking(move || {
        let mut plan = plan::plan(
            &st.models,
            &st.config.limits,
            &st.options(),
            req,
            mode,
            st.config
                .lora_dir
                .as_deref()
                .map(sd_pipeline::prompt_loras::LoraDir::new)
                .as_ref(),
        )?;
        plan.request.watermark = st.config.watermark;
        Ok::<_, ApiError>(plan)
    })
    .await
    .map_err(|e| ApiError::internal(format!("validating the request: {e}")))??;
    let (job, rx) = s.queue.submit(plan)?;
    let _guard = AbandonOnDrop {
        queue: s.queue.clone(),
        id: job.id,
    };
    drop(job);
    let reply = rx
        .await
        .map_err(|_| ApiError::internal("the worker stopped before answering"))??;
    Ok(Json(reply))
}

async fn txt2img(
    State(s): Shared,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    generate(s, parse_body(body)?, Mode::Txt2Img).await
}

async fn img2img(
    State(s): Shared,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    generate(s, parse_body(body)?, Mode::Img2Img).await
}

/// A boolean query parameter as FastAPI reads one (`true`/`false`, `1`/`0`, `yes`/`no`,
/// `on`/`off`); absent or unreadable: `default`.
fn query_flag(uri: &axum::http::Uri, name: &str, default: bool) -> bool {
    uri.query()
        .into_iter()
        .flat_map(|q| q.split('&'))
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == name)
        .and_then(|(_, v)| match v.to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" | "on" => Some(true),
            "false" | "0" | "no" | "off" => Some(false),
            _ => None,
        })
        .unwrap_or(default)
}

async fn progress(State(s): Shared, uri: axum::http::Uri) -> Json<Value> {
    // A1111's ProgressRequest: skip_current_image defaults to false
    let current_image = if query_flag(&uri, "skip_current_image", false) {
        None
    } else {
        s.queue.preview(s.options().show_progress_every_n_steps)
    };
    let (p, waiting, running) = s.queue.snapshot();
    let fraction = queue::fraction(&p);
    let eta = match p.started {
        Some(t) if fraction > 0.0 => {
            let el = t.elapsed().as_secs_f64();
            el / fraction - el
        }
        _ => 0.0,
    };
    Json(json!({
        "progress": fraction,
        "eta_relative": eta,
        "state": {
            "skipped": p.skipped,
            "interrupted": p.interrupted,
            "stopping_generation": false,
            "job": p.job.map(|id| format!("job {id}")).unwrap_or_default(),
            "job_count": if running { p.job_count } else { 0 },
            "job_timestamp": p.job_timestamp,
            "job_no": p.job_no,
            "sampling_step": p.sampling_step,
            "sampling_steps": p.sampling_steps,
            "queued": waiting,
        },
        "current_image": current_image,
        "textinfo": null,
        "current_task": p.job.map(|id| format!("job {id}")),
    }))
}

async fn interrupt(State(s): Shared) -> Json<Value> {
    s.queue.interrupt();
    Json(json!({}))
}

async fn skip(State(s): Shared) -> Json<Value> {
    s.queue.skip();
    Json(json!({}))
}

async fn samplers() -> Json<Value> {
    let mut out: Vec<Value> = Vec::new();
    let mut seen: Vec<&str> = Vec::new();
    for k in sd_pipeline::SchedulerKind::all() {
        let name = k.a1111_name().0;
        if let Some(i) = seen.iter().position(|n| *n == name) {
            if let Some(a) = out[i]["aliases"].as_array_mut() {
                a.push(json!(k.short_name()));
            }
            continue;
        }
        seen.push(name);
        out.push(json!({
            "name": name,
            "aliases": [k.short_name(), k.class_name()],
            "options": {},
        }));
    }
    Json(Value::Array(out))
}

async fn schedulers() -> Json<Value> {
    Json(json!([
        {"name": "automatic", "label": "Automatic", "aliases": null, "default_rho": -1, "need_inner_model": false},
        {"name": "karras", "label": "Karras", "aliases": null, "default_rho": 7.0, "need_inner_model": false},
    ]))
}

fn stem(p: &Path) -> String {
    p.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}

async fn sd_models(State(s): Shared) -> Json<Value> {
    let entry = |title: &str, path: &Path| {
        json!({
            "title": title,
            "model_name": title,
            "hash": null,
            "sha256": null,
            "filename": path.to_string_lossy(),
            "config": null,
        })
    };
    // The current model first, then the other loaded ones, then the folders not loaded yet.
    let current = s.models.current();
    let loaded = s.models.loaded();
    let mut out = vec![entry(current.title(), &current.path)];
    for m in loaded.iter().filter(|m| m.path != current.path) {
        out.push(entry(m.title(), &m.path));
    }
    for p in s.models.available() {
        if !loaded.iter().any(|m| m.path == p) {
            let name = p
                .file_name()
                .map(|f| f.to_string_lossy().into_owned())
                .unwrap_or_default();
            out.push(entry(&name, &p));
        }
    }
    Json(Value::Array(out))
}

async fn loras(State(s): Shared) -> Json<Value> {
    let files = s
        .config
        .lora_dir
        .as_deref()
        .and_then(|d| sd_pipeline::prompt_loras::LoraDir::new(d).list().ok())
        .unwrap_or_default();
    Json(Value::Array(
        files
            .iter()
            .map(|p| json!({"name": stem(p), "alias": stem(p), "path": p.to_string_lossy(), "metadata": {}}))
            .collect(),
    ))
}

/// AUTOMATIC1111's listing of an embedding: `shape` is the vector width (SDXL: clip_l's +
/// clip_g's), `vectors` the number of vectors (SDXL: clip_g's); sd-rs reads safetensors files,
/// which carry no `step` or checkpoint.
fn embedding_entry(e: Option<&sd_pipeline::formats::EmbeddingFile>) -> Value {
    let dims = |t: &Option<sd_pipeline::core::candle_core::Tensor>| {
        t.as_ref().and_then(|t| t.dims2().ok())
    };
    let (vectors, shape) = match e {
        Some(e) => match (dims(&e.single), dims(&e.clip_l), dims(&e.clip_g)) {
            (Some((n, d)), _, _) => (json!(n), json!(d)),
            (None, Some((_, dl)), Some((n, dg))) => (json!(n), json!(dl + dg)),
            _ => (json!(0), Value::Null),
        },
        None => (json!(0), Value::Null),
    };
    json!({"step": null, "sd_checkpoint": null, "sd_checkpoint_name": null, "shape": shape, "vectors": vectors})
}

async fn embeddings(State(s): Shared) -> Json<Value> {
    let model = s.models.current();
    let found = &model.embeddings;
    let loaded: Map<String, Value> = found
        .loaded
        .iter()
        .map(|e| (e.token().to_owned(), embedding_entry(Some(e))))
        .collect();
    let skipped: Map<String, Value> = found
        .skipped
        .iter()
        .map(|k| (k.name.clone(), embedding_entry(k.file.as_deref())))
        .collect();
    Json(json!({"loaded": loaded, "skipped": skipped}))
}

async fn refresh_embeddings(State(s): Shared) -> Result<Json<Value>, ApiError> {
    let models = s.models.clone();
    tokio::task::spawn_blocking(move || models.refresh_embeddings())
        .await
        .map_err(|e| ApiError::internal(format!("reading the embeddings: {e}")))??;
    Ok(Json(json!({})))
}

async fn get_options(State(s): Shared) -> Json<Value> {
    let o = s.options();
    Json(json!({
        "sd_model_checkpoint": s.models.current().title(),
        "sd_checkpoint_hash": null,
        "CLIP_stop_at_last_layers": o.clip_stop_at_last_layers,
        "samples_format": "png",
        "sd_vae": "Automatic",
        "show_progress_every_n_steps": o.show_progress_every_n_steps,
        "live_previews_enable": true,
        "show_progress_type": "Approx cheap",
    }))
}

async fn set_options(
    State(s): Shared,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let req: Map<String, Value> = parse_body(body)?;
    let mut new = s.options();
    for (k, v) in &req {
        match k.as_str() {
            "CLIP_stop_at_last_layers" => {
                new.clip_stop_at_last_layers = v
                    .as_u64()
                    .filter(|n| (1..=12).contains(n))
                    .map(|n| n as u32)
                    .ok_or_else(|| {
                        ApiError::invalid(
                            k.clone(),
                            format!("{v}: expected an integer from 1 to 12"),
                        )
                    })?;
            }
            "show_progress_every_n_steps" => {
                new.show_progress_every_n_steps =
                    v.as_i64().filter(|&n| n >= -1).ok_or_else(|| {
                        ApiError::invalid(
                            k.clone(),
                            format!("{v}: expected an integer, -1 (after each image) or more"),
                        )
                    })?;
            }
            "sd_model_checkpoint" => {
                // Loading takes a while: off the async threads. The model stays loaded.
                let (models, name) = (s.models.clone(), v.as_str().unwrap_or_default().to_owned());
                let field = k.clone();
                let m = tokio::task::spawn_blocking(move || models.get(&name, &field))
                    .await
                    .map_err(|e| ApiError::internal(format!("loading the model: {e}")))??;
                s.models.set_current(m);
            }
            other => log::info!("option {other} ignored (sd-rs does not use it)"),
        }
    }
    *s.options.lock().unwrap_or_else(|e| e.into_inner()) = new;
    Ok(Json(Value::Null))
}

async fn png_info(body: Result<Bytes, BytesRejection>) -> Result<Json<Value>, ApiError> {
    let req: PngInfoRequest = parse_body(body)?;
    if req.image.is_empty() {
        return Err(ApiError::invalid(
            "image",
            "image: a base64 PNG is required",
        ));
    }
    let bytes = plan::base64_image(&req.image, "image")?;
    let text = sd_pipeline::image::png_parameters(&bytes)?;
    Ok(Json(match text {
        Some(t) => json!({
            "info": t,
            "items": {"parameters": t},
            "parameters": crate::parse_infotext(&t),
        }),
        None => json!({"info": "", "items": {}, "parameters": {}}),
    }))
}

async fn health(State(s): Shared) -> Json<Value> {
    let (_, waiting, running) = s.queue.snapshot();
    Json(json!({
        "status": "ok",
        "model": s.models.current().title(),
        "running": running,
        "queued": waiting,
        "queue_capacity": s.queue.capacity(),
    }))
}

async fn ping() -> Json<Value> {
    Json(json!({}))
}
