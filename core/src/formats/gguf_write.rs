//! GGUF v3 writer for f32 tensors and scalar/string metadata: what graft writes (GGUF-LoRA
//! adapters). Layout as in llama.cpp's `gguf.h`: header, metadata, tensor infos (dims in ggml
//! order, innermost first), then the data, every tensor at a 32-byte aligned offset.

use std::path::Path;

const ALIGNMENT: usize = 32;
const TYPE_F32: u32 = 0;

/// A metadata value graft writes.
#[derive(Debug, Clone, PartialEq)]
pub enum MetaValue {
    U32(u32),
    F32(f32),
    String(String),
}

/// An f32 tensor: `shape` in torch order (outermost first), row-major `data`.
#[derive(Debug, Clone)]
pub struct F32Tensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

/// The bytes of a GGUF v3 file holding `meta` and `tensors`.
pub fn to_bytes(meta: &[(String, MetaValue)], tensors: &[F32Tensor]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend(b"GGUF");
    out.extend(3u32.to_le_bytes());
    out.extend((tensors.len() as u64).to_le_bytes());
    out.extend((meta.len() as u64).to_le_bytes());
    for (key, value) in meta {
        put_str(&mut out, key);
        match value {
            MetaValue::U32(v) => {
                out.extend(4u32.to_le_bytes());
                out.extend(v.to_le_bytes());
            }
            MetaValue::F32(v) => {
                out.extend(6u32.to_le_bytes());
                out.extend(v.to_le_bytes());
            }
            MetaValue::String(s) => {
                out.extend(8u32.to_le_bytes());
                put_str(&mut out, s);
            }
        }
    }
    let mut offset = 0usize;
    for t in tensors {
        put_str(&mut out, &t.name);
        out.extend((t.shape.len() as u32).to_le_bytes());
        for &d in t.shape.iter().rev() {
            out.extend((d as u64).to_le_bytes());
        }
        out.extend(TYPE_F32.to_le_bytes());
        out.extend((offset as u64).to_le_bytes());
        offset += (t.data.len() * 4).div_ceil(ALIGNMENT) * ALIGNMENT;
    }
    out.resize(out.len().div_ceil(ALIGNMENT) * ALIGNMENT, 0);
    for t in tensors {
        out.extend(t.data.iter().flat_map(|v| v.to_le_bytes()));
        out.resize(out.len().div_ceil(ALIGNMENT) * ALIGNMENT, 0);
    }
    out
}

/// Writes a GGUF file atomically (temporary sibling + rename).
///
/// # Errors
/// Any I/O failure; `path` then keeps its old content.
pub fn write(
    path: &Path,
    meta: &[(String, MetaValue)],
    tensors: &[F32Tensor],
) -> std::io::Result<()> {
    crate::atomic::write_atomic(path, &to_bytes(meta, tensors))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::gguf::{GgufFile, GgufValue};

    #[test]
    fn written_files_read_back() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("t.gguf");
        let meta = vec![
            (
                "general.type".to_string(),
                MetaValue::String("adapter".into()),
            ),
            ("adapter.lora.alpha".to_string(), MetaValue::F32(16.0)),
        ];
        let t = F32Tensor {
            name: "blk.0.attn_q.weight.lora_a".into(),
            shape: vec![2, 3],
            data: vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
        };
        let u = F32Tensor {
            name: "x".into(),
            shape: vec![5],
            data: vec![0.5; 5],
        };
        write(&path, &meta, &[t, u]).expect("write");
        let f = GgufFile::open(&path).expect("valid GGUF");
        assert_eq!(f.str("general.type").expect("string"), "adapter");
        assert_eq!(f.get("adapter.lora.alpha"), Some(&GgufValue::F32(16.0)));
        let info = f.tensor_info("blk.0.attn_q.weight.lora_a").expect("tensor");
        assert_eq!(info.torch_shape(), vec![2, 3]);
        let bytes = f.tensor_bytes(info);
        assert_eq!(
            f32::from_le_bytes([bytes[20], bytes[21], bytes[22], bytes[23]]),
            6.0
        );
        assert_eq!(
            f.tensor_bytes(f.tensor_info("x").expect("tensor")).len(),
            20
        );
    }
}
