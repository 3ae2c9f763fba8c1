//! The model families graft runs, and what sets each apart from Llama — the one place that
//! matches on the family. Config readers (`load::hf_config`, `load::gguf`) ask a [`Family`]
//! for its defaults and names and produce a [`super::ModelConfig`]; everything after them reads
//! only that description. Each family is a small difference against Llama, as transformers'
//! `modular_*.py` files and llama.cpp's graph builders describe them.

use std::fmt;

use super::config::{Activation, NormPlacement, QkNorm};

/// A decoder family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Family {
    /// Llama 2/3, SmolLM, and anything with the Llama block.
    Llama,
    /// Llama with a sliding window on every layer.
    Mistral,
    /// Llama with q/k/v biases and an untied head.
    Qwen2,
    /// Llama with per-head q/k RMSNorm and no biases.
    Qwen3,
    /// Sandwich norms with `(1 + w)` weights, GELU-tanh, scaled embeddings, soft-capping,
    /// alternating sliding-window and global layers.
    Gemma2,
    /// Gemma 2 without soft-capping, with per-head q/k norm, a 5:1 local/global pattern and a
    /// separate rope base for local layers.
    Gemma3,
    /// Fused `qkv_proj` and `gate_up_proj`, partial rotary, longrope.
    Phi3,
    /// Norms after attention and MLP instead of before, q/k RMSNorm over the whole projection.
    Olmo2,
    /// Mistral's attention with routed experts (softmax top-k, renormalized) for the MLP;
    /// llama.cpp writes it as `llama` with an expert count.
    Mixtral,
    /// Qwen3's attention with routed experts (`norm_topk_prob`, dense layers by
    /// `mlp_only_layers` / `decoder_sparse_step`).
    Qwen3Moe,
    /// Pre-norm layers with q/k RMSNorm over the whole projection and routed experts (softmax
    /// top-k, not renormalized by default).
    Olmoe,
    /// Qwen2's attention (q/k/v biases) with routed experts (softmax top-k, not renormalized)
    /// and a shared expert scaled by a sigmoid gate.
    Qwen2Moe,
    /// Multi-head Latent Attention, dense layers first, then sigmoid-scored experts chosen
    /// within the best groups (with a per-expert bias) beside an ungated shared expert;
    /// llama.cpp's `deepseek2`.
    DeepseekV3,
    /// Biased attention with sinks, alternating sliding-window and full layers, YaRN; routed
    /// experts with biases and the clamped SwiGLU, chosen by a biased router.
    GptOss,
}

/// Which layers use the sliding window when a config does not list them (`layer_types`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlidingPattern {
    /// Every layer (Mistral).
    All,
    /// Layer `i` slides unless `(i + 1) % n == 0` (Gemma 2: `n = 2`, Gemma 3: `n = 6`).
    AllBut(usize),
}

impl Family {
    pub const ALL: [Family; 14] = [
        Family::Llama,
        Family::Mistral,
        Family::Qwen2,
        Family::Qwen3,
        Family::Gemma2,
        Family::Gemma3,
        Family::Phi3,
        Family::Olmo2,
        Family::Mixtral,
        Family::Qwen3Moe,
        Family::Olmoe,
        Family::Qwen2Moe,
        Family::DeepseekV3,
        Family::GptOss,
    ];

    /// From `config.json`'s `model_type`.
    pub fn from_model_type(t: &str) -> Option<Family> {
        Some(match t {
            "llama" | "smollm" => Family::Llama,
            "mistral" => Family::Mistral,
            "qwen2" => Family::Qwen2,
            "qwen3" => Family::Qwen3,
            "gemma2" => Family::Gemma2,
            "gemma3" | "gemma3_text" => Family::Gemma3,
            "phi3" => Family::Phi3,
            "olmo2" => Family::Olmo2,
            "mixtral" => Family::Mixtral,
            "qwen3_moe" => Family::Qwen3Moe,
            "olmoe" => Family::Olmoe,
            "qwen2_moe" => Family::Qwen2Moe,
            "deepseek_v3" => Family::DeepseekV3,
            "gpt_oss" => Family::GptOss,
            _ => return None,
        })
    }

