//! `fdpo merge` end to end: each method's output, run by fdpo, gives the
//! logits transformers gives on the same merge computed by an independent
//! numpy implementation (tests/fixtures/merge/make_merge_fixture.py, which
//! also loads fdpo's own output in transformers); mismatched models are
//! refused by file and tensor.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use candle_core::{DType, Device, Tensor};
use fdpo_model::CausalLm;
use serde_json::Value;

fn fdpo(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_fdpo")).args(args).output().expect("the fdpo binary runs")
}

fn trl(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fdpo-train/tests/fixtures/trl").join(name)
}

fn here() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/merge")
}

#[test]
fn merges_give_transformers_logits() {
    let expected: Value =
        serde_json::from_str(&std::fs::read_to_string(here().join("expected.json")).unwrap()).unwrap();
    let ids: Vec<u32> =
        expected["ids"][0].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
    let dir = tempfile::tempdir().unwrap();
    for case in expected["cases"].as_array().unwrap() {
        let method = case["method"].as_str().unwrap();
        let out = dir.path().join(method);
        let models = [trl("chatml_policy"), here().join("third")];
        let models = format!("{},{}", models[0].display(), models[1].display());
        let mut args = vec!["merge".to_string(), "--method".into(), method.into(), "--models".into(), models];
        args.extend([
            "--out".into(),
            out.display().to_string(),
            "--base".into(),
            trl("chatml").display().to_string(),
        ]);
        if let Some(w) = case["weights"].as_array() {
            let w: Vec<String> = w.iter().map(|x| x.to_string()).collect();
            args.extend(["--weights".into(), w.join(",")]);
        }
        for key in ["t", "density"] {
            if let Some(v) = case.get(key) {
                args.extend([format!("--{key}"), v.to_string()]);
            }
        }
        let res = fdpo(&args.iter().map(String::as_str).collect::<Vec<_>>());
        assert!(res.status.success(), "{method}: {}", String::from_utf8_lossy(&res.stderr));
        let (model, _) = CausalLm::load(&out, DType::F32, &Device::Cpu).unwrap();
        let input = Tensor::new(ids.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
        let logits = model.forward(&input, None, None).unwrap().squeeze(0).unwrap().to_vec2::<f32>().unwrap();
        let want = case["logits"].as_array().unwrap();
        let mut worst = 0f32;
        for (row, w) in logits.iter().zip(want) {
            for (g, e) in row.iter().zip(w.as_array().unwrap()) {
                worst = worst.max((g - e.as_f64().unwrap() as f32).abs());
            }
        }
        assert!(worst < 1e-4, "{method}: max |Δlogit| {worst}");
        assert!(out.join("tokenizer.json").exists() && out.join("config.json").exists());
    }
}

#[test]
fn mismatched_models_and_arguments_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("m");
    let run = |models: &str, extra: &[&str]| {
        let mut args = vec!["merge", "--models", models, "--out", out.to_str().unwrap()];
        args.extend(extra);
        String::from_utf8_lossy(&fdpo(&args).stderr).into_owned()
    };
    let llama = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fdpo-model/tests/fixtures/llama");
    let two = format!("{},{}", trl("chatml").display(), llama.display());
    let e = run(&two, &["--method", "linear"]);
    assert!(e.contains("model_type") && e.contains("`llama`, but") && e.contains("`qwen2`"), "{e}");
    let same = format!("{},{}", trl("chatml").display(), trl("chatml_policy").display());
    assert!(run(&same, &["--method", "ties"]).contains("merge differences from a base model"));
    assert!(run(&same, &["--method", "linear", "--weights", "1"]).contains("--weights: 1 given for 2 models"));
    let three = format!("{same},{}", here().join("third").display());
    assert!(run(&three, &["--method", "slerp"]).contains("slerp merges exactly two models, got 3"));
    // A tensor of another shape is named.
    let odd = dir.path().join("odd");
    std::fs::create_dir_all(&odd).unwrap();
    for f in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(trl("chatml").join(f), odd.join(f)).unwrap();
    }
    let mut tensors =
        candle_core::safetensors::load(trl("chatml").join("model.safetensors"), &Device::Cpu).unwrap();
    tensors.insert("model.norm.weight".into(), Tensor::zeros(7, DType::F32, &Device::Cpu).unwrap());
    candle_core::safetensors::save(&tensors, odd.join("model.safetensors")).unwrap();
    let e = run(&format!("{},{}", trl("chatml").display(), odd.display()), &["--method", "linear"]);
    assert!(e.contains("tensor `model.norm.weight`: shape [7], but [32]"), "{e}");
    assert!(!out.exists(), "nothing written");
}
