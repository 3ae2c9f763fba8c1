//! Writes that must never leave a half-written file: the bytes go to a temporary sibling, are
//! synced, and the file is renamed into place; the directory is then synced too, so that the
//! rename itself survives a power cut (a synced file under a name the directory never
//! recorded is lost with it).

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

/// Writes `bytes` to `path` atomically.
///
/// # Errors
/// Any I/O failure; `path` then keeps its old content.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    write_atomic_with(path, |w| w.write_all(bytes))
}

/// Streams what `fill` writes to `path` atomically: a file too large to hold in memory (a
/// merged model) is written piece by piece to the temporary sibling, which is removed if
/// `fill` or the I/O fails.
///
/// # Errors
/// What `fill` returns, or an I/O failure; `path` then keeps its old content.
pub fn write_atomic_with<E: From<std::io::Error>>(
    path: &Path,
    fill: impl FnOnce(&mut BufWriter<File>) -> Result<(), E>,
) -> Result<(), E> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let name = path
        .file_name()
        .map_or("file".into(), |n| n.to_string_lossy().into_owned());
    // process and sequence number: two writers of one path never share a temporary file
    let tmp = Temporary(path.with_file_name(format!(
        ".{name}.tmp-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )));
    let mut w = BufWriter::with_capacity(1 << 20, File::create(&tmp.0)?);
    fill(&mut w)?;
    let f = w
        .into_inner()
        .map_err(std::io::IntoInnerError::into_error)?;
    f.sync_all()?;
    std::fs::rename(&tmp.0, path)?;
    sync_parent(path)?;
    Ok(())
}

/// Syncs the directory holding `path`, making a rename or creation in it durable.
///
/// # Errors
/// The directory cannot be opened or synced.
pub fn sync_parent(path: &Path) -> std::io::Result<()> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    File::open(parent)?.sync_all()
}

/// A temporary file removed when dropped: after an error, or a panic in the writer (after a
/// successful rename there is nothing left to remove).
struct Temporary(std::path::PathBuf);

impl Drop for Temporary {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
