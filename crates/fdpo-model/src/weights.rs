//! Checkpoint weights: model.safetensors or a sharded
//! model.safetensors.index.json, read into trainable variables. A model
//! asks for each tensor by its safetensors key with the shape its config
//! implies; a missing tensor or a wrong shape is an error naming both.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var};
use serde_json::Value;

use crate::ModelError;

/// Tensors of a checkpoint, handed out as variables (each key once).
#[derive(Debug)]
pub struct Weights {
    path: PathBuf,
    tensors: HashMap<String, Tensor>,
    vars: Vec<(String, Var)>,
    /// For fresh models: create missing tensors (normal(0, std), seeded).
    init: Option<RandomInit>,
}

/// How a fresh model's tensors are drawn: N(0, std²) for matrices, ones for
/// norm scales, zeros for biases (transformers' `_init_weights`).
#[derive(Debug, Clone)]
struct RandomInit {
    std: f64,
    dtype: DType,
    device: Device,
}

impl Weights {
    /// Reads every safetensors file of `dir`, converting to `dtype`.
    pub fn load_dir(dir: &Path, dtype: DType, device: &Device) -> Result<Weights, ModelError> {
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        let files: Vec<PathBuf> = if single.exists() {
            vec![single]
        } else if index.exists() {
            let text = std::fs::read_to_string(&index).map_err(|e| ModelError::io(&index, e))?;
            let value: Value = serde_json::from_str(&text).map_err(|e| ModelError::Config {
                path: index.clone(),
                field: "(json)".into(),
                message: e.to_string(),
            })?;
            let map =
                value.get("weight_map").and_then(Value::as_object).ok_or_else(|| ModelError::Config {
                    path: index.clone(),
                    field: "weight_map".into(),
                    message: "missing or not an object".into(),
                })?;
            let mut files: Vec<String> = map.values().filter_map(|v| v.as_str().map(String::from)).collect();
            files.sort();
            files.dedup();
            files.into_iter().map(|f| dir.join(f)).collect()
        } else if dir.join("pytorch_model.bin").exists() {
            return Err(ModelError::Pickle { path: dir.to_path_buf() });
        } else {
            return Err(ModelError::io(
                &single,
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "no model.safetensors or model.safetensors.index.json",
                ),
            ));
        };
        let mut tensors = HashMap::new();
        for file in &files {
            if !file.exists() {
                return Err(ModelError::io(
                    file,
                    std::io::Error::new(std::io::ErrorKind::NotFound, "shard not found"),
                ));
            }
            let loaded = candle_core::safetensors::load(file, device)
                .map_err(|e| ModelError::Checkpoint { path: file.clone(), message: e.to_string() })?;
            for (name, t) in loaded {
                tensors.insert(name, t.to_dtype(dtype)?);
            }
        }
        Ok(Weights { path: dir.to_path_buf(), tensors, vars: Vec::new(), init: None })
    }

    /// Weights from tensors already in memory (tests, fresh models).
    pub fn from_tensors(path: impl Into<PathBuf>, tensors: HashMap<String, Tensor>) -> Weights {
        Weights { path: path.into(), tensors, vars: Vec::new(), init: None }
    }

    /// Weights of a fresh model: every tensor asked for is created, matrices
    /// N(0, std²), norm scales 1, biases 0 (candle's random generator).
    pub fn random(std: f64, dtype: DType, device: &Device) -> Weights {
        Weights {
            path: PathBuf::from("(random init)"),
            tensors: HashMap::new(),
            vars: Vec::new(),
            init: Some(RandomInit { std, dtype, device: device.clone() }),
        }
    }

    /// The names of the checkpoint's tensors.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    /// Whether the checkpoint has a tensor called `name`.
    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// The tensor `name` with shape `shape`, as a trainable variable.
    pub fn get(&mut self, name: &str, shape: &[usize]) -> Result<Tensor, ModelError> {
        if let (Some(init), false) = (&self.init, self.tensors.contains_key(name)) {
            let t = if name.ends_with(".bias") {
                Tensor::zeros(shape, init.dtype, &init.device)?
            } else if shape.len() == 1 {
                Tensor::ones(shape, init.dtype, &init.device)?
            } else {
                Tensor::randn(0f32, init.std as f32, shape, &init.device)?.to_dtype(init.dtype)?
            };
            self.tensors.insert(name.to_string(), t);
        }
        let t = self
            .tensors
            .get(name)
            .ok_or_else(|| ModelError::MissingTensor { path: self.path.clone(), name: name.into() })?;
        if t.dims() != shape {
            return Err(ModelError::Shape {
                path: self.path.clone(),
                name: name.into(),
                expected: shape.to_vec(),
                found: t.dims().to_vec(),
            });
        }
        if let Some((_, var)) = self.vars.iter().find(|(n, _)| n == name) {
            return Ok(var.as_tensor().clone());
        }
        let var = Var::from_tensor(t)?;
        let out = var.as_tensor().clone();
        self.vars.push((name.to_string(), var));
        Ok(out)
    }

    /// Every tensor of the checkpoint with its current value: trained
    /// variables as they are now, the rest as loaded.
    pub fn current(&self) -> Result<HashMap<String, Tensor>, ModelError> {
        let mut out: HashMap<String, Tensor> = self.tensors.clone();
        for (name, var) in &self.vars {
            out.insert(name.clone(), var.as_tensor().detach());
        }
        Ok(out)
    }

    /// Adds (or replaces) a tensor, e.g. a new head's initial value.
    pub fn insert(&mut self, name: &str, tensor: Tensor) {
        self.tensors.insert(name.to_string(), tensor);
    }

    /// Forgets tensors no model asked for (e.g. a causal LM's `lm_head`
    /// under a reward model), so that saving writes only what is used.
    pub fn drop_unused(&mut self) {
        let used: std::collections::HashSet<&str> = self.vars.iter().map(|(n, _)| n.as_str()).collect();
        self.tensors.retain(|name, _| used.contains(name.as_str()));
    }

    /// The variables handed out so far, in the order asked for.
    pub fn vars(&self) -> &[(String, Var)] {
        &self.vars
    }
}
