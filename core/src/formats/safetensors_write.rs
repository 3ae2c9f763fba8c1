//! Writes an HF checkpoint's weights as transformers saves them: `model.safetensors`, or shards
//! `model-0000i-of-0000n.safetensors` with `model.safetensors.index.json` once the data passes
//! the shard size. Each file's header is the `safetensors` crate's own [`Metadata`]; the data
//! is streamed one tensor at a time and every file written atomically.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::str::FromStr;

use safetensors::tensor::{Metadata, TensorInfo};
use safetensors::Dtype;

use crate::quant::GgmlType;

/// A floating-point dtype of the written weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FloatDtype {
    F32,
    F16,
    BF16,
}

impl FloatDtype {
    /// The float dtype a safetensors dtype is, if it is one of these.
    pub fn from_safetensors(d: Dtype) -> Option<Self> {
        match d {
            Dtype::F32 => Some(FloatDtype::F32),
            Dtype::F16 => Some(FloatDtype::F16),
            Dtype::BF16 => Some(FloatDtype::BF16),
            _ => None,
        }
    }

    pub fn safetensors(self) -> Dtype {
        match self {
            FloatDtype::F32 => Dtype::F32,
            FloatDtype::F16 => Dtype::F16,
            FloatDtype::BF16 => Dtype::BF16,
        }
    }

    /// transformers' `torch_dtype` name.
    pub fn torch_name(self) -> &'static str {
        match self {
            FloatDtype::F32 => "float32",
            FloatDtype::F16 => "float16",
            FloatDtype::BF16 => "bfloat16",
        }
    }

    /// Little-endian bytes of `x` in this dtype (round to nearest even).
    pub fn encode(self, x: &[f32]) -> Vec<u8> {
        let ty = match self {
            FloatDtype::F32 => GgmlType::F32,
            FloatDtype::F16 => GgmlType::F16,
            FloatDtype::BF16 => GgmlType::BF16,
        };
        ty.quantize(x)
            .unwrap_or_else(|_| unreachable!("float types encode any length"))
    }

    pub fn size(self) -> usize {
        match self {
            FloatDtype::F32 => 4,
            FloatDtype::F16 | FloatDtype::BF16 => 2,
        }
    }
}

impl FromStr for FloatDtype {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "f32" | "float32" => Ok(FloatDtype::F32),
            "f16" | "float16" => Ok(FloatDtype::F16),
            "bf16" | "bfloat16" => Ok(FloatDtype::BF16),
            other => Err(format!(
                "unknown dtype '{other}' (expected f32, f16 or bf16)"
            )),
        }
    }
}

/// One tensor to write: its data comes later, from the writer's callback.
#[derive(Debug, Clone)]
pub struct SafetensorSpec {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
}

impl SafetensorSpec {
    pub fn n_bytes(&self) -> usize {
        self.shape.iter().product::<usize>() * self.dtype.bitsize() / 8
    }
}

/// HF's index of a sharded checkpoint.
#[derive(serde::Serialize)]
struct ShardIndex<'a> {
    metadata: BTreeMap<&'static str, u64>,
    weight_map: BTreeMap<&'a str, String>,
}

