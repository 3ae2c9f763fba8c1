//! Reading a safetensors file's tensors as f32 tensor data, with one copy.
//!
//! The header is read and checked first (so a caller can refuse names, shapes and dtypes
//! before any data is read); then the data region is read into one recycled buffer
//! ([`crate::recycle`]) that the F32 tensors are views of: one copy from the page cache, into
//! memory that is already resident when adapters come and go, and no memory map, which a
//! file truncated while it is being read (`cp` over an adapter in a watched directory) would
//! turn into SIGBUS. Large files are read by a few threads, each on its own file handle over
//! its own byte range. This is the adapter loader's path: a cold adapter costs little more
//! than reading its bytes.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use burn::tensor::{AllocationProperty, Bytes, DType, TensorData};
use safetensors::tensor::{Metadata, TensorInfo};
use safetensors::Dtype;

use crate::load::hf::f32_values;
use crate::recycle::READ_BUFFERS;

/// Bytes per reading thread below which one thread reads everything.
const MIN_BYTES_PER_THREAD: usize = 4 << 20;
/// Most threads one file is read with.
const MAX_THREADS: usize = 4;
/// Longest header read (the safetensors crate's limit).
const MAX_HEADER_BYTES: u64 = 100_000_000;

/// Why a safetensors file could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: corrupt safetensors file: {message}")]
    Corrupt { path: PathBuf, message: String },
    /// Replaced or rewritten while it was being read: reading it again may succeed.
    #[error("{path}: the file changed while it was being read")]
    Changed { path: PathBuf },
}

/// A safetensors file's header: its tensors in file order, data not yet read.
#[derive(Debug)]
pub struct Header {
    path: PathBuf,
    tensors: Vec<(String, TensorInfo)>,
    data_start: u64,
    /// The file the header was read from, so that a file replaced meanwhile is noticed.
    identity: Identity,
}

/// One tensor of a [`Header`].
pub struct TensorMeta<'a> {
    pub name: &'a str,
    pub dtype: Dtype,
    pub shape: &'a [usize],
}

/// What says a file is still the one whose header was read: device and inode (not replaced),
/// length and modification time (not rewritten in place).
type Identity = (u64, u64, u64, Option<std::time::SystemTime>);

#[cfg(unix)]
fn identity(m: &std::fs::Metadata) -> Identity {
    use std::os::unix::fs::MetadataExt;
    (m.dev(), m.ino(), m.len(), m.modified().ok())
}
#[cfg(not(unix))]
fn identity(m: &std::fs::Metadata) -> Identity {
    (0, 0, m.len(), m.modified().ok())
}

impl Header {
    /// Reads and checks the header of the file at `path`: the tensors' byte ranges must tile
    /// the data exactly, to the end of the file.
    ///
    /// # Errors
    /// An unreadable file, a header that is not valid safetensors JSON, byte ranges that do
    /// not match the shapes, dtypes or the file's length.
    pub fn read(path: &Path) -> Result<Header, ReadError> {
        let io = |source| ReadError::Io {
            path: path.to_path_buf(),
            source,
        };
        let corrupt = |message: String| ReadError::Corrupt {
            path: path.to_path_buf(),
            message,
        };
        let mut f = File::open(path).map_err(io)?;
        let meta = f.metadata().map_err(io)?;
        if !meta.is_file() {
            return Err(corrupt("not a regular file".into()));
        }
        let len = meta.len();
        let mut n = [0u8; 8];
        f.read_exact(&mut n)
            .map_err(|_| corrupt(format!("{len} bytes, too short for a header")))?;
        let n = u64::from_le_bytes(n);
        if n > len.saturating_sub(8) || n > MAX_HEADER_BYTES {
            return Err(corrupt(format!(
                "header length {n} is beyond the file ({len} bytes) or the {MAX_HEADER_BYTES}-byte limit"
            )));
        }
        let mut text = vec![0u8; n as usize];
        f.read_exact(&mut text).map_err(io)?;
        let metadata: Metadata =
            serde_json::from_slice(&text).map_err(|e| corrupt(format!("header: {e}")))?;
        let mut tensors: Vec<(String, TensorInfo)> = metadata
            .tensors()
            .into_iter()
            .map(|(name, info)| (name, info.clone()))
            .collect();
        tensors.sort_by_key(|(_, i)| i.data_offsets);
        let data_start = 8 + n;
        let end = tensors.last().map_or(0, |(_, i)| i.data_offsets.1) as u64;
        if data_start.checked_add(end) != Some(len) {
            return Err(corrupt(format!(
                "the header describes {end} bytes of tensor data but the file has {} after it",
                len - data_start
            )));
        }
        Ok(Header {
            path: path.to_path_buf(),
            tensors,
            data_start,
            identity: identity(&meta),
        })
    }

