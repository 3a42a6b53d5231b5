//! `fdpo audit`: bias audits of preference data (`verbosity`) and of a
//! judge's verdicts (`judge`: equal-opportunity gap, length-controlled win
//! rate, position bias, self-preference — each when its fields are present).

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use clap::{Args, Subcommand};
use fdpo_data::records::{read_records, JudgementRecord, PreferenceRecord};
use fdpo_data::{DataError, Location};
use fdpo_eval::audit::{
    equal_opportunity, length_controlled, position_bias, self_preference, verbosity, words, Judgement,
    Proportion, Winner,
};
use serde_json::{json, Value};

use crate::output::{fmt_num, write_file};

/// Audits.
#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Do preference labels favour the longer response? Records need `chosen` and `rejected`
    /// (strings or message lists).
    Verbosity(VerbosityArgs),
    /// Biases of a judge. Records need `a`, `b` and `winner` ("a", "b" or "tie"); optional
    /// `reference` ("a"/"b": equal-opportunity gap), `swapped_winner` (the verdict with b shown
    /// first, in a/b terms: position bias), `judge`, `a_model`, `b_model` (self-preference). The
    /// length-controlled win rate treats a as the model and b as the baseline.
    Judge(JudgeArgs),
}

impl AuditCommand {
    /// Runs the audit.
    pub fn run(self) -> Result<()> {
        match self {
            AuditCommand::Verbosity(a) => run_verbosity(a),
            AuditCommand::Judge(a) => run_judge(a),
        }
    }
}

/// Arguments of `fdpo audit verbosity`.
#[derive(Debug, Args)]
pub struct VerbosityArgs {
    /// Preference pairs in any TRL form (an implicit pair's shared prompt is not counted): .jsonl, .parquet or a dataset folder.
    pub file: PathBuf,
    /// Lower edges of the |length difference| bins, in words (comma-separated, positive, strictly
    /// increasing).
    #[arg(long, value_delimiter = ',', default_value = "1,10,50,200")]
    pub bins: Vec<usize>,
    /// Also write the report here (JSON).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// Arguments of `fdpo audit judge`.
#[derive(Debug, Args)]
pub struct JudgeArgs {
    /// Judgements: .jsonl, .parquet or a dataset folder.
    pub file: PathBuf,
    /// Also write the report here (JSON).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// A verdict field (`a`, `b` or `tie`), named in errors.
fn winner_of(value: Option<&str>, field: &str, at: &Location) -> Result<Option<Winner>> {
    match value {
        None => Ok(None),
        Some(s) => match Winner::parse(s) {
            Some(w) => Ok(Some(w)),
            None => bail!("{at}: field `{field}`: expected \"a\", \"b\" or \"tie\", got {s:?}"),
        },
    }
}

fn show(p: &Proportion) -> String {
    format!("{} [{}, {}] (n = {})", fmt_num(p.value), fmt_num(p.low), fmt_num(p.high), p.n)
}

fn finish(report: Value, out: Option<&Path>) -> Result<()> {
    if let Some(path) = out {
        write_file(path, serde_json::to_string_pretty(&report)?.as_bytes())?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

/// Bin edges must be positive and strictly increasing.
fn check_bins(bins: &[usize]) -> Result<()> {
    let increasing = bins.windows(2).all(|w| w[0] < w[1]);
    if bins.is_empty() || bins[0] == 0 || !increasing {
        let list = bins.iter().map(usize::to_string).collect::<Vec<_>>().join(",");
        bail!("--bins: edges must be positive and strictly increasing, got {list}");
    }
    Ok(())
}

/// The records of a file, which must have at least one.
fn read_nonempty<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Vec<(Location, T)>> {
    let records = read_records::<T>(path, "train")?;
    if records.is_empty() {
        bail!("{}: no pairs", path.display());
    }
    Ok(records)
}

fn run_verbosity(args: VerbosityArgs) -> Result<()> {
    check_bins(&args.bins)?;
    let records = read_nonempty::<PreferenceRecord>(&args.file)?;
    let mut lengths = Vec::with_capacity(records.len());
    for (at, record) in records {
        let pair = record.pair().map_err(|m| DataError::record(&at, m))?;
        lengths.push((words(&pair.chosen.content()), words(&pair.rejected.content())));
    }
    let r = verbosity(&lengths, &args.bins);
    println!("{} pairs, {} with different lengths (words)", lengths.len(), r.pairs_with_length_difference);
    println!("chosen is the longer: {}", show(&r.chosen_longer));
    for (label, p) in &r.by_length_difference {
        println!("  |difference| {label:>8}: {}", show(p));
    }
    println!("rank correlation (length advantage, preferred): {}", fmt_num(r.rank_correlation));
    finish(json!(r), args.out.as_deref())
}

fn run_judge(args: JudgeArgs) -> Result<()> {
    let records = read_nonempty::<JudgementRecord>(&args.file)?;
    let mut judgements = Vec::with_capacity(records.len());
    for (at, r) in records {
        judgements.push(Judgement {
            len_a: words(&r.a.content()),
            len_b: words(&r.b.content()),
            winner: winner_of(Some(&r.winner), "winner", &at)?.expect("a given verdict"),
            swapped_winner: winner_of(r.swapped_winner.as_deref(), "swapped_winner", &at)?,
            reference: winner_of(r.reference.as_deref(), "reference", &at)?,
            judge: r.judge,
            a_model: r.a_model,
            b_model: r.b_model,
        });
    }
    let lc = length_controlled(&judgements);
    let eo = equal_opportunity(&judgements);
    let position = position_bias(&judgements);
    let own = self_preference(&judgements);
    println!("{} judgements", judgements.len());
    if let Some(lc) = &lc {
        match (lc.length_controlled_win_rate, lc.theta, lc.phi) {
            (Some(rate), Some(theta), Some(phi)) => println!(
                "win rate of a over b: raw {}; length-controlled {} (theta {}, phi {}, sigma {} words)",
                show(&lc.raw_win_rate),
                fmt_num(rate),
                fmt_num(theta),
                fmt_num(phi),
                fmt_num(lc.sigma)
            ),
            _ => println!(
                "win rate of a over b: raw {}; length-controlled {}",
                show(&lc.raw_win_rate),
                lc.note.as_deref().unwrap_or("not estimable")
            ),
        }
    }
    match &eo {
        Some(eo) => println!(
            "equal-opportunity gap: {} [{}, {}] (agreement when the reference prefers the longer {}, the shorter {})",
            fmt_num(eo.gap.value),
            fmt_num(eo.gap.low),
            fmt_num(eo.gap.high),
            show(&eo.agreement_reference_longer),
            show(&eo.agreement_reference_shorter)
        ),
        None => println!("equal-opportunity gap: needs `reference` labels on pairs of both kinds"),
    }
    match &position {
        Some(p) => println!(
            "position: consistency {}; first shown wins {}",
            show(&p.consistency),
            show(&p.first_position_preference)
        ),
        None => println!("position bias: needs `swapped_winner`"),
    }
    for s in &own {
        println!(
            "self-preference of {}: {} under itself vs {} under other judges, uplift {} [{}, {}]",
            s.judge,
            show(&s.own_judge_win_rate),
            show(&s.neutral_judges_win_rate),
            fmt_num(s.uplift.value),
            fmt_num(s.uplift.low),
            fmt_num(s.uplift.high)
        );
    }
    let report = json!({"judgements": judgements.len(), "length_controlled": lc, "equal_opportunity": eo,
        "position": position, "self_preference": own});
    finish(report, args.out.as_deref())
}
