//! Property test: files with arbitrary key names and shapes drawn from the real schemes
//! (checkpoint, LoRA and embedding prefixes, suffixes, indices, ranks) never make the readers
//! panic: `Checkpoint::open` and its maps, `LoraFile::open` and `deltas`, `EmbeddingFile::open`
//! return `Ok` or an `Err` with a message. `PROPTEST_CASES` sets the number of cases.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed};
use sd_core::testing::{proptest_cases, proptest_fixed_seed};
use sd_formats::lora::ComponentWeights;
use sd_formats::{Checkpoint, EmbeddingFile, LoraFile, LoraTarget};

const HEADS: &[&str] = &[
    "model.diffusion_model.input_blocks.",
    "model.diffusion_model.output_blocks.",
    "model.diffusion_model.middle_block.",
    "model.diffusion_model.",
    "first_stage_model.decoder.up.",
    "first_stage_model.encoder.mid.attn_1.",
    "cond_stage_model.transformer.text_model.",
    "cond_stage_model.model.transformer.resblocks.",
    "conditioner.embedders.1.model.transformer.resblocks.",
    "conditioner.embedders.0.model.",
    "lora_unet_input_blocks_",
    "lora_unet_down_blocks_0_attentions_",
    "lora_te_text_model_encoder_layers_",
    "lora_te2_",
    "unet.down_blocks.",
    "text_encoder.text_model.encoder.layers.0.self_attn.",
    "emb_params",
    "clip_l",
    "clip_g",
    "",
];
const TAILS: &[&str] = &[
    "0.0.weight",
    "1.0.op.weight",
    "2.1.conv.bias",
    "0.in_layers.2.weight",
    "attn.in_proj_weight",
    "attn.in_proj_bias",
    "q.weight",
    "text_projection",
    ".lora_down.weight",
    ".lora_up.weight",
    ".alpha",
    "0_1_transformer_blocks_0_attn2_to_k.lora_down.weight",
    "0_1_transformer_blocks_0_attn2_to_k.lora_up.weight",
    "to_q.lora_A.weight",
    "to_q.lora_B.weight",
    "q_proj.lora_linear_layer.down.weight",
    "9_0_op.hada_w1_a",
    "x.dora_scale",
    "",
];

fn key() -> impl Strategy<Value = String> {
    (
        0..HEADS.len(),
        0..TAILS.len(),
        proptest::option::of(0u8..30),
    )
        .prop_map(|(h, t, n)| {
            let mid = n.map(|n| format!("{n}.")).unwrap_or_default();
            format!("{}{mid}{}", HEADS[h], TAILS[t])
        })
}

fn shape() -> impl Strategy<Value = Vec<usize>> {
    proptest::collection::vec(0usize..6, 0..5)
}

struct Fake(HashMap<String, Vec<usize>>);

impl ComponentWeights for Fake {
    fn weight_shape(&self, name: &str) -> Option<Vec<usize>> {
        self.0.get(name).cloned()
    }
    fn weight_names(&self) -> Vec<String> {
        self.0.keys().cloned().collect()
    }
}

fn config() -> Config {
    let mut c = Config {
        cases: proptest_cases(64),
        failure_persistence: None,
        ..Config::default()
    };
    if let Some(seed) = proptest_fixed_seed() {
        c.rng_seed = RngSeed::Fixed(seed);
    }
    c
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn readers_never_panic(entries in proptest::collection::vec((key(), shape()), 1..12), lpb in 0usize..4) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.safetensors");
        let dev = Device::Cpu;
        let tensors: HashMap<String, Tensor> = entries
            .iter()
            .map(|(k, s)| (k.clone(), Tensor::ones(s.as_slice(), DType::F32, &dev).unwrap()))
            .collect();
        candle_core::safetensors::save(&tensors, &path).unwrap();
        if let Ok(ck) = Checkpoint::open(&path) {
            let _ = ck.unet_map(lpb);
            let _ = ck.vae_map();
            for te in ["text_encoder", "text_encoder_2"] {
                let _ = ck.text_encoder_map(te, lpb, lpb % 2 == 0);
            }
            let _ = ck.sd2_v_prediction_statistic();
        }
        if let Ok(lora) = LoraFile::open(&path) {
            let _ = lora.cross_attention_width();
            // The model's weights: the file's own shapes under diffusers-like names.
            let fake = Fake(
                entries
                    .iter()
                    .map(|(k, s)| (format!("down_blocks.0.attentions.{}.weight", k.len() % 3), s.clone()))
                    .collect(),
            );
            for t in [LoraTarget::Unet, LoraTarget::TextEncoder, LoraTarget::TextEncoder2] {
                let _ = lora.deltas(t, &fake, lpb, 0.5);
            }
        }
        let _ = EmbeddingFile::open(&path, None);
    }
}
