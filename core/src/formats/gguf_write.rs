//! GGUF v3 writer: metadata of every GGUF value type and tensors of any GGML type graft can
//! encode — GGUF-LoRA adapters (f32) and merged models (the base's metadata carried over, its
//! tensors re-encoded). Layout as in llama.cpp's `gguf.h`: header, metadata, tensor infos (dims
//! in ggml order, innermost first), then the data, every tensor at a 32-byte aligned offset.
//! Files are streamed to a temporary sibling and renamed into place.

use std::borrow::Cow;
use std::io::Write;
use std::path::Path;

use crate::formats::gguf::GgufValue;
use crate::quant::GgmlType;

const ALIGNMENT: u64 = 32;

/// An f32 tensor: `shape` in torch order (outermost first), row-major `data`.
#[derive(Debug, Clone)]
pub struct F32Tensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// A tensor's header entry: its data comes later, from the writer's callback.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    pub name: String,
    /// Torch order (outermost first).
    pub shape: Vec<usize>,
    pub ty: GgmlType,
}

impl TensorSpec {
    /// Bytes of the tensor's data (the innermost dimension must be whole blocks).
    pub fn n_bytes(&self) -> Option<u64> {
        let inner = *self.shape.last().unwrap_or(&1) as u64;
        if inner % self.ty.block_size() as u64 != 0 {
            return None;
        }
        self.ty
            .bytes_for(self.shape.iter().map(|&d| d as u64).product())
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

/// GGUF's value type id.
fn type_id(v: &GgufValue) -> u32 {
    match v {
        GgufValue::U8(_) => 0,
        GgufValue::I8(_) => 1,
        GgufValue::U16(_) => 2,
        GgufValue::I16(_) => 3,
        GgufValue::U32(_) => 4,
        GgufValue::I32(_) => 5,
        GgufValue::F32(_) => 6,
        GgufValue::Bool(_) => 7,
        GgufValue::String(_) => 8,
        GgufValue::Array(_) => 9,
        GgufValue::U64(_) => 10,
        GgufValue::I64(_) => 11,
        GgufValue::F64(_) => 12,
    }
}

/// A value without its type id (array elements share one, written before them).
fn put_value(out: &mut Vec<u8>, v: &GgufValue) {
    match v {
        GgufValue::U8(x) => out.push(*x),
        GgufValue::I8(x) => out.extend(x.to_le_bytes()),
        GgufValue::U16(x) => out.extend(x.to_le_bytes()),
        GgufValue::I16(x) => out.extend(x.to_le_bytes()),
        GgufValue::U32(x) => out.extend(x.to_le_bytes()),
        GgufValue::I32(x) => out.extend(x.to_le_bytes()),
        GgufValue::F32(x) => out.extend(x.to_le_bytes()),
        GgufValue::Bool(x) => out.push(u8::from(*x)),
        GgufValue::String(x) => put_str(out, x),
        GgufValue::U64(x) => out.extend(x.to_le_bytes()),
        GgufValue::I64(x) => out.extend(x.to_le_bytes()),
        GgufValue::F64(x) => out.extend(x.to_le_bytes()),
        GgufValue::Array(items) => {
            // An empty array keeps no element type in the reader; any type reads back empty.
            let elem = items.first().map_or(type_id(&GgufValue::U8(0)), type_id);
            out.extend(elem.to_le_bytes());
            out.extend((items.len() as u64).to_le_bytes());
            for item in items {
                put_value(out, item);
            }
        }
    }
}

/// A tensor list or its data that the writer refuses: a caller's mistake, named.
fn invalid(message: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidInput, message)
}

/// The header: magic, version, counts, metadata, tensor infos, padding to the data.
fn header(meta: &[(String, GgufValue)], tensors: &[TensorSpec]) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    out.extend(b"GGUF");
    out.extend(3u32.to_le_bytes());
    out.extend((tensors.len() as u64).to_le_bytes());
    out.extend((meta.len() as u64).to_le_bytes());
    for (key, value) in meta {
        put_str(&mut out, key);
        out.extend(type_id(value).to_le_bytes());
        put_value(&mut out, value);
    }
    let mut offset = 0u64;
    for t in tensors {
        let n = t.n_bytes().ok_or_else(|| {
            invalid(format!(
                "tensor {} {:?}: {:?} needs rows of whole {}-element blocks",
                t.name,
                t.shape,
                t.ty,
                t.ty.block_size()
            ))
        })?;
        put_str(&mut out, &t.name);
        out.extend((t.shape.len() as u32).to_le_bytes());
        for &d in t.shape.iter().rev() {
            out.extend((d as u64).to_le_bytes());
        }
        out.extend(t.ty.id().to_le_bytes());
        out.extend(offset.to_le_bytes());
        offset += n.div_ceil(ALIGNMENT) * ALIGNMENT;
    }
    out.resize(
        out.len().div_ceil(ALIGNMENT as usize) * ALIGNMENT as usize,
        0,
    );
    Ok(out)
}

