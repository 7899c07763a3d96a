//! Where finished images go: a local folder ([`relayfarm_core::LocalResultStore`]) or
//! S3-compatible object storage through the `object_store` crate.
//!
//! `--results` (env `RELAYFARM_RESULTS`) takes either a folder path or `s3://bucket/prefix`;
//! see [`ResultStore::open`]. Keys are relative paths like `batch-id/00001-cat.png`; keys that
//! would leave the store (`..`, absolute paths, empty parts) are refused by every backend.

use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use relayfarm_core::LocalResultStore;
use std::ops::Range;
use std::sync::Arc;

/// Errors of a result store.
#[derive(Debug, thiserror::Error)]
pub enum ResultStoreError {
    /// The key is not a relative path inside the store.
    #[error("result key {0:?} is not a relative path inside the result store")]
    InvalidKey(String),
    /// The `--results` location could not be understood.
    #[error("--results {location:?}: {reason}")]
    InvalidLocation {
        /// What was given.
        location: String,
        /// Why it was refused.
        reason: String,
    },
    /// No result under this key.
    #[error("no result `{0}` in the result store")]
    NotFound(String),
    /// A local file-system error.
    #[error("result store {what}: {source}")]
    Io {
        /// The path or key concerned.
        what: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// An object-storage error.
    #[error("object store {what}: {source}")]
    Object {
        /// The key concerned.
        what: String,
        /// The cause.
        #[source]
        source: object_store::Error,
    },
}

/// Result of result-store operations.
pub type Result<T> = std::result::Result<T, ResultStoreError>;

/// Where `--results` points: a local folder or an S3 bucket with a key prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResultLocation {
    /// A local folder.
    Local(std::path::PathBuf),
    /// `s3://bucket/prefix`.
    S3 {
        /// The bucket name.
        bucket: String,
        /// The key prefix (no leading or trailing `/`; may be empty).
        prefix: String,
    },
}

impl ResultLocation {
    /// Parses a `--results` value: `s3://bucket[/prefix]` (also `s3a://`) is object storage,
    /// anything else is a local folder path.
    pub fn parse(s: &str) -> Result<Self> {
        let rest = s
            .strip_prefix("s3://")
            .or_else(|| s.strip_prefix("s3a://"))
            .or_else(|| s.strip_prefix("S3://"));
        let Some(rest) = rest else {
            return Ok(ResultLocation::Local(s.into()));
        };
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(ResultStoreError::InvalidLocation {
                location: s.into(),
                reason: "no bucket name; use s3://bucket/prefix".into(),
            });
        }
        let prefix = prefix.trim_matches('/').to_string();
        if !prefix.is_empty() && !prefix.split('/').all(valid_segment) {
            return Err(ResultStoreError::InvalidLocation {
                location: s.into(),
                reason: "the prefix has an empty, `.` or `..` part".into(),
            });
        }
        Ok(ResultLocation::S3 {
            bucket: bucket.into(),
            prefix,
        })
    }
}

fn valid_segment(seg: &str) -> bool {
    !seg.is_empty() && seg != "." && seg != ".." && !seg.contains('\\')
}

/// Checks that `key` is a relative `/`-separated path without empty, `.` or `..` parts.
pub fn check_key(key: &str) -> Result<()> {
    if !key.is_empty() && !key.starts_with('/') && key.split('/').all(valid_segment) {
        Ok(())
    } else {
        Err(ResultStoreError::InvalidKey(key.into()))
    }
}

/// A result store (cheap to clone).
#[derive(Clone)]
pub enum ResultStore {
    /// A local folder; writes are atomic (temporary file + rename).
    Local(LocalResultStore),
    /// Any `object_store` backend (S3, or in-memory/local file system in tests) under a prefix.
    Object {
        /// The backend.
        store: Arc<dyn ObjectStore>,
        /// Key prefix inside the backend.
        prefix: ObjectPath,
        /// A description for logs (`s3://bucket/prefix`).
        description: String,
    },
}

impl std::fmt::Debug for ResultStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ResultStore({})", self.description())
    }
}

