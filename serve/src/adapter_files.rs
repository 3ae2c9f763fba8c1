//! An adapters directory on disk: which entries are adapters (PEFT subdirectories and `.gguf`
//! files, named by the entry), and each adapter's signature — size and modification time of
//! its files — that says whether it changed. Nothing here reads a file's contents: indexing
//! ten thousand adapters costs a directory listing and a few `stat`s each.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use graft_core::adapters::peft::{CONFIG_FILE, WEIGHTS_FILE};

/// Size and modification time of the files that make up an adapter.
pub type Signature = Vec<(u64, Option<SystemTime>)>;

/// An adapter found in the directory.
#[derive(Debug, Clone, PartialEq)]
pub struct Found {
    pub path: PathBuf,
    /// Whether the entry is a symbolic link (its target must be checked against the roots).
    pub symlink: bool,
    pub signature: Signature,
}

/// The adapter name of the directory entry `entry` (a PEFT directory's name, a `.gguf`
/// file's stem); `None` for hidden entries (`.name.tmp-…` staging directories included).
pub fn name_of(entry: &Path) -> Option<String> {
    let name = if entry.extension().is_some_and(|x| x == "gguf") {
        entry.file_stem()
    } else {
        entry.file_name()
    }?
    .to_string_lossy()
    .into_owned();
    (!name.is_empty() && !name.starts_with('.')).then_some(name)
}

/// The signature of the adapter at `path` (a PEFT directory or a `.gguf` file), or `None` if
/// it is not one (any more).
pub fn signature(path: &Path) -> Option<Signature> {
    let stat = |f: &Path| {
        std::fs::metadata(f)
            .ok()
            .map(|m| (m.is_file(), (m.len(), m.modified().ok())))
    };
    if path.extension().is_some_and(|x| x == "gguf") {
        return stat(path).and_then(|(file, s)| file.then(|| vec![s]));
    }
    // A PEFT directory must have its config; the weights may still be on their way.
    let (file, config) = stat(&path.join(CONFIG_FILE))?;
    let weights = stat(&path.join(WEIGHTS_FILE)).map_or((0, None), |(_, s)| s);
    file.then(|| vec![config, weights])
}

/// The adapter at directory entry `entry`, if it is one.
pub fn found(entry: &Path) -> Option<Found> {
    let symlink = std::fs::symlink_metadata(entry)
        .ok()?
        .file_type()
        .is_symlink();
    Some(Found {
        path: entry.to_path_buf(),
        symlink,
        signature: signature(entry)?,
    })
}

/// Whether `dir` holds an adapter called `name` (as `name/` or `name.gguf`).
pub fn holds(dir: &Path, name: &str) -> bool {
    signature(&dir.join(name)).is_some() || signature(&dir.join(format!("{name}.gguf"))).is_some()
}

/// Every adapter in `dir`, by name.
pub fn scan(dir: &Path) -> BTreeMap<String, Found> {
    let mut out = BTreeMap::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = e.path();
        let Some(name) = name_of(&path) else { continue };
        let symlink = e.file_type().is_ok_and(|t| t.is_symlink());
        if let Some(signature) = signature(&path) {
            out.insert(
                name,
                Found {
                    path,
                    symlink,
                    signature,
                },
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_named_and_only_adapters_are_found() {
        let dir = tempfile::tempdir().expect("tmp");
        let d = dir.path();
        std::fs::create_dir(d.join("peft")).expect("mkdir");
        std::fs::write(d.join("peft").join(CONFIG_FILE), "{}").expect("write");
        std::fs::create_dir(d.join("empty")).expect("mkdir");
        std::fs::create_dir(d.join(".peft.tmp-1")).expect("mkdir");
        std::fs::write(d.join(".peft.tmp-1").join(CONFIG_FILE), "{}").expect("write");
        std::fs::write(d.join("g.gguf"), "x").expect("write");
        std::fs::write(d.join("notes.txt"), "x").expect("write");
        std::os::unix::fs::symlink(d.join("peft"), d.join("link")).expect("symlink");
        let all = scan(d);
        assert_eq!(
            all.keys().map(String::as_str).collect::<Vec<_>>(),
            ["g", "link", "peft"]
        );
        assert!(all["link"].symlink && !all["peft"].symlink);
        assert_eq!(all["peft"].signature[1], (0, None), "no weights yet");
        let before = all["peft"].signature.clone();
        std::fs::write(d.join("peft").join(WEIGHTS_FILE), "abc").expect("write");
        assert_ne!(signature(&d.join("peft")), Some(before));
        assert_eq!(found(&d.join("g.gguf")).map(|f| f.signature.len()), Some(1));
        assert_eq!(found(&d.join("empty")), None);
        assert!(holds(d, "g") && holds(d, "peft") && !holds(d, "empty"));
    }
}