    /// From GGUF's `general.architecture` (llama.cpp writes Mistral models as `llama`, and
    /// Mixtral as `llama` with `llama.expert_count`: see [`Family::with_experts`]).
    pub fn from_gguf_arch(a: &str) -> Option<Family> {
        Some(match a {
            "llama" => Family::Llama,
            "qwen2" => Family::Qwen2,
            "qwen3" => Family::Qwen3,
            "gemma2" => Family::Gemma2,
            "gemma3" => Family::Gemma3,
            "phi3" => Family::Phi3,
            "olmo2" => Family::Olmo2,
            "qwen3moe" => Family::Qwen3Moe,
            "olmoe" => Family::Olmoe,
            "qwen2moe" => Family::Qwen2Moe,
            "deepseek2" => Family::DeepseekV3,
            "gpt-oss" => Family::GptOss,
            _ => return None,
        })
    }

    /// The family of a GGUF file of this architecture that has routed experts (`llama` with
    /// experts is Mixtral).
    pub fn with_experts(self) -> Family {
        match self {
            Family::Llama => Family::Mixtral,
            f => f,
        }
    }

    /// Whether the family's MLP is routed experts.
    pub fn is_moe(self) -> bool {
        matches!(
            self,
            Family::Mixtral
                | Family::Qwen3Moe
                | Family::Olmoe
                | Family::Qwen2Moe
                | Family::DeepseekV3
                | Family::GptOss
        )
    }