impl ResultStore {
    /// Opens the store a `--results` value names. A folder is created if missing; for
    /// `s3://bucket/prefix` credentials, region and endpoint come from the standard `AWS_*`
    /// environment variables (`AmazonS3Builder::from_env`: `AWS_ACCESS_KEY_ID`,
    /// `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_REGION`, `AWS_ENDPOINT_URL` for
    /// MinIO-style servers, `AWS_ALLOW_HTTP=true` for plain-HTTP endpoints).
    pub fn open(location: &str) -> Result<Self> {
        match ResultLocation::parse(location)? {
            ResultLocation::Local(dir) => LocalResultStore::open(&dir)
                .map(ResultStore::Local)
                .map_err(|source| ResultStoreError::Io {
                    what: format!("cannot create the folder {}", dir.display()),
                    source,
                }),
            ResultLocation::S3 { bucket, prefix } => {
                let s3 = object_store::aws::AmazonS3Builder::from_env()
                    .with_bucket_name(&bucket)
                    .build()
                    .map_err(|e| ResultStoreError::InvalidLocation {
                        location: location.into(),
                        reason: format!("cannot configure S3 access: {e}"),
                    })?;
                Ok(Self::object(
                    Arc::new(s3),
                    &prefix,
                    format!("s3://{bucket}/{prefix}"),
                ))
            }
        }
    }

    /// A store over any `object_store` backend, with keys under `prefix` (`a/b`, or empty).
    pub fn object(store: Arc<dyn ObjectStore>, prefix: &str, description: String) -> Self {
        ResultStore::Object {
            store,
            prefix: ObjectPath::from_iter(prefix.split('/').filter(|s| !s.is_empty())),
            description,
        }
    }

    /// Where the store is, for logs.
    pub fn description(&self) -> String {
        match self {
            ResultStore::Local(l) => l.dir().display().to_string(),
            ResultStore::Object { description, .. } => description.clone(),
        }
    }

    fn object_path(prefix: &ObjectPath, key: &str) -> Result<ObjectPath> {
        check_key(key)?;
        let parts: Vec<object_store::path::PathPart<'_>> = prefix
            .parts()
            .chain(key.split('/').map(object_store::path::PathPart::from))
            .collect();
        Ok(ObjectPath::from_iter(parts))
    }

    fn local_path(local: &LocalResultStore, key: &str) -> Result<std::path::PathBuf> {
        check_key(key)?;
        local
            .checked_path(key)
            .map_err(|_| ResultStoreError::InvalidKey(key.into()))
    }

    fn object_err(key: &str, e: object_store::Error) -> ResultStoreError {
        match e {
            object_store::Error::NotFound { .. } => ResultStoreError::NotFound(key.into()),
            source => ResultStoreError::Object {
                what: key.into(),
                source,
            },
        }
    }

    /// Stores `bytes` under `key`, replacing an existing result (atomic in both backends: a
    /// reader sees the old or the new object, never a partial one).
    pub async fn put(&self, key: &str, bytes: Vec<u8>) -> Result<()> {
        match self {
            ResultStore::Local(local) => {
                Self::local_path(local, key)?;
                let local = local.clone();
                let k = key.to_string();
                tokio::task::spawn_blocking(move || local.put(&k, &bytes))
                    .await
                    .map_err(|e| ResultStoreError::Io {
                        what: key.into(),
                        source: std::io::Error::other(e.to_string()),
                    })?
                    .map(|_| ())
                    .map_err(|source| ResultStoreError::Io {
                        what: key.into(),
                        source,
                    })
            }
            ResultStore::Object { store, prefix, .. } => {
                let path = Self::object_path(prefix, key)?;
                store
                    .put(&path, PutPayload::from(bytes))
                    .await
                    .map(|_| ())
                    .map_err(|e| Self::object_err(key, e))
            }
        }
    }

