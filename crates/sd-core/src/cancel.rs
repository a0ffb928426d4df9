//! Cancellation of long computations: a check the models poll between their parts.

use std::sync::Arc;

use crate::{Error, Result};

/// A check polled between the parts of long work (each text encoder and prompt chunk, each
/// denoising step, the VAE decoder's blocks and tiles); once it answers true the work stops
/// with [`Error::Interrupted`] at the next check. The default never cancels, and a run that is
/// never cancelled computes exactly what it computes without one.
///
/// ```
/// use std::sync::atomic::{AtomicBool, Ordering};
/// use std::sync::Arc;
/// let flag = Arc::new(AtomicBool::new(false));
/// let f = flag.clone();
/// let cancel = sd_core::Cancel::new(move || f.load(Ordering::Relaxed));
/// assert!(cancel.check().is_ok());
/// flag.store(true, Ordering::Relaxed);
/// assert!(matches!(cancel.check(), Err(sd_core::Error::Interrupted)));
/// ```
#[derive(Clone, Default)]
pub struct Cancel(Option<Arc<dyn Fn() -> bool + Send + Sync>>);

impl Cancel {
    /// Cancels once `f` returns true (`f` is called at every check: keep it cheap, e.g. an
    /// atomic load).
    pub fn new(f: impl Fn() -> bool + Send + Sync + 'static) -> Self {
        Self(Some(Arc::new(f)))
    }

    /// Never cancels (the default).
    pub fn never() -> Self {
        Self(None)
    }

    /// True once the work should stop.
    pub fn is_cancelled(&self) -> bool {
        self.0.as_ref().is_some_and(|f| f())
    }

    /// `Err(Error::Interrupted)` once the work should stop.
    pub fn check(&self) -> Result<()> {
        if self.is_cancelled() {
            Err(Error::Interrupted)
        } else {
            Ok(())
        }
    }
}

impl std::fmt::Debug for Cancel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "Cancel(check)"
        } else {
            "Cancel(never)"
        })
    }
}
