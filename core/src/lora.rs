//! LoRA adapters (Hu et al. 2021) over the model's projections, in PEFT's vocabulary:
//! target modules are named as in HF Llama (`q_proj` … `down_proj`), `lora_A: [r, in]`,
//! `lora_B: [out, r]`, `scaling = lora_alpha / r` (rsLoRA: `lora_alpha / √r`).

use std::fmt;
use std::str::FromStr;

use burn::prelude::*;

use crate::proj::LoraWeights;

/// A projection of a decoder layer that an adapter can target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TargetModule {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl TargetModule {
    pub const ALL: [TargetModule; 7] = [
        TargetModule::Q,
        TargetModule::K,
        TargetModule::V,
        TargetModule::O,
        TargetModule::Gate,
        TargetModule::Up,
        TargetModule::Down,
    ];

    /// HF module name (`q_proj`, …).
    pub fn hf_name(self) -> &'static str {
        match self {
            TargetModule::Q => "q_proj",
            TargetModule::K => "k_proj",
            TargetModule::V => "v_proj",
            TargetModule::O => "o_proj",
            TargetModule::Gate => "gate_proj",
            TargetModule::Up => "up_proj",
            TargetModule::Down => "down_proj",
        }
    }

    /// HF parent module (`self_attn` or `mlp`).
    pub fn hf_parent(self) -> &'static str {
        match self {
            TargetModule::Q | TargetModule::K | TargetModule::V | TargetModule::O => "self_attn",
            _ => "mlp",
        }
    }

    /// llama.cpp tensor stem (`attn_q`, …, `ffn_down`).
    pub fn gguf_name(self) -> &'static str {
        match self {
            TargetModule::Q => "attn_q",
            TargetModule::K => "attn_k",
            TargetModule::V => "attn_v",
            TargetModule::O => "attn_output",
            TargetModule::Gate => "ffn_gate",
            TargetModule::Up => "ffn_up",
            TargetModule::Down => "ffn_down",
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for TargetModule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.hf_name())
    }
}

impl FromStr for TargetModule {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        TargetModule::ALL
            .into_iter()
            .find(|t| t.hf_name() == s)
            .ok_or_else(|| {
                format!(
                    "unknown target module '{s}' (Llama modules: q_proj, k_proj, v_proj, o_proj, \
                 gate_proj, up_proj, down_proj)"
                )
            })
    }
}

/// One adapter's weights for every layer and target module it covers.
#[derive(Debug, Clone)]
pub struct Adapter<B: Backend> {
    /// `layers[i][t.index()]`
    pub layers: Vec<[Option<LoraWeights<B>>; 7]>,
}

impl<B: Backend> Adapter<B> {
    /// An adapter with no modules for a model of `num_layers` layers.
    pub fn empty(num_layers: usize) -> Self {
        Adapter {
            layers: (0..num_layers).map(|_| Default::default()).collect(),
        }
    }

    pub fn get(&self, layer: usize, target: TargetModule) -> Option<&LoraWeights<B>> {
        self.layers
            .get(layer)
            .and_then(|l| l[target.index()].as_ref())
    }

    /// Bytes held by the A and B matrices (f32).
    pub fn n_bytes(&self) -> usize {
        self.layers
            .iter()
            .flatten()
            .flatten()
            .map(|l| (l.a.shape().num_elements() + l.b.shape().num_elements()) * 4)
            .sum()
    }
}
