//! GGUF v2/v3 container reader (llama.cpp's `gguf.h` / gguf-py `GGUFReader`).
//!
//! The file is memory-mapped; metadata is parsed eagerly, tensor data stays in the map and is
//! handed out as byte slices. Every count and size read from the header is checked against the
//! bytes actually present before anything is allocated, so a corrupt header cannot trigger an
//! unbounded allocation.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use crate::quant::GgmlType;

/// "GGUF" read as a little-endian u32.
const GGUF_MAGIC: u32 = 0x4655_4747;
const DEFAULT_ALIGNMENT: u64 = 32;
/// Largest tensor rank GGML supports.
const MAX_DIMS: u32 = 4;

/// Errors reading a GGUF file; each names the file and, where there is one, the key or tensor.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("{path}: cannot read: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a GGUF file (magic {magic:#010x}, expected 0x46554747 \"GGUF\")")]
    BadMagic { path: PathBuf, magic: u32 },
    #[error("{path}: unsupported GGUF version {version} (graft reads versions 2 and 3)")]
    Version { path: PathBuf, version: u32 },
    #[error("{path}: file is truncated: {what} needs bytes up to offset {needed}, file has {len}")]
    Truncated {
        path: PathBuf,
        what: String,
        needed: u64,
        len: u64,
    },
    #[error("{path}: malformed {what}")]
    Malformed { path: PathBuf, what: String },
    #[error("{path}: metadata key '{key}' is missing")]
    MissingKey { path: PathBuf, key: String },
    #[error("{path}: metadata key '{key}' has type {found}, expected {expected}")]
    KeyType {
        path: PathBuf,
        key: String,
        found: &'static str,
        expected: &'static str,
    },
    #[error("{path}: tensor '{tensor}' has unsupported GGML type id {type_id}")]
    UnsupportedType {
        path: PathBuf,
        tensor: String,
        type_id: u32,
    },
}

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum GgufValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(Vec<GgufValue>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl GgufValue {
    fn type_name(&self) -> &'static str {
        match self {
            GgufValue::U8(_) => "u8",
            GgufValue::I8(_) => "i8",
            GgufValue::U16(_) => "u16",
            GgufValue::I16(_) => "i16",
            GgufValue::U32(_) => "u32",
            GgufValue::I32(_) => "i32",
            GgufValue::F32(_) => "f32",
            GgufValue::Bool(_) => "bool",
            GgufValue::String(_) => "string",
            GgufValue::Array(_) => "array",
            GgufValue::U64(_) => "u64",
            GgufValue::I64(_) => "i64",
            GgufValue::F64(_) => "f64",
        }
    }

    /// The value as an unsigned integer, if it is a non-negative integer of any width.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            GgufValue::U8(v) => Some(v.into()),
            GgufValue::U16(v) => Some(v.into()),
            GgufValue::U32(v) => Some(v.into()),
            GgufValue::U64(v) => Some(v),
            GgufValue::I8(v) => u64::try_from(v).ok(),
            GgufValue::I16(v) => u64::try_from(v).ok(),
            GgufValue::I32(v) => u64::try_from(v).ok(),
            GgufValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The value as a float, if it is any number.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            GgufValue::F32(v) => Some(v.into()),
            GgufValue::F64(v) => Some(v),
            GgufValue::I8(v) => Some(v.into()),
            GgufValue::I16(v) => Some(v.into()),
            GgufValue::I32(v) => Some(v.into()),
            GgufValue::I64(v) => Some(v as f64),
            _ => self.as_u64().map(|v| v as f64),
        }
    }
}

/// One tensor's header entry.
#[derive(Debug, Clone)]
pub struct GgufTensorInfo {
    pub name: String,
    /// GGML order: `dims[0]` is the contiguous (innermost) dimension.
    pub dims: Vec<u64>,
    pub ty: GgmlType,
    /// Absolute offset of the data in the file.
    pub offset: u64,
    /// Size of the data in bytes.
    pub n_bytes: u64,
}

