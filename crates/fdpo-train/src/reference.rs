//! Reference log-probabilities, computed once and cached on disk.
//!
//! f-DPO needs log π_ref of every chosen and rejected response. They are
//! computed with the reference model in batches, written (atomically) to
//! `<cache_dir>/reference_logps.json` together with a key — a hash of the
//! reference checkpoint's files, the tokenised pairs and the tokenisation
//! settings — and the model is dropped. A later run with the same key
//! reuses the file; any difference in the key is reported as a stale cache
//! and recomputed, never silently reused.

use std::path::Path;

use candle_core::Device;
use fdpo_model::packing::Batching;
use fdpo_model::{CausalLm, ModelError};
use serde_json::{json, Value};

use crate::data::PreferencePair;
use crate::dpo::policy_logps;
use crate::parallel;
use crate::trainer::TrainError;

/// log π_ref of each pair's responses, in data order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ReferenceLogps {
    /// Σ log π_ref over the chosen response's tokens.
    pub chosen: Vec<f64>,
    /// Σ log π_ref over the rejected response's tokens.
    pub rejected: Vec<f64>,
}

/// What the cache did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CacheStatus {
    /// No cache file: computed and written.
    Computed,
    /// The cache matched the key: reused, the model was not loaded.
    Reused,
    /// A cache for another key (checkpoint, data or settings changed):
    /// recomputed and overwritten.
    Stale {
        /// The key found in the file.
        found: String,
    },
}

/// Token ids into the hash, each list length-prefixed so that two
/// different splits of one stream never hash alike.
fn hash_ids(h: &mut blake3::Hasher, ids: &[u32]) {
    h.update(&(ids.len() as u64).to_le_bytes());
    for id in ids {
        h.update(&id.to_le_bytes());
    }
}

/// The files of a checkpoint that decide its outputs: config.json,
/// tokenizer.json, every `*.safetensors` shard and the shard index
/// (`model.safetensors.index.json`), sorted by name.
fn checkpoint_files(dir: &Path) -> Result<Vec<std::path::PathBuf>, ModelError> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .map_err(|e| ModelError::Io { path: dir.into(), source: e })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            name == "config.json"
                || name == "tokenizer.json"
                || name.ends_with(".safetensors")
                || name.ends_with(".safetensors.index.json")
        })
        .collect();
    files.sort();
    Ok(files)
}

/// The cache key: BLAKE3 over the reference checkpoint's files (name,
/// length and content, streamed in chunks: a 14 GB shard costs a 64 KiB
/// buffer, not 14 GB of memory), the pairs' token ids, and `settings`
/// (e.g. max_length, truncation).
pub fn cache_key(
    reference_dir: &Path,
    pairs: &[PreferencePair],
    settings: &str,
) -> Result<String, ModelError> {
    let mut h = blake3::Hasher::new();
    for f in checkpoint_files(reference_dir)? {
        let io = |source| ModelError::Io { path: f.clone(), source };
        let file = std::fs::File::open(&f).map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        h.update(f.file_name().and_then(|n| n.to_str()).unwrap_or("").as_bytes());
        h.update(&len.to_le_bytes());
        h.update_reader(file).map_err(io)?;
    }
    for p in pairs {
        hash_ids(&mut h, &p.prompt);
        hash_ids(&mut h, &p.chosen);
        hash_ids(&mut h, &p.rejected);
    }
    h.update(settings.as_bytes());
    Ok(h.finalize().to_hex()[..32].to_string())
}

/// Computes log π_ref of every pair with `model`, `batch_size` pairs at a
/// time, laid out as `batching` says (the policy's own path, so π and
/// π_ref come from one function).
pub fn compute(
    model: &CausalLm,
    pairs: &[PreferencePair],
    pad_id: u32,
    batch_size: usize,
    batching: Batching,
    device: &Device,
) -> Result<ReferenceLogps, TrainError> {
    let mut out =
        ReferenceLogps { chosen: Vec::with_capacity(pairs.len()), rejected: Vec::with_capacity(pairs.len()) };
    for batch in pairs.chunks(batch_size.max(1)) {
        let refs: Vec<&PreferencePair> = batch.iter().collect();
        let logps = policy_logps(model, &refs, pad_id, batching, device)?;
        let values = |t: &candle_core::Tensor| -> Result<Vec<f64>, TrainError> {
            Ok(t.detach().to_dtype(candle_core::DType::F64)?.to_vec1::<f64>()?)
        };
        out.chosen.extend(values(&logps.chosen)?);
        out.rejected.extend(values(&logps.rejected)?);
    }
    Ok(out)
}

