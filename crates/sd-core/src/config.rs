//! Reading diffusers/transformers `config.json` files into serde structs.
//!
//! Config structs in the model crates mirror the JSON field for field; they collect keys they
//! do not know into a `#[serde(flatten)] extra` map, which [`unknown_keys`] turns into a list
//! the loader reports (keys starting with `_`, such as `_class_name`, are metadata and ignored).

use std::collections::BTreeMap;
use std::path::Path;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Reads and parses a JSON file; errors name the file and the offending field path.
pub fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    parse_json(&text, path)
}

/// Parses JSON text that came from `path` (used in error messages). The bare `NaN`, `Infinity`
/// and `-Infinity` tokens that Python's `json` writes (diffusers saves DPM-Solver's
/// `"lambda_min_clipped": -Infinity` that way) are read as `null`.
pub fn parse_json<T: DeserializeOwned>(text: &str, path: &Path) -> Result<T> {
    let text = python_json_to_json(text);
    let de = &mut serde_json::Deserializer::from_str(&text);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let key = e.path().to_string();
        let key = (key != ".").then_some(key);
        Error::config(path, key.as_deref(), e.into_inner().to_string())
    })
}

/// Keys of a flattened `extra` map that are neither known fields nor `_`-prefixed metadata.
pub fn unknown_keys(extra: &BTreeMap<String, serde_json::Value>) -> Vec<String> {
    extra
        .keys()
        .filter(|k| !k.starts_with('_'))
        .cloned()
        .collect()
}

/// A config field that diffusers accepts either as one value for every block or as a list with
/// one value per block (e.g. `attention_head_dim: 8` or `[5, 10, 20, 20]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany<T> {
    /// The same value for every block.
    One(T),
    /// One value per block.
    Many(Vec<T>),
}

impl<T: Clone> OneOrMany<T> {
    /// Expands to exactly `n` values; a list of another length is a config error for `key`.
    pub fn per_block(&self, n: usize, path: &Path, key: &str) -> Result<Vec<T>> {
        match self {
            OneOrMany::One(v) => Ok(vec![v.clone(); n]),
            OneOrMany::Many(v) if v.len() == n => Ok(v.clone()),
            OneOrMany::Many(v) => Err(Error::config(
                path,
                Some(key),
                format!("has {} entries, expected one per block ({n})", v.len()),
            )),
        }
    }
}

/// Replaces the bare `NaN`, `Infinity` and `-Infinity` tokens that Python's `json` writes (e.g.
/// DPM-Solver's `"lambda_min_clipped": -Infinity`) with `null`, outside strings.
fn python_json_to_json(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let (mut in_str, mut escaped) = (false, false);
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        if in_str {
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_str = false;
            }
        } else if c == '"' {
            in_str = true;
        } else {
            let token = ["-Infinity", "Infinity", "NaN"]
                .into_iter()
                .find(|t| rest.starts_with(t));
            if let Some(t) = token {
                out.push_str("null");
                rest = &rest[t.len()..];
                continue;
            }
        }
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_non_finite_tokens_become_null_outside_strings() {
        let t = r#"{"a": -Infinity, "b": [NaN, Infinity], "s": "NaN -Infinity \" Infinity"}"#;
        let v: serde_json::Value = parse_json(t, Path::new("x.json")).unwrap();
        assert!(v["a"].is_null() && v["b"][0].is_null() && v["b"][1].is_null());
        assert_eq!(v["s"], "NaN -Infinity \" Infinity");
    }
}
