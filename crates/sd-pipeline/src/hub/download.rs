//! The hub's HTTP side, as huggingface_hub's `file_download.py` uses it:
//! `GET {endpoint}/api/models/{repo}/revision/{rev}` lists the files (`siblings`) and the commit
//! (`sha`); `HEAD {endpoint}/{repo}/resolve/{commit}/{file}`, following relative redirects only,
//! gives the blob's name (`X-Linked-Etag`, else `ETag`), its size (`X-Linked-Size`, else
//! `Content-Length`) and, for large files, a redirect to a CDN (`Location`); the bytes come
//! from a `GET` of that location, resumed with `Range: bytes={have}-` after a dropped
//! connection. A blob is renamed into place only when it has exactly the announced size; the
//! token goes only to the endpoint's own host.

use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use sd_core::{Error, Result};

use super::cache::{link_blob, safe_relative, snapshot_dir};
use super::HubConfig;

/// Attempts per file (the first and resumptions after a dropped connection).
const ATTEMPTS: u32 = 4;
/// Redirects followed per request (the hub uses at most two: a renamed repo, then the CDN).
const MAX_REDIRECTS: usize = 10;

pub(super) struct Client<'a> {
    hub: &'a HubConfig,
    agent: ureq::Agent,
}

/// The revision's files and the commit it points to.
pub(super) struct Listing {
    pub sha: String,
    pub siblings: Vec<String>,
}

/// A listing failure: no answer at all (a cached snapshot may stand in) or an answer refusing.
pub(super) enum ListingError {
    Unreachable(Error),
    Answered(Error),
}

#[derive(serde::Deserialize)]
struct RawListing {
    sha: String,
    #[serde(default)]
    siblings: Vec<RawSibling>,
}

#[derive(serde::Deserialize)]
struct RawSibling {
    rfilename: String,
}

/// What a `HEAD` of `/resolve/` tells about one file.
struct Metadata {
    etag: String,
    size: u64,
    /// Where the bytes are (the CDN after an absolute redirect, else the resolve URL).
    location: String,
}

/// A request that failed: an HTTP status the server chose, or no usable answer.
enum Failure {
    Status(u16),
    Transport(String),
}

impl<'a> Client<'a> {
    pub fn new(hub: &'a HubConfig) -> Result<Self> {
        let agent = ureq::AgentBuilder::new()
            .redirects(0)
            .try_proxy_from_env(true)
            .timeout_connect(Duration::from_secs(20))
            .timeout_read(Duration::from_secs(60))
            .user_agent(concat!("sd-rs/", env!("CARGO_PKG_VERSION")))
            .build();
        Ok(Self { hub, agent })
    }

    fn err(&self, model: &str, msg: String) -> Error {
        Error::io(
            super::cache::repo_dir(model, self.hub),
            std::io::Error::other(msg),
        )
    }

    /// A request carrying the token when `url` is on the endpoint's host.
    fn request(&self, method: &str, url: &str) -> ureq::Request {
        let mut r = self.agent.request(method, url);
        if let Some(t) = &self.hub.token {
            if same_origin(url, &self.hub.endpoint) {
                r = r.set("Authorization", &format!("Bearer {t}"));
            }
        }
        r
    }

    /// Sends `method url`, following redirects (all of them, or only relative ones as
    /// huggingface_hub's metadata request does). Returns the last response and its URL.
    fn call(
        &self,
        method: &str,
        url: &str,
        range_from: Option<u64>,
        relative_only: bool,
    ) -> std::result::Result<(ureq::Response, String), Failure> {
        let mut url = url.to_owned();
        for _ in 0..=MAX_REDIRECTS {
            let mut req = self
                .request(method, &url)
                .set("Accept-Encoding", "identity");
            if let Some(from) = range_from {
                req = req.set("Range", &format!("bytes={from}-"));
            }
            let resp = match req.call() {
                Ok(r) => r,
                Err(ureq::Error::Status(code, _)) => return Err(Failure::Status(code)),
                Err(ureq::Error::Transport(t)) => return Err(Failure::Transport(t.to_string())),
            };
            if !(300..400).contains(&resp.status()) {
                return Ok((resp, url));
            }
            let Some(location) = resp.header("Location").map(str::to_owned) else {
                return Err(Failure::Transport(format!(
                    "{url} answered {} without a Location header",
                    resp.status()
                )));
            };
            let absolute = location.starts_with("http://") || location.starts_with("https://");
            if absolute && relative_only {
                return Ok((resp, url));
            }
            url = join_url(&url, &location);
        }
        Err(Failure::Transport(format!(
            "more than {MAX_REDIRECTS} redirects from {url}"
        )))
    }

