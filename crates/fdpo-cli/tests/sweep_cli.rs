//! A reduced `fdpo sweep`: its exact frontier is `fdpo exact frontier`'s on
//! the instance it writes; its π* is `fdpo exact solve`'s; the study's
//! first point (the reference) is at the distance to π* computed here
//! from the instance by the definitions; the exact arithmetic mixture's
//! reward is the mean of its parts'; a folder of other files is refused.

use std::path::Path;
use std::process::Command;

use fdpo_core::{solve_prompt, Divergence, Instance};
use serde_json::Value;

fn fdpo(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_fdpo")).args(args).output().unwrap()
}

fn ok(args: &[&str]) -> String {
    let res = fdpo(args);
    assert!(res.status.success(), "fdpo {args:?}: {}", String::from_utf8_lossy(&res.stderr));
    String::from_utf8(res.stdout).unwrap()
}

/// Rows of a CSV file, fields split on commas (no quoting in these files).
fn csv(path: &Path) -> Vec<Vec<String>> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| l.split(',').map(str::to_string).collect())
        .collect()
}

fn close(a: f64, b: f64, tol: f64) -> bool {
    (a - b).abs() <= tol * (1.0 + a.abs().max(b.abs()))
}

#[test]
fn reduced_sweep_agrees_with_the_exact_lab() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("sweep");
    let out_s = out.to_str().unwrap();
    ok(&[
        "sweep",
        "--output-dir",
        out_s,
        "--corpus",
        "2000",
        "--sft-steps",
        "60",
        "--hidden",
        "16",
        "--pairs-per-prompt",
        "8",
        "--betas",
        "0.3",
        "--study-beta",
        "0.1",
        "--divergences",
        "reverse-kl,forward-kl",
        "--study-divergences",
        "reverse-kl",
        "--data-multipliers",
        "1",
        "--study-steps",
        "12",
        "--study-evals",
        "2",
        "--soup-seeds",
        "2",
        "--frontier-beta-min",
        "0.05",
        "--frontier-beta-max",
        "20",
        "--frontier-num-betas",
        "7",
    ]);

    // The exact lines: `fdpo exact frontier` on the instance the sweep wrote.
    let instance_path = out.join("instance.json");
    let exact_dir = dir.path().join("exact");
    ok(&[
        "exact",
        "frontier",
        "--instance",
        instance_path.to_str().unwrap(),
        "--divergence",
        "reverse-kl,forward-kl",
        "--beta-min",
        "0.05",
        "--beta-max",
        "20",
        "--num-betas",
        "7",
        "--output-dir",
        exact_dir.to_str().unwrap(),
    ]);
    let (ours, theirs) = (csv(&out.join("frontier.csv")), csv(&exact_dir.join("frontier.csv")));
    assert_eq!(ours.len(), 1 + 1 + 2 * 7);
    assert_eq!(ours.len(), theirs.len());
    assert_eq!(ours[0], theirs[0]);
    for (a, b) in ours.iter().zip(&theirs).skip(1) {
        assert_eq!(a[..3], b[..3], "divergence, alpha and beta columns");
        for (x, y) in a[3..].iter().zip(&b[3..]) {
            let (x, y): (f64, f64) = (x.parse().unwrap(), y.parse().unwrap());
            assert!(close(x, y, 1e-9), "{a:?} vs {b:?}");
        }
    }

    let summary: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    // Trained βs: --betas with the study's β added.
    let sweep = summary["sweep"].as_array().unwrap();
    let betas: Vec<f64> = sweep.iter().map(|p| p["beta"].as_f64().unwrap()).collect();
    assert_eq!(betas, [0.1, 0.1, 0.3, 0.3]);

    // π* of the sweep is `fdpo exact solve`'s.
    let solved: Value = serde_json::from_str(&ok(&[
        "exact",
        "solve",
        "--instance",
        instance_path.to_str().unwrap(),
        "--divergence",
        "forward-kl",
        "--beta",
        "0.3",
        "--json",
    ]))
    .unwrap();
    let fkl = sweep.iter().find(|p| p["divergence"] == "forward-kl" && p["beta"] == 0.3).unwrap();
    for (ours, theirs) in [("reward", "reward"), ("entropy", "entropy")] {
        let (x, y) = (fkl["exact"][ours].as_f64().unwrap(), solved[theirs].as_f64().unwrap());
        assert!(close(x, y, 1e-9), "{ours}: {x} vs {y}");
    }

    // The study starts at π_ref: TV(π_ref, π*) and KL(π*‖π_ref) by their definitions.
    let text = std::fs::read_to_string(&instance_path).unwrap();
    let instance: Instance = Instance::from_json(&text).unwrap().instance;
    let (mut tv, mut kl) = (0.0, 0.0);
    for p in &instance.prompts {
        let star = solve_prompt(Divergence::ReverseKl, 0.1, &p.ref_logprobs, &p.rewards).unwrap();
        for (s, q) in star.policy.iter().zip(&p.ref_logprobs) {
            tv += 0.5 * (s - q.exp()).abs();
            if *s > 0.0 {
                kl += s * (s.ln() - q);
            }
        }
    }
    let n = instance.prompts.len() as f64;
    let study = summary["study"].as_array().unwrap();
    assert_eq!(study.len(), 2, "1× pairs and fresh pairs");
    let start = &study[0]["points"][0];
    assert_eq!(start["step"], 0);
    assert!(close(start["measure"]["tv_opt"].as_f64().unwrap(), tv / n, 1e-9), "{start} vs {}", tv / n);
    assert!(close(start["measure"]["kl_opt"].as_f64().unwrap(), kl / n, 1e-9), "{start} vs {}", kl / n);
    let steps: Vec<u64> =
        study[1]["points"].as_array().unwrap().iter().map(|p| p["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, [0, 6, 12]);
    assert_eq!(study[1]["pairs"], 12 * 32 / 8 * 8, "fresh pairs: one per sample of the run");

    // The arithmetic mixture's reward is linear in its parts.
    let merges = summary["merges"].as_array().unwrap();
    let exact_at = |d: &str| sweep.iter().find(|p| p["divergence"] == d && p["beta"] == 0.1).unwrap();
    let mixed = merges.iter().find(|m| m["kind"] == "arithmetic mixture").unwrap();
    let mean = 0.5
        * (exact_at("reverse-kl")["exact"]["reward"].as_f64().unwrap()
            + exact_at("forward-kl")["exact"]["reward"].as_f64().unwrap());
    assert!(close(mixed["measure"]["reward"].as_f64().unwrap(), mean, 1e-9), "{mixed} vs {mean}");
    let kinds: Vec<&str> = merges.iter().map(|m| m["kind"].as_str().unwrap()).collect();
    for kind in ["weight space", "geometric mixture", "interpolation (WARP)", "extrapolation (ExPO)"] {
        assert!(kinds.contains(&kind), "{kind} missing: {kinds:?}");
    }
    let report = std::fs::read_to_string(out.join("report.md")).unwrap();
    for part in [
        "## 1. Frontiers",
        "### Entropy at matched reward",
        "## 2. Optimisation or objective",
        "## 3. Merges",
    ] {
        assert!(report.contains(part), "{part} missing");
    }
    for plot in ["frontier", "study_distance", "study_entropy", "merges"] {
        for ext in ["svg", "png"] {
            assert!(out.join(format!("{plot}.{ext}")).exists(), "{plot}.{ext}");
        }
    }
}

#[test]
fn sweep_refuses_a_folder_it_did_not_write() {
    let dir = tempfile::tempdir().unwrap();
    let keep = dir.path().join("notes.txt");
    std::fs::write(&keep, "mine").unwrap();
    let res = fdpo(&["sweep", "--output-dir", dir.path().to_str().unwrap()]);
    assert!(!res.status.success());
    let stderr = String::from_utf8_lossy(&res.stderr);
    assert!(stderr.contains("holds files that fdpo sweep did not write"), "{stderr}");
    assert_eq!(std::fs::read_to_string(&keep).unwrap(), "mine");
    let res = fdpo(&["sweep", "--study-divergences", "js", "--divergences", "reverse-kl"]);
    let stderr = String::from_utf8_lossy(&res.stderr);
    assert!(stderr.contains("--study-divergences: js is not in --divergences"), "{stderr}");
}
