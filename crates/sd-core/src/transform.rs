//! Weights in a foreign layout, seen through our names: the one place where tensors are renamed,
//! derived from others (a row block of a fused q/k/v projection, a transpose, a reshape such as
//! squeezing a 1x1 convolution) and have deltas (LoRA) merged into them.
//!
//! A [`WeightMap`] is built by a converter (sd-formats knows the layouts) over memory-mapped
//! [`WeightFiles`]; [`crate::VarBuilder::from_map`] hands its tensors to a model exactly as it
//! would from a diffusers file, and the load report names the file's own keys: a file tensor
//! no model name was derived from is reported as unused under its file key, a wrongly-shaped
//! one as `file.key (as model.name)`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};
use crate::weights::WeightFiles;

/// How one tensor the model asks for is made from one tensor of the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Derive {
    /// The file tensor as stored (a rename).
    Same,
    /// Rows `start .. start + len` of dimension 0: one of q, k, v from a fused `in_proj`.
    Rows {
        /// First row.
        start: usize,
        /// Number of rows.
        len: usize,
    },
    /// The transpose of a 2-D tensor (OpenCLIP's `text_projection`, used as `x @ P`).
    Transpose,
    /// The same elements in another shape (a 1x1 convolution squeezed to a linear weight, or
    /// the reverse); the element counts must agree.
    Reshape(Vec<usize>),
}

impl Derive {
    /// The shape this derivation gives from a file tensor of shape `file`, or why it cannot.
    pub fn shape(&self, file: &[usize]) -> std::result::Result<Vec<usize>, String> {
        match self {
            Derive::Same => Ok(file.to_vec()),
            Derive::Rows { start, len } => match file.split_first() {
                Some((&rows, rest)) if start.checked_add(*len).is_some_and(|e| e <= rows) => {
                    let mut s = vec![*len];
                    s.extend_from_slice(rest);
                    Ok(s)
                }
                _ => Err(format!(
                    "rows {start}..{} of a tensor of shape {file:?}",
                    start.saturating_add(*len)
                )),
            },
            Derive::Transpose => match file {
                [a, b] => Ok(vec![*b, *a]),
                _ => Err(format!("the transpose of a {}-D tensor", file.len())),
            },
            Derive::Reshape(to) => {
                let n = |s: &[usize]| s.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
                if n(to).is_some() && n(to) == n(file) {
                    Ok(to.clone())
                } else {
                    Err(format!("a tensor of shape {file:?} reshaped to {to:?}"))
                }
            }
        }
    }

    fn apply(&self, t: Tensor) -> Result<Tensor> {
        Ok(match self {
            Derive::Same => t,
            Derive::Rows { start, len } => t.narrow(0, *start, *len)?.contiguous()?,
            Derive::Transpose => t.t()?.contiguous()?,
            Derive::Reshape(to) => t.reshape(to.as_slice())?,
        })
    }
}

/// One model tensor: which file key it comes from and how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapped {
    /// The tensor's key in the file.
    pub key: String,
    /// How the model's tensor is derived from it.
    pub derive: Derive,
}

/// A model's view of foreign weights: model names mapped to file keys with derivations, plus
/// the file keys this view owns (those not used by the model are reported as unused) and deltas
/// to add after loading.
#[derive(Debug, Clone)]
pub struct WeightMap {
    files: Arc<WeightFiles>,
    map: BTreeMap<String, Mapped>,
    owned: BTreeSet<String>,
    deltas: BTreeMap<String, Vec<Tensor>>,
    label: Option<String>,
}

impl WeightMap {
    /// An empty view over `files`.
    pub fn new(files: Arc<WeightFiles>) -> Self {
        Self {
            files,
            map: BTreeMap::new(),
            owned: BTreeSet::new(),
            deltas: BTreeMap::new(),
            label: None,
        }
    }

    /// Names the component in load reports (e.g. `"unet"`): the report's file line becomes
    /// `file.safetensors (unet)`.
    pub fn with_label(mut self, label: impl Into<String>) -> Self {
        self.label = Some(label.into());
        self
    }

