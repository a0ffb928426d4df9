//! Strict, memory-mapped weight loading.
//!
//! [`resolve_weight_files`] finds a component's safetensors file(s) in a diffusers folder
//! (variants, shards); [`WeightFiles`] memory-maps them once; a [`VarBuilder`] hands out tensors
//! by their diffusers/transformers names while recording every problem, so that
//! [`VarBuilder::finish`] reports all missing, unused and wrongly-shaped tensors at once.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Shape, Tensor};

use crate::error::{Error, LoadReport, Result};
use crate::transform::WeightMap;

/// Tensor-name suffixes that checkpoints carry but models never read (buffers saved by
/// older library versions). They are not reported as unused.
const BENIGN_EXTRAS: &[&str] = &["position_ids"];

/// Finds the safetensors weight file(s) of one component folder.
///
/// `stem` is the file stem diffusers uses for the component (`diffusion_pytorch_model` for the
/// UNet and VAE, `model` for transformers' text encoders). With `variant = Some("fp16")` the
/// files `{stem}.fp16.safetensors` or the sharded `{stem}.safetensors.index.fp16.json` are
/// preferred; when the variant is absent the plain files are used and the returned note says so.
///
/// Folders that only hold pickled weights (`.bin`, `.ckpt`, `.pt`, `.pth`) are refused with an
/// error explaining why: unpickling can execute arbitrary code.
pub fn resolve_weight_files(
    dir: &Path,
    stem: &str,
    variant: Option<&str>,
) -> Result<(Vec<PathBuf>, Option<String>)> {
    if !dir.is_dir() {
        return Err(Error::io(
            dir,
            std::io::Error::new(std::io::ErrorKind::NotFound, "component folder not found"),
        ));
    }
    let mut note = None;
    if let Some(v) = variant {
        if let Some(files) = find_files(dir, stem, Some(v))? {
            return Ok((files, None));
        }
        note = Some(format!(
            "{}: no `{stem}.{v}.safetensors` (variant `{v}`); using the non-variant weights",
            dir.display()
        ));
    }
    if let Some(files) = find_files(dir, stem, None)? {
        return Ok((files, note));
    }
    let pickled: Vec<String> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| {
            [".bin", ".ckpt", ".pt", ".pth"]
                .iter()
                .any(|ext| n.ends_with(ext))
        })
        .collect();
    let reason = if pickled.is_empty() {
        format!("no `{stem}.safetensors` (or sharded `{stem}.safetensors.index.json`) found")
    } else {
        format!(
            "only pickled weights found ({}); sd-rs loads safetensors only, because unpickling \
             can run arbitrary code. Convert them with `safetensors` in Python, or use a \
             model revision that ships `{stem}.safetensors`",
            pickled.join(", ")
        )
    };
    Err(Error::io(
        dir,
        std::io::Error::new(std::io::ErrorKind::NotFound, reason),
    ))
}

fn find_files(dir: &Path, stem: &str, variant: Option<&str>) -> Result<Option<Vec<PathBuf>>> {
    let (single, index) = match variant {
        Some(v) => (
            format!("{stem}.{v}.safetensors"),
            format!("{stem}.safetensors.index.{v}.json"),
        ),
        None => (
            format!("{stem}.safetensors"),
            format!("{stem}.safetensors.index.json"),
        ),
    };
    let single = dir.join(single);
    if single.is_file() {
        return Ok(Some(vec![single]));
    }
    let index = dir.join(index);
    if index.is_file() {
        #[derive(serde::Deserialize)]
        struct Index {
            weight_map: BTreeMap<String, String>,
        }
        let idx: Index = crate::config::read_json(&index)?;
        let mut files: Vec<PathBuf> = Vec::new();
        for (name, f) in &idx.weight_map {
            // Shards live beside the index: a path that leaves the folder is refused.
            let plain = Path::new(f)
                .components()
                .all(|c| matches!(c, std::path::Component::Normal(_)));
            if f.is_empty() || !plain {
                return Err(Error::config(
                    &index,
                    Some(&format!("weight_map.{name}")),
                    format!("`{f}` is not a file name in the component folder"),
                ));
            }
            let p = dir.join(f);
            if !files.contains(&p) {
                files.push(p);
            }
        }
        files.sort();
        return Ok(Some(files));
    }
    Ok(None)
}

/// Where one tensor lives inside the memory-mapped files.
#[derive(Debug, Clone)]
struct Entry {
    file: usize,
    dtype: safetensors::Dtype,
    shape: Vec<usize>,
    start: usize,
    end: usize,
}