    /// The revision's file list and commit.
    pub fn listing(&self, model: &str) -> std::result::Result<Listing, ListingError> {
        let url = format!(
            "{}/api/models/{model}/revision/{}",
            self.hub.endpoint,
            encode(&self.hub.revision, false)
        );
        let what = format!("listing `{model}` at revision {}", self.hub.revision);
        let resp = match self.call("GET", &url, None, false) {
            Ok((r, _)) => r,
            Err(Failure::Transport(t)) => {
                return Err(ListingError::Unreachable(
                    self.err(model, format!("{what}: {t}")),
                ))
            }
            Err(Failure::Status(code)) => {
                return Err(ListingError::Answered(self.status_error(
                    model,
                    &what,
                    &url,
                    code,
                    "the repository or revision does not exist",
                )))
            }
        };
        let bad =
            |e: String| ListingError::Answered(self.err(model, format!("{what} ({url}): {e}")));
        let text = resp.into_string().map_err(|e| bad(e.to_string()))?;
        let raw: RawListing = serde_json::from_str(&text)
            .map_err(|e| bad(format!("not the hub's JSON (`sha`, `siblings`): {e}")))?;
        Ok(Listing {
            sha: raw.sha,
            siblings: raw.siblings.into_iter().map(|s| s.rfilename).collect(),
        })
    }

    fn status_error(
        &self,
        model: &str,
        what: &str,
        url: &str,
        code: u16,
        not_found: &str,
    ) -> Error {
        let hint = match code {
            401 | 403 if self.hub.token.is_some() => {
                " (the token in HF_TOKEN / HF_HOME/token was refused: does it grant access to \
                 this repository? gated models need their terms accepted on the hub)"
                    .to_owned()
            }
            401 | 403 => {
                " (gated or private repository: set HF_TOKEN, or log in with `huggingface-cli \
                 login`)"
                    .to_owned()
            }
            404 => format!(" ({not_found})"),
            _ => String::new(),
        };
        self.err(model, format!("{what}: {url} answered HTTP {code}{hint}"))
    }

    /// `snapshots/{sha}/{file}` of `repo`, downloaded unless already there.
    pub fn fetch(&self, model: &str, sha: &str, file: &str, repo: &Path) -> Result<PathBuf> {
        safe_relative("file name from the hub", file)?;
        let pointer = snapshot_dir(repo, sha)?.join(file);
        if pointer.is_file() {
            return Ok(pointer);
        }
        let url = format!(
            "{}/{model}/resolve/{sha}/{}",
            self.hub.endpoint,
            encode(file, true)
        );
        let meta = self.metadata(model, file, &url)?;
        let blob = repo.join("blobs").join(&meta.etag);
        let complete = std::fs::metadata(&blob).is_ok_and(|m| m.is_file() && m.len() == meta.size);
        if !complete {
            self.download(model, file, &meta, &blob)?;
        }
        link_blob(&pointer, &blob, file)?;
        Ok(pointer)
    }

    fn metadata(&self, model: &str, file: &str, url: &str) -> Result<Metadata> {
        let what = format!("`{file}` of `{model}`");
        let (resp, final_url) = match self.call("HEAD", url, None, true) {
            Ok(r) => r,
            Err(Failure::Transport(t)) => return Err(self.err(model, format!("{what}: {t}"))),
            Err(Failure::Status(code)) => {
                return Err(self.status_error(
                    model,
                    &what,
                    url,
                    code,
                    &format!("no file `{file}` at this revision"),
                ))
            }
        };
        let header = |k: &str| resp.header(k).map(str::to_owned);
        let etag = header("X-Linked-Etag")
            .or_else(|| header("ETag"))
            .map(|e| e.trim_start_matches("W/").trim_matches('"').to_owned())
            .filter(|e| {
                !e.is_empty()
                    && e.len() <= 128
                    && e.chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            })
            .ok_or_else(|| {
                self.err(
                    model,
                    format!("{what}: {url} gave no usable ETag / X-Linked-Etag (is this a hub?)"),
                )
            })?;
        let size = header("X-Linked-Size")
            .or_else(|| header("Content-Length"))
            .and_then(|s| s.trim().parse::<u64>().ok())
            .ok_or_else(|| {
                self.err(
                    model,
                    format!("{what}: {url} gave no size (X-Linked-Size / Content-Length)"),
                )
            })?;
        let location = if (300..400).contains(&resp.status()) {
            header("Location").unwrap_or(final_url)
        } else {
            final_url
        };
        Ok(Metadata {
            etag,
            size,
            location,
        })
    }

