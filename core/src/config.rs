//! Model hyper-parameters: the HF `config.json` as serde reads it ([`HfConfig`]) and the
//! validated runtime form ([`LlamaConfig`]) that the model uses, whatever file it came from.

use serde::Deserialize;

/// Rotary-embedding frequency scaling.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Llama 3.1 "llama3" scaling (per-frequency interpolation).
    Llama3 {
        factor: f32,
        low_freq_factor: f32,
        high_freq_factor: f32,
        original_max_position: usize,
    },
    /// Positions divided by `factor`.
    Linear { factor: f32 },
    /// Per-frequency divisors given explicitly (llama.cpp's `rope_freqs.weight`).
    Factors(Vec<f32>),
}

/// Validated hyper-parameters of a Llama-family decoder.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f32,
    pub rope_scaling: Option<RopeScaling>,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// q/k/v projections carry biases (Qwen2).
    pub attention_bias: bool,
    /// llama.cpp's architecture name (`llama`, `qwen2`): what GGUF files of this model and its
    /// GGUF-LoRA adapters say in `general.architecture`.
    pub architecture: String,
}

impl LlamaConfig {
    /// Checks the relations the model relies on.
    ///
    /// # Errors
    /// A message naming the offending field and value.
    pub fn validate(&self) -> Result<(), String> {
        let positive = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_layers),
            ("num_attention_heads", self.num_heads),
            ("num_key_value_heads", self.num_kv_heads),
            ("head_dim", self.head_dim),
            ("max_position_embeddings", self.max_position_embeddings),
        ];
        for (name, v) in positive {
            if v == 0 {
                return Err(format!("{name} must be positive, got 0"));
            }
        }
        if self.num_heads % self.num_kv_heads != 0 {
            return Err(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                self.num_heads, self.num_kv_heads
            ));
        }
        if self.head_dim % 2 != 0 {
            return Err(format!(
                "head_dim {} must be even for rotary embeddings",
                self.head_dim
            ));
        }
        if !(self.rope_theta > 0.0) {
            return Err(format!(
                "rope_theta must be positive, got {}",
                self.rope_theta
            ));
        }
        if let Some(RopeScaling::Factors(f)) = &self.rope_scaling {
            if f.len() != self.head_dim / 2 {
                return Err(format!(
                    "rope frequency factors have {} entries, expected head_dim/2 = {}",
                    f.len(),
                    self.head_dim / 2
                ));
            }
        }
        Ok(())
    }

    /// Parameter count of the base model.
    pub fn n_params(&self) -> usize {
        let (h, i, kv) = (
            self.hidden_size,
            self.intermediate_size,
            self.num_kv_heads * self.head_dim,
        );
        let q = self.num_heads * self.head_dim;
        let attn = h * q + 2 * h * kv + q * h;
        let bias = if self.attention_bias { q + 2 * kv } else { 0 };
        let layer = attn + bias + 3 * h * i + 2 * h;
        let head = if self.tie_word_embeddings {
            0
        } else {
            self.vocab_size * h
        };
        self.vocab_size * h + self.num_layers * layer + h + head
    }
}

/// `config.json` of an HF Llama/Mistral/Qwen2 checkpoint (the keys graft reads; others ignored).
#[derive(Debug, Clone, Deserialize)]
pub struct HfConfig {
    #[serde(default)]
    pub architectures: Vec<String>,
    #[serde(default)]
    pub model_type: Option<String>,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default)]
    pub head_dim: Option<usize>,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "default_theta")]
    pub rope_theta: f32,
    #[serde(default)]
    pub rope_scaling: Option<serde_json::Value>,
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub hidden_act: Option<String>,
}

fn default_eps() -> f64 {
    1e-6
}
fn default_theta() -> f32 {
    10_000.0
}
fn default_max_pos() -> usize {
    2048
}

/// Model types whose decoder is the Llama block graft implements.
pub const SUPPORTED_MODEL_TYPES: [&str; 4] = ["llama", "mistral", "qwen2", "smollm"];

impl TryFrom<HfConfig> for LlamaConfig {
    type Error = String;

