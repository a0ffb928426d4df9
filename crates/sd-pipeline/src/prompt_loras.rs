//! LoRAs named in the prompt, as AUTOMATIC1111's built-in Lora extension reads them:
//! `<lora:NAME:WEIGHT>` or `<lora:NAME:TE_WEIGHT:UNET_WEIGHT>` loads `NAME.safetensors` from a
//! LoRA folder (`--lora-dir`) with those strengths; the tag itself is taken out of the text when
//! the prompt is encoded ([`crate::PromptSyntax::A1111`]). The `sd` CLI and `sd serve` resolve
//! tags with this one module, and write A1111's `Lora hashes` infotext field from it.
//!
//! As A1111's `extra_networks.parse_prompts`, only the tags of the first prompt of a batch
//! count (they apply to the whole model, hence to every prompt).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use sd_clip::prompt_syntax::{extract_extra_networks, LoraTag};
use sd_core::{Error, Result};
use sd_formats::LoraFile;
use sha2::{Digest, Sha256};

/// File extensions a LoRA folder is searched for, as A1111 lists them. Only `.safetensors`
/// loads: the loader refuses pickles (`.pt`, `.ckpt`) with a message saying so, which is
/// clearer than "not found" for a file that is there.
const EXTENSIONS: [&str; 3] = ["safetensors", "pt", "ckpt"];

/// A folder of LoRA files, looked up by file stem (A1111's `<lora:NAME>`).
#[derive(Debug, Clone)]
pub struct LoraDir {
    dir: PathBuf,
}

impl LoraDir {
    /// The folder `dir` (read when a name is looked up).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    /// The folder.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// The LoRA files of the folder (not its subfolders), sorted, with [`EXTENSIONS`] endings.
    pub fn list(&self) -> Result<Vec<PathBuf>> {
        let rd = std::fs::read_dir(&self.dir).map_err(|e| Error::io(&self.dir, e))?;
        let mut v: Vec<PathBuf> = rd
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| {
                p.is_file()
                    && p.extension()
                        .is_some_and(|e| EXTENSIONS.iter().any(|x| e.eq_ignore_ascii_case(x)))
            })
            .collect();
        v.sort();
        Ok(v)
    }

    /// The file whose stem is `name` (`.safetensors` preferred); an unknown name is an error
    /// listing the folder's LoRAs.
    pub fn find(&self, name: &str) -> Result<PathBuf> {
        let files = self.list()?;
        let stem = |p: &Path| p.file_stem().map(|s| s.to_string_lossy().into_owned());
        let found = files
            .iter()
            .filter(|p| stem(p).as_deref() == Some(name))
            .min_by_key(|p| {
                let e = p
                    .extension()
                    .map(|e| e.to_string_lossy().to_ascii_lowercase());
                EXTENSIONS
                    .iter()
                    .position(|x| Some(*x) == e.as_deref())
                    .unwrap_or(EXTENSIONS.len())
            });
        match found {
            Some(p) => Ok(p.clone()),
            None => {
                let names: Vec<String> = files.iter().filter_map(|p| stem(p)).collect();
                Err(Error::invalid_argument(
                    "<lora:NAME>",
                    name,
                    format!(
                        "one of the LoRAs in {}: {}",
                        self.dir.display(),
                        if names.is_empty() {
                            "(none: the folder has no .safetensors files)".to_owned()
                        } else {
                            names.join(", ")
                        }
                    ),
                ))
            }
        }
    }
}

/// A LoRA named by a prompt tag, opened, with its strengths and A1111's short hash.
#[derive(Debug, Clone)]
pub struct PromptLora {
    /// The name as written in the tag.
    pub name: String,
    /// The opened file.
    pub file: Arc<LoraFile>,
    /// Strength on the text encoder(s).
    pub te_weight: f64,
    /// Strength on the UNet.
    pub unet_weight: f64,
    /// The first 12 hex digits of the file's sha256 (A1111's `shorthash`).
    pub short_hash: String,
}