    /// Downloads into `blobs/{etag}.incomplete`, resuming after dropped connections, and
    /// renames it to `blob` once it has exactly the announced size.
    fn download(&self, model: &str, file: &str, meta: &Metadata, blob: &Path) -> Result<()> {
        let mut part = blob.as_os_str().to_owned();
        part.push(".incomplete");
        let part = PathBuf::from(part);
        let io = |e| Error::io(&part, e);
        if let Some(parent) = part.parent() {
            std::fs::create_dir_all(parent).map_err(io)?;
        }
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&part)
            .map_err(io)?;
        let mut last = String::new();
        for attempt in 0..ATTEMPTS {
            if attempt > 0 {
                log::warn!("downloading `{file}`: {last}; retrying");
                std::thread::sleep(Duration::from_millis(100 * u64::from(attempt)));
            }
            let mut have = f.metadata().map_err(io)?.len();
            if have > meta.size {
                f.set_len(0).map_err(io)?;
                have = 0;
            }
            if have == meta.size {
                break;
            }
            let (resp, _) =
                match self.call("GET", &meta.location, (have > 0).then_some(have), false) {
                    Ok(r) => r,
                    Err(Failure::Status(416)) => {
                        f.set_len(0).map_err(io)?;
                        last = "the server refused the resume range (HTTP 416)".to_owned();
                        continue;
                    }
                    Err(Failure::Status(code)) => {
                        return Err(self.status_error(
                            model,
                            &format!("`{file}` of `{model}`"),
                            &meta.location,
                            code,
                            &format!("no file `{file}` at this revision"),
                        ))
                    }
                    Err(Failure::Transport(t)) => {
                        last = t;
                        continue;
                    }
                };
            let from = match resp.status() {
                206 => {
                    let range = resp.header("Content-Range").unwrap_or("");
                    if !range.starts_with(&format!("bytes {have}-")) {
                        // Not the part we asked for: start over rather than splice.
                        f.set_len(0).map_err(io)?;
                        last = format!("asked for bytes {have}-, got range {range:?}");
                        continue;
                    }
                    have
                }
                // The whole file (a server that ignores Range): rewrite from the start.
                _ => {
                    f.set_len(0).map_err(io)?;
                    0
                }
            };
            f.seek(std::io::SeekFrom::End(0)).map_err(io)?;
            // Never more than announced, whatever the server sends.
            let mut body = resp.into_reader().take(meta.size - from + 1);
            let copied = std::io::copy(&mut body, &mut f);
            f.flush().map_err(io)?;
            let now = f.metadata().map_err(io)?.len();
            match copied {
                Err(e) => last = format!("connection lost after {now} of {} bytes: {e}", meta.size),
                Ok(_) if now < meta.size => {
                    last = format!("connection closed after {now} of {} bytes", meta.size)
                }
                Ok(_) if now > meta.size => {
                    f.set_len(0).map_err(io)?;
                    last = format!(
                        "the server sent more than the announced {} bytes",
                        meta.size
                    );
                }
                Ok(_) => break,
            }
        }
        let now = f.metadata().map_err(io)?.len();
        if now != meta.size {
            return Err(self.err(
                model,
                format!(
                    "`{file}` of `{model}`: {last} after {ATTEMPTS} attempts; {} kept to resume \
                     next time",
                    part.display()
                ),
            ));
        }
        f.sync_all().map_err(io)?;
        drop(f);
        std::fs::rename(&part, blob).map_err(|e| Error::io(blob, e))
    }
}

/// Whether `url` is on the same scheme, host and port as `endpoint`.
fn same_origin(url: &str, endpoint: &str) -> bool {
    let origin = |u: &str| -> String {
        let (scheme, rest) = u.split_once("://").unwrap_or(("", u));
        let host = rest.split(['/', '?', '#']).next().unwrap_or("");
        format!(
            "{}://{}",
            scheme.to_ascii_lowercase(),
            host.to_ascii_lowercase()
        )
    };
    origin(url) == origin(endpoint)
}

/// `location` (absolute, or a path relative to `base`'s host) as an absolute URL.
fn join_url(base: &str, location: &str) -> String {
    if location.starts_with("http://") || location.starts_with("https://") {
        return location.to_owned();
    }
    let (scheme, rest) = base.split_once("://").unwrap_or(("http", base));
    let host = rest.split(['/', '?', '#']).next().unwrap_or("");
    if location.starts_with('/') {
        format!("{scheme}://{host}{location}")
    } else {
        let dir = base.rsplit_once('/').map(|(d, _)| d).unwrap_or(base);
        format!("{dir}/{location}")
    }
}

/// Percent-encodes a path (keeping `/` when `keep_slash`), as URLs of the hub need.
fn encode(s: &str, keep_slash: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) || (keep_slash && b == b'/') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(encode("refs/pr/1", false), "refs%2Fpr%2F1");
        assert_eq!(encode("unet/a b.json", true), "unet/a%20b.json");
        assert_eq!(
            join_url("http://h:1/o/n/resolve/x/f", "/api/resolve-cache/f"),
            "http://h:1/api/resolve-cache/f"
        );
        assert_eq!(join_url("http://h/a/b", "https://cdn/x"), "https://cdn/x");
        assert!(same_origin("http://127.0.0.1:80/x", "http://127.0.0.1:80"));
        assert!(!same_origin(
            "https://cdn.example/x",
            "https://huggingface.co"
        ));
    }
}