/// Safetensors files, memory-mapped once, with an index of their tensors.
pub struct WeightFiles {
    paths: Vec<PathBuf>,
    maps: Vec<memmap2::Mmap>,
    entries: HashMap<String, Entry>,
}

impl std::fmt::Debug for WeightFiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WeightFiles")
            .field("paths", &self.paths)
            .field("tensors", &self.entries.len())
            .finish()
    }
}

impl WeightFiles {
    /// Memory-maps the files and reads their headers. Corrupt headers are reported with the file.
    pub fn open(paths: &[PathBuf]) -> Result<Self> {
        let mut maps = Vec::with_capacity(paths.len());
        let mut entries = HashMap::new();
        for (i, path) in paths.iter().enumerate() {
            let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
            // SAFETY: the file is opened read-only; like every mmap-based loader we rely on the
            // file not being truncated while the model loads.
            let map = unsafe { memmap2::MmapOptions::new().map(&file) }
                .map_err(|e| Error::io(path, e))?;
            let invalid = |why: String| {
                Error::io(
                    path,
                    std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        format!("not a valid safetensors file: {why}"),
                    ),
                )
            };
            check_offsets(&map).map_err(invalid)?;
            let (header_len, meta) =
                safetensors::SafeTensors::read_metadata(&map).map_err(|e| {
                    Error::io(
                        path,
                        std::io::Error::new(
                            std::io::ErrorKind::InvalidData,
                            format!("not a valid safetensors file: {e}"),
                        ),
                    )
                })?;
            let base = 8 + header_len;
            for (name, info) in meta.tensors() {
                // A zero-sized tensor passes the crate's size check whatever its other dims,
                // but their product (the strides) must still fit in memory arithmetic.
                let fits = info
                    .shape
                    .iter()
                    .filter(|&&d| d != 0)
                    .try_fold(8usize, |n, &d| n.checked_mul(d))
                    .is_some();
                if !fits {
                    return Err(invalid(format!(
                        "tensor `{name}` has shape {:?}, whose dimensions overflow",
                        info.shape
                    )));
                }
                let (s, e) = info.data_offsets;
                let entry = Entry {
                    file: i,
                    dtype: info.dtype,
                    shape: info.shape.clone(),
                    start: base + s,
                    end: base + e,
                };
                if let Some(other) = entries.insert(name.clone(), entry) {
                    return Err(invalid(format!(
                        "tensor `{name}` is also in {}; a tensor must be in one file only",
                        paths[other.file].display()
                    )));
                }
            }
            maps.push(map);
        }
        Ok(Self {
            paths: paths.to_vec(),
            maps,
            entries,
        })
    }

    /// The files, in the order they were opened.
    pub fn paths(&self) -> &[PathBuf] {
        &self.paths
    }

    /// Names of every tensor in the files.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }

    /// Shape of a tensor, if present.
    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.entries.get(name).map(|e| e.shape.as_slice())
    }

    /// Reads one tensor and converts it to `dtype` on `device`.
    pub fn load(&self, name: &str, dtype: DType, device: &Device) -> Result<Tensor> {
        let e = self.entries.get(name).ok_or_else(|| {
            Error::Weights(Box::new(LoadReport {
                files: self.paths.clone(),
                missing: vec![(name.to_owned(), vec![], None)],
                ..Default::default()
            }))
        })?;
        let file_dtype = match e.dtype {
            safetensors::Dtype::F32 => DType::F32,
            safetensors::Dtype::F16 => DType::F16,
            safetensors::Dtype::BF16 => DType::BF16,
            safetensors::Dtype::F64 => DType::F64,
            safetensors::Dtype::I64 => DType::I64,
            safetensors::Dtype::U32 => DType::U32,
            safetensors::Dtype::U8 => DType::U8,
            other => {
                return Err(Error::unsupported(format!(
                    "tensor `{name}` in {} has dtype {other:?}; sd-rs reads f32, f16, bf16, f64, i64, u32 and u8",
                    self.paths[e.file].display()
                )))
            }
        };
        let bytes = self.maps[e.file].get(e.start..e.end).ok_or_else(|| {
            Error::io(
                &self.paths[e.file],
                std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!("tensor `{name}` lies past the end of the file (truncated download?)"),
                ),
            )
        })?;
        let t = Tensor::from_raw_buffer(bytes, file_dtype, &e.shape, device)?;
        if file_dtype == dtype {
            Ok(t)
        } else {
            Ok(t.to_dtype(dtype)?)
        }
    }
}

