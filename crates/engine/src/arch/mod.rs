//! One file per architecture: config parsing (GGUF metadata and `config.json`), tensor names and
//! the weight transforms that map each format onto Hugging Face's conventions. The forward pass
//! itself is shared (`decoder.rs`); an architecture chooses norms, biases, positions and caps.

pub mod gemma2;
pub mod gemma3;
pub mod gpt2;
pub mod llama;
