//! Qwen2: the Llama-family decoder with biases on the q, k and v
//! projections (`model_type: "qwen2"` resolves to `qkv_bias = true` in
//! `config.rs`); the blocks and the forward pass are `llama.rs`'s. This file
//! holds what differs: nothing but the configuration, and its test.

pub use crate::llama::Model;

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::config::ModelConfig;

    #[test]
    fn qwen2_has_qkv_biases_and_no_output_bias() {
        let text = r#"{"model_type": "qwen2", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
            "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1, "rms_norm_eps": 1e-6,
            "rope_theta": 1e6, "max_position_embeddings": 32, "tie_word_embeddings": true}"#;
        let ModelConfig::Llama(c) = ModelConfig::parse(text, Path::new("config.json")).unwrap() else {
            panic!()
        };
        assert!(c.qkv_bias && !c.o_bias && c.tie_word_embeddings);
    }
}
