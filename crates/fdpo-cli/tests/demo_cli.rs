//! A reduced `fdpo demo` inside the test suite: it completes, its report has
//! every row with finite numbers, the grammar covers ≥ 99% of the
//! reference's mass, reverse-KL f-DPO raises the true reward, and a second
//! run reuses the cached reference.

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
    assert_eq!(names, ["reference", "reverse-kl", "js"]);
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
        if r["policy"] != "reference" {
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
    for r in &rows[1..] {
        let beta = summary["beta"].as_f64().unwrap();
        let trained = r["reward"].as_f64().unwrap() - beta * r["divergence"].as_f64().unwrap();
        let exact = r["exact_reward"].as_f64().unwrap() - beta * r["exact_divergence"].as_f64().unwrap();
        assert!(exact >= trained - 1e-9, "{}: exact objective {exact} < trained {trained}", r["policy"]);
    }
    let report = std::fs::read_to_string(out.join("report.md")).unwrap();
    for row in ["| reference |", "| reverse-kl |", "| js |"] {
        assert!(report.contains(row), "{row} missing from the report");
    }
    for plot in ["reward_vs_entropy.svg", "reward_vs_entropy.png", "reward_vs_diversity.png"] {
        assert!(out.join(plot).exists(), "{plot}");
    }
    // Same seed and sizes: the reference and the pairs are reused.
    let again = run("reverse-kl");
    let stderr = String::from_utf8_lossy(&again.stderr).into_owned();
    assert!(again.status.success() && stderr.contains("reference: reusing"), "{stderr}");
}
