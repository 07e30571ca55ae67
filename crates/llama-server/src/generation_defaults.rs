//! Sampling defaults from a model directory's `generation_config.json`, applied
//! when a request leaves a field out (as vLLM does): Llama 2 Chat ships
//! temperature 0.6 and top_p 0.9, which its authors tuned it for.

use std::path::Path;

use serde::Deserialize;

#[derive(Debug, Clone, Copy, Default, PartialEq, Deserialize)]
pub struct GenerationDefaults {
    #[serde(default)]
    pub temperature: Option<f32>,
    #[serde(default)]
    pub top_p: Option<f32>,
    #[serde(default)]
    pub top_k: Option<usize>,
    #[serde(default)]
    pub min_p: Option<f32>,
    #[serde(default)]
    pub repetition_penalty: Option<f32>,
}

impl GenerationDefaults {
    /// A missing file means no defaults; a malformed one is an error worth stopping for.
    pub fn from_model_dir(dir: &Path) -> anyhow::Result<Self> {
        let path = dir.join("generation_config.json");
        if !path.is_file() {
            return Ok(Self::default());
        }
        let text = std::fs::read_to_string(&path)?;
        Self::from_json(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
    }

    pub fn from_json(text: &str) -> Result<Self, serde_json::Error> {
        serde_json::from_str(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_bundled_generation_config() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/tiny-llama");
        let d = GenerationDefaults::from_model_dir(&dir).unwrap();
        assert_eq!(d.temperature, Some(0.6));
        assert_eq!(d.top_p, Some(0.9));
        assert_eq!(d.top_k, None);
        assert_eq!(
            GenerationDefaults::from_model_dir(Path::new("/nonexistent")).unwrap(),
            GenerationDefaults::default()
        );
    }
}
