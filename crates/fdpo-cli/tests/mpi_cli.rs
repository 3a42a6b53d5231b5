//! Data-parallel training under `mpirun -np 2` (the `mpi` feature; CI
//! installs OpenMPI and runs `cargo test -p fdpo-cli --features mpi --test
//! mpi_cli`): two ranks with one micro-batch each train to the very weights
//! and metrics of one process accumulating two (f-DPO and SFT); a run
//! stopped alone resumes on two ranks, and one stopped on two resumes
//! alone, to the uninterrupted run's weights; a failing rank stops the
//! whole job, naming the rank and the reason, instead of hanging. Without
//! the feature the tests are listed as ignored, with the reason.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fdpo-model/tests/fixtures/llama")
}

/// Fails with the remedy when the `mpi` feature is on but mpirun is missing.
fn require_mpirun() {
    assert!(
        Command::new("mpirun").arg("--version").output().is_ok_and(|o| o.status.success()),
        "the `mpi` feature is on but mpirun is missing: bash scripts/setup-mpi.sh"
    );
}

/// `fdpo ARGS` alone, or under `mpirun -np 2` (one thread per rank, a
/// 120 s limit so that a hang fails the test instead of stalling it).
fn fdpo(ranks: usize, args: &[&str], env: &[(&str, &str)]) -> Output {
    let bin = env!("CARGO_BIN_EXE_fdpo");
    let mut cmd = Command::new("timeout");
    cmd.arg("120");
    if ranks > 1 {
        cmd.args(["mpirun", "-np", &ranks.to_string(), "--oversubscribe", "--allow-run-as-root"]);
        cmd.args(["-x", "RAYON_NUM_THREADS=1"]);
        for (k, _) in env {
            cmd.args(["-x", k]);
        }
    }
    cmd.arg(bin).args(args).envs(env.iter().copied()).output().unwrap()
}

fn ok(out: Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{stderr}");
    stderr
}

/// metrics.jsonl without the timing field.
fn metrics(dir: &Path) -> Vec<Value> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let mut v: Value = serde_json::from_str(l).unwrap();
            v.as_object_mut().unwrap().remove("tokens_per_s");
            v
        })
        .collect()
}

fn weights(dir: &Path) -> Vec<u8> {
    std::fs::read(dir.join("final/model.safetensors")).unwrap()
}

struct Setup {
    _dir: tempfile::TempDir,
    root: PathBuf,
}

impl Setup {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        std::fs::write(
            root.join("prefs.jsonl"),
            "{\"prompt\": \"the film\", \"chosen\": \" was good\", \"rejected\": \" was bad\"}\n\
             {\"prompt\": \"a story\", \"chosen\": \" so good\", \"rejected\": \" so bad\"}\n\
             {\"prompt\": \"the plot\", \"chosen\": \" is good\", \"rejected\": \" is dull\"}\n\
             {\"prompt\": \"the end\", \"chosen\": \" was fine\", \"rejected\": \" was awful and long\"}\n\
             {\"prompt\": \"a film\", \"chosen\": \" very good\", \"rejected\": \" bad\"}\n",
        )
        .unwrap();
        std::fs::write(
            root.join("sft.jsonl"),
            "{\"prompt\": \"the film\", \"completion\": \" was good\"}\n\
             {\"prompt\": \"a story\", \"completion\": \" so very good\"}\n\
             {\"prompt\": \"the plot\", \"completion\": \" is good\"}\n",
        )
        .unwrap();
        std::fs::write(
            root.join("run.toml"),
            "learning_rate = 0.005\nmax_steps = 6\nsave_steps = 2\nper_device_train_batch_size = 2\n\
             gradient_accumulation_steps = 2\nlogging_steps = 1\nmax_length = 64\n",
        )
        .unwrap();
        Setup { _dir: dir, root }
    }

    fn args<'a>(&'a self, command: &'a str, data: &'a str, out: &'a str) -> Vec<String> {
        let model = fixture();
        let path = |p: &str| self.root.join(p).to_str().unwrap().to_string();
        vec![
            command.into(),
            "--config".into(),
            path("run.toml"),
            "--model".into(),
            model.to_str().unwrap().into(),
            "--train-file".into(),
            path(data),
            "--output-dir".into(),
            path(out),
        ]
    }
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

#[test]
#[cfg_attr(not(feature = "mpi"), ignore = "needs --features mpi (and OpenMPI: scripts/setup-mpi.sh)")]
fn two_ranks_train_to_the_weights_of_one_process() {
    require_mpirun();
    let s = Setup::new();
    for (command, data) in [("train", "prefs.jsonl"), ("sft", "sft.jsonl")] {
        let (one, two) = (format!("{command}-one"), format!("{command}-two"));
        ok(fdpo(1, &strs(&s.args(command, data, &one)), &[]));
        let log = ok(fdpo(2, &strs(&s.args(command, data, &two)), &[]));
        // One rank speaks: one "done" line, not two.
        assert_eq!(log.matches("done: model in").count(), 1, "{log}");
        let (one, two) = (s.root.join(one), s.root.join(two));
        assert!(weights(&one) == weights(&two), "{command}: weights differ between 1 and 2 ranks");
        assert_eq!(metrics(&one), metrics(&two), "{command}: metrics differ");
        let steps: Vec<u64> = metrics(&two).iter().map(|r| r["step"].as_u64().unwrap()).collect();
        assert_eq!(steps, [1, 2, 3, 4, 5, 6]);
        for step in [2, 4, 6] {
            assert!(two.join(format!("checkpoints/step-{step}/model.safetensors")).exists());
        }
    }
}

#[test]
#[cfg_attr(not(feature = "mpi"), ignore = "needs --features mpi (and OpenMPI: scripts/setup-mpi.sh)")]
fn a_run_resumes_on_another_number_of_ranks() {
    require_mpirun();
    let s = Setup::new();
    ok(fdpo(1, &strs(&s.args("train", "prefs.jsonl", "whole")), &[]));
    let whole = weights(&s.root.join("whole"));
    for (first, then, name) in [(1, 2, "one-then-two"), (2, 1, "two-then-one")] {
        let mut args = s.args("train", "prefs.jsonl", name);
        args.extend(["--stop-after-steps".into(), "3".into()]);
        let log = ok(fdpo(first, &strs(&args), &[]));
        assert!(log.contains("stopped after step 3"), "{log}");
        let run = s.root.join(name);
        let log = ok(fdpo(then, &["train", "--resume", run.to_str().unwrap()], &[]));
        assert!(log.contains("resumed from step 2"), "{log}");
        assert!(weights(&run) == whole, "{name}: resumed weights differ from the uninterrupted run's");
    }
}

#[test]
#[cfg_attr(not(feature = "mpi"), ignore = "needs --features mpi (and OpenMPI: scripts/setup-mpi.sh)")]
fn a_failing_rank_stops_the_job_and_is_named() {
    require_mpirun();
    let s = Setup::new();
    let out = fdpo(2, &strs(&s.args("train", "prefs.jsonl", "failed")), &[("FDPO_TEST_FAIL", "1:2")]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(124), "the job hung until the time limit: {stderr}");
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("rank 1 of 2") && stderr.contains("injected failure at step 2"), "{stderr}");
    assert!(!s.root.join("failed/final").exists());
}
