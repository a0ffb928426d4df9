//! Embeds the demo model (`models/demo/` at the workspace root) into the `sd` binary, so that
//! `sd txt2img --prompt ...` works offline wherever the binary goes. Generates
//! `$OUT_DIR/demo_files.rs` with the relative path and bytes of every file, and a content hash.

use std::path::{Path, PathBuf};

fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut entries: Vec<_> = entries.filter_map(|e| e.ok()).map(|e| e.path()).collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            walk(&p, out);
        } else {
            out.push(p);
        }
    }
}

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let demo = manifest.join("../../models/demo");
    println!("cargo:rerun-if-changed={}", demo.display());
    let mut files = Vec::new();
    walk(&demo, &mut files);
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut src = String::from("/// (path relative to the model folder, contents) of every demo-model file.\npub const FILES: &[(&str, &[u8])] = &[\n");
    for f in &files {
        println!("cargo:rerun-if-changed={}", f.display());
        let rel = f
            .strip_prefix(&demo)
            .expect("under demo")
            .to_string_lossy()
            .replace('\\', "/");
        if rel.starts_with('.') || rel.ends_with(".md") {
            continue;
        }
        for b in rel
            .bytes()
            .chain(std::fs::read(f).expect("readable demo file"))
        {
            hash = (hash ^ b as u64).wrapping_mul(0x100_0000_01b3);
        }
        src.push_str(&format!(
            "    ({rel:?}, include_bytes!({:?})),\n",
            f.canonicalize().expect("exists")
        ));
    }
    src.push_str("];\n");
    src.push_str(&format!("/// Hash of the embedded files (names the extraction folder).\npub const HASH: u64 = {hash:#x};\n"));
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("set by cargo")).join("demo_files.rs");
    std::fs::write(out, src).expect("writable OUT_DIR");
}