    /// Reads the whole result under `key`.
    pub async fn get(&self, key: &str) -> Result<Vec<u8>> {
        match self {
            ResultStore::Local(local) => {
                let path = Self::local_path(local, key)?;
                tokio::fs::read(&path).await.map_err(|e| io_err(key, e))
            }
            ResultStore::Object { store, prefix, .. } => {
                let path = Self::object_path(prefix, key)?;
                let got = store
                    .get(&path)
                    .await
                    .map_err(|e| Self::object_err(key, e))?;
                got.bytes()
                    .await
                    .map(|b| b.to_vec())
                    .map_err(|e| Self::object_err(key, e))
            }
        }
    }

    /// The size in bytes of the result under `key` ([`ResultStoreError::NotFound`] if absent).
    pub async fn size(&self, key: &str) -> Result<u64> {
        match self {
            ResultStore::Local(local) => {
                let path = Self::local_path(local, key)?;
                let meta = tokio::fs::metadata(&path)
                    .await
                    .map_err(|e| io_err(key, e))?;
                if meta.is_file() {
                    Ok(meta.len())
                } else {
                    Err(ResultStoreError::NotFound(key.into()))
                }
            }
            ResultStore::Object { store, prefix, .. } => {
                let path = Self::object_path(prefix, key)?;
                store
                    .head(&path)
                    .await
                    .map(|m| m.size)
                    .map_err(|e| Self::object_err(key, e))
            }
        }
    }