/// The LoRA tags of `prompt` resolved in `dir` and opened, in the order written. Tags of other
/// kinds (`<hypernet:...>`) are left to the prompt encoder (which logs them as ignored). A tag
/// with a weight that is not a number, a tag without a folder, and an unknown name are errors.
pub fn prompt_loras(prompt: &str, dir: Option<&LoraDir>) -> Result<Vec<PromptLora>> {
    let (_, tags) = extract_extra_networks(prompt);
    let tags: Vec<LoraTag> = tags
        .iter()
        .filter_map(|t| t.lora())
        .collect::<Result<_>>()?;
    if tags.is_empty() {
        return Ok(Vec::new());
    }
    let Some(dir) = dir else {
        let names: Vec<&str> = tags.iter().map(|t| t.name.as_str()).collect();
        return Err(Error::invalid_argument(
            "<lora:...> tags",
            names.join(", "),
            "a LoRA folder to load them from (--lora-dir DIR)",
        ));
    };
    let mut out = Vec::with_capacity(tags.len());
    for t in tags {
        for (what, w) in [("TE", t.te_weight), ("UNet", t.unet_weight)] {
            if !w.is_finite() {
                return Err(Error::invalid_argument(
                    format!("<lora:{}> {what} weight", t.name),
                    w.to_string(),
                    "a finite number",
                ));
            }
        }
        let path = dir.find(&t.name)?;
        let file = LoraFile::open(&path)?;
        out.push(PromptLora {
            short_hash: short_sha256(&path)?,
            name: t.name,
            file: Arc::new(file),
            te_weight: t.te_weight,
            unet_weight: t.unet_weight,
        });
    }
    Ok(out)
}

/// A1111's `Lora hashes` infotext value: `name: hash, name: hash` (`:` and `,` taken out of the
/// names); `None` without LoRAs.
pub fn lora_hashes(loras: &[PromptLora]) -> Option<String> {
    let v: Vec<String> = loras
        .iter()
        .map(|l| format!("{}: {}", l.name.replace([':', ','], ""), l.short_hash))
        .collect();
    (!v.is_empty()).then(|| v.join(", "))
}

/// The first 12 hex digits of the sha256 of the file at `path` (A1111's LoRA and embedding
/// hashes).
pub fn short_sha256(path: &Path) -> Result<String> {
    Ok(sha256_hex(path)?[..12].to_owned())
}

/// The sha256 of the file at `path`, as 64 lowercase hex digits (A1111's `Model hash` is the
/// first 10).
pub fn sha256_hex(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use sd_core::testing::fixtures_dir;

    fn dir() -> LoraDir {
        LoraDir::new(fixtures_dir().join("loras"))
    }

    #[test]
    fn tags_resolve_with_their_weights_and_hashes() {
        let l = prompt_loras(
            "a fox <lora:sd1_kohya:0.7>, <lora:sd1_peft:0.5:0.25> <hypernet:x:1>",
            Some(&dir()),
        )
        .expect("both fixtures exist");
        let got: Vec<(&str, f64, f64)> = l
            .iter()
            .map(|l| (l.name.as_str(), l.te_weight, l.unet_weight))
            .collect();
        assert_eq!(got, [("sd1_kohya", 0.7, 0.7), ("sd1_peft", 0.5, 0.25)]);
        // `sha256sum tests/fixtures/loras/*.safetensors`, first 12 hex digits
        assert_eq!(
            lora_hashes(&l).as_deref(),
            Some("sd1_kohya: da06c1c9875a, sd1_peft: 3a57c9154080")
        );
        assert!(prompt_loras("no tags, <b> <lora:>", None)
            .expect("nothing to load")
            .is_empty());
    }

    #[test]
    fn unknown_names_and_missing_folders_are_clear_errors() {
        let e = prompt_loras("<lora:nope:1>", Some(&dir())).expect_err("unknown");
        let m = e.to_string();
        assert!(
            m.contains("nope") && m.contains("sd1_kohya, sd1_peft, sdxl_kohya"),
            "{m}"
        );
        let e = prompt_loras("<lora:sd1_kohya:1>", None).expect_err("no folder");
        assert!(e.to_string().contains("--lora-dir"), "{e}");
        let e = prompt_loras("<lora:sd1_kohya:strong>", Some(&dir())).expect_err("weight");
        assert!(e.to_string().contains("strong"), "{e}");
        let e = prompt_loras("<lora:sd1_kohya:1>", Some(&LoraDir::new("/no/such/dir")))
            .expect_err("no folder");
        assert!(e.to_string().contains("/no/such/dir"), "{e}");
    }
}
