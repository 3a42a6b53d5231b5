//! The reward-model trainer on the demo task: trained on grammar pairs
//! labelled by the true reward, it ranks held-out pairs far above chance and
//! its scores correlate with the true reward.

use std::path::Path;

use candle_core::{DType, Device};
use fdpo_model::reward::RewardModel;
use fdpo_model::{CausalLm, ModelConfig, TextTokenizer, Weights};
use fdpo_train::config::{parse_config, RewardKeys};
use fdpo_train::reward::train_reward;
use fdpo_train::task::{seeded_init, ReviewTask};
use fdpo_train::trainer::{Outcome, Quiet};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde_json::json;

fn pairs(task: &ReviewTask, n: usize, seed: u64) -> Vec<(usize, String, String)> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut out = vec![];
    while out.len() < n {
        let g = out.len() % 8;
        let (a, b) =
            (ReviewTask::text(&task.sample(g, &mut rng)), ReviewTask::text(&task.sample(g, &mut rng)));
        let (ra, rb) = (ReviewTask::reward(&a), ReviewTask::reward(&b));
        if (ra - rb).abs() > 1e-9 {
            out.push(if ra > rb { (g, a, b) } else { (g, b, a) });
        }
    }
    out
}

fn pearson(x: &[f64], y: &[f64]) -> f64 {
    let n = x.len() as f64;
    let (mx, my) = (x.iter().sum::<f64>() / n, y.iter().sum::<f64>() / n);
    let cov: f64 = x.iter().zip(y).map(|(a, b)| (a - mx) * (b - my)).sum();
    let (vx, vy): (f64, f64) =
        (x.iter().map(|a| (a - mx).powi(2)).sum(), y.iter().map(|b| (b - my).powi(2)).sum());
    cov / (vx * vy).sqrt()
}

#[test]
fn reward_model_learns_the_demo_reward() {
    let dir = std::env::temp_dir().join(format!("fdpo-rm-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let init = dir.join("init");
    ReviewTask::write_model_files(&init, 32, 2, 4).unwrap();
    let config = ModelConfig::read(&init.join("config.json")).unwrap();
    let mut weights = Weights::random(0.02, DType::F32, &Device::Cpu);
    CausalLm::build(&config, &mut weights).unwrap();
    seeded_init(&weights, 1).unwrap();
    fdpo_model::save::save_pretrained(&weights, &init, &init).unwrap();
    let task = ReviewTask::new(5);
    let prompts = task.prompts();
    let write = |name: &str, data: &[(usize, String, String)]| {
        let text: String = data
            .iter()
            .map(|(g, c, r)| {
                json!({"prompt": prompts[*g], "chosen": format!(" {c}"), "rejected": format!(" {r}")})
                    .to_string()
                    + "\n"
            })
            .collect();
        std::fs::write(dir.join(name), text).unwrap();
        dir.join(name)
    };
    let train = write("train.jsonl", &pairs(&task, 512, 1));
    let held_out = pairs(&task, 200, 2);
    let eval = write("eval.jsonl", &held_out);
    let text = format!(
        "model = {init:?}\ntrain_file = {train:?}\neval_file = {eval:?}\noutput_dir = {:?}\nlearning_rate = 3e-3\n\
         per_device_train_batch_size = 32\nnum_train_epochs = 4\nmax_length = 32\nmax_prompt_length = 16\nlogging_steps = 8\n",
        dir.join("run")
    );
    let path = dir.join("rm.toml");
    let c = parse_config::<RewardKeys>(&text, &path).unwrap();
    let summary = train_reward(&c, &Device::Cpu, false, &mut Quiet, None).unwrap();
    let Outcome::Finished { model_dir } = summary.outcome else { panic!() };
    let log = std::fs::read_to_string(dir.join("run/metrics.jsonl")).unwrap();
    let last: serde_json::Value = serde_json::from_str(log.lines().last().unwrap()).unwrap();
    assert!(last["eval_accuracy"].as_f64().unwrap() > 0.8, "{last}");

    // The saved model, loaded as a reward model, ranks the held-out pairs.
    let tokenizer = TextTokenizer::load(&model_dir).unwrap();
    let (rm, _) = RewardModel::load(&model_dir, 0, DType::F32, &Device::Cpu).unwrap();
    let ids = |g: usize, y: &str| {
        let mut r = tokenizer.encode(y, false).unwrap();
        r.push(tokenizer.eos_id().unwrap());
        (tokenizer.encode(&prompts[g], true).unwrap(), r)
    };
    let seqs: Vec<_> = held_out.iter().flat_map(|(g, c, r)| [ids(*g, c), ids(*g, r)]).collect();
    let scores = rm.score(&seqs, &Device::Cpu).unwrap();
    let right = scores.chunks(2).filter(|s| s[0] > s[1]).count() as f64 / held_out.len() as f64;
    assert!(right > 0.8, "held-out accuracy {right}");
    let truth: Vec<f64> =
        held_out.iter().flat_map(|(_, c, r)| [ReviewTask::reward(c), ReviewTask::reward(r)]).collect();
    let rho = pearson(&scores, &truth);
    assert!(rho > 0.7, "correlation with the true reward {rho}");
    assert!(Path::new(&model_dir.join("config.json")).exists());
    std::fs::remove_dir_all(&dir).unwrap();
}
