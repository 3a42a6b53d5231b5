//! Parity with PyTorch/transformers on tiny random checkpoints.
//!
//! Expected values come from `tests/fixtures/make_fixtures.py` (transformers
//! 5.24, torch 2.15, eager attention, float32): logits on a right-padded
//! batch, the mean next-token cross-entropy over real targets, and its
//! gradient for every parameter.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, D};
use fdpo_model::{CausalLm, ModelError};

fn fixture(family: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(family)
}

fn expected(family: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture(family).join("expected.safetensors"), &Device::Cpu).unwrap()
}

/// Mean next-token cross-entropy over targets that are real tokens, as the script computes it.
fn loss_of(logits: &Tensor, ids: &Tensor, mask: &Tensor) -> Tensor {
    let (_, t, _) = logits.dims3().unwrap();
    let logp = candle_nn::ops::log_softmax(&logits.narrow(1, 0, t - 1).unwrap(), D::Minus1).unwrap();
    let target = ids.narrow(1, 1, t - 1).unwrap().contiguous().unwrap();
    let picked = logp.gather(&target.unsqueeze(2).unwrap(), 2).unwrap().squeeze(2).unwrap();
    let keep = mask.narrow(1, 1, t - 1).unwrap().to_dtype(DType::F32).unwrap();
    (picked.neg().unwrap() * &keep)
        .unwrap()
        .sum_all()
        .unwrap()
        .broadcast_div(&keep.sum_all().unwrap())
        .unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

fn max_abs(a: &Tensor) -> f32 {
    a.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

fn check_family(family: &str) {
    let want = expected(family);
    let (model, weights) = CausalLm::load(&fixture(family), DType::F32, &Device::Cpu).unwrap();
    let ids = want["input_ids"].to_dtype(DType::U32).unwrap();
    let mask = &want["attention_mask"];
    let logits = model.forward(&ids, Some(mask), None).unwrap();
    // Positions of real tokens only: at padding, transformers' position ids
    // (arange) and fdpo's (from the mask, as in generation) differ, and
    // nothing reads those logits.
    let real = mask.to_dtype(DType::F32).unwrap().unsqueeze(2).unwrap();
    let diff =
        max_abs_diff(&logits.broadcast_mul(&real).unwrap(), &want["logits"].broadcast_mul(&real).unwrap());
    assert!(diff < 1e-4, "{family}: logits differ by {diff}");

    let loss = loss_of(&logits, &ids, mask);
    let got = loss.to_vec0::<f32>().unwrap();
    let want_loss = want["loss"].to_vec1::<f32>().unwrap()[0];
    assert!((got - want_loss).abs() < 1e-5, "{family}: loss {got} vs {want_loss}");

    let grads = loss.backward().unwrap();
    let mut checked = 0;
    for (name, var) in weights.vars() {
        // Every trainable weight must receive a gradient: candle drops them
        // silently through ops without a backward pass.
        let g = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("{family}: no gradient for `{name}`"));
        let w = want
            .get(&format!("grad.{name}"))
            .unwrap_or_else(|| panic!("{family}: no expected grad for {name}"));
        let scale = max_abs(w).max(1e-6);
        let diff = max_abs_diff(g, w) / scale;
        assert!(diff < 1e-4, "{family}: gradient of `{name}` off by {diff} (relative to max {scale})");
        checked += 1;
    }
    let expected_params = want.keys().filter(|k| k.starts_with("grad.")).count();
    assert_eq!(checked, expected_params, "{family}: every parameter of transformers' model is checked");
}

#[test]
fn llama_with_llama3_rope_and_gqa_matches_transformers() {
    check_family("llama");
}

#[test]
fn qwen2_with_biases_and_tied_embeddings_matches_transformers() {
    check_family("qwen2");
}

#[test]
fn gpt2_matches_transformers() {
    check_family("gpt2");
}

/// Incremental decoding with the cache gives the logits of the full pass.
/// Dtypes without fused kernels take candle's ops (attention's fallback
/// repeats grouped key/value heads itself, RoPE rotates head-major): in f64
/// the logits still match transformers', padding and GQA included.
#[test]
fn the_unfused_path_matches_transformers_in_f64() {
    for family in ["llama", "qwen2", "gpt2"] {
        let want = expected(family);
        let (model, _) = CausalLm::load(&fixture(family), DType::F64, &Device::Cpu).unwrap();
        let ids = want["input_ids"].to_dtype(DType::U32).unwrap();
        let mask = &want["attention_mask"];
        let logits = model.forward(&ids, Some(mask), None).unwrap();
        assert_eq!(logits.dtype(), DType::F64);
        let real = mask.to_dtype(DType::F32).unwrap().unsqueeze(2).unwrap();
        let logits = logits.to_dtype(DType::F32).unwrap().broadcast_mul(&real).unwrap();
        let diff = max_abs_diff(&logits, &want["logits"].broadcast_mul(&real).unwrap());
        assert!(diff < 1e-4, "{family}: f64 logits differ by {diff}");
    }
}

#[test]
fn kv_cache_matches_full_forward() {
    for family in ["llama", "qwen2", "gpt2"] {
        let (model, _) = CausalLm::load(&fixture(family), DType::F32, &Device::Cpu).unwrap();
        let ids = expected(family)["input_ids"].to_dtype(DType::U32).unwrap().narrow(0, 0, 1).unwrap();
        let full = model.forward(&ids, None, None).unwrap();
        let mut cache = model.new_cache();
        let first = model.forward(&ids.narrow(1, 0, 7).unwrap(), None, Some(&mut cache)).unwrap();
        assert_eq!(cache.len(), 7);
        let mut parts = vec![first];
        for t in 7..12 {
            parts.push(model.forward(&ids.narrow(1, t, 1).unwrap(), None, Some(&mut cache)).unwrap());
        }
        let stepped = Tensor::cat(&parts, 1).unwrap();
        let diff = max_abs_diff(&stepped, &full);
        assert!(diff < 1e-5, "{family}: cached decoding differs by {diff}");
    }
}

/// Sampling's use of the cache: a batch of left-padded prompts of
/// different lengths, a prefill longer than one attention query block (32
/// rows), then tokens one at a time. Every step's logits equal the full
/// forward pass over the whole padded sequence (GQA for Llama and Qwen2,
/// biases for Qwen2 and GPT-2).
#[test]
fn batched_left_padded_decoding_matches_full_forward() {
    let dev = Device::Cpu;
    for family in ["llama", "qwen2", "gpt2"] {
        let (model, _) = CausalLm::load(&fixture(family), DType::F32, &dev).unwrap();
        let (width, lens, steps) = (40usize, [40usize, 33], 4usize);
        let token = |row: usize, j: usize| ((row * 31 + j * 7 + 3) % 90) as u32 + 1;
        let mut ids = Vec::new();
        let mut pad = Vec::new();
        for (row, len) in lens.iter().enumerate() {
            for j in 0..width + steps {
                let real = j >= width - len;
                ids.push(if real { token(row, j) } else { 0 });
                pad.push(u8::from(real));
            }
        }
        let total = width + steps;
        let ids = Tensor::from_vec(ids, (2, total), &dev).unwrap();
        let pad = Tensor::from_vec(pad, (2, total), &dev).unwrap();
        let full = model.forward(&ids, Some(&pad), None).unwrap();
        let mut cache = model.new_cache();
        let first = model.forward(
            &ids.narrow(1, 0, width).unwrap(),
            Some(&pad.narrow(1, 0, width).unwrap()),
            Some(&mut cache),
        );
        let mut stepped = vec![first.unwrap()];
        for j in width..total {
            let step = model
                .forward(
                    &ids.narrow(1, j, 1).unwrap(),
                    Some(&pad.narrow(1, 0, j + 1).unwrap()),
                    Some(&mut cache),
                )
                .unwrap();
            stepped.push(step);
        }
        let stepped = Tensor::cat(&stepped, 1).unwrap();
        // Only real tokens' logits are compared (padding rows are never read).
        let real = pad.to_dtype(DType::F32).unwrap().unsqueeze(2).unwrap();
        let diff = max_abs_diff(&stepped.broadcast_mul(&real).unwrap(), &full.broadcast_mul(&real).unwrap());
        assert!(diff < 1e-4 * max_abs(&full).max(1.0), "{family}: cached decoding differs by {diff}");
    }
}

fn copy_fixture(family: &str, dir: &Path) {
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fixture(family).join(f), dir.join(f)).unwrap();
    }
}

