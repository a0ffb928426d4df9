//! The download path end to end, against a small hub started by each test on 127.0.0.1: the
//! fixture model served in the Hugging Face URL layout (`/api/models/{repo}/revision/{rev}`,
//! `/{repo}/resolve/{rev}/{file}` with `X-Repo-Commit`, `ETag` / `X-Linked-Etag`,
//! `X-Linked-Size`, `Content-Length`, `Range`, and a redirect of weight files to a "CDN" path as
//! the hub does for LFS files). The server counts requests, can require a token, cut a file
//! halfway, or answer 404 for a listed file.
//!
//! Each test builds its own `HubConfig` (no process environment is read or changed, so the tests
//! run in parallel).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use sd_pipeline::core::testing::fixtures_dir;
use sd_pipeline::core::LoadOptions;
use sd_pipeline::hub::{missing_files, resolve_config, resolve_model, HubConfig};
use sd_pipeline::StableDiffusion;

const REPO: &str = "test-org/tiny-sd1";
const MAIN_SHA: &str = "1111111111111111111111111111111111111111";
const V1_SHA: &str = "2222222222222222222222222222222222222222";
const TOKEN: &str = "hf_test_token";

/// One request the server saw.
#[derive(Debug, Clone)]
struct Seen {
    method: String,
    path: String,
    range: Option<String>,
}

/// A revision's files: path -> bytes.
type Files = Arc<BTreeMap<String, Vec<u8>>>;

#[derive(Default)]
struct State {
    /// revision name or commit -> (commit, files).
    revisions: HashMap<String, (String, Files)>,
    token: Option<String>,
    /// Files whose next `n` body GETs are cut halfway (the connection closed after half).
    cut: HashMap<String, usize>,
    /// Listed files that answer 404.
    gone: HashSet<String>,
    seen: Vec<Seen>,
}

struct Hub {
    endpoint: String,
    state: Arc<Mutex<State>>,
}