impl GgufTensorInfo {
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }

    /// Shape in PyTorch order (outermost first), e.g. `[out, in]` for a linear weight.
    pub fn torch_shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }
}

/// An opened GGUF file.
pub struct GgufFile {
    path: PathBuf,
    map: std::sync::Arc<Mmap>,
    pub version: u32,
    pub metadata: BTreeMap<String, GgufValue>,
    pub tensors: Vec<GgufTensorInfo>,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("n_metadata", &self.metadata.len())
            .field("n_tensors", &self.tensors.len())
            .finish()
    }
}

impl GgufFile {
    /// Opens and parses the header of a GGUF file.
    ///
    /// # Errors
    /// Any I/O failure, wrong magic, unsupported version, truncation or malformed entry.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, GgufError> {
        let path = path.as_ref().to_path_buf();
        let io = |source| GgufError::Io {
            path: path.clone(),
            source,
        };
        let file = File::open(&path).map_err(io)?;
        // SAFETY: the map is read-only; graft never writes the file while it is mapped. A file
        // truncated by another process underneath us is outside what the type system can see,
        // as with every mmap-based model loader.
        let map = unsafe { Mmap::map(&file) }.map_err(io)?;
        let mut r = Reader {
            path: &path,
            bytes: &map,
            pos: 0,
        };
        let magic = r.u32("magic")?;
        if magic != GGUF_MAGIC {
            return Err(GgufError::BadMagic { path, magic });
        }
        let version = r.u32("version")?;
        if !(2..=3).contains(&version) {
            return Err(GgufError::Version { path, version });
        }
        let n_tensors = r.u64("tensor count")?;
        let n_kv = r.u64("metadata count")?;
        // Each KV needs at least 12 bytes (key length + type), each tensor info at least 24.
        r.check_count(n_kv, 12, "metadata count")?;
        r.check_count(n_tensors, 24, "tensor count")?;
        let mut metadata = BTreeMap::new();
        for _ in 0..n_kv {
            let key = r.string("metadata key")?;
            let ty = r.u32("metadata value type")?;
            let value = r.value(ty, &key, 0)?;
            metadata.insert(key, value);
        }
        let alignment = match metadata.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(v) => match v.as_u64() {
                Some(a) if a > 0 && a.is_power_of_two() => a,
                _ => {
                    return Err(GgufError::Malformed {
                        path,
                        what: format!("general.alignment {v:?} (must be a power of two)"),
                    })
                }
            },
        };
        let mut raw = Vec::with_capacity(n_tensors as usize);
        for _ in 0..n_tensors {
            let name = r.string("tensor name")?;
            let n_dims = r.u32("tensor rank")?;
            if n_dims == 0 || n_dims > MAX_DIMS {
                return Err(r.malformed(format!("tensor '{name}': rank {n_dims} (1..=4 allowed)")));
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                dims.push(r.u64("tensor dimension")?);
            }
            let type_id = r.u32("tensor type")?;
            let offset = r.u64("tensor offset")?;
            let ty = GgmlType::from_id(type_id).ok_or_else(|| GgufError::UnsupportedType {
                path: path.clone(),
                tensor: name.clone(),
                type_id,
            })?;
            raw.push((name, dims, ty, offset));
        }
        let data_start = r.pos as u64;
        let data_start = data_start.div_ceil(alignment) * alignment;
        let len = map.len() as u64;
        let mut tensors = Vec::with_capacity(raw.len());
        for (name, dims, ty, rel) in raw {
            let n_elements = dims
                .iter()
                .try_fold(1u64, |acc, &d| acc.checked_mul(d))
                .filter(|&n| n > 0)
                .ok_or_else(|| r.malformed(format!("tensor '{name}': dimensions {dims:?}")))?;
            let n_bytes = ty.bytes_for(n_elements).ok_or_else(|| {
                r.malformed(format!(
                    "tensor '{name}': {n_elements} elements is not a whole number of {ty:?} blocks \
                     of {}",
                    ty.block_size()
                ))
            })?;
            let offset = data_start
                .checked_add(rel)
                .ok_or_else(|| r.malformed(format!("tensor '{name}': offset {rel}")))?;
            let end = offset.checked_add(n_bytes).unwrap_or(u64::MAX);
            if end > len {
                return Err(GgufError::Truncated {
                    path,
                    what: format!("tensor '{name}' ({n_bytes} bytes of {ty:?})"),
                    needed: end,
                    len,
                });
            }
            tensors.push(GgufTensorInfo {
                name,
                dims,
                ty,
                offset,
                n_bytes,
            });
        }
        Ok(GgufFile {
            path,
            map: std::sync::Arc::new(map),
            version,
            metadata,
            tensors,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn tensor_info(&self, name: &str) -> Option<&GgufTensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// The raw (packed) bytes of a tensor, borrowed from the map.
    /// A tensor's data as bytes shared with the file's map, without a copy.
    pub fn tensor_data(&self, info: &GgufTensorInfo) -> crate::quant::SharedBytes {
        crate::quant::SharedBytes::Mapped {
            map: self.map.clone(),
            range: info.offset as usize..(info.offset + info.n_bytes) as usize,
        }
    }

    pub fn tensor_bytes(&self, info: &GgufTensorInfo) -> &[u8] {
        // Bounds were checked against the file length in `open`.
        &self.map[info.offset as usize..(info.offset + info.n_bytes) as usize]
    }

    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.metadata.get(key)
    }

    fn missing(&self, key: &str) -> GgufError {
        GgufError::MissingKey {
            path: self.path.clone(),
            key: key.to_string(),
        }
    }

    fn wrong(&self, key: &str, v: &GgufValue, expected: &'static str) -> GgufError {
        GgufError::KeyType {
            path: self.path.clone(),
            key: key.to_string(),
            found: v.type_name(),
            expected,
        }
    }

    /// A required string value.
    pub fn str(&self, key: &str) -> Result<&str, GgufError> {
        match self.get(key) {
            Some(GgufValue::String(s)) => Ok(s),
            Some(v) => Err(self.wrong(key, v, "string")),
            None => Err(self.missing(key)),
        }
    }

    /// An optional unsigned integer value.
    pub fn opt_u64(&self, key: &str) -> Result<Option<u64>, GgufError> {
        match self.get(key) {
            Some(v) => v
                .as_u64()
                .map(Some)
                .ok_or_else(|| self.wrong(key, v, "unsigned integer")),
            None => Ok(None),
        }
    }

    /// A required unsigned integer value.
    pub fn u64(&self, key: &str) -> Result<u64, GgufError> {
        self.opt_u64(key)?.ok_or_else(|| self.missing(key))
    }

    /// An optional float value.
    pub fn opt_f64(&self, key: &str) -> Result<Option<f64>, GgufError> {
        match self.get(key) {
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| self.wrong(key, v, "number")),
            None => Ok(None),
        }
    }

    /// An optional boolean value.
    pub fn opt_bool(&self, key: &str) -> Result<Option<bool>, GgufError> {
        match self.get(key) {
            Some(GgufValue::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(self.wrong(key, v, "bool")),
            None => Ok(None),
        }
    }

    /// An optional array value.
    pub fn opt_array(&self, key: &str) -> Result<Option<&[GgufValue]>, GgufError> {
        match self.get(key) {
            Some(GgufValue::Array(a)) => Ok(Some(a)),
            Some(v) => Err(self.wrong(key, v, "array")),
            None => Ok(None),
        }
    }

    /// A required array of strings.
    pub fn string_array(&self, key: &str) -> Result<Vec<&str>, GgufError> {
        let arr = self.opt_array(key)?.ok_or_else(|| self.missing(key))?;
        arr.iter()
            .map(|v| match v {
                GgufValue::String(s) => Ok(s.as_str()),
                other => Err(self.wrong(key, other, "array of strings")),
            })
            .collect()
    }
}

