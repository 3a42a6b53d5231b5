//! `fdpo reward score` on the transformers-made reward fixture gives
//! transformers' scores; `fdpo reward train` writes a model it can score with.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fdpo-model/tests/fixtures").join(name)
}

fn fdpo(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_fdpo")).args(args).output().unwrap()
}

#[test]
fn score_matches_transformers_and_train_writes_a_reward_model() {
    let dir = tempfile::tempdir().unwrap();
    let samples = dir.path().join("s.jsonl");
    // The pairs of make_reward_fixture.py, as a samples file.
    std::fs::write(
        &samples,
        "{\"prompt\": \"the film\", \"responses\": [\" was good\"]}\n{\"prompt\": \"a story\", \"responses\": [\" was bad and dull\"]}\n\
         {\"prompt\": \"the plot\", \"responses\": [\" fine\"]}\n",
    )
    .unwrap();
    let out = dir.path().join("scored.jsonl");
    let model = fixture("llama-reward");
    let res = fdpo(&[
        "reward",
        "score",
        "--model",
        model.to_str().unwrap(),
        samples.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(res.status.success(), "{}", String::from_utf8_lossy(&res.stderr));
    let expected: Value =
        serde_json::from_str(&std::fs::read_to_string(model.join("expected.json")).unwrap()).unwrap();
    let got: Vec<f64> = std::fs::read_to_string(&out)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap()["scores"][0].as_f64().unwrap())
        .collect();
    for (g, w) in got.iter().zip(expected["scores"].as_array().unwrap()) {
        assert!((g - w.as_f64().unwrap()).abs() < 1e-5, "{got:?} vs {}", expected["scores"]);
    }
    // The demo task's reward needs no model.
    std::fs::write(&samples, "{\"prompt\": \"horror review :\", \"responses\": [\"frankly plot was awful but superb\", \"overall music felt good and great\"]}\n").unwrap();
    let res = fdpo(&[
        "reward",
        "score",
        "--demo-reward",
        samples.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(res.status.success(), "{}", String::from_utf8_lossy(&res.stderr));
    let line: Value = serde_json::from_str(std::fs::read_to_string(&out).unwrap().trim()).unwrap();
    let s: Vec<f64> = line["scores"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
    assert!((s[0] - (0.3 * -2.0 + 0.7 * 2.0)).abs() < 1e-12 && (s[1] - 1.45).abs() < 1e-12, "{s:?}");
    // A bad line names the file, line and field.
    std::fs::write(&samples, "{\"prompt\": \"a\", \"responses\": [3]}\n").unwrap();
    let res = fdpo(&["reward", "score", "--model", model.to_str().unwrap(), samples.to_str().unwrap()]);
    let e = String::from_utf8_lossy(&res.stderr);
    assert!(
        e.contains("s.jsonl:1: field `responses[0]`: invalid type: integer `3`, expected a string"),
        "{e}"
    );
    // A response beyond the model's 64 positions is named, not a bare shape error.
    let long = "good ".repeat(80);
    std::fs::write(&samples, format!("{{\"prompt\": \"a\", \"responses\": [\"fine\", \"{long}\"]}}\n"))
        .unwrap();
    let res = fdpo(&["reward", "score", "--model", model.to_str().unwrap(), samples.to_str().unwrap()]);
    let e = String::from_utf8_lossy(&res.stderr);
    assert!(
        e.contains("s.jsonl:1: responses[1]: prompt and response are")
            && e.contains("beyond the reward model's 64 positions"),
        "{e}"
    );

    let prefs = dir.path().join("prefs.jsonl");
    std::fs::write(
        &prefs,
        "{\"prompt\": \"the film\", \"chosen\": \" was good\", \"rejected\": \" was bad\"}\n",
    )
    .unwrap();
    let run = dir.path().join("rm");
    let res = fdpo(&[
        "reward",
        "train",
        "--model",
        fixture("llama").to_str().unwrap(),
        "--data",
        prefs.to_str().unwrap(),
        "--output-dir",
        run.to_str().unwrap(),
        "--max-steps",
        "2",
        "--logging-steps",
        "1",
    ]);
    assert!(res.status.success(), "{}", String::from_utf8_lossy(&res.stderr));
    let log = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    assert!(log.contains("\"accuracy\"") && log.contains("\"margin\""), "{log}");
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("final/config.json")).unwrap()).unwrap();
    assert_eq!(config["architectures"][0], "LlamaForSequenceClassification");

    // fdpo online with the defaults (64 new tokens, max_length 1024) on
    // 64-position models: both are cut to fit, with warnings, and it runs.
    let prompts = dir.path().join("prompts.jsonl");
    std::fs::write(&prompts, "{\"prompt\": \"the film\"}\n{\"prompt\": \"a story\"}\n").unwrap();
    let judge = format!("reward-model:{}", fixture("llama-reward").display());
    let online = dir.path().join("online");
    // A first start on a missing policy fails and records nothing, so the
    // corrected command is not refused as "other settings".
    let res = fdpo(&[
        "online",
        "--policy",
        "no-such-model",
        "--prompts",
        prompts.to_str().unwrap(),
        "--judge",
        &judge,
        "--output-dir",
        online.to_str().unwrap(),
    ]);
    assert!(!res.status.success() && !online.join("online.json").exists());
    let res = fdpo(&[
        "online",
        "--policy",
        fixture("llama").to_str().unwrap(),
        "--prompts",
        prompts.to_str().unwrap(),
        "--judge",
        &judge,
        "--rounds",
        "1",
        "--groups",
        "2",
        "--eval-samples",
        "2",
        "--output-dir",
        online.to_str().unwrap(),
    ]);
    let e = String::from_utf8_lossy(&res.stderr);
    assert!(res.status.success(), "{e}");
    assert!(e.contains("max_new_tokens 64 does not fit the 64 positions"), "{e}");
    assert!(e.contains("max_length 1024 is beyond the model's context of 64 positions"), "{e}");
    assert_eq!(std::fs::read_to_string(online.join("rounds.jsonl")).unwrap().lines().count(), 2);
}