/// A model folder as a file map (relative paths with `/`).
fn files_of(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, Vec<u8>>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(root, &p, out);
            } else {
                let rel = p
                    .strip_prefix(root)
                    .unwrap()
                    .to_string_lossy()
                    .replace('\\', "/");
                if rel != "manifest.json" {
                    out.insert(rel, std::fs::read(&p).unwrap());
                }
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

/// FNV-1a of the bytes: a stand-in for the hub's sha256 / git-sha1 etags.
fn etag(bytes: &[u8]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h = (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}{:08x}", bytes.len())
}

impl Hub {
    /// Serves `fixtures/models/sd1` at `main`, and the same model with another scheduler config
    /// at the tag `v1`.
    fn start() -> Self {
        let main = files_of(&fixtures_dir().join("models/sd1"));
        let mut v1 = main.clone();
        let sched = String::from_utf8(v1["scheduler/scheduler_config.json"].clone()).unwrap();
        let mut sched: serde_json::Value = serde_json::from_str(&sched).unwrap();
        sched["steps_offset"] = serde_json::json!(0);
        v1.insert(
            "scheduler/scheduler_config.json".into(),
            serde_json::to_vec_pretty(&sched).unwrap(),
        );
        let main = Arc::new(main);
        let v1 = Arc::new(v1);
        let mut state = State::default();
        for (name, sha, files) in [
            ("main", MAIN_SHA, &main),
            (MAIN_SHA, MAIN_SHA, &main),
            ("v1", V1_SHA, &v1),
            (V1_SHA, V1_SHA, &v1),
        ] {
            state
                .revisions
                .insert(name.into(), (sha.into(), Arc::clone(files)));
        }
        let state = Arc::new(Mutex::new(state));
        // The hub, and its "CDN" on another port (another origin: no token goes there).
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let cdn_listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let cdn = format!("http://{}", cdn_listener.local_addr().unwrap());
        for l in [listener, cdn_listener] {
            let (st, cdn) = (Arc::clone(&state), cdn.clone());
            std::thread::spawn(move || {
                for conn in l.incoming() {
                    let Ok(conn) = conn else { continue };
                    let (st, cdn) = (Arc::clone(&st), cdn.clone());
                    std::thread::spawn(move || serve(conn, &st, &cdn));
                }
            });
        }
        Hub { endpoint, state }
    }

    fn config(&self, cache: &Path) -> HubConfig {
        HubConfig {
            cache_dir: cache.to_path_buf(),
            endpoint: self.endpoint.clone(),
            token: None,
            offline: false,
            revision: "main".into(),
        }
    }

    fn seen(&self) -> Vec<Seen> {
        self.state.lock().unwrap().seen.clone()
    }

    fn clear(&self) {
        self.state.lock().unwrap().seen.clear();
    }

    /// The body downloads (GETs of file bytes, not the listing) seen so far.
    fn body_gets(&self) -> Vec<Seen> {
        self.seen()
            .into_iter()
            .filter(|s| s.method == "GET" && !s.path.starts_with("/api/"))
            .collect()
    }
}

fn respond(conn: &mut TcpStream, status: &str, headers: &[(String, String)], body: &[u8]) {
    let mut head = format!("HTTP/1.1 {status}\r\nConnection: close\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    let _ = conn.write_all(head.as_bytes());
    let _ = conn.write_all(body);
    let _ = conn.flush();
}

fn serve(mut conn: TcpStream, state: &Mutex<State>, cdn: &str) {
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut line = String::new();
    if reader.read_line(&mut line).is_err() {
        return;
    }
    let mut parts = line.split_whitespace();
    let (Some(method), Some(target)) = (parts.next(), parts.next()) else {
        return;
    };
    let (method, path) = (method.to_owned(), target.to_owned());
    let mut headers = HashMap::new();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).is_err() || h.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_owned());
        }
    }
    let range = headers.get("range").cloned();
    let mut st = state.lock().unwrap();
    st.seen.push(Seen {
        method: method.clone(),
        path: path.clone(),
        range: range.clone(),
    });
    let json = ("Content-Type".to_owned(), "application/json".to_owned());
    let authorized = match &st.token {
        None => true,
        Some(t) => headers.get("authorization") == Some(&format!("Bearer {t}")),
    };
    let not_found = |conn: &mut TcpStream, what: &str| {
        let body = format!("{{\"error\":\"{what} not found\"}}");
        let h = [
            json.clone(),
            ("Content-Length".into(), body.len().to_string()),
            ("X-Error-Code".into(), "EntryNotFound".into()),
        ];
        respond(conn, "404 Not Found", &h, body.as_bytes());
    };
    let unauthorized = |conn: &mut TcpStream| {
        let body = b"{\"error\":\"Invalid credentials in Authorization header\"}";
        let h = [
            json.clone(),
            ("Content-Length".into(), body.len().to_string()),
        ];
        respond(conn, "401 Unauthorized", &h, body);
    };

    // The "CDN": bytes by etag, no token needed (and none must be sent).
    if let Some(tag) = path.strip_prefix("/cdn/") {
        if headers.contains_key("authorization") {
            respond(&mut conn, "400 Bad Request", &[], b"");
            return;
        }
        let found = st.revisions.values().find_map(|(_, files)| {
            files
                .iter()
                .find(|(_, b)| etag(b) == tag)
                .map(|(n, b)| (n.clone(), b.clone()))
        });
        let Some((name, bytes)) = found else {
            return not_found(&mut conn, "blob");
        };
        let cut = st.cut.get_mut(&name).is_some_and(|n| {
            let c = *n > 0;
            *n = n.saturating_sub(1);
            c
        });
        drop(st);
        let from = range
            .as_deref()
            .and_then(|r| r.strip_prefix("bytes="))
            .and_then(|r| r.strip_suffix('-'))
            .and_then(|r| r.parse::<usize>().ok())
            .filter(|&f| f < bytes.len());
        let len = bytes.len();
        let (status, body, mut h) = match from {
            Some(f) => (
                "206 Partial Content",
                &bytes[f..],
                vec![(
                    "Content-Range".to_owned(),
                    format!("bytes {f}-{}/{len}", len - 1),
                )],
            ),
            None => ("200 OK", &bytes[..], vec![]),
        };
        h.push(("Content-Length".into(), body.len().to_string()));
        h.push(("Accept-Ranges".into(), "bytes".into()));
        if method == "HEAD" {
            return respond(&mut conn, status, &h, b"");
        }
        if cut {
            // Announce the whole length, send half, hang up.
            respond(&mut conn, status, &h, &body[..body.len() / 2]);
            let _ = conn.shutdown(std::net::Shutdown::Both);
            return;
        }
        return respond(&mut conn, status, &h, body);
    }

    if !authorized {
        return unauthorized(&mut conn);
    }
    let repo_prefix = format!("/api/models/{REPO}/revision/");
    if let Some(rev) = path.strip_prefix(&repo_prefix) {
        let rev = rev.replace("%2F", "/");
        let Some((sha, files)) = st.revisions.get(&rev) else {
            return not_found(&mut conn, "revision");
        };
        let siblings: Vec<_> = files
            .keys()
            .map(|f| serde_json::json!({ "rfilename": f }))
            .collect();
        let body = serde_json::to_vec(&serde_json::json!({
            "id": REPO, "modelId": REPO, "sha": sha, "siblings": siblings,
        }))
        .unwrap();
        let h = [json, ("Content-Length".into(), body.len().to_string())];
        return respond(&mut conn, "200 OK", &h, &body);
    }
    let resolve_prefix = format!("/{REPO}/resolve/");
    let Some(rest) = path.strip_prefix(&resolve_prefix) else {
        return not_found(&mut conn, "repository");
    };
    let Some((rev, file)) = rest.split_once('/') else {
        return not_found(&mut conn, "file");
    };
    let Some((sha, files)) = st.revisions.get(rev).cloned() else {
        return not_found(&mut conn, "revision");
    };
    let Some(bytes) = files.get(file).filter(|_| !st.gone.contains(file)) else {
        return not_found(&mut conn, "entry");
    };
    let tag = etag(bytes);
    let mut h = vec![
        ("X-Repo-Commit".to_owned(), sha.clone()),
        ("Accept-Ranges".into(), "bytes".into()),
    ];
    if file.ends_with(".safetensors") {
        // An LFS file: the hub answers with the blob's sha256 as X-Linked-Etag, its size as
        // X-Linked-Size and a redirect to the CDN.
        h.push(("X-Linked-Etag".into(), format!("\"{tag}\"")));
        h.push(("X-Linked-Size".into(), bytes.len().to_string()));
        h.push(("ETag".into(), "\"not-the-blob\"".into()));
        h.push(("Location".into(), format!("{cdn}/cdn/{tag}")));
        h.push(("Content-Length".into(), "0".into()));
        return respond(&mut conn, "302 Found", &h, b"");
    }
    let bytes = bytes.clone();
    drop(st);
    h.push(("ETag".into(), format!("\"{tag}\"")));
    h.push(("Content-Length".into(), bytes.len().to_string()));
    let body: &[u8] = if method == "HEAD" { b"" } else { &bytes };
    respond(&mut conn, "200 OK", &h, body);
}

