//! LoRA adapters (Hu et al. 2021) over the model's projections, in PEFT's vocabulary:
//! target modules are named as in HF (`q_proj` … `down_proj`, Phi-3's fused `qkv_proj` and
//! `gate_up_proj`), `lora_A: [r, in]`,
//! `lora_B: [out, r]`, `scaling = lora_alpha / r` (rsLoRA: `lora_alpha / √r`).
//!
//! On a Mixture-of-Experts layer the router and the routed experts are targets too, as PEFT's
//! `target_parameters` makes them on transformers' 3-D expert parameters: one adapter holds a
//! rank-`r` pair per expert, stacked as PEFT stores it, `lora_A: [E·r, in]` (expert `e`'s
//! rows `e·r..(e+1)·r`) and `lora_B: [out, E·r]` (expert `e`'s columns `e, e+E, e+2E, …`:
//! interleaved, not blocked). Expert `e`'s change is `scaling·B_e·A_e`; on the fused
//! `gate_up_proj` its first `I` rows change the gate and the last `I` the up projection, which
//! therefore share one `A_e`.

use std::fmt;
use std::ops::Range;
use std::str::FromStr;

use burn::prelude::*;
use burn::tensor::{DType, Distribution, FloatDType, TensorData};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

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
    /// q, k and v as one projection (Phi-3), rows in that order.
    Qkv,
    /// gate and up as one projection (Phi-3), rows in that order.
    GateUp,
    /// Multi-head Latent Attention (DeepSeek): the query's down-projection to `q_lora_rank`,
    QA,
    /// its up-projection to every head's query,
    QB,
    /// the down-projection to the shared latent (`kv_lora_rank`) and rotary key,
    KvA,
    /// and the latent's up-projection to every head's key (no rope part) and value.
    KvB,
    /// The `[1, hidden]` gate of a sparse layer's shared expert (Qwen2-MoE's
    /// `mlp.shared_expert_gate`); the shared expert's own projections are `Gate`, `Up`, `Down`.
    SharedExpertGate,
    /// A sparse layer's router, `[experts, hidden]` (transformers' `mlp.gate`).
    Router,
    /// Every routed expert's gate and up projections (transformers' 3-D
    /// `mlp.experts.gate_up_proj`): a rank-`r` pair per expert, stacked.
    ExpertsGateUp,
    /// Every routed expert's down projection (`mlp.experts.down_proj`), stacked likewise.
    ExpertsDown,
}

impl TargetModule {
    /// Number of kinds of target.
    pub const COUNT: usize = 17;

    pub const ALL: [TargetModule; Self::COUNT] = [
        TargetModule::Q,
        TargetModule::K,
        TargetModule::V,
        TargetModule::O,
        TargetModule::Gate,
        TargetModule::Up,
        TargetModule::Down,
        TargetModule::Qkv,
        TargetModule::GateUp,
        TargetModule::QA,
        TargetModule::QB,
        TargetModule::KvA,
        TargetModule::KvB,
        TargetModule::SharedExpertGate,
        TargetModule::Router,
        TargetModule::ExpertsGateUp,
        TargetModule::ExpertsDown,
    ];