/// log π_ref of `pairs` under `config`'s reference model, cached in
/// `<output_dir>/reference/<name>/` under the key of the checkpoint, the
/// pairs and `settings` (the reference model is loaded only on a miss).
pub fn cached(
    config: &crate::config::TrainConfig,
    pairs: &[PreferencePair],
    settings: &str,
    name: &str,
    device: &Device,
) -> Result<(ReferenceLogps, CacheStatus), TrainError> {
    let key = cache_key(&config.ref_model, pairs, settings)?;
    let cache_dir = config.output_dir.join("reference").join(name);
    load_or_compute(&cache_dir, &key, pairs.len(), || {
        let (model, _) = CausalLm::load(&config.ref_model, candle_core::DType::F32, device)?;
        let pad = fdpo_model::TextTokenizer::load(&config.ref_model)?.pad_id();
        compute(&model, pairs, pad, config.eval_batch_size, config.batching, device)
    })
}

/// The cached log-probabilities for `key`, or those computed by `compute`
/// (which loads the reference model; it is dropped when it returns) and
/// written to `<cache_dir>/reference_logps.json`.
pub fn load_or_compute(
    cache_dir: &Path,
    key: &str,
    pairs: usize,
    compute: impl FnOnce() -> Result<ReferenceLogps, TrainError>,
) -> Result<(ReferenceLogps, CacheStatus), TrainError> {
    if parallel::size() == 1 {
        return load_or_compute_here(cache_dir, key, pairs, compute);
    }
    // Rank 0 computes (or finds) the cache; the others then read what it wrote.
    let mine = parallel::is_root().then(|| load_or_compute_here(cache_dir, key, pairs, compute));
    parallel::barrier();
    mine.unwrap_or_else(|| {
        load_or_compute_here(cache_dir, key, pairs, || {
            let path = cache_dir.join("reference_logps.json");
            let why = std::io::Error::new(std::io::ErrorKind::NotFound, "rank 0 did not write it");
            Err(ModelError::Io { path, source: why }.into())
        })
    })
}

