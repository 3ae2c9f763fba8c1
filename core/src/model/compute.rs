//! The float type of the base projections' products, as configs and flags name it
//! (`train.compute_dtype`, `--compute-dtype`).

use burn::tensor::FloatDType;

/// What each projection's base product runs in ([`crate::model::Model::set_compute_dtype`]).
///
/// A half type rounds a layer projection's input to it and runs the product in it: on a GPU,
/// the packed base is dequantized to it for the device's half-precision GEMM (bitsandbytes'
/// `bnb_4bit_compute_dtype`); on the CPU the kernels keep their f32 arithmetic on the rounded
/// values (no speed-up there; a dense base is cast per product, slower). The LM head, MoE
/// routers, the adapter terms and their parameters (the master weights), norms, rope,
/// attention, the residual stream and the loss stay f32.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum ComputeDtype {
    /// f32: the reference numerics the parity tests hold graft to.
    #[default]
    F32,
    /// bfloat16 (8 significant bits, f32's range): QLoRA's usual compute type.
    Bf16,
    /// float16 (11 significant bits, range to 65504): GPUs without bf16, and WGSL.
    F16,
}

impl ComputeDtype {
    /// As burn's float type.
    pub fn dtype(self) -> FloatDType {
        match self {
            ComputeDtype::F32 => FloatDType::F32,
            ComputeDtype::Bf16 => FloatDType::BF16,
            ComputeDtype::F16 => FloatDType::F16,
        }
    }
}

impl std::str::FromStr for ComputeDtype {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "f32" => Ok(ComputeDtype::F32),
            "bf16" => Ok(ComputeDtype::Bf16),
            "f16" => Ok(ComputeDtype::F16),
            other => Err(format!(
                "unknown compute dtype '{other}' (expected 'f32', 'bf16' or 'f16')"
            )),
        }
    }
}

impl std::fmt::Display for ComputeDtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ComputeDtype::F32 => "f32",
            ComputeDtype::Bf16 => "bf16",
            ComputeDtype::F16 => "f16",
        })
    }
}

crate::serde_as_str!(ComputeDtype);
