//! A reduced `fdpo demo` inside the test suite: it completes, its report has
//! every row with finite numbers, the grammar covers ≥ 99% of the
//! reference's mass, reverse-KL f-DPO raises the true reward, its exact
//! optimum is `fdpo exact solve`'s on the instance file it writes, and a
//! second run reuses the cached reference.

use std::process::Command;

use serde_json::Value;

#[test]
fn reduced_demo_reports_every_divergence() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("demo");
    let run = |divergences: &str| {
        Command::new(env!("CARGO_BIN_EXE_fdpo"))
            .args(["demo", "--output-dir", out.to_str().unwrap(), "--divergences", divergences])
            .args(["--samples", "8", "--pairs-per-prompt", "32", "--seed", "3"])
            .output()
            .unwrap()
    };
    let res = run("reverse-kl,js");
    let stderr = String::from_utf8_lossy(&res.stderr).into_owned();
    assert!(res.status.success(), "{stderr}");
    let summary: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    let coverage = summary["coverage"].as_f64().unwrap();
    assert!(coverage >= 0.99, "the grammar covers only {coverage} of the reference's mass");
    let rows = summary["rows"].as_array().unwrap();
    let names: Vec<&str> = rows.iter().map(|r| r["policy"].as_str().unwrap()).collect();
    assert_eq!(names, ["reference", "reverse-kl", "js", "kto (β = 0.1)"]);
    let kto = &rows[3];
    for r in rows {
        let mut keys = vec![
            "reward_samples",
            "reward",
            "entropy",
            "divergence_samples",
            "divergence",
            "token_entropy",
            "grammar_mass",
        ];
        if r["policy"] != "reference" && r != kto {
            keys.extend(["exact_reward", "exact_entropy", "exact_divergence"]);
            for m in ["distinct-1", "distinct-2", "ead", "1-self-bleu"] {
                assert!(r["exact_diversity"][m].as_f64().is_some_and(f64::is_finite), "{m}: {r}");
            }
        }
        for k in keys {
            assert!(r[k].as_f64().is_some_and(f64::is_finite), "{k}: {r}");
        }
        for m in ["distinct-1", "distinct-2", "ead", "1-self-bleu"] {
            assert!(r["diversity"][m].as_f64().is_some_and(f64::is_finite), "{m}: {r}");
        }
    }
    let reference = rows[0]["reward_samples"].as_f64().unwrap();
    let rkl = rows[1]["reward_samples"].as_f64().unwrap();
    assert!(rkl > reference + 0.2, "reverse-KL reward {rkl} vs reference {reference}");
    // The exact optimum is at least as good in its own objective as the trained policy.
    for r in &rows[1..3] {
        let beta = summary["beta"].as_f64().unwrap();
        let trained = r["reward"].as_f64().unwrap() - beta * r["divergence"].as_f64().unwrap();
        let exact = r["exact_reward"].as_f64().unwrap() - beta * r["exact_divergence"].as_f64().unwrap();
        assert!(exact >= trained - 1e-9, "{}: exact objective {exact} < trained {trained}", r["policy"]);
    }
    let report = std::fs::read_to_string(out.join("report.md")).unwrap();
    for row in ["| reference |", "| reverse-kl |", "| js |", "| kto (β = 0.1) |"] {
        assert!(report.contains(row), "{row} missing from the report");
    }
    // KTO learns from the same labels, unpaired, and the report places it beside reverse-KL f-DPO.
    let kto_reward = kto["reward_samples"].as_f64().unwrap();
    assert!(kto_reward > reference + 0.1, "KTO reward {kto_reward} vs reference {reference}");
    assert!(kto["exact_reward"].is_null(), "KTO has no exact optimum here: {kto}");
    assert!(
        report.contains("**kto (β = 0.1)** trained on the same 32 preference labels per prompt"),
        "{report}"
    );
    assert!(report.contains("; reverse-KL f-DPO at β = 0.1: reward"), "{report}");
    for plot in ["reward_vs_entropy.svg", "reward_vs_entropy.png", "reward_vs_diversity.png"] {
        assert!(out.join(plot).exists(), "{plot}");
    }
    // Online rounds (the true reward as judge) beat the reference, and the
    // comparison has a row per round with an offline run of as many labels.
    let comparison = summary["online_vs_offline"].as_array().unwrap();
    assert_eq!(comparison.len(), 4);
    let last = &comparison[3];
    let online = last["online"]["true_reward"].as_f64().unwrap();
    assert!(online > reference + 0.2, "online reward {online} vs reference {reference}");
    let (on_labels, off_labels) =
        (last["online"]["labels"].as_u64().unwrap(), last["offline"]["labels"].as_u64().unwrap());
    assert!(on_labels <= off_labels && on_labels + 32 >= off_labels, "{on_labels} vs {off_labels} labels");
    assert!(report.contains("## Online against offline"));

    // instance.json reruns the demo's exact optimum in the exact lab.
    let solved: Value = serde_json::from_str(
        &String::from_utf8(
            Command::new(env!("CARGO_BIN_EXE_fdpo"))
                .args(["exact", "solve", "--instance", out.join("instance.json").to_str().unwrap()])
                .args(["--divergence", "js", "--beta", "0.1", "--json"])
                .output()
                .unwrap()
                .stdout,
        )
        .unwrap(),
    )
    .unwrap();
    for (ours, theirs) in
        [("exact_reward", "reward"), ("exact_entropy", "entropy"), ("exact_divergence", "divergence_value")]
    {
        let (x, y) = (rows[2][ours].as_f64().unwrap(), solved[theirs].as_f64().unwrap());
        assert!((x - y).abs() < 1e-9 * (1.0 + x.abs()), "{ours}: demo {x}, fdpo exact solve {y}");
    }

    // Same seed and sizes: the reference and the pairs are reused.
    let again = run("reverse-kl");
    let reference_dir = out.join("reference/sft/final");
    online_and_reward_model_commands(dir.path(), &reference_dir, &out.join("reference/prefs.jsonl"));
    let stderr = String::from_utf8_lossy(&again.stderr).into_owned();
    assert!(again.status.success() && stderr.contains("reference: reusing"), "{stderr}");
    // The rerun replaced the first run's f-DPO runs and recorded its own settings.
    assert!(out.join("runs/reverse-kl").exists() && !out.join("runs/js").exists());
    let summary: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["settings"]["divergences"], serde_json::json!(["reverse-kl"]));
    assert_eq!(summary["settings"]["samples"], 8);
}