/// Checks, before the safetensors crate reads the header, that the header length and every
/// tensor's `data_offsets` lie within the file (with checked arithmetic): offsets near
/// `u64::MAX` overflow the crate's own size check. Malformed JSON is left to the crate's
/// parser, which reports it.
fn check_offsets(buf: &[u8]) -> std::result::Result<(), String> {
    let len_bytes: [u8; 8] = buf
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| format!("{} bytes, shorter than the 8-byte header size", buf.len()))?;
    let n = u64::from_le_bytes(len_bytes);
    let body = (buf.len() as u64 - 8).checked_sub(n).ok_or_else(|| {
        format!(
            "the header claims {n} bytes but the file has {} after the size field (truncated?)",
            buf.len() - 8
        )
    })?;
    // n <= buf.len() - 8 here, so the range is in bounds.
    let header = &buf[8..8 + n as usize];
    let Ok(serde_json::Value::Object(map)) = serde_json::from_slice::<serde_json::Value>(header)
    else {
        return Ok(());
    };
    for (name, info) in &map {
        let offsets = info.get("data_offsets").and_then(|o| o.as_array());
        if let Some([start, end]) = offsets.map(Vec::as_slice) {
            if let (Some(start), Some(end)) = (start.as_u64(), end.as_u64()) {
                if start > end || end > body {
                    return Err(format!(
                        "tensor `{name}` spans bytes {start}..{end} of a {body}-byte data section \
                         (truncated or corrupt file)"
                    ));
                }
            }
        }
    }
    Ok(())
}

/// Where a [`VarBuilder`] takes its tensors from.
enum Source {
    /// Real weights from safetensors files.
    Files(WeightFiles),
    /// Foreign weights seen through our names (renamed, derived, with deltas).
    Mapped(WeightMap),
    /// Zero-cost placeholders (a broadcast scalar): to build a model only to list its parameters.
    Zeros,
    /// Deterministic pseudo-random values, scaled for stable activations: for benchmarks.
    Random { seed: u64 },
}

struct Shared {
    source: Source,
    dtype: DType,
    device: Device,
    requested: Mutex<Vec<(String, Vec<usize>)>>,
    report: Mutex<LoadReport>,
}

/// Hands out a model's tensors by name (`pp` pushes a name segment), recording problems instead
/// of failing at the first one. Call [`VarBuilder::finish`] on the root builder after the model
/// is built.
#[derive(Clone)]
pub struct VarBuilder {
    shared: Arc<Shared>,
    prefix: String,
}

impl std::fmt::Debug for VarBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VarBuilder")
            .field("prefix", &self.prefix)
            .finish()
    }
}

impl VarBuilder {
    fn new(source: Source, dtype: DType, device: &Device) -> Self {
        let files = match &source {
            Source::Files(w) => w.paths.clone(),
            Source::Mapped(m) => m.report_files(),
            _ => vec![],
        };
        Self {
            shared: Arc::new(Shared {
                source,
                dtype,
                device: device.clone(),
                requested: Mutex::new(Vec::new()),
                report: Mutex::new(LoadReport {
                    files,
                    ..Default::default()
                }),
            }),
            prefix: String::new(),
        }
    }

    /// Loads from memory-mapped safetensors files, converting every tensor to `dtype`.
    pub fn from_files(files: WeightFiles, dtype: DType, device: &Device) -> Self {
        Self::new(Source::Files(files), dtype, device)
    }

    /// Loads through a [`WeightMap`] (renamed and derived tensors of a foreign layout), converting
    /// every tensor to `dtype`; the load report names the file's own keys.
    pub fn from_map(map: WeightMap, dtype: DType, device: &Device) -> Self {
        Self::new(Source::Mapped(map), dtype, device)
    }

    /// Opens and memory-maps `paths`, then behaves as [`VarBuilder::from_files`].
    pub fn from_paths(paths: &[PathBuf], dtype: DType, device: &Device) -> Result<Self> {
        Ok(Self::from_files(WeightFiles::open(paths)?, dtype, device))
    }

    /// Placeholders that cost no memory: build a model to list its parameter names and shapes.
    pub fn zeros(dtype: DType, device: &Device) -> Self {
        Self::new(Source::Zeros, dtype, device)
    }

    /// Deterministic random weights (normal, std 0.02; norm scales 1, biases 0), for benchmarks.
    pub fn random(seed: u64, dtype: DType, device: &Device) -> Self {
        Self::new(Source::Random { seed }, dtype, device)
    }

    /// A builder whose names are prefixed by `segment.`.
    pub fn pp(&self, segment: impl std::fmt::Display) -> Self {
        let prefix = if self.prefix.is_empty() {
            segment.to_string()
        } else {
            format!("{}.{segment}", self.prefix)
        };
        Self {
            shared: self.shared.clone(),
            prefix,
        }
    }