    /// The targets that are linear modules, PEFT's `"all-linear"` (on an MoE model the router
    /// and experts are parameters, targeted only by name; a shared expert's gate is linear).
    pub fn linear() -> &'static [TargetModule] {
        &Self::ALL[..14]
    }

    /// The name in configs and in parameter names: the HF module name (`q_proj`, …) or, for
    /// an MoE layer's parameters, `router`, `experts.gate_up_proj`, `experts.down_proj`.
    pub fn name(self) -> &'static str {
        match self {
            TargetModule::Router => "router",
            TargetModule::ExpertsGateUp => "experts.gate_up_proj",
            TargetModule::ExpertsDown => "experts.down_proj",
            t => t.hf_name(),
        }
    }

    /// Whether the adapter holds one pair per routed expert, stacked.
    pub fn per_expert(self) -> bool {
        matches!(
            self,
            TargetModule::ExpertsGateUp | TargetModule::ExpertsDown
        )
    }

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
            TargetModule::Qkv => "qkv_proj",
            TargetModule::GateUp => "gate_up_proj",
            TargetModule::QA => "q_a_proj",
            TargetModule::QB => "q_b_proj",
            TargetModule::KvA => "kv_a_proj_with_mqa",
            TargetModule::KvB => "kv_b_proj",
            TargetModule::SharedExpertGate => "shared_expert_gate",
            TargetModule::Router => "gate",
            TargetModule::ExpertsGateUp | TargetModule::ExpertsDown => "experts",
        }
    }

    /// HF parent module (`self_attn` or `mlp`).
    pub fn hf_parent(self) -> &'static str {
        match self {
            TargetModule::Q
            | TargetModule::K
            | TargetModule::V
            | TargetModule::O
            | TargetModule::Qkv
            | TargetModule::QA
            | TargetModule::QB
            | TargetModule::KvA
            | TargetModule::KvB => "self_attn",
            _ => "mlp",
        }
    }

    /// llama.cpp tensor stem (`attn_q`, …, `ffn_down`; Phi-3's fused gate/up is `ffn_up`, so
    /// `Up` and `GateUp` share a name: a model has one or the other).
    pub fn gguf_name(self) -> &'static str {
        match self {
            TargetModule::Q => "attn_q",
            TargetModule::K => "attn_k",
            TargetModule::V => "attn_v",
            TargetModule::O => "attn_output",
            TargetModule::Gate => "ffn_gate",
            TargetModule::Up => "ffn_up",
            TargetModule::Down => "ffn_down",
            TargetModule::Qkv => "attn_qkv",
            TargetModule::GateUp => "ffn_up",
            TargetModule::QA => "attn_q_a",
            TargetModule::QB => "attn_q_b",
            TargetModule::KvA => "attn_kv_a_mqa",
            // llama.cpp's converter now splits it into `attn_k_b` and `attn_v_b`.
            TargetModule::KvB => "attn_kv_b",
            TargetModule::SharedExpertGate => "ffn_gate_inp_shexp",
            TargetModule::Router => "ffn_gate_inp",
            TargetModule::ExpertsGateUp => "ffn_gate_up_exps",
            TargetModule::ExpertsDown => "ffn_down_exps",
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for TargetModule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

crate::serde_as_str!(TargetModule);

impl FromStr for TargetModule {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        // PEFT names the experts' parameters with their parent (`mlp.experts.down_proj`).
        let s = s.strip_prefix("mlp.").unwrap_or(s);
        TargetModule::ALL
            .into_iter()
            .find(|t| t.name() == s)
            .ok_or_else(|| {
                format!(
                    "unknown target module '{s}' (modules: q_proj, k_proj, v_proj, o_proj, \
                     gate_proj, up_proj, down_proj, Phi-3's qkv_proj, gate_up_proj, \
                     DeepSeek's q_a_proj, q_b_proj, kv_a_proj_with_mqa, kv_b_proj, and on MoE \
                     models router, experts.gate_up_proj, experts.down_proj and \
                     shared_expert_gate)"
                )
            })
    }
}

/// A low-rank adapter for one projection.
#[derive(Debug, Clone)]
pub struct LoraWeights<B: Backend> {
    /// `[r, in]`
    pub a: Tensor<B, 2>,
    /// `[out, r]`
    pub b: Tensor<B, 2>,
    /// `lora_alpha / r` (or `lora_alpha / √r` with rsLoRA).
    pub scale: f32,
    /// Dropout probability on the adapter's input; applied only when the backend records
    /// gradients (training).
    pub dropout: f32,
    /// 1, or the number of routed experts whose pairs `a` and `b` stack (module docs).
    pub experts: usize,
}

impl<B: Backend> LoraWeights<B> {
    /// The rank `r` (of each expert's pair, for a per-expert adapter).
    pub fn rank(&self) -> usize {
        self.a.dims()[0] / self.experts.max(1)
    }