fn msg(e: impl std::fmt::Display) -> String {
    e.to_string()
}

#[test]
fn first_download_writes_the_hub_cache_layout_and_a_second_run_downloads_nothing() {
    let hub = Hub::start();
    let cache = tempfile::tempdir().unwrap();
    let cfg = hub.config(cache.path());
    let dir = resolve_model(REPO, None, &cfg).unwrap();

    // The layout huggingface_hub writes: refs/main holds the commit; snapshots/<commit>/<file>
    // are relative symlinks into blobs/<etag>; nothing .incomplete is left.
    let repo = cache.path().join("models--test-org--tiny-sd1");
    assert_eq!(dir, repo.join("snapshots").join(MAIN_SHA));
    assert_eq!(
        std::fs::read_to_string(repo.join("refs/main")).unwrap(),
        MAIN_SHA
    );
    let served = files_of(&fixtures_dir().join("models/sd1"));
    let wanted = [
        "model_index.json",
        "scheduler/scheduler_config.json",
        "text_encoder/config.json",
        "text_encoder/model.safetensors",
        "tokenizer/merges.txt",
        "tokenizer/vocab.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "vae/config.json",
        "vae/diffusion_pytorch_model.safetensors",
    ];
    for f in wanted {
        let link = dir.join(f);
        let target = std::fs::read_link(&link).unwrap_or_else(|e| panic!("{f}: {e}"));
        let ups = 2 + f.matches('/').count();
        assert!(target.is_relative() && target.starts_with("../".repeat(ups - 1) + ".."));
        assert_eq!(
            target.file_name().unwrap().to_string_lossy(),
            etag(&served[f]),
            "{f} links to blobs/<etag>"
        );
        assert_eq!(std::fs::read(&link).unwrap(), served[f], "{f} bytes");
    }
    // Only the plain weights: the fp16 variant files are not downloaded.
    assert!(!dir
        .join("unet/diffusion_pytorch_model.fp16.safetensors")
        .exists());
    let blobs: Vec<String> = std::fs::read_dir(repo.join("blobs"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        blobs.iter().all(|b| !b.ends_with(".incomplete")),
        "{blobs:?}"
    );
    // The files the downloader wrote load as a pipeline.
    let sd = StableDiffusion::load(&dir, &LoadOptions::default()).unwrap();
    assert_eq!(sd.family, sd_pipeline::ModelFamily::Sd);
    // Each file's bytes were fetched exactly once (HEAD for metadata, GET for the body).
    let gets = hub.body_gets();
    let weights = gets.iter().filter(|s| s.path.starts_with("/cdn/")).count();
    assert_eq!(weights, 3, "{gets:?}");

    // A second run: one listing request (to learn what `main` points to), no file request.
    hub.clear();
    assert_eq!(resolve_model(REPO, None, &cfg).unwrap(), dir);
    let seen = hub.seen();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert!(seen[0].path.starts_with("/api/models/"));

    // Offline: served from the cache with no request at all.
    hub.clear();
    let offline = HubConfig {
        offline: true,
        ..cfg.clone()
    };
    assert_eq!(resolve_model(REPO, None, &offline).unwrap(), dir);
    assert!(hub.seen().is_empty());

    // The hub unreachable (a closed port): the complete cached snapshot stands in.
    let closed = TcpListener::bind("127.0.0.1:0").unwrap();
    let unreachable = HubConfig {
        endpoint: format!("http://{}", closed.local_addr().unwrap()),
        ..cfg.clone()
    };
    drop(closed);
    assert_eq!(resolve_model(REPO, None, &unreachable).unwrap(), dir);
}

#[test]
fn offline_without_a_cache_is_a_clear_error_and_sends_nothing() {
    let hub = Hub::start();
    let cache = tempfile::tempdir().unwrap();
    let cfg = HubConfig {
        offline: true,
        ..hub.config(cache.path())
    };
    let err = msg(resolve_model(REPO, None, &cfg).unwrap_err());
    assert!(
        err.contains("HF_HUB_OFFLINE") && err.contains("models--test-org--tiny-sd1"),
        "{err}"
    );
    assert!(hub.seen().is_empty());
    // Unreachable and nothing cached: the error names the listing that failed.
    let closed = TcpListener::bind("127.0.0.1:0").unwrap();
    let cfg = HubConfig {
        endpoint: format!("http://{}", closed.local_addr().unwrap()),
        offline: false,
        ..cfg
    };
    drop(closed);
    let err = msg(resolve_model(REPO, None, &cfg).unwrap_err());
    assert!(err.contains("listing `test-org/tiny-sd1`"), "{err}");
}

#[test]
fn a_download_cut_halfway_is_resumed_and_never_taken_as_complete() {
    let hub = Hub::start();
    let cache = tempfile::tempdir().unwrap();
    let cfg = hub.config(cache.path());
    let unet = "unet/diffusion_pytorch_model.safetensors";
    let full = files_of(&fixtures_dir().join("models/sd1"))[unet].clone();

    // Cut once: the next request asks for the rest (Range: bytes=<half>-) and the file is whole.
    hub.state.lock().unwrap().cut.insert(unet.into(), 1);
    let dir = resolve_model(REPO, None, &cfg).unwrap();
    assert_eq!(std::fs::read(dir.join(unet)).unwrap(), full);
    let tag = etag(&full);
    let unet_gets: Vec<Seen> = hub
        .body_gets()
        .into_iter()
        .filter(|s| s.path == format!("/cdn/{tag}"))
        .collect();
    assert_eq!(unet_gets.len(), 2, "{unet_gets:?}");
    assert_eq!(unet_gets[0].range, None);
    assert_eq!(
        unet_gets[1].range.as_deref(),
        Some(format!("bytes={}-", full.len() / 2).as_str())
    );
}

#[test]
fn a_download_that_keeps_failing_leaves_no_usable_snapshot_then_resumes() {
    let hub = Hub::start();
    let cache = tempfile::tempdir().unwrap();
    let cfg = hub.config(cache.path());
    let unet = "unet/diffusion_pytorch_model.safetensors";
    let full = files_of(&fixtures_dir().join("models/sd1"))[unet].clone();
    let tag = etag(&full);

    // Every attempt cut: an error naming the file, the partial blob kept as .incomplete, no
    // snapshot link, no ref.
    hub.state.lock().unwrap().cut.insert(unet.into(), 1000);
    let err = msg(resolve_model(REPO, None, &cfg).unwrap_err());
    assert!(err.contains(unet) && err.contains("attempts"), "{err}");
    let repo = cache.path().join("models--test-org--tiny-sd1");
    let part = repo.join("blobs").join(format!("{tag}.incomplete"));
    let kept = std::fs::metadata(&part).unwrap().len();
    assert!(kept > 0 && (kept as usize) < full.len(), "{kept}");
    assert!(!repo.join("blobs").join(&tag).exists());
    let snap = repo.join("snapshots").join(MAIN_SHA);
    assert!(snap.join("model_index.json").is_file());
    assert!(std::fs::symlink_metadata(snap.join(unet)).is_err());
    assert!(!repo.join("refs/main").exists());

    // The snapshot is judged file by file: the UNet weights are missing (the other weights were
    // downloaded before the UNet's or not, whichever; the UNet's is what the error names).
    let missing = missing_files(&snap, None, true).unwrap();
    assert!(missing.contains(&unet.to_owned()), "{missing:?}");
    // Offline now: no ref, so the model is not in the cache.
    let offline = HubConfig {
        offline: true,
        ..cfg.clone()
    };
    let err = msg(resolve_model(REPO, None, &offline).unwrap_err());
    assert!(err.contains("HF_HUB_OFFLINE"), "{err}");
    // With a ref from an earlier complete run of the same commit, offline names the file.
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), MAIN_SHA).unwrap();
    let err = msg(resolve_model(REPO, None, &offline).unwrap_err());
    assert!(err.contains(unet), "{err}");

    // The server recovers: the download resumes from the kept bytes.
    hub.state.lock().unwrap().cut.clear();
    hub.clear();
    let dir = resolve_model(REPO, None, &cfg).unwrap();
    assert_eq!(std::fs::read(dir.join(unet)).unwrap(), full);
    let gets: Vec<Seen> = hub
        .body_gets()
        .into_iter()
        .filter(|s| s.path == format!("/cdn/{tag}"))
        .collect();
    assert_eq!(gets.len(), 1, "{gets:?}");
    assert_eq!(
        gets[0].range.as_deref(),
        Some(format!("bytes={kept}-").as_str())
    );
    assert!(!part.exists());
}

