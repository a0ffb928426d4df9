//! The one error type of sd-rs, with variants grouped by who is at fault.

use std::fmt;
use std::path::PathBuf;

/// Result alias used throughout sd-rs.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Every error that sd-rs library code returns.
///
/// Messages say what was received and what was expected, and name the file,
/// config key or tensor involved.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file or folder involved.
        path: PathBuf,
        /// The underlying I/O error.
        #[source]
        source: std::io::Error,
    },

    /// A config file is unreadable, or a field has a value sd-rs cannot use.
    #[error("{}: {}{reason}", path.display(), key.as_deref().map(|k| format!("field `{k}`: ")).unwrap_or_default())]
    Config {
        /// The config file (e.g. `unet/config.json`).
        path: PathBuf,
        /// The offending field, when one is to blame.
        key: Option<String>,
        /// What is wrong and what was expected.
        reason: String,
    },

    /// Weights are missing, unused, of the wrong shape or unreadable.
    #[error("{0}")]
    Weights(Box<LoadReport>),

    /// A caller-supplied argument is out of range or inconsistent.
    #[error("invalid argument `{name}`: got {value}, expected {expected}")]
    InvalidArgument {
        /// The argument name.
        name: String,
        /// What was received.
        value: String,
        /// What was expected.
        expected: String,
    },

    /// A feature that sd-rs does not (yet) support.
    #[error("unsupported: {what}")]
    Unsupported {
        /// What is not supported, and what is.
        what: String,
    },

    /// A computation produced NaN or infinite values (typically a float16 overflow, such as
    /// SDXL's VAE decoding in f16); `hint` says what to do instead.
    #[error("{what} holds {count} NaN/inf values; {hint}")]
    NonFinite {
        /// What was computed (e.g. "the decoded image (VAE in f16)").
        what: String,
        /// How many values are NaN or infinite.
        count: usize,
        /// What to do about it.
        hint: String,
    },

    /// The work was cancelled through a [`crate::Cancel`] (e.g. a server's `/interrupt`)
    /// before it finished; nothing is wrong with the inputs.
    #[error("interrupted")]
    Interrupted,

    /// An error from the tensor library.
    #[error("tensor error: {0}")]
    Tensor(#[from] candle_core::Error),
}

impl Error {
    /// Shorthand for [`Error::InvalidArgument`].
    pub fn invalid_argument(
        name: impl Into<String>,
        value: impl fmt::Display,
        expected: impl Into<String>,
    ) -> Self {
        Error::InvalidArgument {
            name: name.into(),
            value: value.to_string(),
            expected: expected.into(),
        }
    }

    /// Shorthand for [`Error::Config`].
    pub fn config(path: impl Into<PathBuf>, key: Option<&str>, reason: impl Into<String>) -> Self {
        Error::Config {
            path: path.into(),
            key: key.map(str::to_owned),
            reason: reason.into(),
        }
    }

    /// Shorthand for [`Error::Unsupported`].
    pub fn unsupported(what: impl Into<String>) -> Self {
        Error::Unsupported { what: what.into() }
    }

    /// Shorthand for [`Error::Io`].
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}

/// Everything that went wrong while loading one model's weights, reported at once.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LoadReport {
    /// The weight file(s) the model was loaded from.
    pub files: Vec<PathBuf>,
    /// Tensors the model needs that the files lack: (name, expected shape, nearest name in the files).
    pub missing: Vec<(String, Vec<usize>, Option<String>)>,
    /// Tensors present with another shape: (name, expected shape, found shape).
    pub wrong_shape: Vec<(String, Vec<usize>, Vec<usize>)>,
    /// Tensors in the files that the model does not use (benign extras excluded).
    pub unused: Vec<String>,
    /// Tensors that could not be read (corrupt data, unsupported dtype): (name, reason).
    pub unreadable: Vec<(String, String)>,
}

impl LoadReport {
    /// True when nothing went wrong.
    pub fn is_ok(&self) -> bool {
        self.missing.is_empty()
            && self.wrong_shape.is_empty()
            && self.unused.is_empty()
            && self.unreadable.is_empty()
    }
}

impl fmt::Display for LoadReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let files: Vec<String> = self.files.iter().map(|p| p.display().to_string()).collect();
        write!(f, "weights in {} do not fit the model:", files.join(", "))?;
        const SHOW: usize = 20;
        for (name, shape, hint) in self.missing.iter().take(SHOW) {
            write!(f, "\n  missing `{name}` (expected shape {shape:?})")?;
            if let Some(h) = hint {
                write!(f, "; nearest name in the file: `{h}`")?;
            }
        }
        if self.missing.len() > SHOW {
            write!(f, "\n  ... and {} more missing", self.missing.len() - SHOW)?;
        }
        for (name, want, got) in self.wrong_shape.iter().take(SHOW) {
            write!(f, "\n  `{name}` has shape {got:?}, expected {want:?}")?;
        }
        if self.wrong_shape.len() > SHOW {
            write!(
                f,
                "\n  ... and {} more of the wrong shape",
                self.wrong_shape.len() - SHOW
            )?;
        }
        for (name, why) in self.unreadable.iter().take(SHOW) {
            write!(f, "\n  `{name}` cannot be read: {why}")?;
        }
        for name in self.unused.iter().take(SHOW) {
            write!(
                f,
                "\n  unused tensor `{name}` (the config may not match these weights)"
            )?;
        }
        if self.unused.len() > SHOW {
            write!(f, "\n  ... and {} more unused", self.unused.len() - SHOW)?;
        }
        Ok(())
    }
}