    /// transformers' module of a sparse layer's shared expert (under `mlp`), for the families
    /// that have one.
    pub fn hf_shared_expert(self) -> Option<&'static str> {
        match self {
            Family::Qwen2Moe => Some("shared_expert"),
            Family::DeepseekV3 => Some("shared_experts"),
            _ => None,
        }
    }

    /// The key of `config.json` that switches the q/k/v biases (Qwen2-MoE's `qkv_bias`).
    pub fn attention_bias_key(self) -> &'static str {
        match self {
            Family::Qwen2Moe => "qkv_bias",
            _ => "attention_bias",
        }
    }

    /// Whether the chosen experts' weights are renormalized when the config does not say
    /// (`norm_topk_prob`; what llama.cpp hard-codes per architecture for GGUF files).
    pub fn default_norm_topk(self) -> bool {
        match self {
            // Mixtral always renormalizes; llama.cpp does for qwen3moe (transformers' class
            // default is false, but Qwen3-MoE checkpoints set it).
            // GPT-OSS takes the softmax of the top-k logits: renormalized probabilities.
            // (deepseek2 files say it with expert_weights_norm; llama.cpp's default is false.)
            Family::Mixtral | Family::Qwen3Moe | Family::GptOss => true,
            _ => false,
        }
    }

    /// transformers' module of a layer's routed experts and their router, and the names of
    /// an expert's gate, up and down projections in the checkpoint.
    pub fn hf_experts(self) -> (&'static str, [&'static str; 3]) {
        match self {
            Family::Mixtral => ("block_sparse_moe", ["w1", "w3", "w2"]),
            _ => ("mlp", ["gate_proj", "up_proj", "down_proj"]),
        }
    }

    /// The module name of a sparse layer's router under the experts' module (GPT-OSS:
    /// `mlp.router`).
    pub fn hf_router(self) -> &'static str {
        match self {
            Family::GptOss => "router",
            _ => "gate",
        }
    }

    /// YaRN rounds its correction range outward unless the config says otherwise; GPT-OSS's
    /// does not (`truncate: false`), and its GGUF files have no key for it.
    pub fn yarn_truncates(self) -> bool {
        self != Family::GptOss
    }

    /// Attention sinks: a learned logit per head that joins every softmax (GPT-OSS).
    pub fn has_sinks(self) -> bool {
        self == Family::GptOss
    }

    /// `model_type` in `config.json`.
    pub fn model_type(self) -> &'static str {
        match self {
            Family::Llama => "llama",
            Family::Mistral => "mistral",
            Family::Qwen2 => "qwen2",
            Family::Qwen3 => "qwen3",
            Family::Gemma2 => "gemma2",
            Family::Gemma3 => "gemma3_text",
            Family::Phi3 => "phi3",
            Family::Olmo2 => "olmo2",
            Family::Mixtral => "mixtral",
            Family::Qwen3Moe => "qwen3_moe",
            Family::Olmoe => "olmoe",
            Family::Qwen2Moe => "qwen2_moe",
            Family::DeepseekV3 => "deepseek_v3",
            Family::GptOss => "gpt_oss",
        }
    }

    /// The transformers class in `config.json`'s `architectures`.
    pub fn hf_architecture(self) -> &'static str {
        match self {
            Family::Llama => "LlamaForCausalLM",
            Family::Mistral => "MistralForCausalLM",
            Family::Qwen2 => "Qwen2ForCausalLM",
            Family::Qwen3 => "Qwen3ForCausalLM",
            Family::Gemma2 => "Gemma2ForCausalLM",
            Family::Gemma3 => "Gemma3ForCausalLM",
            Family::Phi3 => "Phi3ForCausalLM",
            Family::Olmo2 => "Olmo2ForCausalLM",
            Family::Mixtral => "MixtralForCausalLM",
            Family::Qwen3Moe => "Qwen3MoeForCausalLM",
            Family::Olmoe => "OlmoeForCausalLM",
            Family::Qwen2Moe => "Qwen2MoeForCausalLM",
            Family::DeepseekV3 => "DeepseekV3ForCausalLM",
            Family::GptOss => "GptOssForCausalLM",
        }
    }

    /// llama.cpp's architecture name.
    pub fn gguf_arch(self) -> &'static str {
        match self {
            Family::Llama | Family::Mistral | Family::Mixtral => "llama",
            Family::Qwen2 => "qwen2",
            Family::Qwen3 => "qwen3",
            Family::Gemma2 => "gemma2",
            Family::Gemma3 => "gemma3",
            Family::Phi3 => "phi3",
            Family::Olmo2 => "olmo2",
            Family::Qwen3Moe => "qwen3moe",
            Family::Olmoe => "olmoe",
            Family::Qwen2Moe => "qwen2moe",
            Family::DeepseekV3 => "deepseek2",
            Family::GptOss => "gpt-oss",
        }
    }

    /// llama.cpp stores q/k rows permuted for its adjacent-pair rope (`LlamaModel.permute`).
    pub fn gguf_permutes_qk(self) -> bool {
        matches!(self, Family::Llama | Family::Mistral | Family::Mixtral)
    }

    pub fn norm_placement(self) -> NormPlacement {
        match self {
            Family::Gemma2 | Family::Gemma3 => NormPlacement::Sandwich,
            Family::Olmo2 => NormPlacement::Post,
            _ => NormPlacement::Pre,
        }
    }

    pub fn qk_norm(self) -> QkNorm {
        match self {
            Family::Qwen3 | Family::Qwen3Moe | Family::Gemma3 => QkNorm::PerHead,
            Family::Olmo2 | Family::Olmoe => QkNorm::Full,
            _ => QkNorm::None,
        }
    }

    /// HF checkpoints store RMSNorm weights as `w` in `x·(offset + w)` (Gemma: 1); llama.cpp's
    /// converter adds the offset into the GGUF weight.
    pub fn hf_norm_offset(self) -> f32 {
        match self {
            Family::Gemma2 | Family::Gemma3 => 1.0,
            _ => 0.0,
        }
    }

    pub fn activation(self) -> Activation {
        match self {
            Family::Gemma2 | Family::Gemma3 => Activation::GeluTanh,
            _ => Activation::Silu,
        }
    }

    pub fn fused_projections(self) -> bool {
        self == Family::Phi3
    }

    /// Embeddings are multiplied by `√hidden_size`.
    pub fn scales_embeddings(self) -> bool {
        matches!(self, Family::Gemma2 | Family::Gemma3)
    }

    /// `tie_word_embeddings` when `config.json` does not say (transformers' class default).
    pub fn default_tied_embeddings(self) -> bool {
        matches!(self, Family::Gemma2 | Family::Gemma3)
    }

    /// `hidden_act` (or Gemma's `hidden_activation`) when `config.json` does not say.
    pub fn default_hidden_act(self) -> &'static str {
        match self.activation() {
            Activation::Silu => "silu",
            Activation::GeluTanh => "gelu_pytorch_tanh",
        }
    }

    /// q/k/v biases when `config.json` does not say (`attention_bias`).
    pub fn default_attention_bias(self) -> bool {
        matches!(self, Family::Qwen2 | Family::Qwen2Moe | Family::GptOss)
    }

    /// Whether `config.json`'s `sliding_window` applies when `use_sliding_window` is absent
    /// (transformers' Qwen2/Qwen3 default it to off).
    pub fn sliding_window_by_default(self) -> bool {
        !matches!(
            self,
            Family::Qwen2 | Family::Qwen3 | Family::Qwen3Moe | Family::Qwen2Moe
        )
    }

    /// The layers with a sliding window when the config gives a window but no per-layer list.
    pub fn sliding_pattern(self) -> SlidingPattern {
        match self {
            Family::Gemma2 | Family::GptOss => SlidingPattern::AllBut(2),
            Family::Gemma3 => SlidingPattern::AllBut(6),
            _ => SlidingPattern::All,
        }
    }

    /// The `query_pre_attn_scalar` llama.cpp uses for a GGUF file, which has no key for it:
    /// `head_dim`, except for the Gemma 27B models (Gemma 2: 46 layers, Gemma 3: 62), whose
    /// scalar is `hidden / heads`.
    pub fn gguf_query_scale_dim(
        self,
        num_layers: usize,
        hidden: usize,
        heads: usize,
        head_dim: usize,
    ) -> usize {
        match (self, num_layers) {
            (Family::Gemma2, 46) | (Family::Gemma3, 62) => hidden / heads.max(1),
            _ => head_dim,
        }
    }

    /// Rope types this family's `config.json` uses for its longrope (Phi-3: the early "su"
    /// and "yarn", which transformers renames).
    pub fn longrope_aliases(self) -> &'static [&'static str] {
        match self {
            Family::Phi3 => &["su", "yarn"],
            _ => &[],
        }
    }

    /// Local (sliding) layers have their own rope base and no rope scaling (Gemma 3:
    /// `rope_local_base_freq`, llama.cpp: 10 000).
    pub fn local_rope_base(self) -> Option<f32> {
        (self == Family::Gemma3).then_some(10_000.0)
    }
}