#[test]
fn a_private_repository_needs_the_token_and_the_token_stays_on_the_hub() {
    let hub = Hub::start();
    hub.state.lock().unwrap().token = Some(TOKEN.into());
    let cache = tempfile::tempdir().unwrap();
    let cfg = hub.config(cache.path());
    let err = msg(resolve_model(REPO, None, &cfg).unwrap_err());
    assert!(err.contains("401") && err.contains("HF_TOKEN"), "{err}");
    let wrong = HubConfig {
        token: Some("hf_wrong".into()),
        ..cfg.clone()
    };
    let err = msg(resolve_model(REPO, None, &wrong).unwrap_err());
    assert!(err.contains("401") && err.contains("refused"), "{err}");
    // With the token: downloads; the CDN answers 400 to any Authorization header, so this also
    // checks the token is not sent past the hub's own host.
    let with = HubConfig {
        token: Some(TOKEN.into()),
        ..cfg
    };
    let dir = resolve_model(REPO, None, &with).unwrap();
    assert!(missing_files(&dir, None, true).unwrap().is_empty());
}

#[test]
fn variants_download_only_their_files_and_a_missing_one_is_named() {
    let hub = Hub::start();
    let cache = tempfile::tempdir().unwrap();
    let cfg = hub.config(cache.path());
    let dir = resolve_model(REPO, Some("fp16"), &cfg).unwrap();
    for f in [
        "unet/diffusion_pytorch_model.fp16.safetensors",
        "vae/diffusion_pytorch_model.fp16.safetensors",
        "text_encoder/model.fp16.safetensors",
    ] {
        assert!(dir.join(f).is_file(), "{f}");
    }
    assert!(!dir
        .join("unet/diffusion_pytorch_model.safetensors")
        .exists());
    // Asking for the plain weights now downloads them (the fp16 snapshot is not complete for
    // them), in the same snapshot.
    assert_eq!(resolve_model(REPO, None, &cfg).unwrap(), dir);
    assert!(dir
        .join("unet/diffusion_pytorch_model.safetensors")
        .is_file());

    // A variant the repository does not have: refused before any weight is fetched, naming the
    // files looked for.
    let cache2 = tempfile::tempdir().unwrap();
    hub.clear();
    let err = msg(resolve_model(REPO, Some("bf16"), &hub.config(cache2.path())).unwrap_err());
    assert!(
        err.contains("variant `bf16`")
            && err.contains("unet/diffusion_pytorch_model.bf16.safetensors"),
        "{err}"
    );
    assert!(!hub.body_gets().iter().any(|s| s.path.starts_with("/cdn/")));

    // A listed variant file that the hub answers 404 for: the error names the file.
    let cache3 = tempfile::tempdir().unwrap();
    let vae16 = "vae/diffusion_pytorch_model.fp16.safetensors";
    hub.state.lock().unwrap().gone.insert(vae16.into());
    let err = msg(resolve_model(REPO, Some("fp16"), &hub.config(cache3.path())).unwrap_err());
    assert!(err.contains(vae16) && err.contains("404"), "{err}");
}

