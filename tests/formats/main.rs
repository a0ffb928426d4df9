//! The files users download (issue 13), in one test binary (one link instead of three):
//! single-file checkpoints, LoRAs and textual-inversion embeddings against diffusers.

mod embedding;
mod lora;
mod single_file;