    /// `scale·(x·Aᵀ)·Bᵀ`.
    ///
    /// # Shapes
    /// `x: [n, in]` → `[n, out]`
    pub fn delta(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        let (a, b) = (f32_of(&self.a), f32_of(&self.b));
        let x = if self.dropout > 0.0 && B::ad_enabled(&x.device()) {
            let keep = 1.0 - f64::from(self.dropout);
            let mask = x.random_like(Distribution::Bernoulli(keep));
            x * mask.div_scalar(keep)
        } else {
            x
        };
        x.matmul(a.transpose())
            .matmul(b.transpose())
            .mul_scalar(self.scale)
    }

    /// The pair with `A` and `B` stored as `dtype`.
    pub fn stored_as(self, dtype: AdapterDtype) -> Self {
        let to = match dtype {
            AdapterDtype::F32 => FloatDType::F32,
            AdapterDtype::Bf16 => FloatDType::BF16,
        };
        LoraWeights {
            a: self.a.cast(to),
            b: self.b.cast(to),
            ..self
        }
    }
}

/// `t` in f32 (a pair stored in bf16 is computed in f32).
fn f32_of<B: Backend>(t: &Tensor<B, 2>) -> Tensor<B, 2> {
    match t.dtype() {
        DType::F32 => t.clone(),
        _ => t.clone().cast(FloatDType::F32),
    }
}

/// How a served adapter's `A` and `B` are kept in memory. bf16 halves their memory and the
/// bytes each token reads (as vLLM serves adapters in the model's 16-bit type); the adapter
/// term is still computed in f32. Training keeps f32.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum AdapterDtype {
    #[default]
    F32,
    Bf16,
}

impl FromStr for AdapterDtype {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "f32" => Ok(AdapterDtype::F32),
            "bf16" => Ok(AdapterDtype::Bf16),
            other => Err(format!(
                "unknown adapter dtype '{other}' (expected 'f32' or 'bf16')"
            )),
        }
    }
}

crate::serde_as_str!(AdapterDtype);

impl fmt::Display for AdapterDtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AdapterDtype::F32 => "f32",
            AdapterDtype::Bf16 => "bf16",
        })
    }
}

impl<B: Backend> LoraWeights<B> {
    /// Expert `e`'s own pair out of a stacked per-expert adapter (module docs), restricted to
    /// the output rows `rows`: `A_e: [r, in]`, `B_e[rows]: [rows, r]`.
    pub fn expert(&self, e: usize, rows: Range<usize>) -> LoraWeights<B> {
        let [_, cols] = self.a.dims();
        let [out, _] = self.b.dims();
        let (r, experts) = (self.rank(), self.experts);
        let a = self.a.clone().slice([e * r..(e + 1) * r, 0..cols]);
        let b = self
            .b
            .clone()
            .reshape([out, r, experts])
            .slice([rows.clone(), 0..r, e..e + 1])
            .reshape([rows.len(), r]);
        LoraWeights {
            a,
            b,
            scale: self.scale,
            dropout: self.dropout,
            experts: 1,
        }
    }
}

/// Which adapter (if any) applies to each contiguous run of rows.
pub type RowAdapters<'a, B> = [(Range<usize>, Option<&'a LoraWeights<B>>)];

/// One adapter's weights for every layer and target module it covers.
#[derive(Debug, Clone)]
pub struct Adapter<B: Backend> {
    /// `layers[i][t.index()]`
    pub layers: Vec<[Option<LoraWeights<B>>; TargetModule::COUNT]>,
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

    /// Bytes held by the A and B matrices.
    pub fn n_bytes(&self) -> usize {
        self.layers
            .iter()
            .flatten()
            .flatten()
            .map(|l| {
                l.a.shape().num_elements() * l.a.dtype().size()
                    + l.b.shape().num_elements() * l.b.dtype().size()
            })
            .sum()
    }

    /// The adapter with every pair stored as `dtype` ([`AdapterDtype`]).
    pub fn stored_as(self, dtype: AdapterDtype) -> Self {
        Adapter {
            layers: self
                .layers
                .into_iter()
                .map(|l| l.map(|m| m.map(|w| w.stored_as(dtype))))
                .collect(),
        }
    }
}