/// Settings the demo cannot run with are refused by flag before anything
/// is written, and a folder the demo did not write is left untouched.
#[test]
fn demo_refuses_bad_settings_and_foreign_folders() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("mine");
    std::fs::create_dir_all(out.join("reference")).unwrap();
    std::fs::write(out.join("reference/notes.txt"), "keep me").unwrap();
    std::fs::create_dir_all(out.join("runs/x")).unwrap();
    // A summary.json of someone else's does not make the folder the demo's.
    std::fs::write(out.join("summary.json"), "{\"rows\": []}").unwrap();
    let demo_in = |out: &std::path::Path, extra: &[&str]| {
        let res = Command::new(env!("CARGO_BIN_EXE_fdpo"))
            .args(["demo", "--output-dir", out.to_str().unwrap()])
            .args(extra)
            .output()
            .unwrap();
        assert!(!res.status.success(), "{extra:?} was accepted");
        String::from_utf8_lossy(&res.stderr).into_owned()
    };
    let demo = |extra: &[&str]| demo_in(&out, extra);
    let tiny = ["--corpus", "16", "--sft-steps", "1", "--pairs-per-prompt", "8", "--samples", "2"];
    for (args, flag) in [
        (&["--hidden", "0"][..], "--hidden"),
        (&["--hidden", "20"][..], "--hidden"),
        (&["--samples", "1"][..], "--samples must be at least 2"),
        (&["--samples", "0"][..], "--samples"),
        (&["--divergences", "reverse-kl,js,reverse-kl"][..], "reverse-kl is listed twice"),
        (&["--online-rounds", "9", "--pairs-per-prompt", "8"][..], "--online-rounds"),
        (&["--learning-rate", "0"][..], "--learning-rate"),
        (&["--num-train-epochs=-1"][..], "--num-train-epochs"),
        // Tiny sizes, so that a regression fails fast instead of running a whole demo.
        (&tiny[..], "did not write"),
    ] {
        let stderr = demo(args);
        assert!(stderr.contains(flag), "{args:?}: {stderr}");
    }
    assert_eq!(std::fs::read_to_string(out.join("reference/notes.txt")).unwrap(), "keep me");
    assert!(out.join("runs/x").exists() && !out.join("demo.json").exists());
    let file = dir.path().join("a-file");
    std::fs::write(&file, "x").unwrap();
    assert!(demo_in(&file, &tiny).contains("is not a folder"));
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "x");
}