    fn try_from(c: HfConfig) -> Result<Self, String> {
        let model_type = c.model_type.clone().unwrap_or_else(|| "llama".into());
        if !SUPPORTED_MODEL_TYPES.contains(&model_type.as_str()) {
            return Err(format!(
                "model_type '{model_type}' is not a Llama-family architecture graft supports \
                 (supported: {})",
                SUPPORTED_MODEL_TYPES.join(", ")
            ));
        }
        if let Some(act) = &c.hidden_act {
            if act != "silu" {
                return Err(format!("hidden_act '{act}' is not supported (only 'silu')"));
            }
        }
        let rope_scaling = match &c.rope_scaling {
            None | Some(serde_json::Value::Null) => None,
            Some(v) => Some(parse_rope_scaling(v, c.max_position_embeddings)?),
        };
        let head_dim = c
            .head_dim
            .unwrap_or(c.hidden_size / c.num_attention_heads.max(1));
        let cfg = LlamaConfig {
            vocab_size: c.vocab_size,
            hidden_size: c.hidden_size,
            intermediate_size: c.intermediate_size,
            num_layers: c.num_hidden_layers,
            num_heads: c.num_attention_heads,
            num_kv_heads: c.num_key_value_heads.unwrap_or(c.num_attention_heads),
            head_dim,
            rms_norm_eps: c.rms_norm_eps,
            rope_theta: c.rope_theta,
            rope_scaling,
            max_position_embeddings: c.max_position_embeddings,
            tie_word_embeddings: c.tie_word_embeddings,
            attention_bias: c.attention_bias || model_type == "qwen2",
            architecture: if model_type == "qwen2" {
                "qwen2"
            } else {
                "llama"
            }
            .to_string(),
        };
        cfg.validate()?;
        Ok(cfg)
    }
}

fn parse_rope_scaling(v: &serde_json::Value, max_pos: usize) -> Result<RopeScaling, String> {
    let kind = v
        .get("rope_type")
        .or_else(|| v.get("type"))
        .and_then(|t| t.as_str())
        .ok_or_else(|| format!("rope_scaling {v} has no rope_type"))?;
    let num = |k: &str| {
        v.get(k)
            .and_then(|x| x.as_f64())
            .ok_or_else(|| format!("rope_scaling.{k} is missing or not a number in {v}"))
    };
    match kind {
        "default" => Ok(RopeScaling::Linear { factor: 1.0 }),
        "linear" => Ok(RopeScaling::Linear {
            factor: num("factor")? as f32,
        }),
        "llama3" => Ok(RopeScaling::Llama3 {
            factor: num("factor")? as f32,
            low_freq_factor: num("low_freq_factor")? as f32,
            high_freq_factor: num("high_freq_factor")? as f32,
            original_max_position: v
                .get("original_max_position_embeddings")
                .and_then(|x| x.as_u64())
                .map_or(max_pos, |x| x as usize),
        }),
        other => Err(format!(
            "rope_scaling type '{other}' is not supported (linear, llama3)"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn smollm() -> HfConfig {
        serde_json::from_str(
            r#"{"architectures":["LlamaForCausalLM"],"model_type":"llama","vocab_size":49152,
            "hidden_size":576,"intermediate_size":1536,"num_hidden_layers":30,
            "num_attention_heads":9,"num_key_value_heads":3,"rms_norm_eps":1e-5,
            "rope_theta":100000.0,"max_position_embeddings":8192,"tie_word_embeddings":true}"#,
        )
        .unwrap()
    }

    #[test]
    fn smollm2_parameter_count_matches_transformers() {
        let c = LlamaConfig::try_from(smollm()).unwrap();
        assert_eq!(c.head_dim, 64);
        assert_eq!(c.n_params(), 134_515_008);
    }

    #[test]
    fn bad_values_are_named() {
        let mut c = smollm();
        c.num_key_value_heads = Some(4);
        let e = LlamaConfig::try_from(c).unwrap_err();
        assert!(e.contains("num_key_value_heads 4"), "{e}");
        let mut c = smollm();
        c.model_type = Some("gpt2".into());
        assert!(LlamaConfig::try_from(c).unwrap_err().contains("'gpt2'"));
    }

    #[test]
    fn llama3_rope_scaling_parses() {
        let v = serde_json::json!({"rope_type":"llama3","factor":8.0,"low_freq_factor":1.0,
            "high_freq_factor":4.0,"original_max_position_embeddings":8192});
        assert_eq!(
            parse_rope_scaling(&v, 131072).unwrap(),
            RopeScaling::Llama3 {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position: 8192
            }
        );
    }
}
