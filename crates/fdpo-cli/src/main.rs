//! The `fdpo` binary: one subcommand per task, each in `cmd/<name>`.

mod cmd;
mod output;
mod plot;

use clap::{Parser, Subcommand};

/// fdpo: align language models under any admissible f-divergence, and
/// measure what alignment costs.
#[derive(Debug, Parser)]
#[command(name = "fdpo", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// The whole story on the built-in review task: f-DPO per divergence beside the exact optimum.
    Demo(cmd::demo::DemoArgs),
    /// Frontiers over β, trained and exact; is a divergence's diversity its objective's or unfinished training's?
    Sweep(Box<cmd::sweep::SweepArgs>),
    /// The exact lab: closed-form optimal policies on finite response sets.
    #[command(subcommand)]
    Exact(cmd::exact::ExactCommand),
    /// Sequence log-probabilities of responses (or preference pairs) under a model.
    Logprobs(cmd::logprobs::LogprobsArgs),
    /// Merge checkpoints of one architecture (linear, slerp, task-arithmetic, ties).
    Merge(cmd::merge::MergeArgs),
    /// Sample K responses per prompt with the KV cache.
    Generate(cmd::generate::GenerateArgs),
    /// Bias audits of preference data and judges.
    #[command(subcommand)]
    Audit(cmd::audit::AuditCommand),
    /// Evaluate samples files: diversity metrics side by side.
    #[command(subcommand)]
    Eval(cmd::eval::EvalCommand),
    /// Train a policy with f-DPO on preference pairs (TRL's DPOConfig names).
    Train(cmd::train::TrainArgs<fdpo_train::config::DpoKeys>),
    /// Online / iterative f-DPO: sample, judge, pair best with worst, train; per round.
    Online(Box<cmd::online::OnlineArgs>),
    /// Bradley–Terry reward models: train, and score samples.
    #[command(subcommand)]
    Reward(cmd::reward::RewardCommand),
    /// Supervised fine-tuning on prompt/completion, text or chat data.
    Sft(cmd::train::TrainArgs<fdpo_train::config::SftKeys>),
    /// KTO on unpaired thumbs-up / thumbs-down data (TRL's KTOConfig names).
    Kto(cmd::train::TrainArgs<fdpo_train::config::KtoKeys>),
    /// Benchmarks (tokens/s and peak memory; compare with scripts/bench_train.py).
    #[command(subcommand)]
    Bench(cmd::bench::BenchCommand),
}

/// Keeps freed tensor buffers in glibc's heap instead of returning them to
/// the kernel: training allocates and frees the same large buffers every
/// step, and fresh mmap'd pages cost a page fault each (measured: +15%
/// training throughput from this alone).
fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator thresholds; called before any
    // other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 256 << 20);
    }
}

/// candle's CPU worker pool spins before parking; on a machine with as
/// many cores as threads the spinning workers steal time from rayon's (gemm)
/// threads. Measured on 2 cores (`fdpo bench train`, 3 alternating runs
/// each): 1,910 tokens/s with a limit of 1 against 1,805 with candle's
/// default 25,000 (the runs vary by ±10%). A user's own setting wins.
fn tune_thread_pool() {
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        // SAFETY: called first thing in main, before any other thread exists.
        unsafe { std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", "1") };
    }
}

/// A flag that belongs to another trainer (`fdpo sft --beta`) gets a tip
/// naming the command that takes it.
fn explain_other_trainers_flag(mut err: clap::Error) -> clap::Error {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    if err.kind() == ErrorKind::UnknownArgument {
        if let Some(ContextValue::String(flag)) = err.get(ContextKind::InvalidArg) {
            let key = flag.trim_start_matches('-').split('=').next().unwrap_or("").replace('-', "_");
            if let Some(command) = fdpo_train::config::command_of_key(&key) {
                let tip = format!("`{flag}` is an option of `{command}`");
                err.insert(ContextKind::Suggested, ContextValue::StyledStrs(vec![tip.into()]));
            }
        }
    }
    err
}