/// `fdpo online` on the demo's reference: rounds are logged, a second call
/// continues after the last completed round; a reward model trained by
/// `fdpo reward train` on the demo's pairs serves as a judge.
fn online_and_reward_model_commands(
    dir: &std::path::Path,
    reference: &std::path::Path,
    prefs: &std::path::Path,
) {
    let prompts = dir.join("prompts.jsonl");
    let genres = ["horror", "comedy", "drama", "western", "musical", "thriller", "romance", "documentary"];
    let text: String = genres.iter().map(|g| format!("{{\"prompt\": \"{g} review :\"}}\n")).collect();
    std::fs::write(&prompts, text).unwrap();
    let out = dir.join("online");
    let online_with = |judge: &str, out: &std::path::Path, rounds: &str, against: &str| {
        Command::new(env!("CARGO_BIN_EXE_fdpo"))
            .args(["online", "--policy", reference.to_str().unwrap(), "--prompts", prompts.to_str().unwrap()])
            .args([
                "--judge",
                judge,
                "--rounds",
                rounds,
                "--groups",
                "4",
                "--eval-samples",
                "4",
                "--learning-rate",
                "1e-3",
            ])
            .args([
                // Beyond the model's 32 positions: cut, with one warning
                // for the whole run rather than one per round.
                "--max-length",
                "48",
                "--max-prompt-length",
                "16",
                "--max-new-tokens",
                "12",
                "--demo-task",
            ])
            .args(["--output-dir", out.to_str().unwrap(), "--against", against])
            .output()
            .unwrap()
    };
    let online =
        |judge: &str, out: &std::path::Path, rounds: &str| online_with(judge, out, rounds, "reference");
    let res = online("demo-reward", &out, "2");
    let stderr = String::from_utf8_lossy(&res.stderr).into_owned();
    assert!(res.status.success(), "{stderr}");
    assert_eq!(stderr.matches("max_length 48 is beyond the model's context of 32").count(), 1, "{stderr}");
    let read = |path: &std::path::Path| -> Vec<Value> {
        std::fs::read_to_string(path).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    };
    let first = read(&out.join("rounds.jsonl"));
    assert_eq!(first.iter().map(|r| r["round"].as_u64().unwrap()).collect::<Vec<_>>(), [0, 1, 2]);
    let res = online("demo-reward", &out, "3");
    let stderr = String::from_utf8_lossy(&res.stderr).into_owned();
    assert!(res.status.success() && stderr.contains("round 2: already done"), "{stderr}");
    let second = read(&out.join("rounds.jsonl"));
    assert_eq!(second.len(), 4);
    assert_eq!(second[..3], first[..], "completed rounds are kept as they were");
    assert!(second[3]["labels"].as_u64().unwrap() > second[2]["labels"].as_u64().unwrap());
    // Continuing under other settings is refused, naming what changed.
    let res = online_with("demo-reward", &out, "4", "previous");
    let stderr = String::from_utf8_lossy(&res.stderr).into_owned();
    assert!(!res.status.success() && stderr.contains("against \"reference\" → \"previous\""), "{stderr}");
    // A moved run folder continues from its own copy of the last policy.
    let moved = dir.join("online-moved");
    std::fs::rename(&out, &moved).unwrap();
    let res = online("demo-reward", &moved, "4");
    assert!(res.status.success(), "{}", String::from_utf8_lossy(&res.stderr));
    let third = read(&moved.join("rounds.jsonl"));
    assert_eq!(third.len(), 5);
    assert!(third[3]["policy"].as_str().unwrap().starts_with(moved.to_str().unwrap()), "{:?}", third[3]);

    // One-token responses: distinct-2 is undefined for every prompt — null
    // and "undefined", not 0 — while distinct-1 is still measured.
    let short = dir.join("online-short");
    let res = Command::new(env!("CARGO_BIN_EXE_fdpo"))
        .args(["online", "--policy", reference.to_str().unwrap(), "--prompts", prompts.to_str().unwrap()])
        .args(["--judge", "demo-reward", "--rounds", "0", "--max-new-tokens", "1", "--eval-samples", "4"])
        .args(["--max-length", "32", "--max-prompt-length", "16", "--output-dir", short.to_str().unwrap()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&res.stderr).into_owned();
    assert!(res.status.success() && stderr.contains("distinct-2 undefined"), "{stderr}");
    let round0 = &read(&short.join("rounds.jsonl"))[0];
    assert!(round0["distinct_2"].is_null() && round0["distinct_1"].as_f64().is_some(), "{round0}");

    // A reward model on the demo pairs, then one online round judged by it.
    let rm = dir.join("rm");
    let res = Command::new(env!("CARGO_BIN_EXE_fdpo"))
        .args(["reward", "train", "--model", reference.to_str().unwrap(), "--data", prefs.to_str().unwrap()])
        .args(["--output-dir", rm.to_str().unwrap(), "--max-steps", "30", "--learning-rate", "3e-3"])
        .args(["--max-length", "32", "--max-prompt-length", "16", "--per-device-train-batch-size", "32"])
        .output()
        .unwrap();
    assert!(res.status.success(), "{}", String::from_utf8_lossy(&res.stderr));
    let judge = format!("reward-model:{}", rm.join("final").display());
    let res = online(&judge, &dir.join("online-rm"), "1");
    assert!(res.status.success(), "{}", String::from_utf8_lossy(&res.stderr));
    let rounds = read(&dir.join("online-rm/rounds.jsonl"));
    assert!(
        rounds[1]["judged_reward"].as_f64().unwrap().is_finite()
            && rounds[1]["true_reward"].as_f64().is_some()
    );
}