    /// The memory-mapped files.
    pub fn files(&self) -> &Arc<WeightFiles> {
        &self.files
    }

    /// Claims the file key `key` for this view: if no model tensor uses it, loading reports
    /// it as unused.
    pub fn own(&mut self, key: impl Into<String>) {
        self.owned.insert(key.into());
    }

    /// Maps the model name `name` to the file key `key` via `derive` (and owns the key).
    pub fn insert(&mut self, name: impl Into<String>, key: impl Into<String>, derive: Derive) {
        let key = key.into();
        self.owned.insert(key.clone());
        self.map.insert(name.into(), Mapped { key, derive });
    }

    /// Adds `delta` to the tensor `name` when it is loaded (in the load dtype; the shapes must
    /// match, checked at load). Several deltas add up.
    pub fn add_delta(&mut self, name: impl Into<String>, delta: Tensor) {
        self.deltas.entry(name.into()).or_default().push(delta);
    }

    /// Removes every delta.
    pub fn clear_deltas(&mut self) {
        self.deltas.clear();
    }

    /// The mapping of a model name, if any.
    pub fn get(&self, name: &str) -> Option<&Mapped> {
        self.map.get(name)
    }

    /// Every model name, in order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.map.keys().map(String::as_str)
    }

    /// Number of mapped model names.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// True when nothing is mapped.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// The shape the tensor `name` has through this view (`None` when it is not mapped, its
    /// file key is absent or the derivation does not fit).
    pub fn mapped_shape(&self, name: &str) -> Option<Vec<usize>> {
        self.shape(name).ok().flatten()
    }

    /// Every file key as the model name of the same spelling (a diffusers folder's own file).
    pub fn identity(files: Arc<WeightFiles>) -> Self {
        let mut m = Self::new(files.clone());
        for k in files.names() {
            m.insert(k, k, Derive::Same);
        }
        m
    }

    /// The file keys this view owns.
    pub fn owned(&self) -> impl Iterator<Item = &str> {
        self.owned.iter().map(String::as_str)
    }

    /// The report's file list: the files, labelled with the component when one is set.
    pub(crate) fn report_files(&self) -> Vec<PathBuf> {
        self.files
            .paths()
            .iter()
            .map(|p| match &self.label {
                Some(l) => PathBuf::from(format!("{} ({l})", p.display())),
                None => p.clone(),
            })
            .collect()
    }

    /// The shape `name` will have, or `Err((file key, why))` when the file tensor cannot give
    /// it; `Ok(None)` when `name` is not mapped or its file key is absent.
    pub(crate) fn shape(&self, name: &str) -> std::result::Result<Option<Vec<usize>>, String> {
        let Some(m) = self.map.get(name) else {
            return Ok(None);
        };
        let Some(file_shape) = self.files.shape(&m.key) else {
            return Ok(None);
        };
        m.derive.shape(file_shape).map(Some)
    }

    /// Loads `name`: the file tensor, derived, in `dtype` on `device`, plus its deltas.
    pub fn load(&self, name: &str, dtype: DType, device: &Device) -> Result<Tensor> {
        let m = self.map.get(name).ok_or_else(|| {
            Error::invalid_argument("tensor name", name, "a name the weight map defines")
        })?;
        let t = m.derive.apply(self.files.load(&m.key, dtype, device)?)?;
        match self.deltas.get(name) {
            None => Ok(t),
            Some(ds) => {
                let mut t = t;
                for d in ds {
                    if d.dims() != t.dims() {
                        return Err(Error::invalid_argument(
                            format!("delta for `{name}`"),
                            format!("shape {:?}", d.dims()),
                            format!("the weight's shape {:?}", t.dims()),
                        ));
                    }
                    t = (t + d.to_dtype(dtype)?.to_device(device)?)?;
                }
                Ok(t)
            }
        }
    }
}
