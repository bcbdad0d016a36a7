//! One file per architecture: config parsing (GGUF metadata and `config.json`), tensor names and
//! the weight transforms that map each format onto Hugging Face's conventions. The forward pass
//! itself is shared (`decoder.rs`); an architecture chooses norms, biases, positions and caps.
//! The Llama-style families (Qwen 2/3, Mistral, Phi-3, OLMo 2) share Llama's block builder.

pub mod gemma2;
pub mod gemma3;
pub mod gpt2;
pub mod llama;
pub mod mistral;
pub mod olmo2;
pub mod phi3;
pub mod qwen2;
pub mod qwen3;