    /// The tensors in file order.
    pub fn tensors(&self) -> impl Iterator<Item = TensorMeta<'_>> {
        self.tensors.iter().map(|(name, i)| TensorMeta {
            name,
            dtype: i.dtype,
            shape: &i.shape,
        })
    }

    /// Every tensor as f32 data, in [`Self::tensors`] order (F32, F16 and BF16 files).
    ///
    /// The data is read into one buffer leased from [`READ_BUFFERS`]; F32 tensors are views of
    /// it (no copy; the buffer returns to the pool when the last of them is dropped), F16 and
    /// BF16 tensors views of a second leased buffer they are converted into.
    ///
    /// # Errors
    /// Another dtype (the tensor is named), a read failure, a file that was replaced or
    /// truncated since its header was read.
    pub fn read_data(&self) -> Result<Vec<TensorData>, ReadError> {
        for (name, info) in &self.tensors {
            if !matches!(info.dtype, Dtype::F32 | Dtype::F16 | Dtype::BF16) {
                return Err(ReadError::Corrupt {
                    path: self.path.clone(),
                    message: format!(
                        "tensor '{name}': dtype {:?} (expected F32, F16 or BF16)",
                        info.dtype
                    ),
                });
            }
        }
        let total = self.tensors.last().map_or(0, |(_, i)| i.data_offsets.1);
        let mut lease = READ_BUFFERS.lease(total);
        self.read_region(lease.bytes_mut())?;
        // Rewritten in place while it was read (same inode, new contents): the bytes may mix
        // two versions.
        let now = std::fs::metadata(&self.path).map_err(|source| ReadError::Io {
            path: self.path.clone(),
            source,
        })?;
        if identity(&now) != self.identity {
            return Err(ReadError::Changed {
                path: self.path.clone(),
            });
        }
        let region = bytes::Bytes::from_owner(lease);
        // Tensors that are not aligned F32 are converted into a second leased buffer, so that
        // F16 and BF16 adapters recycle their memory too.
        let converted =
            |info: &TensorInfo| !(info.dtype == Dtype::F32 && info.data_offsets.0 % 4 == 0);
        let sizes: Vec<Option<usize>> = self
            .tensors
            .iter()
            .map(|(_, i)| converted(i).then(|| i.shape.iter().product::<usize>() * 4))
            .collect();
        let mut f32s = READ_BUFFERS.lease(sizes.iter().flatten().sum());
        let mut at = 0;
        for ((_, info), size) in self.tensors.iter().zip(&sizes) {
            if let Some(size) = *size {
                let (start, end) = info.data_offsets;
                let values =
                    f32_values(info.dtype, &region[start..end]).expect("dtypes checked above");
                let out = &mut f32s.bytes_mut()[at..at + size];
                for (v, o) in values.zip(out.chunks_exact_mut(4)) {
                    o.copy_from_slice(&v.to_le_bytes());
                }
                at += size;
            }
        }
        let f32s = bytes::Bytes::from_owner(f32s);
        let mut at = 0;
        Ok(self
            .tensors
            .iter()
            .zip(&sizes)
            .map(|((_, info), size)| {
                let view = match *size {
                    // Views of the converted buffer start at multiples of 4 (empty ones too).
                    Some(size) => {
                        at += size;
                        f32s.slice(at - size..at)
                    }
                    None => region.slice(info.data_offsets.0..info.data_offsets.1),
                };
                TensorData::from_bytes(
                    Bytes::from_shared(view, AllocationProperty::Native),
                    info.shape.clone(),
                    DType::F32,
                )
            })
            .collect())
    }

    /// Reads the whole data region into `out`, split over a few threads for large files.
    fn read_region(&self, out: &mut [u8]) -> Result<(), ReadError> {
        let threads = (out.len() / MIN_BYTES_PER_THREAD)
            .clamp(1, MAX_THREADS)
            .min(std::thread::available_parallelism().map_or(1, usize::from));
        let part = out.len().div_ceil(threads).max(1);
        let results: Vec<Result<(), ReadError>> = std::thread::scope(|s| {
            let handles: Vec<_> = out
                .chunks_mut(part)
                .enumerate()
                .map(|(k, chunk)| {
                    let at = self.data_start + (k * part) as u64;
                    s.spawn(move || self.read_at(at, chunk))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join().unwrap_or_else(|_| {
                        Err(ReadError::Corrupt {
                            path: self.path.clone(),
                            message: "a reading thread panicked".into(),
                        })
                    })
                })
                .collect()
        });
        results.into_iter().collect()
    }

    /// Fills `out` from byte `at` of the file, on a handle of its own.
    fn read_at(&self, at: u64, out: &mut [u8]) -> Result<(), ReadError> {
        let io = |source| ReadError::Io {
            path: self.path.clone(),
            source,
        };
        let mut f = File::open(&self.path).map_err(io)?;
        f.seek(SeekFrom::Start(at)).map_err(io)?;
        // The header was checked against the file's length: a short read means it shrank
        // since. (Other replacements and rewrites are caught by `read_data`'s check after
        // the read.)
        f.read_exact(out).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                ReadError::Changed {
                    path: self.path.clone(),
                }
            } else {
                io(e)
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use half::{bf16, f16};

    use super::*;

    fn write(path: &Path, tensors: &[(&str, Dtype, Vec<usize>, Vec<u8>)]) {
        let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
            .iter()
            .map(|(n, d, s, b)| {
                (
                    n.to_string(),
                    safetensors::tensor::TensorView::new(*d, s.clone(), b).expect("view"),
                )
            })
            .collect();
        safetensors::serialize_to_file(views, None, path).expect("write");
    }

    fn f32_bytes(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    #[test]
    fn values_dtypes_and_order_come_back_as_written() {
        let dir = tempfile::tempdir().expect("tmp");
        let p = dir.path().join("t.safetensors");
        let big: Vec<f32> = (0..(3 << 20)).map(|i| i as f32 * 0.5).collect();
        let halves: Vec<u8> = [1.5f32, -2.0]
            .iter()
            .flat_map(|x| f16::from_f32(*x).to_le_bytes())
            .collect();
        let brains: Vec<u8> = [0.25f32, 8.0, -1.0]
            .iter()
            .flat_map(|x| bf16::from_f32(*x).to_le_bytes())
            .collect();
        write(
            &p,
            &[
                (
                    "a",
                    Dtype::F32,
                    vec![2, 2],
                    f32_bytes(&[1.0, 2.0, 3.0, 4.0]),
                ),
                ("b", Dtype::F16, vec![2], halves),
                ("c", Dtype::BF16, vec![3, 1], brains),
                ("d", Dtype::F32, vec![3 << 20], f32_bytes(&big)),
                ("e", Dtype::F32, vec![1], f32_bytes(&[-7.0])),
            ],
        );
        let h = Header::read(&p).expect("header");
        let names: Vec<&str> = h.tensors().map(|t| t.name).collect();
        let values: Vec<Vec<f32>> = h
            .read_data()
            .expect("data")
            .into_iter()
            .map(|d| d.to_vec::<f32>().expect("f32"))
            .collect();
        let by_name: std::collections::BTreeMap<&str, &Vec<f32>> =
            names.iter().copied().zip(&values).collect();
        assert_eq!(by_name["a"], &vec![1.0, 2.0, 3.0, 4.0]);
        assert_eq!(by_name["b"], &vec![1.5, -2.0]);
        assert_eq!(by_name["c"], &vec![0.25, 8.0, -1.0]);
        assert_eq!(
            by_name["d"], &big,
            "the 12 MiB tensor is read by several threads"
        );
        assert_eq!(by_name["e"], &vec![-7.0]);
    }

    #[test]
    fn truncated_files_and_other_dtypes_are_refused_with_the_reason() {
        let dir = tempfile::tempdir().expect("tmp");
        let p = dir.path().join("t.safetensors");
        write(
            &p,
            &[("a", Dtype::F32, vec![4], f32_bytes(&[1.0, 2.0, 3.0, 4.0]))],
        );
        let full = std::fs::read(&p).expect("read");
        std::fs::write(&p, &full[..full.len() - 3]).expect("truncate");
        let e = Header::read(&p).expect_err("short").to_string();
        assert!(e.contains("16 bytes of tensor data"), "{e}");
        std::fs::write(&p, &full[..5]).expect("truncate");
        let e = Header::read(&p).expect_err("short").to_string();
        assert!(e.contains("too short"), "{e}");
        // Truncated, or rewritten in place with the same length, after the header was read:
        // the read says the file changed (it may mix two versions).
        std::fs::write(&p, &full).expect("restore");
        let h = Header::read(&p).expect("header");
        std::fs::OpenOptions::new()
            .write(true)
            .open(&p)
            .and_then(|f| f.set_len(full.len() as u64 - 8))
            .expect("truncate in place");
        let e = h.read_data().expect_err("truncated");
        assert!(matches!(e, ReadError::Changed { .. }), "{e}");
        std::fs::write(&p, &full).expect("restore");
        let h = Header::read(&p).expect("header");
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(&p, &full).expect("rewrite in place");
        let e = h.read_data().expect_err("rewritten");
        assert!(e.to_string().contains("changed while"), "{e}");
        assert_eq!(
            Header::read(&p)
                .and_then(|h| h.read_data())
                .map(|d| d.len())
                .ok(),
            Some(1),
            "read again, it is whole"
        );
        write(&p, &[("i", Dtype::I32, vec![1], vec![0, 0, 0, 0])]);
        let e = Header::read(&p)
            .expect("header")
            .read_data()
            .expect_err("int")
            .to_string();
        assert!(e.contains("'i'") && e.contains("I32"), "{e}");
    }
}
