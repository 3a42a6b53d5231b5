//! Loads a model directory and saves it again: `cargo run -p fdpo-model
//! --example resave -- IN OUT`. Used to check by hand that transformers
//! loads what fdpo writes (see tests/fixtures/check_saved.py).

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (src, out) = (std::path::Path::new(&args[1]), std::path::Path::new(&args[2]));
    let (_, weights) = fdpo_model::CausalLm::load(src, candle_core::DType::F32, &candle_core::Device::Cpu)
        .unwrap_or_else(|e| panic!("{e}"));
    fdpo_model::save::save_pretrained(&weights, src, out).unwrap_or_else(|e| panic!("{e}"));
}
