//! Half-precision base products (`Model::set_compute_dtype`): bf16 and f16 change the logits
//! by their rounding and no more, on packed (NF4) and dense bases, a sparse family's experts
//! included; f32 gives transformers' logits as before.

use graft_core::backend::GraftBackend;
use graft_core::load::{load_hf_dir, LoadOptions};
use graft_core::model::ComputeDtype;
use graft_core::quant::QuantKind;

use crate::families::{alone, case, logits_of};
use crate::max_abs_diff;
use crate::reference::fixture;

/// The logits of the first `len` tokens of a family's first prompt (all of it if shorter)
/// with the base products in `compute`, on `device`, from its safetensors loaded as `quantize`.
pub fn logits_in<Bk: GraftBackend>(
    family: &str,
    quantize: QuantKind,
    compute: ComputeDtype,
    len: usize,
    device: &Bk::Device,
) -> Vec<f32> {
    let dir = fixture(&format!("families/{family}"));
    let opts = LoadOptions {
        quantize,
        compute,
        ..LoadOptions::default()
    };
    let m = load_hf_dir::<Bk>(&dir, opts, device)
        .unwrap_or_else(|e| panic!("{family}: {e}"))
        .model;
    let prompt = &case(family).prompts[0];
    logits_of(&m, &mut [alone(&prompt[..len.min(prompt.len())], None)])
}

/// The largest |logit| of `l`.
pub fn largest(l: &[f32]) -> f32 {
    l.iter().fold(0f32, |m, v| m.max(v.abs()))
}

/// bf16 keeps 8 significant bits, f16 11: a product's relative error is about 2⁻⁸ and 2⁻¹¹,
/// and two layers of them move the logits by a few times that, relative to the largest.
pub fn bound(dtype: ComputeDtype) -> f32 {
    match dtype {
        ComputeDtype::Bf16 => 3e-2,
        _ => 5e-3,
    }
}

#[test]
fn half_precision_products_move_the_logits_by_their_rounding() {
    type Cpu = burn::backend::Flex;
    let device = Default::default();
    for (family, quantize) in [
        ("llama", QuantKind::Nf4),
        ("llama", QuantKind::Keep),
        ("qwen3_moe", QuantKind::Nf4),
    ] {
        let f32s = logits_in::<Cpu>(family, quantize, ComputeDtype::F32, usize::MAX, &device);
        let scale = largest(&f32s);
        for dtype in [ComputeDtype::Bf16, ComputeDtype::F16] {
            let half = logits_in::<Cpu>(family, quantize, dtype, usize::MAX, &device);
            let d = max_abs_diff(&half, &f32s) / scale;
            eprintln!("{family} ({quantize:?}) in {dtype}: max |Δ| / max |logit| = {d:.2e}");
            assert!(d > 0.0, "{family} {dtype}: no rounding at all");
            assert!(d <= bound(dtype), "{family} {dtype}: {d:.2e}");
        }
    }
}

/// The half type reaches the layers' projections and the experts, not the LM head nor the
/// router (bitsandbytes leaves the LM head in the model's type; a rounded router could pick
/// other experts).
#[test]
fn the_lm_head_and_the_router_stay_f32() {
    use burn::tensor::FloatDType;
    let dir = fixture("families/qwen3_moe");
    let opts = LoadOptions {
        quantize: QuantKind::Nf4,
        compute: ComputeDtype::Bf16,
        ..LoadOptions::default()
    };
    let m = load_hf_dir::<burn::backend::Flex>(&dir, opts, &Default::default())
        .expect("qwen3_moe")
        .model;
    assert_eq!(m.lm_head.compute, FloatDType::F32);
    let sparse = m
        .layers
        .iter()
        .find_map(|l| l.experts.as_ref().map(|x| (l, x)))
        .expect("a sparse layer");
    let (layer, experts) = sparse;
    assert_eq!(experts.router.compute, FloatDType::F32);
    assert_eq!(experts.experts[0].gate.compute, FloatDType::BF16);
    let q = layer.projs.iter().flatten().next().expect("a projection");
    assert_eq!(q.compute, FloatDType::BF16);
}
