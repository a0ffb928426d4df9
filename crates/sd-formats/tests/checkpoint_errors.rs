//! Files that are not usable single-file checkpoints get clear errors, never a panic.

use std::path::{Path, PathBuf};

use sd_formats::{Checkpoint, Family};

/// Writes a safetensors file by hand: (name, dtype, shape) with zero bytes of the right size.
fn write_st(path: &Path, tensors: &[(&str, &str, &[usize])]) {
    let mut header = serde_json::Map::new();
    let mut offset = 0usize;
    for (name, dtype, shape) in tensors {
        let size = match *dtype {
            "F16" | "BF16" => 2,
            "F64" | "I64" => 8,
            "U8" | "BOOL" => 1,
            _ => 4,
        };
        let n: usize = shape.iter().product::<usize>() * size;
        header.insert(
            (*name).to_owned(),
            serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}),
        );
        offset += n;
    }
    let h = serde_json::Value::Object(header).to_string();
    let mut bytes = (h.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(h.as_bytes());
    bytes.resize(bytes.len() + offset, 0);
    std::fs::write(path, bytes).unwrap();
}

fn err(path: &Path) -> String {
    match Checkpoint::open(path) {
        Ok(c) => panic!("{} opened as {:?}", path.display(), c.family()),
        Err(e) => e.to_string(),
    }
}

fn tmp(dir: &tempfile::TempDir, name: &str) -> PathBuf {
    dir.path().join(name)
}

#[test]
fn pickles_are_refused_unopened() {
    let d = tempfile::tempdir().unwrap();
    for name in ["model.ckpt", "model.pt", "model.bin", "model.pth"] {
        let p = tmp(&d, name);
        std::fs::write(&p, b"\x80\x02garbage").unwrap();
        let e = err(&p);
        assert!(e.contains("pickled") && e.contains("safetensors"), "{e}");
    }
    // Content sniffing: a torch.save zip or a raw pickle with a .safetensors name.
    let p = tmp(&d, "renamed.safetensors");
    std::fs::write(&p, b"PK\x03\x04rest of a zip").unwrap();
    assert!(err(&p).contains("zip archive"), "{}", err(&p));
    std::fs::write(&p, b"\x80\x04\x95pickle").unwrap();
    assert!(err(&p).contains("pickle stream"), "{}", err(&p));
}

#[test]
fn truncated_and_corrupt_files() {
    let d = tempfile::tempdir().unwrap();
    let p = tmp(&d, "t.safetensors");
    // A header length beyond the file.
    let mut b = 1000u64.to_le_bytes().to_vec();
    b.extend_from_slice(b"{\"a\":");
    std::fs::write(&p, &b).unwrap();
    let e = err(&p);
    assert!(
        e.contains("not a valid safetensors file") && e.contains("truncated"),
        "{e}"
    );
    // Shorter than the size field.
    std::fs::write(&p, b"abc").unwrap();
    assert!(err(&p).contains("not a valid safetensors file"));
    // Data cut short after a valid header.
    write_st(
        &p,
        &[("model.diffusion_model.out.2.weight", "F32", &[4, 8, 3, 3])],
    );
    let full = std::fs::read(&p).unwrap();
    std::fs::write(&p, &full[..full.len() - 10]).unwrap();
    assert!(err(&p).contains("truncated or corrupt"), "{}", err(&p));
    // Empty file, missing file.
    std::fs::write(&p, b"").unwrap();
    let _ = err(&p);
    let e = err(&tmp(&d, "absent.safetensors"));
    assert!(e.contains("absent.safetensors"), "{e}");
}

#[test]
fn families_and_refusals() {
    let d = tempfile::tempdir().unwrap();
    let p = tmp(&d, "c.safetensors");
    let unet_in = "model.diffusion_model.input_blocks.0.0.weight";
    let vae = "first_stage_model.decoder.conv_in.weight";
    let cases: &[(&[&str], Family)] = &[
        (
            &["cond_stage_model.transformer.text_model.final_layer_norm.weight"],
            Family::Sd1,
        ),
        (&["cond_stage_model.model.ln_final.weight"], Family::Sd2),
        (
            &[
                "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight",
                "conditioner.embedders.1.model.ln_final.weight",
            ],
            Family::Sdxl,
        ),
        (
            &["conditioner.embedders.0.model.ln_final.weight"],
            Family::SdxlRefiner,
        ),
    ];
    for (te, family) in cases {
        let mut t: Vec<(&str, &str, &[usize])> =
            vec![(unet_in, "F32", &[8, 4, 3, 3]), (vae, "F16", &[2])];
        t.extend(te.iter().map(|k| (*k, "F32", &[2usize] as &[usize])));
        write_st(&p, &t);
        assert_eq!(Checkpoint::open(&p).unwrap().family(), *family);
    }
    // Inpainting: 9 input channels.
    write_st(
        &p,
        &[
            (unet_in, "F32", &[8, 9, 3, 3]),
            ("cond_stage_model.transformer.text_model.x", "F32", &[1]),
            (vae, "F32", &[1]),
        ],
    );
    let e = err(&p);
    assert!(
        e.contains("inpainting") && e.contains("not supported yet"),
        "{e}"
    );
    // No text encoder; no VAE; SDXL without its second encoder.
    write_st(&p, &[(unet_in, "F32", &[8, 4, 3, 3]), (vae, "F32", &[1])]);
    assert!(err(&p).contains("without a text encoder"));
    write_st(
        &p,
        &[
            (unet_in, "F32", &[8, 4, 3, 3]),
            ("cond_stage_model.model.x", "F32", &[1]),
        ],
    );
    assert!(err(&p).contains("no VAE"));
    // A LoRA file or a diffusers UNet file given as a checkpoint.
    write_st(
        &p,
        &[(
            "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight",
            "F32",
            &[4, 8],
        )],
    );
    assert!(err(&p).contains("LoRA"), "{}", err(&p));
    write_st(&p, &[("down_blocks.0.resnets.0.conv1.weight", "F32", &[4])]);
    assert!(err(&p).contains("diffusers"), "{}", err(&p));
}

#[test]
fn wrong_text_encoder_component() {
    let d = tempfile::tempdir().unwrap();
    let p = tmp(&d, "c.safetensors");
    write_st(
        &p,
        &[
            (
                "model.diffusion_model.input_blocks.0.0.weight",
                "F32",
                &[8, 4, 3, 3],
            ),
            ("cond_stage_model.transformer.text_model.x", "F32", &[1]),
            ("first_stage_model.x", "F32", &[1]),
        ],
    );
    let c = Checkpoint::open(&p).unwrap();
    let e = c
        .text_encoder_map("text_encoder_2", 12, true)
        .unwrap_err()
        .to_string();
    assert!(e.contains("text_encoder_2") && e.contains("SD 1.x"), "{e}");
    assert!(c.unet_map(0).is_err());
    // The SD 2 statistic needs the full-size UNet's tensor.
    assert_eq!(c.sd2_v_prediction_statistic(), None);
}
