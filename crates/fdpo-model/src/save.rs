//! Saving a model in the Hugging Face layout it was loaded from: the
//! current weights as model.safetensors (every tensor of the checkpoint,
//! trained ones with their new values, the names unchanged), and the
//! source's config.json, generation_config.json and tokenizer files copied.
//! Every file is written atomically (temporary file, then rename), so
//! transformers' `from_pretrained(dir)` loads the result.

use std::collections::HashMap;
use std::path::Path;

use candle_core::Tensor;

use crate::{ModelError, Weights};

/// Files copied unchanged from the source directory when present.
const COPIED: [&str; 6] = [
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
];

/// Writes `weights` and the metadata files of `source` into `out`.
pub fn save_pretrained(weights: &Weights, source: &Path, out: &Path) -> Result<(), ModelError> {
    let config = source.join("config.json");
    if !config.exists() {
        // A model without its config.json could not be loaded back.
        return Err(ModelError::io(&config, std::io::Error::from(std::io::ErrorKind::NotFound)));
    }
    std::fs::create_dir_all(out).map_err(|e| ModelError::io(out, e))?;
    let tensors: HashMap<String, Tensor> = weights.current()?;
    let tensors: Vec<(String, Tensor)> =
        tensors.into_iter().map(|(k, t)| Ok((k, t.contiguous()?))).collect::<candle_core::Result<_>>()?;
    // transformers 4.x insists on {"format": "pt"} in the header metadata.
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    let target = out.join("model.safetensors");
    let bytes = safetensors::serialize(tensors.iter().map(|(k, t)| (k.as_str(), t)), Some(metadata))
        .map_err(|e| ModelError::Candle(candle_core::Error::Msg(format!("{}: {e}", target.display()))))?;
    fdpo_core::write_atomic(&target, &bytes).map_err(|e| ModelError::io(&target, e))?;
    for name in COPIED {
        let from = source.join(name);
        if from.exists() && source != out {
            let bytes = std::fs::read(&from).map_err(|e| ModelError::io(&from, e))?;
            let to = out.join(name);
            fdpo_core::write_atomic(&to, &bytes).map_err(|e| ModelError::io(&to, e))?;
        }
    }
    Ok(())
}