impl SlidingPattern {
    /// Whether layer `i` slides.
    pub fn slides(self, i: usize) -> bool {
        match self {
            SlidingPattern::All => true,
            SlidingPattern::AllBut(n) => (i + 1) % n != 0,
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.model_type())
    }
}

/// The `model_type`s graft reads, for error messages.
pub fn supported_model_types() -> String {
    Family::ALL
        .iter()
        .map(|f| f.model_type())
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for f in Family::ALL {
            assert_eq!(Family::from_model_type(f.model_type()), Some(f));
            let back = Family::from_gguf_arch(f.gguf_arch()).unwrap();
            // Mistral files are written as llama by llama.cpp, Mixtral as llama with experts.
            assert_eq!(back.gguf_arch(), f.gguf_arch());
            if f.is_moe() {
                assert_eq!(back.with_experts(), f);
            }
        }
    }

    #[test]
    fn gemma_patterns_match_transformers() {
        // transformers: Gemma 2 `layer_types[i] = sliding if (i + 1) % 2`; Gemma 3 with 6.
        let g2: Vec<bool> = (0..4)
            .map(|i| Family::Gemma2.sliding_pattern().slides(i))
            .collect();
        assert_eq!(g2, [true, false, true, false]);
        let g3: Vec<bool> = (0..7)
            .map(|i| Family::Gemma3.sliding_pattern().slides(i))
            .collect();
        assert_eq!(g3, [true, true, true, true, true, false, true]);
    }
}
