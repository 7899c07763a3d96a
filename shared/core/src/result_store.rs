//! Where finished images go. A local folder today; S3-compatible storage is next.

use std::path::{Path, PathBuf};

/// A result store in a local folder. Writes are atomic (temporary file + rename), so a crash
/// never leaves a half-written image that a resumed batch would mistake for a finished one.
#[derive(Debug, Clone)]
pub struct LocalResultStore {
    dir: PathBuf,
}

impl LocalResultStore {
    /// Opens (and creates) the folder.
    pub fn open(dir: impl AsRef<Path>) -> std::io::Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        std::fs::create_dir_all(&dir)?;
        Ok(LocalResultStore { dir })
    }

    /// The folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The path of a named result.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Reads a named result. `name` is a relative key (e.g. `batch/00001-cat.png`); keys that
    /// would leave the folder (`..`, absolute paths) are refused.
    pub fn get(&self, name: &str) -> std::io::Result<Vec<u8>> {
        std::fs::read(self.checked_path(name)?)
    }

    /// The path of a key, refusing keys that would escape the folder.
    pub fn checked_path(&self, name: &str) -> std::io::Result<PathBuf> {
        let p = Path::new(name);
        let ok = !name.is_empty()
            && p.components()
                .all(|c| matches!(c, std::path::Component::Normal(_)));
        if !ok {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("result key {name:?} is not a relative path inside the result store"),
            ));
        }
        Ok(self.dir.join(p))
    }

    /// Whether a named result is already stored.
    pub fn contains(&self, name: &str) -> bool {
        self.path(name).is_file()
    }

    /// Stores a result atomically; an existing result of the same name is replaced.
    pub fn put(&self, name: &str, bytes: &[u8]) -> std::io::Result<PathBuf> {
        write_atomic(&self.checked_path(name)?, bytes)
    }
}

/// Writes a file atomically: a temporary file beside it, then a rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<PathBuf> {
    let parent = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent)?;
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "result".into());
    let tmp = parent.join(format!(".{file_name}.tmp-{}", std::process::id()));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)?;
    Ok(path.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn put_and_contains() {
        let d = std::env::temp_dir().join(format!("relayfarm-store-{}", std::process::id()));
        let s = LocalResultStore::open(&d).unwrap();
        assert!(!s.contains("a.png"));
        s.put("a.png", b"123").unwrap();
        assert!(s.contains("a.png"));
        assert_eq!(s.get("a.png").unwrap(), b"123");
        s.put("batch/b.png", b"4").unwrap();
        assert_eq!(s.get("batch/b.png").unwrap(), b"4");
        assert!(s.get("../x").is_err());
        assert!(s.put("/etc/x", b"").is_err());
        let _ = std::fs::remove_dir_all(d);
    }
}
