//! The model registry (`models.toml`, compiled in): short names such as `gemma-2-2b-it` mapped to
//! a local GGUF file (the two real models `make models` fetches) and/or a Hugging Face hub id,
//! with facts about each (architecture, size, chat or base).

use crate::error::{EngineError, Result};
use serde::{Deserialize, Serialize};
use std::sync::OnceLock;

/// The registry shipped with persona-lens.
pub const REGISTRY_TOML: &str = include_str!("../models.toml");

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RegistryEntry {
    pub name: String,
    pub hub: Option<String>,
    /// A GGUF file name looked for in the models directory.
    pub file: Option<String>,
    pub arch: String,
    pub params: String,
    pub chat: bool,
    pub role: String,
    /// The same model on the other side of chat tuning (same tokenizer and width): the matched
    /// partner for model diffing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub twin: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RegistryFile {
    model: Vec<RegistryEntry>,
}

/// Parses a registry file's text, checking that names are unique and every entry has a source.
pub fn parse_registry(text: &str) -> Result<Vec<RegistryEntry>> {
    let f: RegistryFile = toml::from_str(text).map_err(|e| EngineError::BadField {
        file: "models.toml".into(),
        field: "(toml)".into(),
        reason: e.to_string().lines().next().unwrap_or_default().to_string(),
    })?;
    for (i, e) in f.model.iter().enumerate() {
        if f.model[..i].iter().any(|o| o.name == e.name) {
            return Err(EngineError::BadField {
                file: "models.toml".into(),
                field: e.name.clone(),
                reason: "listed twice".into(),
            });
        }
        if !crate::Architecture::ALL.iter().any(|a| a.name() == e.arch) {
            return Err(EngineError::BadField {
                file: "models.toml".into(),
                field: e.name.clone(),
                reason: format!("unknown arch '{}'", e.arch),
            });
        }
        if let Some(t) = &e.twin {
            let back = f.model.iter().find(|o| &o.name == t);
            if back.and_then(|o| o.twin.as_deref()) != Some(e.name.as_str())
                || back.is_some_and(|o| o.chat == e.chat)
            {
                return Err(EngineError::BadField {
                    file: "models.toml".into(),
                    field: e.name.clone(),
                    reason: format!("twin '{t}' must be listed, name it back, and be the other side of chat tuning"),
                });
            }
        }
        if e.hub.is_none() && e.file.is_none() {
            return Err(EngineError::BadField {
                file: "models.toml".into(),
                field: e.name.clone(),
                reason: "needs a hub id or a file".into(),
            });
        }
    }
    Ok(f.model)
}

/// The compiled-in registry.
pub fn registry() -> &'static [RegistryEntry] {
    static R: OnceLock<Vec<RegistryEntry>> = OnceLock::new();
    R.get_or_init(|| {
        // The file is part of the source and checked by a unit test: it always parses.
        parse_registry(REGISTRY_TOML).unwrap_or_default()
    })
}

/// The entry of a short name, if known.
pub fn lookup(name: &str) -> Option<&'static RegistryEntry> {
    registry().iter().find(|e| e.name == name)
}

/// Short names, comma separated (for error messages).
pub fn names() -> String {
    registry()
        .iter()
        .map(|e| e.name.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_registry_parses_and_names_the_notes_models() {
        let r = parse_registry(REGISTRY_TOML).unwrap();
        for n in [
            "gemma-3-270m",
            "smollm2-135m-instruct",
            "gemma-2-2b",
            "gemma-2-2b-it",
            "gemma-3-4b-it",
            "gpt2",
        ] {
            assert!(r.iter().any(|e| e.name == n), "{n} missing");
        }
        assert_eq!(
            lookup("gemma-3-4b-it").unwrap().hub.as_deref(),
            Some("google/gemma-3-4b-it")
        );
        assert!(lookup("gemma-2-2b-it").unwrap().chat);
        assert!(!lookup("gemma-2-2b").unwrap().chat);
        // One chat model of every family the engine implements beyond the notes' own.
        for arch in ["qwen2", "qwen3", "mistral", "phi3", "olmo2"] {
            assert!(
                r.iter()
                    .any(|e| e.arch == arch && e.chat && e.hub.is_some()),
                "no {arch} chat model"
            );
        }
        assert_eq!(
            lookup("llama-3.2-1b-instruct").unwrap().hub.as_deref(),
            Some("meta-llama/Llama-3.2-1B-Instruct")
        );
        // the matched diffing partners the crosscoder issue names
        for (a, b) in [
            ("smollm2-135m", "smollm2-135m-instruct"),
            ("gemma-3-270m", "gemma-3-270m-it"),
            ("gemma-2-2b", "gemma-2-2b-it"),
        ] {
            assert_eq!(lookup(a).unwrap().twin.as_deref(), Some(b));
            assert_eq!(lookup(b).unwrap().twin.as_deref(), Some(a));
        }
    }

    #[test]
    fn bad_registries_are_refused() {
        let dup = "[[model]]\nname='a'\nhub='x/a'\narch='llama'\nparams='1'\nchat=false\nrole=''\n";
        let e = parse_registry(&format!("{dup}{dup}"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("listed twice"), "{e}");
        let none = "[[model]]\nname='a'\narch='llama'\nparams='1'\nchat=false\nrole=''\n";
        assert!(parse_registry(none)
            .unwrap_err()
            .to_string()
            .contains("hub id or a file"));
        assert!(parse_registry("[[model]]\nname=3").is_err());
        let arch =
            "[[model]]\nname='a'\nhub='x/a'\narch='mamba'\nparams='1'\nchat=false\nrole=''\n";
        assert!(parse_registry(arch)
            .unwrap_err()
            .to_string()
            .contains("unknown arch 'mamba'"));
        let one_way = "[[model]]\nname='a'\nhub='x/a'\narch='llama'\nparams='1'\nchat=false\nrole=''\ntwin='b'\n[[model]]\nname='b'\nhub='x/b'\narch='llama'\nparams='1'\nchat=true\nrole=''\n";
        assert!(parse_registry(one_way)
            .unwrap_err()
            .to_string()
            .contains("twin 'b'"));
    }
}