/// Writes a GGUF file atomically, asking `data(i)` for the bytes of `tensors[i]` in order, so
/// that only one tensor's data is in memory at a time.
///
/// # Errors
/// What `data` returns; data of the wrong size or a shape that is not whole blocks
/// (`InvalidInput`); any I/O failure. `path` then keeps its old content.
pub fn write_with<'a, E: From<std::io::Error>>(
    path: &Path,
    meta: &[(String, GgufValue)],
    tensors: &[TensorSpec],
    mut data: impl FnMut(usize) -> Result<Cow<'a, [u8]>, E>,
) -> Result<(), E> {
    let head = header(meta, tensors)?;
    crate::atomic::write_atomic_with(path, |w| {
        w.write_all(&head)?;
        for (i, t) in tensors.iter().enumerate() {
            let bytes = data(i)?;
            let n = t.n_bytes().unwrap_or_default();
            if bytes.len() as u64 != n {
                return Err(invalid(format!(
                    "tensor {}: {} bytes of data, its {:?} {:?} header says {n}",
                    t.name,
                    bytes.len(),
                    t.ty,
                    t.shape
                ))
                .into());
            }
            w.write_all(&bytes)?;
            let pad = n.div_ceil(ALIGNMENT) * ALIGNMENT - n;
            w.write_all(&[0u8; ALIGNMENT as usize][..pad as usize])?;
        }
        Ok(())
    })
}

/// Writes f32 tensors and `meta` as a GGUF file, atomically.
///
/// # Errors
/// Any I/O failure; `path` then keeps its old content.
pub fn write(
    path: &Path,
    meta: &[(String, GgufValue)],
    tensors: &[F32Tensor],
) -> std::io::Result<()> {
    let specs: Vec<TensorSpec> = tensors
        .iter()
        .map(|t| TensorSpec {
            name: t.name.clone(),
            shape: t.shape.clone(),
            ty: GgmlType::F32,
        })
        .collect();
    write_with(path, meta, &specs, |i| {
        Ok::<_, std::io::Error>(Cow::Owned(
            tensors[i]
                .data
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::gguf::GgufFile;

    #[test]
    fn written_files_read_back() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("t.gguf");
        let meta = vec![
            (
                "general.type".to_string(),
                GgufValue::String("adapter".into()),
            ),
            ("adapter.lora.alpha".to_string(), GgufValue::F32(16.0)),
            (
                "tokenizer.ggml.tokens".to_string(),
                GgufValue::Array(vec![
                    GgufValue::String("a".into()),
                    GgufValue::String("bc".into()),
                ]),
            ),
            (
                "x.flags".to_string(),
                GgufValue::Array(vec![GgufValue::Bool(true), GgufValue::Bool(false)]),
            ),
            ("x.i64".to_string(), GgufValue::I64(-3)),
            ("x.f64".to_string(), GgufValue::F64(0.25)),
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
        // Every metadata value reads back as written.
        for (k, v) in &meta {
            assert_eq!(f.get(k), Some(v), "{k}");
        }
    }

    #[test]
    fn quantized_tensors_read_back_and_bad_data_is_refused() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("q.gguf");
        let x: Vec<f32> = (0..512).map(|i| (i as f32 * 0.37).sin()).collect();
        let q = GgmlType::Q8_0.quantize(&x).expect("encodable");
        let spec = TensorSpec {
            name: "w".into(),
            shape: vec![4, 128],
            ty: GgmlType::Q8_0,
        };
        write_with(&path, &[], std::slice::from_ref(&spec), |_| {
            Ok::<_, std::io::Error>(Cow::Borrowed(&q[..]))
        })
        .expect("write");
        let f = GgufFile::open(&path).expect("valid GGUF");
        let info = f.tensor_info("w").expect("tensor");
        assert_eq!(
            (info.ty, info.torch_shape()),
            (GgmlType::Q8_0, vec![4, 128])
        );
        assert_eq!(f.tensor_bytes(info), &q[..]);

        // The wrong number of bytes fails and leaves the earlier file as it was.
        let err = write_with(&path, &[], &[spec], |_| {
            Ok::<_, std::io::Error>(Cow::Owned(vec![0u8; 3]))
        })
        .expect_err("3 bytes is not 4 rows of Q8_0");
        assert!(err.to_string().contains("3 bytes"), "{err}");
        assert!(GgufFile::open(&path).is_ok());
        let partial = TensorSpec {
            name: "v".into(),
            shape: vec![2, 48],
            ty: GgmlType::Q4_0,
        };
        let err = write_with(&path, &[], &[partial], |_| {
            Ok::<_, std::io::Error>(Cow::Owned(vec![]))
        })
        .expect_err("48 columns are not whole Q4_0 blocks");
        assert!(err.to_string().contains("tensor v [2, 48]"), "{err}");
        assert_eq!(
            std::fs::read_dir(dir.path()).expect("dir").count(),
            1,
            "no temp file left"
        );
    }
}