    /// The full name of `name` under this builder's prefix.
    pub fn path(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_owned()
        } else {
            format!("{}.{name}", self.prefix)
        }
    }

    /// The dtype tensors are converted to.
    pub fn dtype(&self) -> DType {
        self.shared.dtype
    }

    /// The device tensors are placed on.
    pub fn device(&self) -> &Device {
        &self.shared.device
    }

    /// Whether the source has a tensor of this name (always false for placeholder sources).
    pub fn contains(&self, name: &str) -> bool {
        match &self.shared.source {
            Source::Files(w) => w.entries.contains_key(&self.path(name)),
            Source::Mapped(m) => matches!(m.shape(&self.path(name)), Ok(Some(_))),
            _ => false,
        }
    }

    /// Returns the tensor `name` (under the prefix), of the expected shape, in the builder's dtype.
    ///
    /// A missing, unreadable or wrongly-shaped tensor is recorded for [`VarBuilder::finish`] and
    /// a zero placeholder (a broadcast scalar, no allocation) is returned so that loading can go
    /// on and report every problem at once.
    pub fn get(&self, shape: impl Into<Shape>, name: &str) -> Result<Tensor> {
        let shape: Shape = shape.into();
        let full = self.path(name);
        let dims = shape.dims().to_vec();
        self.shared
            .requested
            .lock()
            .expect("invariant: lock not poisoned")
            .push((full.clone(), dims.clone()));
        let placeholder = || -> Result<Tensor> {
            Ok(Tensor::zeros((), self.shared.dtype, &self.shared.device)?
                .broadcast_as(shape.clone())?)
        };
        match &self.shared.source {
            Source::Zeros => placeholder(),
            Source::Random { seed } => self.random_tensor(*seed, &full, &dims, name),
            Source::Files(w) => {
                let mut report = self
                    .shared
                    .report
                    .lock()
                    .expect("invariant: lock not poisoned");
                match w.entries.get(&full) {
                    None => {
                        report.missing.push((full, dims, None));
                        drop(report);
                        placeholder()
                    }
                    Some(e) if e.shape != dims => {
                        report.wrong_shape.push((full, dims, e.shape.clone()));
                        drop(report);
                        placeholder()
                    }
                    Some(_) => {
                        drop(report);
                        self.load_or_record(&full, dims, || {
                            w.load(&full, self.shared.dtype, &self.shared.device)
                        })
                    }
                }
            }
            Source::Mapped(m) => {
                let shown = |key: &str| {
                    if key == full {
                        full.clone()
                    } else {
                        format!("{key} (as {full})")
                    }
                };
                let key = m.get(&full).map(|e| e.key.clone());
                let mut report = self
                    .shared
                    .report
                    .lock()
                    .expect("invariant: lock not poisoned");
                match (m.shape(&full), key) {
                    (Ok(None), _) | (_, None) => {
                        report.missing.push((full, dims, None));
                        drop(report);
                        placeholder()
                    }
                    (Err(why), Some(key)) => {
                        report
                            .unreadable
                            .push((shown(&key), format!("cannot derive {why}")));
                        drop(report);
                        placeholder()
                    }
                    (Ok(Some(s)), Some(key)) if s != dims => {
                        report.wrong_shape.push((shown(&key), dims, s));
                        drop(report);
                        placeholder()
                    }
                    (Ok(Some(_)), Some(key)) => {
                        drop(report);
                        let name = shown(&key);
                        self.load_or_record(&name, dims, || {
                            m.load(&full, self.shared.dtype, &self.shared.device)
                        })
                    }
                }
            }
        }
    }

    /// Runs `load`; a failure is recorded as unreadable under `name` and a placeholder of
    /// shape `dims` returned.
    fn load_or_record(
        &self,
        name: &str,
        dims: Vec<usize>,
        load: impl FnOnce() -> Result<Tensor>,
    ) -> Result<Tensor> {
        match load() {
            Ok(t) => Ok(t),
            Err(err) => {
                self.shared
                    .report
                    .lock()
                    .expect("invariant: lock not poisoned")
                    .unreadable
                    .push((name.to_owned(), err.to_string()));
                Ok(
                    Tensor::zeros((), self.shared.dtype, &self.shared.device)?
                        .broadcast_as(dims)?,
                )
            }
        }
    }

    fn random_tensor(&self, seed: u64, full: &str, dims: &[usize], name: &str) -> Result<Tensor> {
        let n: usize = dims.iter().product();
        let dev = &self.shared.device;
        let dt = self.shared.dtype;
        let is_norm = full.contains("norm") && name == "weight";
        if name == "bias" || name.ends_with("_bias") {
            return Ok(Tensor::zeros(dims, dt, dev)?);
        }
        if is_norm {
            return Ok(Tensor::ones(dims, dt, dev)?);
        }
        // A name-dependent seed keeps the weights independent of construction order.
        let h = full.bytes().fold(seed ^ 0xcbf2_9ce4_8422_2325, |h, b| {
            (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
        });
        let mut g = crate::noise::TorchGenerator::new(h);
        let values: Vec<f32> = g.randn(n).into_iter().map(|v| v * 0.02).collect();
        Ok(Tensor::from_vec(values, dims, dev)?.to_dtype(dt)?)
    }

    /// Every (name, shape) requested so far, in request order.
    pub fn requested(&self) -> Vec<(String, Vec<usize>)> {
        self.shared
            .requested
            .lock()
            .expect("invariant: lock not poisoned")
            .clone()
    }

    /// Ends loading: `Ok` when every tensor was found with the right shape and every tensor in
    /// the files was used; otherwise one [`Error::Weights`] listing every problem.
    pub fn finish(&self) -> Result<()> {
        let requested: HashSet<String> = self.requested().into_iter().map(|(n, _)| n).collect();
        let mut report = self
            .shared
            .report
            .lock()
            .expect("invariant: lock not poisoned")
            .clone();
        let benign = |k: &String| !BENIGN_EXTRAS.iter().any(|b| k.ends_with(b));
        match &self.shared.source {
            Source::Files(w) => {
                let mut unused: Vec<String> = w
                    .entries
                    .keys()
                    .filter(|k| !requested.contains(*k))
                    .filter(|k| benign(k))
                    .cloned()
                    .collect();
                unused.sort();
                if report.missing.len() <= 64 {
                    for (name, _, hint) in report.missing.iter_mut() {
                        *hint = nearest(name, &unused);
                    }
                }
                report.unused = unused;
            }
            Source::Mapped(m) => {
                let used: HashSet<&str> = requested
                    .iter()
                    .filter_map(|n| m.get(n).map(|e| e.key.as_str()))
                    .collect();
                let unused: Vec<String> = m
                    .owned()
                    .filter(|k| !used.contains(k))
                    .map(str::to_owned)
                    .filter(benign)
                    .collect();
                // Hints compare our names: the unrequested model names whose file key is unused.
                let spare: Vec<String> = m
                    .names()
                    .filter(|n| !requested.contains(*n))
                    .map(str::to_owned)
                    .collect();
                if report.missing.len() <= 64 {
                    for (name, _, hint) in report.missing.iter_mut() {
                        *hint = nearest(name, &spare).map(|n| match m.get(&n) {
                            Some(e) if e.key != n => format!("{} (as {n})", e.key),
                            _ => n,
                        });
                    }
                }
                report.unused = unused;
            }
            _ => return Ok(()),
        }
        if report.is_ok() {
            Ok(())
        } else {
            Err(Error::Weights(Box::new(report)))
        }
    }
}