/// Writes `tensors` into `dir`, at most `max_shard_bytes` of data per file (a tensor larger
/// than that gets a file of its own), asking `data(i)` for the bytes of `tensors[i]`; returns
/// the files written.
///
/// # Errors
/// What `data` returns, data of the wrong size (`InvalidInput`), any I/O failure.
pub fn write_sharded<'a, E: From<std::io::Error>>(
    dir: &Path,
    tensors: &[SafetensorSpec],
    max_shard_bytes: usize,
    mut data: impl FnMut(usize) -> Result<Cow<'a, [u8]>, E>,
) -> Result<Vec<String>, E> {
    let mut shards: Vec<Vec<usize>> = vec![vec![]];
    let mut size = 0;
    for (i, t) in tensors.iter().enumerate() {
        let last = shards.last_mut().expect("at least one shard");
        if !last.is_empty() && size + t.n_bytes() > max_shard_bytes {
            shards.push(vec![i]);
            size = t.n_bytes();
        } else {
            last.push(i);
            size += t.n_bytes();
        }
    }
    let n = shards.len();
    let names: Vec<String> = if n == 1 {
        vec!["model.safetensors".into()]
    } else {
        (1..=n)
            .map(|k| format!("model-{k:05}-of-{n:05}.safetensors"))
            .collect()
    };
    let mut weight_map = BTreeMap::new();
    for (shard, name) in shards.iter().zip(&names) {
        let mut infos = Vec::with_capacity(shard.len());
        let mut offset = 0;
        for &i in shard {
            let t = &tensors[i];
            infos.push((
                t.name.clone(),
                TensorInfo {
                    dtype: t.dtype,
                    shape: t.shape.clone(),
                    data_offsets: (offset, offset + t.n_bytes()),
                },
            ));
            offset += t.n_bytes();
            weight_map.insert(t.name.as_str(), name.clone());
        }
        let mut meta = std::collections::HashMap::new();
        meta.insert("format".to_string(), "pt".to_string());
        let header = Metadata::new(Some(meta), infos)
            .and_then(|m| serde_json::to_vec(&m).map_err(Into::into))
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e.to_string()))?;
        let mut header = header;
        header.resize(header.len().next_multiple_of(8), b' ');
        crate::atomic::write_atomic_with::<E>(&dir.join(name), |w| {
            w.write_all(&(header.len() as u64).to_le_bytes())?;
            w.write_all(&header)?;
            for &i in shard {
                let bytes = data(i)?;
                if bytes.len() != tensors[i].n_bytes() {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidInput,
                        format!(
                            "tensor {}: {} bytes of data, {:?} {:?} needs {}",
                            tensors[i].name,
                            bytes.len(),
                            tensors[i].dtype,
                            tensors[i].shape,
                            tensors[i].n_bytes()
                        ),
                    )
                    .into());
                }
                w.write_all(&bytes)?;
            }
            Ok(())
        })?;
    }
    if n > 1 {
        let total = tensors.iter().map(|t| t.n_bytes() as u64).sum();
        let index = ShardIndex {
            metadata: BTreeMap::from([("total_size", total)]),
            weight_map,
        };
        let text = serde_json::to_string_pretty(&index).map_err(std::io::Error::other)?;
        crate::atomic::write_atomic(&dir.join("model.safetensors.index.json"), text.as_bytes())?;
    }
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;
    use safetensors::SafeTensors;

    #[test]
    fn shards_split_by_size_and_read_back_with_their_index() {
        let dir = tempfile::tempdir().expect("temp dir");
        let specs: Vec<SafetensorSpec> = (0..3)
            .map(|i| SafetensorSpec {
                name: format!("t{i}"),
                dtype: Dtype::F32,
                shape: vec![2, 4],
            })
            .collect();
        let values = |i: usize| (0..8).map(|j| (i * 10 + j) as f32).collect::<Vec<_>>();
        let files = write_sharded(dir.path(), &specs, 64, |i| {
            Ok::<_, std::io::Error>(Cow::Owned(FloatDtype::F32.encode(&values(i))))
        })
        .expect("write");
        assert_eq!(
            files,
            [
                "model-00001-of-00002.safetensors",
                "model-00002-of-00002.safetensors"
            ]
        );
        let index: serde_json::Value = serde_json::from_slice(
            &std::fs::read(dir.path().join("model.safetensors.index.json")).expect("index"),
        )
        .expect("json");
        assert_eq!(index["metadata"]["total_size"], 96);
        assert_eq!(
            index["weight_map"]["t2"],
            "model-00002-of-00002.safetensors"
        );
        let bytes = std::fs::read(dir.path().join(&files[1])).expect("shard");
        let st = SafeTensors::deserialize(&bytes).expect("valid safetensors");
        let t = st.tensor("t2").expect("t2");
        assert_eq!(t.shape(), [2, 4]);
        assert_eq!(
            crate::load::hf::to_f32(t.dtype(), t.data()).expect("f32"),
            values(2)
        );
    }
}