/// The hyper-parameters of a LoRA adapter (PEFT's `LoraConfig` names).
#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    /// Rank `r` (≥ 1).
    pub r: usize,
    /// `lora_alpha`; the update is scaled by `lora_alpha / r` (`/ √r` with rsLoRA).
    pub lora_alpha: f32,
    /// Dropout on the adapter's input during training (`lora_dropout`), in `[0, 1)`.
    pub lora_dropout: f32,
    /// Projections that get an adapter, in every layer.
    pub target_modules: Vec<TargetModule>,
    /// rsLoRA scaling (`use_rslora`).
    pub use_rslora: bool,
}

impl LoraConfig {
    /// The factor applied to `B·A`.
    pub fn scale(&self) -> f32 {
        if self.use_rslora {
            self.lora_alpha / (self.r as f32).sqrt()
        } else {
            self.lora_alpha / self.r as f32
        }
    }
}

/// The shape of one module's adapter: `lora_A: [experts·r, in]`, `lora_B: [out, experts·r]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoraShape {
    pub layer: usize,
    pub target: TargetModule,
    pub out_features: usize,
    pub in_features: usize,
    /// 1, or the number of routed experts for a per-expert target.
    pub experts: usize,
}

impl LoraShape {
    /// `(lora_A, lora_B)` shapes at rank `r` (per expert).
    pub fn dims(&self, r: usize) -> ([usize; 2], [usize; 2]) {
        let rows = self.experts * r;
        ([rows, self.in_features], [self.out_features, rows])
    }
}

impl<B: Backend> Adapter<B> {
    /// A fresh adapter initialized as PEFT does by default (`init_lora_weights=True`): `A`
    /// kaiming-uniform with `a = √5`, i.e. uniform in `±1/√in`, and `B = 0`, so the adapter
    /// starts as a no-op. `shapes` lists the modules to adapt in layer then target order
    /// (`Model::adapter_shapes`); the values come from a ChaCha8 stream seeded with `seed`,
    /// drawn in that order (they differ from torch's generator).
    pub fn init_peft(
        num_layers: usize,
        shapes: &[LoraShape],
        config: &LoraConfig,
        seed: u64,
        device: &B::Device,
    ) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut adapter = Adapter::empty(num_layers);
        for s in shapes {
            let (a_dims, b_dims) = s.dims(config.r);
            let bound = 1.0 / (s.in_features as f32).sqrt();
            let a: Vec<f32> = (0..a_dims[0] * a_dims[1])
                .map(|_| rng.random_range(-bound..bound))
                .collect();
            adapter.layers[s.layer][s.target.index()] = Some(LoraWeights {
                a: Tensor::from_data(TensorData::new(a, a_dims), device),
                b: Tensor::zeros(b_dims, device),
                scale: config.scale(),
                dropout: config.lora_dropout,
                experts: s.experts,
            });
        }
        adapter
    }

    /// Every (layer, target, weights) the adapter covers, in layer then target order.
    pub fn modules(&self) -> impl Iterator<Item = (usize, TargetModule, &LoraWeights<B>)> {
        self.layers.iter().enumerate().flat_map(|(li, l)| {
            TargetModule::ALL
                .into_iter()
                .filter_map(move |t| l[t.index()].as_ref().map(|w| (li, t, w)))
        })
    }

    /// The same values outside any autodiff graph and not tracked, so nothing computed from
    /// them is recorded (a no-op on a backend without autodiff).
    pub fn detached(&self) -> Self {
        let detach = |w: &LoraWeights<B>| LoraWeights {
            a: w.a.clone().detach().set_require_grad(false),
            b: w.b.clone().detach().set_require_grad(false),
            ..w.clone()
        };
        Adapter {
            layers: self
                .layers
                .iter()
                .map(|l| l.each_ref().map(|w| w.as_ref().map(detach)))
                .collect(),
        }
    }

    /// Number of trainable values (A and B).
    pub fn n_params(&self) -> usize {
        self.modules()
            .map(|(_, _, w)| w.a.shape().num_elements() + w.b.shape().num_elements())
            .sum()
    }
}