#[test]
fn another_revision_gets_its_own_snapshot_and_ref() {
    let hub = Hub::start();
    let cache = tempfile::tempdir().unwrap();
    let main = resolve_model(REPO, None, &hub.config(cache.path())).unwrap();
    hub.clear();
    let v1_cfg = hub.config(cache.path()).with_revision("v1");
    let v1 = resolve_model(REPO, None, &v1_cfg).unwrap();
    let repo = cache.path().join("models--test-org--tiny-sd1");
    assert_eq!(v1, repo.join("snapshots").join(V1_SHA));
    assert_eq!(
        std::fs::read_to_string(repo.join("refs/v1")).unwrap(),
        V1_SHA
    );
    assert_eq!(
        std::fs::read_to_string(repo.join("refs/main")).unwrap(),
        MAIN_SHA
    );
    let sched = |d: &Path| -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(d.join("scheduler/scheduler_config.json")).unwrap())
            .unwrap()
    };
    assert_eq!(sched(&main)["steps_offset"], 1);
    assert_eq!(sched(&v1)["steps_offset"], 0);
    // Files with the same bytes share their blob: v1's weights were not downloaded again.
    assert!(!hub.body_gets().iter().any(|s| s.path.starts_with("/cdn/")));
    // A commit hash as the revision works offline without a ref.
    let by_commit = HubConfig {
        offline: true,
        ..hub.config(cache.path()).with_revision(V1_SHA)
    };
    assert_eq!(resolve_model(REPO, None, &by_commit).unwrap(), v1);
    // An unknown revision: the hub's 404, named.
    let err = msg(
        resolve_model(REPO, None, &hub.config(cache.path()).with_revision("nope")).unwrap_err(),
    );
    assert!(
        err.contains("revision nope") && err.contains("404"),
        "{err}"
    );
}