#[test]
fn wrong_shapes_missing_tensors_and_pickles_are_named_errors() {
    let dir = std::env::temp_dir().join(format!("fdpo-model-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    copy_fixture("llama", &dir);
    // A checkpoint whose q_proj is transposed.
    let mut tensors = candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap();
    let name = "model.layers.1.self_attn.k_proj.weight";
    let t = tensors[name].t().unwrap().contiguous().unwrap();
    tensors.insert(name.to_string(), t);
    candle_core::safetensors::save(&tensors, dir.join("model.safetensors")).unwrap();
    let err = CausalLm::load(&dir, DType::F32, &Device::Cpu).unwrap_err();
    assert!(matches!(err, ModelError::Shape { .. }), "{err}");
    assert!(
        err.to_string()
            .contains("`model.layers.1.self_attn.k_proj.weight`: expected [16, 32], found [32, 16]"),
        "{err}"
    );

    tensors.remove("model.norm.weight");
    candle_core::safetensors::save(&tensors, dir.join("model.safetensors")).unwrap();
    let err = CausalLm::load(&dir, DType::F32, &Device::Cpu).unwrap_err().to_string();
    assert!(err.contains("tensor `model.norm.weight` is missing") || err.contains("k_proj"), "{err}");

    // A truncated file.
    let bytes = std::fs::read(fixture("llama").join("model.safetensors")).unwrap();
    std::fs::write(dir.join("model.safetensors"), &bytes[..bytes.len() / 2]).unwrap();
    let err = CausalLm::load(&dir, DType::F32, &Device::Cpu).unwrap_err().to_string();
    assert!(err.contains("model.safetensors: not a readable safetensors file"), "{err}");

    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    std::fs::write(dir.join("pytorch_model.bin"), b"not read").unwrap();
    let err = CausalLm::load(&dir, DType::F32, &Device::Cpu).unwrap_err().to_string();
    assert!(err.contains("never reads pickle"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A config.json that declares fewer layers than the checkpoint holds is
/// refused (building would drop the rest silently, and saving would write
/// a model that disagrees with itself).
#[test]
fn fewer_layers_in_the_config_than_in_the_weights_is_an_error() {
    for (family, key) in [("llama", "num_hidden_layers"), ("gpt2", "n_layer")] {
        let dir = std::env::temp_dir().join(format!("fdpo-model-layers-{family}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        copy_fixture(family, &dir);
        let path = dir.join("config.json");
        let mut config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(config[key], 2, "{family} fixture");
        config[key] = 1.into();
        std::fs::write(&path, config.to_string()).unwrap();
        let err = CausalLm::load(&dir, DType::F32, &Device::Cpu).unwrap_err().to_string();
        assert!(
            err.contains(&format!("field `{key}`: 1, but the checkpoint has tensors of layer 1")),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

/// Save → load gives identical logits and the same files and tensor names
/// transformers wrote.
#[test]
fn save_load_round_trip_is_identical() {
    for family in ["llama", "qwen2", "gpt2"] {
        let out = std::env::temp_dir().join(format!("fdpo-model-save-{family}-{}", std::process::id()));
        let (model, weights) = CausalLm::load(&fixture(family), DType::F32, &Device::Cpu).unwrap();
        fdpo_model::save::save_pretrained(&weights, &fixture(family), &out).unwrap();
        let (again, _) = CausalLm::load(&out, DType::F32, &Device::Cpu).unwrap();
        let ids = expected(family)["input_ids"].to_dtype(DType::U32).unwrap();
        let a = model.forward(&ids, None, None).unwrap();
        let b = again.forward(&ids, None, None).unwrap();
        assert_eq!(max_abs_diff(&a, &b), 0.0, "{family}");
        let names = |dir: &Path| {
            let mut k: Vec<String> =
                candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu)
                    .unwrap()
                    .into_keys()
                    .collect();
            k.sort();
            k
        };
        assert_eq!(names(&out), names(&fixture(family)), "{family}");
        for f in ["config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"] {
            assert_eq!(
                std::fs::read(out.join(f)).unwrap(),
                std::fs::read(fixture(family).join(f)).unwrap(),
                "{f}"
            );
        }
        std::fs::remove_dir_all(&out).unwrap();
    }
}

/// A sharded checkpoint (model.safetensors.index.json) loads to the same model.
#[test]
fn sharded_checkpoint_loads() {
    let dir = std::env::temp_dir().join(format!("fdpo-model-shards-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(fixture("llama").join("config.json"), dir.join("config.json")).unwrap();
    let all =
        candle_core::safetensors::load(fixture("llama").join("model.safetensors"), &Device::Cpu).unwrap();
    let mut names: Vec<&String> = all.keys().collect();
    names.sort();
    let (first, second) = names.split_at(names.len() / 2);
    let mut map = serde_json::Map::new();
    for (file, part) in
        [("model-00001-of-00002.safetensors", first), ("model-00002-of-00002.safetensors", second)]
    {
        let shard: HashMap<String, Tensor> = part.iter().map(|n| ((*n).clone(), all[*n].clone())).collect();
        candle_core::safetensors::save(&shard, dir.join(file)).unwrap();
        for n in part {
            map.insert((*n).clone(), serde_json::Value::String(file.into()));
        }
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": map});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    let (sharded, _) = CausalLm::load(&dir, DType::F32, &Device::Cpu).unwrap();
    let (single, _) = CausalLm::load(&fixture("llama"), DType::F32, &Device::Cpu).unwrap();
    let ids = expected("llama")["input_ids"].to_dtype(DType::U32).unwrap();
    let diff =
        max_abs_diff(&sharded.forward(&ids, None, None).unwrap(), &single.forward(&ids, None, None).unwrap());
    assert_eq!(diff, 0.0);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// bf16 weights on disk load as f32, and f32 weights run in bf16, close to
/// the f32 logits (bf16 keeps ~3 significant digits).
#[test]
fn half_precision_weights_convert() {
    let dir = std::env::temp_dir().join(format!("fdpo-model-bf16-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(fixture("qwen2").join("config.json"), dir.join("config.json")).unwrap();
    let tensors =
        candle_core::safetensors::load(fixture("qwen2").join("model.safetensors"), &Device::Cpu).unwrap();
    let half: HashMap<String, Tensor> =
        tensors.iter().map(|(k, t)| (k.clone(), t.to_dtype(DType::BF16).unwrap())).collect();
    candle_core::safetensors::save(&half, dir.join("model.safetensors")).unwrap();
    let ids = expected("qwen2")["input_ids"].to_dtype(DType::U32).unwrap();
    let (reference, _) = CausalLm::load(&fixture("qwen2"), DType::F32, &Device::Cpu).unwrap();
    let want = reference.forward(&ids, None, None).unwrap();
    let (from_bf16, _) = CausalLm::load(&dir, DType::F32, &Device::Cpu).unwrap();
    let got = from_bf16.forward(&ids, None, None).unwrap();
    assert_eq!(got.dtype(), DType::F32);
    let scale = max_abs(&want);
    assert!(max_abs_diff(&got, &want) < 0.05 * scale, "{} vs scale {scale}", max_abs_diff(&got, &want));
    let (in_bf16, _) = CausalLm::load(&fixture("qwen2"), DType::BF16, &Device::Cpu).unwrap();
    let got = in_bf16.forward(&ids, None, None).unwrap().to_dtype(DType::F32).unwrap();
    assert!(max_abs_diff(&got, &want) < 0.1 * scale, "{} vs scale {scale}", max_abs_diff(&got, &want));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The LM head run only at the positions that predict response tokens
/// gives the response log-prob sums, token counts and every parameter's
/// gradient of the full-logits path (a weighted sum, so each row counts).
#[test]
fn head_at_response_positions_equals_the_full_logits_path() {
    use fdpo_model::logprobs::{response_logprob_sums, response_logprob_sums_from_hidden, PaddedBatch};
    for family in ["llama", "qwen2", "gpt2"] {
        let (model, weights) = CausalLm::load(&fixture(family), DType::F32, &Device::Cpu).unwrap();
        let rows: Vec<(Vec<u32>, Vec<u32>)> =
            vec![(vec![3, 5, 7], vec![11, 2, 9, 4]), (vec![8], vec![6, 1]), (vec![2, 2, 6, 10, 12], vec![5])];
        let refs: Vec<(&[u32], &[u32])> = rows.iter().map(|(p, r)| (p.as_slice(), r.as_slice())).collect();
        let batch = PaddedBatch::new(&refs, 0, false, &Device::Cpu).unwrap();
        let weight = Tensor::new(&[0.7f32, -1.3, 2.1], &Device::Cpu).unwrap();
        let logits = model.forward(&batch.ids, Some(&batch.attention), None).unwrap();
        let (full, full_counts) = response_logprob_sums(&logits, &batch.ids, &batch.response).unwrap();
        let hidden = model.forward_hidden(&batch.ids, Some(&batch.attention), None).unwrap();
        let (fast, counts) =
            response_logprob_sums_from_hidden(&model, &hidden, &batch.ids, &batch.response).unwrap();
        assert_eq!(counts.to_vec1::<f32>().unwrap(), [4.0, 2.0, 1.0]);
        assert_eq!(counts.to_vec1::<f32>().unwrap(), full_counts.to_vec1::<f32>().unwrap());
        assert!(max_abs_diff(&fast, &full) < 1e-5, "{family}: sums {fast} vs {full}");
        let gf = (fast * &weight).unwrap().sum_all().unwrap().backward().unwrap();
        let gs = (full * &weight).unwrap().sum_all().unwrap().backward().unwrap();
        for (name, var) in weights.vars() {
            let (a, b) = (gf.get(var.as_tensor()), gs.get(var.as_tensor()));
            let (a, b) = (a.unwrap_or_else(|| panic!("{family}: no gradient for {name}")), b.unwrap());
            let diff = max_abs_diff(a, b) / max_abs(b).max(1e-6);
            assert!(diff < 1e-4, "{family}: gradient of `{name}` off by {diff}");
        }
    }
}

/// Padding-free packing with shared prompts ([prompt | chosen | rejected]
/// in one sequence, several sequences per row) gives the padded batch's
/// per-response log-prob sums and every parameter's gradient, for each
/// family (Llama with grouped queries, Qwen2 with biases, GPT-2 with
/// learned positions), on pairs mixing very short and very long; so does
/// packing without sharing.
#[test]
fn packed_shared_prompts_equal_the_padded_batch() {
    use fdpo_model::logprobs::{response_logprob_sums_from_hidden, target_logprob_sums, PaddedBatch};
    use fdpo_model::packing::{PackedBatch, Scored, Sequence};
    let draw =
        |seed: u32, n: usize| -> Vec<u32> { (0..n as u32).map(|i| (i * 37 + seed * 11 + 5) % 96).collect() };
    // (prompt, chosen, rejected) lengths: long prompts, long responses, one-token ones.
    let shapes = [(40, 20, 23), (1, 2, 1), (3, 60, 4), (17, 1, 30), (2, 5, 5), (55, 8, 3)];
    let pairs: Vec<(Vec<u32>, Vec<u32>, Vec<u32>)> = shapes
        .iter()
        .enumerate()
        .map(|(i, &(p, c, r))| (draw(3 * i as u32, p), draw(3 * i as u32 + 1, c), draw(3 * i as u32 + 2, r)))
        .collect();
    let b = pairs.len();
    let weight: Vec<f32> = (0..2 * b).map(|i| ((i * 7 % 5) as f32 - 2.0) * 0.4 + 0.1).collect();
    let weight = Tensor::from_vec(weight, 2 * b, &Device::Cpu).unwrap();
    for family in ["llama", "qwen2", "gpt2"] {
        let (model, weights) = CausalLm::load(&fixture(family), DType::F32, &Device::Cpu).unwrap();
        // Padded: rows chosen 0..b, then rejected 0..b.
        let rows: Vec<(&[u32], &[u32])> = pairs
            .iter()
            .map(|(p, c, _)| (p.as_slice(), c.as_slice()))
            .chain(pairs.iter().map(|(p, _, r)| (p.as_slice(), r.as_slice())))
            .collect();
        let padded = PaddedBatch::new(&rows, 0, false, &Device::Cpu).unwrap();
        let hidden = model.forward_hidden(&padded.ids, Some(&padded.attention), None).unwrap();
        let (want, want_counts) =
            response_logprob_sums_from_hidden(&model, &hidden, &padded.ids, &padded.response).unwrap();
        let gw = (&want * &weight).unwrap().sum_all().unwrap().backward().unwrap();
        let branches: Vec<[&[u32]; 2]> = pairs.iter().map(|(_, c, r)| [c.as_slice(), r.as_slice()]).collect();
        let singles: Vec<[&[u32]; 1]> =
            pairs.iter().flat_map(|(_, c, r)| [[c.as_slice()], [r.as_slice()]]).collect();
        let shared: Vec<Sequence> =
            pairs.iter().zip(&branches).map(|((p, _, _), br)| Sequence { prefix: p, branches: br }).collect();
        let apart: Vec<Sequence> = singles
            .iter()
            .enumerate()
            .map(|(i, br)| Sequence { prefix: &pairs[i / 2].0, branches: br })
            .collect();
        for (how, seqs) in [("shared prompts", &shared), ("packed apart", &apart)] {
            // Rows of at most 90 tokens: several rows, several sequences in some.
            let batch = PackedBatch::new(seqs, 90, Scored::Branches, 0, &Device::Cpu).unwrap();
            assert!(batch.ids.dim(0).unwrap() > 1 && batch.ids.dim(0).unwrap() < seqs.len());
            let hidden = model.forward_packed(&batch).unwrap();
            let (sums, counts) = target_logprob_sums(&model, &hidden, &batch.targets).unwrap();
            // Owners are [c0, r0, c1, r1, …]: to [c0, c1, …, r0, r1, …].
            let order = |x: &Tensor| x.reshape((b, 2)).unwrap().t().unwrap().flatten_all().unwrap();
            let (got, got_counts) = (order(&sums), order(&counts));
            assert_eq!(got_counts.to_vec1::<f32>().unwrap(), want_counts.to_vec1::<f32>().unwrap());
            let diff = max_abs_diff(&got, &want);
            assert!(diff < 1e-5 * max_abs(&want).max(1.0), "{family}, {how}: sums differ by {diff}");
            let gp = (got * &weight).unwrap().sum_all().unwrap().backward().unwrap();
            for (name, var) in weights.vars() {
                let (a, w) = (gp.get(var.as_tensor()).unwrap(), gw.get(var.as_tensor()).unwrap());
                let diff = max_abs_diff(a, w) / max_abs(w).max(1e-6);
                assert!(diff < 1e-5, "{family}, {how}: gradient of `{name}` off by {diff}");
            }
        }
    }
}
