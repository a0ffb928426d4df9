//! Applying LoRAs to a loaded model, and removing them, without reading the model files again.
//!
//! The UNet's and text encoders' base weights stay memory-mapped ([`crate::StableDiffusion`]
//! keeps their weight sources); [`StableDiffusion::with_loras`] computes each LoRA's deltas,
//! merges them into the base weights as the weights are read, and rebuilds the components the
//! LoRAs touch (repacking their layers for the CPU kernels). Components no LoRA touches (the
//! VAE, an untouched text encoder) are shared with the original by `Arc`.

use std::collections::BTreeMap;
use std::sync::Arc;

use sd_clip::PromptEncoder;
use sd_core::{Error, Result, WeightMap};
use sd_formats::{LoraFile, LoraTarget};

use crate::model_index::ModelFamily;
use crate::pipeline::StableDiffusion;
use crate::single_file::{layers_per_block, text_encoder_from, unet_from};

/// How strictly LoRA keys must match the model.
#[derive(Debug, Clone, Copy, Default)]
pub struct LoraOptions {
    /// Warn about keys that match no module and apply the rest (otherwise: an error listing them).
    pub lenient: bool,
}

fn family_name(f: ModelFamily) -> &'static str {
    match f {
        ModelFamily::Sd => "SD 1.x/2.x",
        ModelFamily::Sdxl => "SDXL",
        ModelFamily::SdxlRefiner => "SDXL refiner",
    }
}

impl StableDiffusion {
    /// The same model with `loras` (file, strength) applied instead of the current ones; an
    /// empty list gives the base model back. Deltas are `strength · alpha / rank · up @ down`
    /// per module (see [`sd_formats::lora`]); several LoRAs add up.
    ///
    /// Refused: a LoRA made for another family (SDXL names on SD 1.x/2.x and the reverse, or a
    /// cross-attention width that is not the UNet's), and keys that match no module of the model
    /// unless `opts.lenient` (then they are logged and skipped).
    pub fn with_loras(
        &self,
        loras: &[(Arc<LoraFile>, f64)],
        opts: &LoraOptions,
    ) -> Result<StableDiffusion> {
        let split: Vec<_> = loras.iter().map(|(l, w)| (l.clone(), *w, *w)).collect();
        self.with_loras_te_unet(&split, opts)
    }

