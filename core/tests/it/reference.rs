//! Block formats against their reference implementations: GGML dequantization equals gguf-py
//! bit for bit; NF4 (+double quantization) matches bitsandbytes.

use graft_core::quant::nf4::{dynamic_map, Nf4Scales, Nf4Tensor};
use graft_core::quant::GgmlType;
use safetensors::SafeTensors;

pub fn fixture(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// Reads every tensor of a fixture file as raw bytes.
pub fn read_fixture(name: &str) -> std::collections::BTreeMap<String, Vec<u8>> {
    let bytes = std::fs::read(fixture(name)).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(n, v)| (n, v.data().to_vec()))
        .collect()
}

pub fn f32s(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

#[test]
fn ggml_dequantization_equals_gguf_py_exactly() {
    let t = read_fixture("ggml_blocks.safetensors");
    for (name, ty) in [
        ("Q4_0", GgmlType::Q4_0),
        ("Q4_1", GgmlType::Q4_1),
        ("Q8_0", GgmlType::Q8_0),
        ("Q4_K", GgmlType::Q4_K),
        ("Q5_K", GgmlType::Q5_K),
        ("Q6_K", GgmlType::Q6_K),
        ("Q5_0", GgmlType::Q5_0),
        ("Q5_1", GgmlType::Q5_1),
        ("Q2_K", GgmlType::Q2_K),
        ("Q3_K", GgmlType::Q3_K),
        ("IQ4_NL", GgmlType::IQ4_NL),
        ("IQ4_XS", GgmlType::IQ4_XS),
        ("MXFP4", GgmlType::MXFP4),
        ("F16", GgmlType::F16),
        ("BF16", GgmlType::BF16),
    ] {
        let bytes = &t[&format!("{name}.bytes")];
        let want = f32s(&t[&format!("{name}.values")]);
        let mut got = vec![0f32; want.len()];
        ty.dequantize(bytes, &mut got);
        let bad = got
            .iter()
            .zip(&want)
            .position(|(a, b)| a.to_bits() != b.to_bits());
        assert_eq!(
            bad,
            None,
            "{name}: first mismatch at {bad:?}: {:?}",
            bad.map(|i| (got[i], want[i]))
        );
    }
}

#[test]
fn nf4_matches_bitsandbytes() {
    let t = read_fixture("nf4.safetensors");
    let w = f32s(&t["weight"]);
    assert_eq!(
        dynamic_map().to_vec(),
        f32s(&t["dynamic_map"]),
        "signed dynamic map"
    );
    assert_eq!(dynamic_map().to_vec(), f32s(&t["nested_quant_map"]));

    // Without double quantization: codes, absmax and values all exact.
    let q = Nf4Tensor::quantize(&w, false);
    assert_eq!(q.packed, t["nodq.packed"], "packed codes");
    assert_eq!(q.scales, Nf4Scales::Plain(f32s(&t["nodq.absmax"])));
    assert_eq!(q.dequantize(), f32s(&t["nodq.dequantized"]));

    // With double quantization: same 4-bit codes; absmax codes, nested scales and offset equal
    // up to the rounding of the f32 mean.
    let q = Nf4Tensor::quantize(&w, true);
    assert_eq!(q.packed, t["packed"]);
    let Nf4Scales::Double {
        codes,
        nested_absmax,
        offset,
    } = &q.scales
    else {
        panic!("double quant expected")
    };
    let want_offset = f32s(&t["nested_offset"])[0];
    assert!(
        (offset - want_offset).abs() <= 1e-7 * want_offset.abs().max(1.0),
        "{offset} vs {want_offset}"
    );
    let want_nested = f32s(&t["nested_absmax"]);
    for (a, b) in nested_absmax.iter().zip(&want_nested) {
        assert!((a - b).abs() <= 1e-6 * b.abs(), "{a} vs {b}");
    }
    let differing = codes
        .iter()
        .zip(&t["absmax"])
        .filter(|(a, b)| a != b)
        .count();
    assert!(differing <= 1, "{differing} absmax codes differ");
    let got = q.dequantize();
    let want = f32s(&t["dequantized"]);
    let d = crate::max_abs_diff(&got, &want);
    assert!(d <= 1e-6, "max |Δ| {d}");
}