fn main() {
    tune_allocator();
    tune_thread_pool();
    let cli = Cli::try_parse().unwrap_or_else(|e| explain_other_trainers_flag(e).exit());
    // Under mpirun/srun (with the `mpi` feature) this process is one rank of a job.
    // Kept to the end of main: dropping it finalises MPI.
    let _mpi = fdpo_train::parallel::init().unwrap_or_else(|e| {
        eprintln!("error: {e}");
        std::process::exit(1)
    });
    let (rank, ranks) = (fdpo_train::parallel::rank(), fdpo_train::parallel::size());
    if ranks > 1
        && !matches!(cli.command, Command::Train(_) | Command::Sft(_) | Command::Kto(_) | Command::Reward(_))
    {
        fdpo_train::parallel::abort("error: only fdpo train, sft, kto and reward train run on several ranks");
    }
    let result = match cli.command {
        Command::Demo(a) => cmd::demo::run(a),
        Command::Sweep(a) => cmd::sweep::run(*a),
        Command::Exact(c) => c.run(),
        Command::Logprobs(a) => cmd::logprobs::run(a),
        Command::Generate(a) => cmd::generate::run(a),
        Command::Merge(a) => cmd::merge::run(a),
        Command::Train(a) => cmd::train::run(a),
        Command::Reward(c) => c.run(),
        Command::Online(a) => cmd::online::run(*a),
        Command::Sft(a) => cmd::train::run(a),
        Command::Kto(a) => cmd::train::run(a),
        Command::Bench(c) => c.run(),
        Command::Eval(c) => c.run(),
        Command::Audit(c) => c.run(),
    };
    match result {
        // One rank's error stops every rank (MPI_Abort), naming the rank.
        Err(err) if ranks > 1 => {
            fdpo_train::parallel::abort(&format!("error: rank {rank} of {ranks}: {err:#}"))
        }
        Err(err) => {
            eprintln!("error: {err:#}");
            std::process::exit(1);
        }
        Ok(()) => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_exact_solve() {
        let cli = Cli::try_parse_from([
            "fdpo",
            "exact",
            "solve",
            "--random",
            "3",
            "--divergence",
            "js",
            "--beta",
            "0.5",
        ])
        .unwrap();
        assert!(matches!(cli.command, Command::Exact(cmd::exact::ExactCommand::Solve(_))));
    }

    #[test]
    fn refuses_inadmissible_divergence_at_parse_time() {
        let err = Cli::try_parse_from([
            "fdpo",
            "exact",
            "solve",
            "--random",
            "3",
            "--divergence",
            "tv",
            "--beta",
            "1",
        ])
        .unwrap_err()
        .to_string();
        assert!(err.contains("not admissible"), "{err}");
    }

    fn parse_error(args: &[&str]) -> String {
        Cli::try_parse_from(args).unwrap_err().to_string()
    }

    /// Out-of-range numbers are refused while parsing, naming the option and the value.
    #[test]
    fn range_errors_name_the_option_and_the_value() {
        let generate = ["fdpo", "generate", "--model", "m", "--prompts", "p.jsonl", "--out", "o.jsonl"];
        let with = |extra: &[&'static str]| [&generate[..], extra].concat();
        let cases: [(Vec<&str>, &str); 7] = [
            (with(&["--batch-size", "0"]), "'--batch-size <BATCH_SIZE>': must be at least 1, got 0"),
            (with(&["--samples", "0"]), "'--samples <SAMPLES>': must be at least 1, got 0"),
            (
                with(&["--temperature", "inf"]),
                "'--temperature <TEMPERATURE>': must be finite and >= 0, got inf",
            ),
            (
                with(&["--temperature", "NaN"]),
                "'--temperature <TEMPERATURE>': must be finite and >= 0, got NaN",
            ),
            (with(&["--top-p", "1.5"]), "'--top-p <TOP_P>': must be in (0, 1], got 1.5"),
            (
                vec!["fdpo", "eval", "diversity", "s.jsonl", "--vocab-size", "0"],
                "'--vocab-size <VOCAB_SIZE>': must be at least 1, got 0",
            ),
            (
                vec!["fdpo", "logprobs", "--model", "m", "--data", "d", "--out", "o", "--batch-size", "0"],
                "'--batch-size <BATCH_SIZE>': must be at least 1, got 0",
            ),
        ];
        for (args, want) in cases {
            let err = parse_error(&args);
            assert!(err.contains(want), "{args:?}: {err}");
        }
        assert!(Cli::try_parse_from(with(&["--temperature", "0", "--top-p", "1"])).is_ok());
    }

    /// Help of comma-list options says so and shows its default with commas,
    /// the form the parser accepts; the default still parses to the list.
    #[test]
    fn comma_list_options_show_comma_defaults() {
        let help = |args: &[&str]| parse_error(&[&["fdpo"][..], args, &["--help"]].concat());
        let verbosity = help(&["audit", "verbosity"]);
        assert!(
            verbosity.contains("comma-separated") && verbosity.contains("[default: 1,10,50,200]"),
            "{verbosity}"
        );
        let coverage = help(&["exact", "coverage"]);
        for want in [
            "[default: reverse-kl,forward-kl]",
            "[default: reference,uniform,optimal]",
            "[default: 8,16,32,64,128,256,512,1024]",
        ] {
            assert!(coverage.contains(want), "{want}: {coverage}");
        }
        assert!(!coverage.contains("[default: 8 16"), "{coverage}");
        assert!(help(&["exact", "gap"]).contains("[default: gaussian:0.3,rare:1,length-bias:0.5]"));
        let cli = Cli::try_parse_from(["fdpo", "audit", "verbosity", "f.jsonl"]).unwrap();
        match cli.command {
            Command::Audit(cmd::audit::AuditCommand::Verbosity(a)) => assert_eq!(a.bins, [1, 10, 50, 200]),
            other => panic!("{other:?}"),
        }
    }
}