    /// [`StableDiffusion::with_loras`] with separate strengths (file, text encoders, UNet), as
    /// AUTOMATIC1111's `<lora:NAME:TE_WEIGHT:UNET_WEIGHT>`. [`StableDiffusion::loras`] then
    /// reports the UNet strengths.
    pub fn with_loras_te_unet(
        &self,
        loras: &[(Arc<LoraFile>, f64, f64)],
        opts: &LoraOptions,
    ) -> Result<StableDiffusion> {
        let unet_cfg = self.unet.config();
        let lpb = layers_per_block(unet_cfg);
        let mut deltas: BTreeMap<LoraTarget, WeightMap> = BTreeMap::new();
        let mut unmatched: Vec<String> = Vec::new();
        for (lora, te_strength, unet_strength) in loras {
            self.check_family(lora)?;
            unmatched.extend(
                lora.unknown_keys()
                    .iter()
                    .map(|k| format!("{k} ({})", lora.path().display())),
            );
            for target in lora.targets() {
                let source = match target {
                    LoraTarget::Unet => self.sources.unet.as_ref(),
                    t => self.sources.text.get(t.component()),
                };
                let Some(source) = source else {
                    let n = lora.modules().iter().filter(|m| m.target == target).count();
                    unmatched.push(format!(
                        "{n} {} module(s) of {}: this model has no {} of its own",
                        target.component(),
                        lora.path().display(),
                        target.component()
                    ));
                    continue;
                };
                let strength = match target {
                    LoraTarget::Unet => *unet_strength,
                    _ => *te_strength,
                };
                let (d, missing) = lora.deltas(target, &source.map, lpb, strength)?;
                unmatched.extend(
                    missing
                        .into_iter()
                        .map(|m| format!("{m} ({})", lora.path().display())),
                );
                let map = deltas.entry(target).or_insert_with(|| source.map.clone());
                for (name, t) in d {
                    map.add_delta(name, t);
                }
            }
        }
        if !unmatched.is_empty() {
            let list: Vec<&str> = unmatched.iter().take(20).map(String::as_str).collect();
            let more = unmatched.len().saturating_sub(20);
            let msg = format!(
                "{} LoRA key(s) match no module of this {} model:\n  {}{}",
                unmatched.len(),
                family_name(self.family),
                list.join("\n  "),
                if more > 0 {
                    format!("\n  ... and {more} more")
                } else {
                    String::new()
                }
            );
            if opts.lenient {
                log::warn!("{msg}\n(applying the rest)");
            } else {
                return Err(Error::unsupported(format!(
                    "{msg}\n(--lora-lenient / LoraOptions::lenient applies the rest)"
                )));
            }
        }
        let mut out = self.clone();
        // Rebuild what the new LoRAs touch, and what the old ones touched (back to base).
        let mut rebuild: Vec<LoraTarget> = deltas.keys().copied().collect();
        for (lora, _) in &self.loras {
            rebuild.extend(lora.targets());
        }
        rebuild.sort();
        rebuild.dedup();
        let mut text = (*self.text_plain).clone();
        for target in rebuild {
            let map = deltas.remove(&target);
            match target {
                LoraTarget::Unet => {
                    if let Some(source) = &self.sources.unet {
                        out.unet = Arc::new(unet_from(source, map)?);
                    }
                }
                t => {
                    if let Some(source) = self.sources.text.get(t.component()) {
                        let te = Arc::new(text_encoder_from(source, map)?);
                        replace_text_encoder(&mut text, t, te);
                    }
                }
            }
        }
        // The embeddings go on top of the (re)built encoders.
        out.text_plain = Arc::new(text.clone());
        for e in &self.embeddings {
            crate::embedding::apply(&mut text, e)?;
        }
        out.text = Arc::new(text);
        out.loras = loras.iter().map(|(l, _, u)| (l.clone(), *u)).collect();
        Ok(out)
    }

    /// The LoRAs applied, with their (UNet) strengths.
    pub fn loras(&self) -> &[(Arc<LoraFile>, f64)] {
        &self.loras
    }

    fn check_family(&self, lora: &LoraFile) -> Result<()> {
        let path = lora.path().display();
        let sdxl = self.family != ModelFamily::Sd;
        if !sdxl && lora.has_sdxl_names() {
            return Err(Error::unsupported(format!(
                "{path} is an SDXL LoRA (lora_te1_/lora_te2_, text_encoder_2 or input_blocks names); \
                 this is an SD 1.x/2.x model"
            )));
        }
        if sdxl && lora.has_sd_names() {
            return Err(Error::unsupported(format!(
                "{path} is an SD 1.x/2.x LoRA (lora_te_ names); this is an {} model",
                family_name(self.family)
            )));
        }
        let want = self.unet.config().cross_attention_dim;
        if let Some(w) = lora.cross_attention_width() {
            if w != want {
                return Err(Error::unsupported(format!(
                    "{path} was made for a model whose cross-attention reads {w}-wide text \
                     embeddings (SD 1.x: 768, SD 2.x: 1024, SDXL: 2048, refiner: 1280); this {} \
                     model reads {want}",
                    family_name(self.family)
                )));
            }
        }
        Ok(())
    }
}

fn replace_text_encoder(
    text: &mut PromptEncoder,
    target: LoraTarget,
    te: Arc<sd_clip::ClipTextModel>,
) {
    match (text, target) {
        (PromptEncoder::Sd { text_encoder, .. }, LoraTarget::TextEncoder)
        | (PromptEncoder::Sdxl { text_encoder, .. }, LoraTarget::TextEncoder)
        | (
            PromptEncoder::Sdxl {
                text_encoder_2: text_encoder,
                ..
            },
            LoraTarget::TextEncoder2,
        )
        | (
            PromptEncoder::Refiner {
                text_encoder_2: text_encoder,
                ..
            },
            LoraTarget::TextEncoder2,
        ) => {
            *text_encoder = te;
        }
        _ => {}
    }
}