/// [`load_or_compute`] in this process alone.
fn load_or_compute_here(
    cache_dir: &Path,
    key: &str,
    pairs: usize,
    compute: impl FnOnce() -> Result<ReferenceLogps, TrainError>,
) -> Result<(ReferenceLogps, CacheStatus), TrainError> {
    let path = cache_dir.join("reference_logps.json");
    let mut status = CacheStatus::Computed;
    if path.exists() {
        let text =
            std::fs::read_to_string(&path).map_err(|e| ModelError::Io { path: path.clone(), source: e })?;
        let value: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        let found = value.get("key").and_then(Value::as_str).unwrap_or("(unreadable)").to_string();
        let read =
            |k: &str| -> Option<Vec<f64>> { value.get(k)?.as_array()?.iter().map(Value::as_f64).collect() };
        match (found == key, read("chosen"), read("rejected")) {
            (true, Some(chosen), Some(rejected)) if chosen.len() == pairs && rejected.len() == pairs => {
                return Ok((ReferenceLogps { chosen, rejected }, CacheStatus::Reused));
            }
            _ => status = CacheStatus::Stale { found },
        }
    }
    let logps = compute()?;
    std::fs::create_dir_all(cache_dir).map_err(|e| ModelError::Io { path: cache_dir.into(), source: e })?;
    let body = json!({"key": key, "pairs": pairs, "chosen": logps.chosen, "rejected": logps.rejected});
    fdpo_core::write_atomic(&path, body.to_string().as_bytes())
        .map_err(|e| ModelError::Io { path: path.clone(), source: e })?;
    Ok((logps, status))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::{read_preferences, Limits, Truncation};
    use candle_core::DType;
    use fdpo_model::TextTokenizer;
    use std::cell::Cell;
    use std::path::PathBuf;

    fn fixture() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../fdpo-model/tests/fixtures/llama")
    }

    fn pairs(dir: &Path) -> Vec<PreferencePair> {
        let path = dir.join("prefs.jsonl");
        std::fs::write(
            &path,
            "{\"prompt\": \"the film\", \"chosen\": \" was good\", \"rejected\": \" was bad\"}\n\
             {\"prompt\": \"a very\", \"chosen\": \" good story\", \"rejected\": \" bad plot, not great\"}\n\
             {\"prompt\": \"the plot\", \"chosen\": \" was fine\", \"rejected\": \" was bad\"}\n",
        )
        .unwrap();
        let limits = Limits { max_length: 64, max_prompt_length: None, truncation: Truncation::KeepStart };
        read_preferences(&path, "train", &TextTokenizer::load(&fixture()).unwrap(), &limits).unwrap().pairs
    }

    #[test]
    fn cache_is_computed_reused_and_detected_stale() {
        let dir = std::env::temp_dir().join(format!("fdpo-refcache-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let data = pairs(&dir);
        let loads = Cell::new(0);
        let run = |key: &str, reference: &Path| {
            load_or_compute(&dir.join("cache"), key, data.len(), || {
                loads.set(loads.get() + 1);
                let (model, _) = CausalLm::load(reference, DType::F32, &Device::Cpu)?;
                let pad = TextTokenizer::load(reference)?.pad_id();
                compute(&model, &data, pad, 2, Batching::default(), &Device::Cpu)
            })
            .unwrap()
        };
        let key = cache_key(&fixture(), &data, "max_length=64").unwrap();
        let (first, status) = run(&key, &fixture());
        assert_eq!(status, CacheStatus::Computed);
        // The values are the model's sequence log-probs, pair by pair.
        let (model, _) = CausalLm::load(&fixture(), DType::F32, &Device::Cpu).unwrap();
        for (i, p) in data.iter().enumerate() {
            let s = fdpo_model::logprobs::sequence_logprobs(
                &model,
                &[(p.prompt.clone(), p.rejected.clone())],
                3,
                &Device::Cpu,
            )
            .unwrap();
            assert!((s[0].logprob_sum - first.rejected[i]).abs() < 1e-4);
        }
        // Same key: reused, the model is not loaded again.
        let (again, status) = run(&key, &fixture());
        assert_eq!((status, loads.get()), (CacheStatus::Reused, 1));
        assert_eq!(again, first);
        // Other settings, other data, or another checkpoint: a new key, reported stale.
        let other_settings = cache_key(&fixture(), &data, "max_length=32").unwrap();
        assert_ne!(other_settings, key);
        assert!(matches!(run(&other_settings, &fixture()).1, CacheStatus::Stale { found } if found == key));
        assert_ne!(cache_key(&fixture(), &data[..2], "max_length=64").unwrap(), key);
        let changed = dir.join("model");
        std::fs::create_dir_all(&changed).unwrap();
        for f in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
            std::fs::copy(fixture().join(f), changed.join(f)).unwrap();
        }
        let mut tensors =
            candle_core::safetensors::load(fixture().join("model.safetensors"), &Device::Cpu).unwrap();
        let w = (&tensors["model.norm.weight"] * 1.5).unwrap();
        tensors.insert("model.norm.weight".into(), w);
        candle_core::safetensors::save(&tensors, changed.join("model.safetensors")).unwrap();
        let changed_key = cache_key(&changed, &data, "max_length=64").unwrap();
        assert_ne!(changed_key, key);
        let (recomputed, status) = run(&changed_key, &changed);
        assert!(matches!(status, CacheStatus::Stale { .. }));
        assert_ne!(recomputed, first, "a different reference gives different log-probs");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A sharded checkpoint (`model.safetensors.index.json` + 2 shards):
    /// every shard and the index enter the key; other files do not.
    #[test]
    fn sharded_checkpoints_key_every_shard_and_the_index() {
        let dir = tempfile::tempdir().unwrap();
        let files = [
            ("config.json", b"{}".to_vec()),
            ("model.safetensors.index.json", b"{\"weight_map\": {}}".to_vec()),
            ("model-00001-of-00002.safetensors", vec![1u8; 300_000]),
            ("model-00002-of-00002.safetensors", vec![2u8; 200_000]),
            ("README.md", b"notes".to_vec()),
        ];
        for (name, bytes) in &files {
            std::fs::write(dir.path().join(name), bytes).unwrap();
        }
        let key = || cache_key(dir.path(), &[], "s").unwrap();
        let first = key();
        assert_eq!(first.len(), 32);
        std::fs::write(dir.path().join("README.md"), b"other notes").unwrap();
        assert_eq!(key(), first, "files that do not shape the model stay out of the key");
        let mut changed = first.clone();
        for (name, _) in &files[1..4] {
            // One byte flipped deep inside the file (past the first chunk).
            let path = dir.path().join(name);
            let mut bytes = std::fs::read(&path).unwrap();
            let at = bytes.len() - 1;
            bytes[at] ^= 0xff;
            std::fs::write(&path, &bytes).unwrap();
            let now = key();
            assert_ne!(now, changed, "{name} is part of the key");
            changed = now;
        }
    }
}
