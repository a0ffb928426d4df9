//! CLIP tokenizer and text encoders of Stable Diffusion 1.x, 2.x and SDXL.
//!
//! - [`ClipTokenizer`]: transformers' `CLIPTokenizer` (tensor-free), with truncation reporting
//!   and chunked long-prompt encoding.
//! - [`ClipTextModel`]: transformers' `CLIPTextModel` and `CLIPTextModelWithProjection`.
//! - [`PromptEncoder`]: what each diffusers pipeline's `encode_prompt` feeds the UNet, or
//!   AUTOMATIC1111's weighted, chunked conditioning ([`PromptSyntax::A1111`]).
//! - [`prompt_syntax`]: AUTOMATIC1111's prompt parser (weights, `BREAK`, editing, alternation,
//!   `<lora:...>` tags).
#![warn(missing_docs)]
#![warn(clippy::unwrap_used)]

pub mod a1111;
pub mod config;
pub mod model;
pub mod prompt;
pub mod prompt_syntax;
pub mod tokenizer;

pub use a1111::{tokenize_line, PromptChunk, PromptSyntax};
pub use config::{Activation, ClipTextConfig, ClipTextConfigJson, EosPooling};
pub use model::{ClipTextModel, ClipTextOutput};
pub use prompt::{Conditioning, PromptEncoder};
pub use tokenizer::{ClipTokenizer, Tokens};