/// The unused name closest to `name` (smallest edit distance), if close enough to be a hint.
fn nearest(name: &str, candidates: &[String]) -> Option<String> {
    candidates
        .iter()
        .map(|c| (levenshtein(name, c), c))
        .filter(|(d, _)| *d <= name.len() / 3 + 2)
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c.clone())
}

fn levenshtein(a: &str, b: &str) -> usize {
    let b: Vec<u8> = b.bytes().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.bytes().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, &cb) in b.iter().enumerate() {
            cur[j + 1] = (prev[j] + usize::from(ca != cb))
                .min(prev[j + 1] + 1)
                .min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

/// How to load a component: dtype, device and weight-file variant. Runtime choices like these
/// never live in model configs.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// The dtype weights are converted to (and the model computes in).
    pub dtype: DType,
    /// Where the weights go.
    pub device: Device,
    /// A weight-file variant such as `"fp16"` (`*.fp16.safetensors`); falls back to the plain
    /// files with a logged note when the variant is absent.
    pub variant: Option<String>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            dtype: DType::F32,
            device: Device::Cpu,
            variant: None,
        }
    }
}

/// Resolves and memory-maps the weights of the component folder `dir` (file stem `stem`,
/// e.g. `diffusion_pytorch_model` or `model`) and returns a [`VarBuilder`] over them.
pub fn component_var_builder(dir: &Path, stem: &str, opts: &LoadOptions) -> Result<VarBuilder> {
    let (files, note) = resolve_weight_files(dir, stem, opts.variant.as_deref())?;
    if let Some(note) = note {
        log::warn!("{note}");
    }
    VarBuilder::from_paths(&files, opts.dtype, &opts.device)
}