#[test]
fn config_only_resolution_downloads_no_weights() {
    let hub = Hub::start();
    let cache = tempfile::tempdir().unwrap();
    let dir = resolve_config(REPO, &hub.config(cache.path())).unwrap();
    assert!(dir.join("unet/config.json").is_file());
    assert!(dir.join("tokenizer/vocab.json").is_file());
    assert!(!hub.body_gets().iter().any(|s| s.path.starts_with("/cdn/")));
    // Those configs are not a complete model: resolving the model then fetches the weights.
    let dir2 = resolve_model(REPO, None, &hub.config(cache.path())).unwrap();
    assert_eq!(dir, dir2);
    assert!(missing_files(&dir2, None, true).unwrap().is_empty());
}

#[test]
fn the_environment_is_read_in_one_place() {
    let vars: HashMap<&str, &str> = [
        ("HF_HOME", "/x/hf"),
        ("HF_ENDPOINT", "http://mirror.example/"),
        ("HF_TOKEN", "hf_abc"),
        ("HF_HUB_OFFLINE", "1"),
    ]
    .into();
    let cfg = HubConfig::from_vars(|k| vars.get(k).map(|v| v.to_string()));
    assert_eq!(cfg.cache_dir, PathBuf::from("/x/hf/hub"));
    assert_eq!(cfg.endpoint, "http://mirror.example");
    assert_eq!(cfg.token.as_deref(), Some("hf_abc"));
    assert!(cfg.offline);
    assert_eq!(cfg.revision, "main");
    let cfg = HubConfig::from_vars(|k| match k {
        "HF_HUB_CACHE" => Some("/c".into()),
        "HF_HOME" => Some("/x/hf".into()),
        "HOME" => Some("/home/u".into()),
        "HF_HUB_OFFLINE" => Some("0".into()),
        _ => None,
    });
    assert_eq!(cfg.cache_dir, PathBuf::from("/c"));
    assert_eq!(cfg.endpoint, "https://huggingface.co");
    assert!(!cfg.offline && cfg.token.is_none());
    let cfg = HubConfig::from_vars(|k| (k == "HOME").then(|| "/home/u".into()));
    assert_eq!(
        cfg.cache_dir,
        PathBuf::from("/home/u/.cache/huggingface/hub")
    );
}