    /// Whether a result is stored under `key`.
    pub async fn exists(&self, key: &str) -> Result<bool> {
        match self.size(key).await {
            Ok(_) => Ok(true),
            Err(ResultStoreError::NotFound(_)) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Reads bytes `range` of the result under `key` (the range is clipped to the object's end
    /// by the caller: ask only for bytes below [`ResultStore::size`]).
    pub async fn get_range(&self, key: &str, range: Range<u64>) -> Result<Vec<u8>> {
        if range.end <= range.start {
            return Ok(Vec::new());
        }
        match self {
            ResultStore::Local(local) => {
                use tokio::io::{AsyncReadExt, AsyncSeekExt};
                let path = Self::local_path(local, key)?;
                let mut file = tokio::fs::File::open(&path)
                    .await
                    .map_err(|e| io_err(key, e))?;
                file.seek(std::io::SeekFrom::Start(range.start))
                    .await
                    .map_err(|e| io_err(key, e))?;
                let want = usize::try_from(range.end - range.start).unwrap_or(usize::MAX);
                let mut buf = Vec::with_capacity(want.min(1 << 24));
                file.take(range.end - range.start)
                    .read_to_end(&mut buf)
                    .await
                    .map_err(|e| io_err(key, e))?;
                Ok(buf)
            }
            ResultStore::Object { store, prefix, .. } => {
                let path = Self::object_path(prefix, key)?;
                store
                    .get_range(&path, range)
                    .await
                    .map(|b| b.to_vec())
                    .map_err(|e| Self::object_err(key, e))
            }
        }
    }
}

fn io_err(key: &str, source: std::io::Error) -> ResultStoreError {
    if source.kind() == std::io::ErrorKind::NotFound {
        ResultStoreError::NotFound(key.into())
    } else {
        ResultStoreError::Io {
            what: key.into(),
            source,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use object_store::local::LocalFileSystem;
    use object_store::memory::InMemory;

    async fn exercise(store: &ResultStore) {
        assert!(!store.exists("b1/00001-cat.png").await.unwrap());
        assert!(matches!(
            store.get("b1/00001-cat.png").await,
            Err(ResultStoreError::NotFound(_))
        ));
        let data: Vec<u8> = (0..1000u32).map(|i| (i % 251) as u8).collect();
        store.put("b1/00001-cat.png", data.clone()).await.unwrap();
        assert!(store.exists("b1/00001-cat.png").await.unwrap());
        assert_eq!(store.get("b1/00001-cat.png").await.unwrap(), data);
        assert_eq!(store.size("b1/00001-cat.png").await.unwrap(), 1000);
        assert_eq!(
            store.get_range("b1/00001-cat.png", 100..356).await.unwrap(),
            data[100..356]
        );
        assert_eq!(
            store
                .get_range("b1/00001-cat.png", 900..1000)
                .await
                .unwrap(),
            data[900..]
        );
        // Replacing is fine.
        store.put("b1/00001-cat.png", vec![1, 2, 3]).await.unwrap();
        assert_eq!(store.get("b1/00001-cat.png").await.unwrap(), [1, 2, 3]);
        for bad in [
            "../x.png",
            "b1/../../x",
            "/etc/passwd",
            "",
            "a//b",
            "./a",
            "a/",
        ] {
            assert!(
                matches!(
                    store.put(bad, vec![0]).await,
                    Err(ResultStoreError::InvalidKey(_))
                ),
                "put {bad:?}"
            );
            assert!(
                matches!(store.get(bad).await, Err(ResultStoreError::InvalidKey(_))),
                "get {bad:?}"
            );
            assert!(store.exists(bad).await.is_err(), "exists {bad:?}");
        }
    }

    #[tokio::test]
    async fn in_memory_backend() {
        let mem = Arc::new(InMemory::new());
        let store = ResultStore::object(mem.clone(), "farm/run1", "memory".into());
        exercise(&store).await;
        // The prefix is applied.
        let raw = mem
            .get(&ObjectPath::from("farm/run1/b1/00001-cat.png"))
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        assert_eq!(&raw[..], [1, 2, 3]);
        // No prefix.
        let bare = ResultStore::object(Arc::new(InMemory::new()), "", "memory".into());
        exercise(&bare).await;
    }

    #[tokio::test]
    async fn local_file_system_backend() {
        let dir =
            std::env::temp_dir().join(format!("relayfarm-results-lfs-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let lfs = Arc::new(LocalFileSystem::new_with_prefix(&dir).unwrap());
        let store = ResultStore::object(lfs, "pre", "lfs".into());
        exercise(&store).await;
        assert!(dir.join("pre/b1/00001-cat.png").is_file());
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test]
    async fn local_folder_backend() {
        let dir =
            std::env::temp_dir().join(format!("relayfarm-results-dir-{}", std::process::id()));
        let store = ResultStore::open(dir.to_str().unwrap()).unwrap();
        assert!(matches!(store, ResultStore::Local(_)));
        exercise(&store).await;
        assert_eq!(
            std::fs::read(dir.join("b1/00001-cat.png")).unwrap(),
            [1, 2, 3]
        );
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn parses_locations() {
        assert_eq!(
            ResultLocation::parse("s3://bucket/some/prefix/").unwrap(),
            ResultLocation::S3 {
                bucket: "bucket".into(),
                prefix: "some/prefix".into()
            }
        );
        assert_eq!(
            ResultLocation::parse("s3://bucket").unwrap(),
            ResultLocation::S3 {
                bucket: "bucket".into(),
                prefix: String::new()
            }
        );
        assert_eq!(
            ResultLocation::parse("s3a://b/p").unwrap(),
            ResultLocation::S3 {
                bucket: "b".into(),
                prefix: "p".into()
            }
        );
        assert!(ResultLocation::parse("s3://").is_err());
        assert!(ResultLocation::parse("s3:///x").is_err());
        assert!(ResultLocation::parse("s3://b/../x").is_err());
        for local in [
            "./relayfarm-results",
            "/data/results",
            "relayfarm-results",
            "s3-folder/x",
        ] {
            assert_eq!(
                ResultLocation::parse(local).unwrap(),
                ResultLocation::Local(local.into())
            );
        }
    }

    #[test]
    fn keys_are_checked() {
        assert!(check_key("b/00001-cat.png").is_ok());
        assert!(check_key("a.png").is_ok());
        for bad in ["..", "../a", "a/../b", "/a", "", "a//b", "a\\..\\b"] {
            assert!(check_key(bad).is_err(), "{bad:?}");
        }
    }

    #[tokio::test]
    async fn s3_url_builds_without_network() {
        // Building the client needs no network; nothing is fetched here.
        let store = ResultStore::open("s3://my-bucket/renders").unwrap();
        assert_eq!(store.description(), "s3://my-bucket/renders");
    }
}