/// Cursor over the header bytes.
struct Reader<'a> {
    path: &'a Path,
    bytes: &'a [u8],
    pos: usize,
}

/// Arrays nested deeper than this are rejected (GGUF files use depth 1).
const MAX_ARRAY_DEPTH: usize = 4;

impl Reader<'_> {
    fn malformed(&self, what: String) -> GgufError {
        GgufError::Malformed {
            path: self.path.to_path_buf(),
            what,
        }
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&[u8], GgufError> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.bytes.len());
        match end {
            Some(end) => {
                let s = &self.bytes[self.pos..end];
                self.pos = end;
                Ok(s)
            }
            None => Err(GgufError::Truncated {
                path: self.path.to_path_buf(),
                what: what.to_string(),
                needed: self.pos as u64 + n as u64,
                len: self.bytes.len() as u64,
            }),
        }
    }

    /// Rejects a count whose minimum encoded size exceeds the bytes left.
    fn check_count(&self, count: u64, min_size: u64, what: &str) -> Result<(), GgufError> {
        let left = (self.bytes.len() - self.pos) as u64;
        if count.saturating_mul(min_size) > left {
            return Err(GgufError::Truncated {
                path: self.path.to_path_buf(),
                what: format!("{what} {count}"),
                needed: (self.pos as u64).saturating_add(count.saturating_mul(min_size)),
                len: self.bytes.len() as u64,
            });
        }
        Ok(())
    }

    fn arr<const N: usize>(&mut self, what: &str) -> Result<[u8; N], GgufError> {
        let s = self.take(N, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u32(&mut self, what: &str) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.arr(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.arr(what)?))
    }

    fn string(&mut self, what: &str) -> Result<String, GgufError> {
        let len = self.u64(what)?;
        self.check_count(len, 1, what)?;
        let bytes = self.take(len as usize, what)?;
        String::from_utf8(bytes.to_vec())
            .map_err(|_| self.malformed(format!("{what}: invalid UTF-8")))
    }

    fn value(&mut self, ty: u32, key: &str, depth: usize) -> Result<GgufValue, GgufError> {
        Ok(match ty {
            0 => GgufValue::U8(self.arr::<1>(key)?[0]),
            1 => GgufValue::I8(self.arr::<1>(key)?[0] as i8),
            2 => GgufValue::U16(u16::from_le_bytes(self.arr(key)?)),
            3 => GgufValue::I16(i16::from_le_bytes(self.arr(key)?)),
            4 => GgufValue::U32(self.u32(key)?),
            5 => GgufValue::I32(i32::from_le_bytes(self.arr(key)?)),
            6 => GgufValue::F32(f32::from_le_bytes(self.arr(key)?)),
            7 => match self.arr::<1>(key)?[0] {
                0 => GgufValue::Bool(false),
                1 => GgufValue::Bool(true),
                b => return Err(self.malformed(format!("metadata '{key}': bool byte {b}"))),
            },
            8 => GgufValue::String(self.string(key)?),
            9 => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(self.malformed(format!("metadata '{key}': arrays nested too deep")));
                }
                let elem_ty = self.u32(key)?;
                let n = self.u64(key)?;
                let min = match elem_ty {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4..=6 => 4,
                    8 | 10..=12 => 8,
                    9 => 12,
                    t => return Err(self.malformed(format!("metadata '{key}': value type {t}"))),
                };
                self.check_count(n, min, key)?;
                let mut items = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    items.push(self.value(elem_ty, key, depth + 1)?);
                }
                GgufValue::Array(items)
            }
            10 => GgufValue::U64(self.u64(key)?),
            11 => GgufValue::I64(i64::from_le_bytes(self.arr(key)?)),
            12 => GgufValue::F64(f64::from_le_bytes(self.arr(key)?)),
            t => return Err(self.malformed(format!("metadata '{key}': value type {t}"))),
        })
    }
}
