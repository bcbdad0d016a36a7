//! One file per architecture: config parsing (GGUF metadata and `config.json`), tensor names and
//! the weight transforms that map each format onto Hugging Face's conventions.

pub mod gemma3;
pub mod llama;
