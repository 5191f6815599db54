//! Compiled plugin code kept on disk, so a start, a `weir check` or a
//! `weir route` loads what an earlier one compiled instead of running
//! cranelift again.
//!
//! What it trusts, and why that is enough: loading compiled code is running
//! it, so an entry is used only when
//! - the directory belongs to weir's user and no one else may write to it
//!   (checked when the cache opens, and again for each entry's file);
//! - the entry is one weir wrote: a header naming this format, the entry's
//!   key (so an entry copied under another name is refused), then the
//!   SHA-256 of the code, which must match;
//! - its key matches: the SHA-256 of the component's bytes and of the
//!   engine's compatibility hash (wasmtime's version, its settings, the CPU
//!   features it compiles for), and wasmtime itself refuses code compiled by
//!   another version or configuration.
//!
//! A corrupt, foreign or stale entry is logged, removed and compiled again;
//! it is never used. Entries are written to a temporary file and renamed, so
//! concurrent weir processes never see half an entry. The directory is kept
//! under its size bound by evicting the entries used longest ago.

use std::fs;
use std::hash::Hasher;
use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use wasmtime::Engine;

use crate::private::not_private;
use wasmtime::component::Component;

/// The first bytes of every entry.
const MAGIC: &[u8; 16] = b"weir-compiled-1\n";
/// Entry files end in this.
const SUFFIX: &str = ".cwasm";

/// Why the cache cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CacheError {
    /// The directory could not be created or read.
    #[error("plugin cache {}: {reason}", path.display())]
    Io {
        /// The directory or file.
        path: PathBuf,
        /// What the OS said.
        reason: String,
    },
    /// The directory is not safe to load code from.
    #[error(
        "plugin cache {}: {reason}; compiled code is loaded only from a directory that weir's user owns and no one else can write (chmod go-w, or choose another cache.dir)",
        path.display()
    )]
    Unsafe {
        /// The directory or file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
}

/// A directory of compiled components.
#[derive(Debug)]
pub struct CompiledCache {
    dir: PathBuf,
    max_bytes: u64,
}

/// SHA-256 as a [`Hasher`], to turn wasmtime's compatibility hash into bytes
/// that are the same in every process.
struct Sha256Hasher(ring::digest::Context);

impl Hasher for Sha256Hasher {
    fn finish(&self) -> u64 {
        let digest = self.0.clone().finish();
        let mut first = [0u8; 8];
        first.copy_from_slice(&digest.as_ref()[..8]);
        u64::from_le_bytes(first)
    }

    fn write(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }
}

/// SHA-256 over `parts` in order.
pub(crate) fn sha256(parts: &[&[u8]]) -> [u8; 32] {
    let mut context = ring::digest::Context::new(&ring::digest::SHA256);
    for part in parts {
        context.update(part);
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(context.finish().as_ref());
    out
}

/// Refuses a path that another user owns or that group or others may write.
fn check_private(path: &Path, metadata: &fs::Metadata) -> Result<(), CacheError> {
    match not_private(metadata, 0o022) {
        None => Ok(()),
        Some(reason) => Err(CacheError::Unsafe {
            path: path.to_owned(),
            reason,
        }),
    }
}

impl CompiledCache {
    /// Opens (creating it, mode 0700, if missing) the cache at `dir`, bounded
    /// to `max_bytes`.
    pub fn open(dir: &Path, max_bytes: u64) -> Result<CompiledCache, CacheError> {
        let io = |reason: std::io::Error| CacheError::Io {
            path: dir.to_owned(),
            reason: reason.to_string(),
        };
        if !dir.exists() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(io)?;
        }
        let metadata = fs::symlink_metadata(dir).map_err(io)?;
        if !metadata.is_dir() {
            return Err(CacheError::Unsafe {
                path: dir.to_owned(),
                reason: "not a directory (a symlink is not followed)".into(),
            });
        }
        check_private(dir, &metadata)?;
        Ok(CompiledCache {
            dir: dir.to_owned(),
            max_bytes,
        })
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The entry's key: the component's bytes and the engine's
    /// compatibility hash (wasmtime's version, its settings, the CPU).
    fn key(engine: &Engine, component_sha256: &[u8; 32]) -> [u8; 32] {
        let mut hasher = Sha256Hasher(ring::digest::Context::new(&ring::digest::SHA256));
        std::hash::Hash::hash(&engine.precompile_compatibility_hash(), &mut hasher);
        let engine = sha256(&[hasher.0.finish().as_ref()]);
        sha256(&[component_sha256, &engine])
    }

    fn entry(&self, key: &[u8; 32]) -> PathBuf {
        self.dir.join(format!("{}{SUFFIX}", weir_plugin_sdk::hex::encode(key)))
    }

    /// The compiled component for `component_sha256`, if a good entry holds
    /// it. A bad entry is logged and removed.
    pub fn load(&self, engine: &Engine, component_sha256: &[u8; 32]) -> Option<Component> {
        let key = Self::key(engine, component_sha256);
        let path = self.entry(&key);
        let bytes = match read_private(&path) {
            Ok(Some(bytes)) => bytes,
            Ok(None) => return None,
            Err(reason) => {
                tracing::warn!(entry = %path.display(), %reason, "plugin cache entry not used; compiling again");
                return None;
            }
        };
        let code = match checked(&bytes, Some(&key)) {
            Ok(code) => code,
            Err(reason) => {
                tracing::warn!(entry = %path.display(), reason, "plugin cache entry is corrupt or foreign; compiling again");
                let _ = fs::remove_file(&path);
                return None;
            }
        };
        #[allow(unsafe_code)]
        // SAFETY: deserialising runs the code it contains. These bytes are
        // an entry weir wrote itself (its header and the SHA-256 of the code
        // just checked), read from a directory and a file that only weir's
        // user owns and can write (`read_private`), under a key that binds
        // the component's bytes and this engine's settings; wasmtime checks
        // its own version and configuration in them again.
        let component = unsafe { Component::deserialize(engine, code) };
        match component {
            Ok(component) => {
                // Used now: the last to be evicted.
                let _ = fs::File::options()
                    .write(true)
                    .open(&path)
                    .and_then(|f| f.set_modified(SystemTime::now()));
                Some(component)
            }
            Err(e) => {
                tracing::warn!(entry = %path.display(), error = %format!("{e:#}"), "plugin cache entry is stale; compiling again");
                let _ = fs::remove_file(&path);
                None
            }
        }
    }

    /// Keeps `component`'s compiled code for the next load, then evicts
    /// what exceeds the bound. Failures are logged: the cache only ever
    /// saves time.
    pub fn store(&self, component_sha256: &[u8; 32], component: &Component) {
        let code = match component.serialize() {
            Ok(code) => code,
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "compiled code cannot be serialised for the plugin cache");
                return;
            }
        };
        let key = Self::key(component.engine(), component_sha256);
        let path = self.entry(&key);
        let temporary = self.dir.join(format!(
            ".{}.{}.tmp",
            std::process::id(),
            weir_plugin_sdk::hex::encode(&sha256(&[&code[..code.len().min(64)], component_sha256]))
        ));
        let written = (|| {
            let mut file = fs::File::options()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&temporary)?;
            file.write_all(MAGIC)?;
            file.write_all(&key)?;
            file.write_all(&sha256(&[&code]))?;
            file.write_all(&code)?;
            file.sync_all()?;
            fs::rename(&temporary, &path)
        })();
        if let Err(e) = written {
            let _ = fs::remove_file(&temporary);
            tracing::warn!(entry = %path.display(), error = %e, "cannot write to the plugin cache");
            return;
        }
        self.evict();
    }

    /// Removes the entries used longest ago until the cache fits its bound;
    /// returns how many were removed.
    pub fn evict(&self) -> usize {
        let mut entries = self.entries();
        let mut total: u64 = entries.iter().map(|(_, len, _)| len).sum();
        entries.sort_by_key(|(_, _, used)| *used);
        let mut removed = 0;
        for (path, len, _) in entries {
            if total <= self.max_bytes {
                break;
            }
            if fs::remove_file(&path).is_ok() {
                total -= len;
                removed += 1;
            }
        }
        removed
    }

    /// Removes every entry that is corrupt or not weir's and the temporary
    /// files of writes that never finished (older than an hour), then evicts
    /// down to the bound; returns how many files were removed.
    pub fn prune(&self) -> usize {
        let mut removed = 0;
        let hour_ago = SystemTime::now() - std::time::Duration::from_secs(3600);
        for entry in fs::read_dir(&self.dir).into_iter().flatten().filter_map(Result::ok) {
            let name = entry.file_name().to_string_lossy().into_owned();
            let stale = entry
                .metadata()
                .and_then(|m| m.modified())
                .is_ok_and(|modified| modified < hour_ago);
            if name.starts_with('.') && name.ends_with(".tmp") && stale && fs::remove_file(entry.path()).is_ok() {
                removed += 1;
            }
        }
        for (path, _, _) in self.entries() {
            let good = matches!(read_private(&path), Ok(Some(bytes)) if checked(&bytes, None).is_ok());
            if !good && fs::remove_file(&path).is_ok() {
                removed += 1;
            }
        }
        removed + self.evict()
    }

    /// Every entry: path, size, last use.
    fn entries(&self) -> Vec<(PathBuf, u64, SystemTime)> {
        let Ok(dir) = fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        dir.filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().ends_with(SUFFIX))
            .filter_map(|e| {
                let metadata = e.metadata().ok()?;
                Some((e.path(), metadata.len(), metadata.modified().ok()?))
            })
            .collect()
    }
}

/// An entry's bytes, if the file exists and only weir's user can write it.
/// Opened without following a symlink and checked on the open file, so the
/// file checked is the file read.
fn read_private(path: &Path) -> Result<Option<Vec<u8>>, String> {
    use std::io::Read as _;
    let mut file = match fs::File::options().read(true).custom_flags(libc::O_NOFOLLOW).open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("cannot open it (a symlink is not followed): {e}")),
    };
    let metadata = file.metadata().map_err(|e| e.to_string())?;
    if !metadata.is_file() {
        return Err("not a regular file".into());
    }
    check_private(path, &metadata).map_err(|e| e.to_string())?;
    let mut bytes = Vec::with_capacity(usize::try_from(metadata.len()).unwrap_or(0));
    file.read_to_end(&mut bytes).map_err(|e| e.to_string())?;
    Ok(Some(bytes))
}

/// The compiled code of an entry whose header, key (when given) and
/// checksum hold.
fn checked<'a>(bytes: &'a [u8], key: Option<&[u8; 32]>) -> Result<&'a [u8], &'static str> {
    let rest = bytes.strip_prefix(MAGIC.as_slice()).ok_or("not a weir cache entry")?;
    if rest.len() < 64 {
        return Err("truncated");
    }
    let (written_key, rest) = rest.split_at(32);
    if key.is_some_and(|key| key.as_slice() != written_key) {
        return Err("it is the entry of another component or engine");
    }
    let (sum, code) = rest.split_at(32);
    if sha256(&[code]) != sum {
        return Err("its checksum does not match its code");
    }
    Ok(code)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    fn private_dir() -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("temp dir");
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o700)).expect("chmod");
        dir
    }

    #[test]
    fn a_directory_others_can_write_is_refused() {
        let dir = private_dir();
        assert!(CompiledCache::open(dir.path(), 1 << 20).is_ok());
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o777)).expect("chmod");
        let err = CompiledCache::open(dir.path(), 1 << 20).expect_err("world-writable");
        assert!(err.to_string().contains("mode 777 lets others write to it"), "{err}");
        // A missing directory is made private.
        let nested = dir.path().join("a/b");
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o700)).expect("chmod");
        CompiledCache::open(&nested, 1 << 20).expect("created");
        assert_eq!(fs::metadata(&nested).expect("made").permissions().mode() & 0o777, 0o700);
    }

    #[test]
    fn an_entry_is_used_only_with_its_header_key_and_checksum() {
        let code = b"compiled code";
        let key = [7u8; 32];
        let mut entry = MAGIC.to_vec();
        entry.extend_from_slice(&key);
        entry.extend_from_slice(&sha256(&[code]));
        entry.extend_from_slice(code);
        assert_eq!(checked(&entry, Some(&key)), Ok(code.as_slice()));
        assert_eq!(
            checked(&entry, Some(&[8u8; 32])),
            Err("it is the entry of another component or engine")
        );
        let mut flipped = entry.clone();
        *flipped.last_mut().expect("a byte") ^= 1;
        assert_eq!(
            checked(&flipped, Some(&key)),
            Err("its checksum does not match its code")
        );
        assert_eq!(checked(&entry[..40], Some(&key)), Err("truncated"));
        assert_eq!(checked(b"\0asm....", None), Err("not a weir cache entry"));
    }

    #[test]
    fn a_symlinked_or_shared_entry_is_not_read() {
        let dir = private_dir();
        let real = dir.path().join("real");
        fs::write(&real, b"bytes").expect("write");
        let link = dir.path().join(format!("link{SUFFIX}"));
        std::os::unix::fs::symlink(&real, &link).expect("symlink");
        let err = read_private(&link).expect_err("a symlink was followed");
        assert!(err.contains("a symlink is not followed"), "{err}");
        fs::set_permissions(&real, fs::Permissions::from_mode(0o666)).expect("chmod");
        let err = read_private(&real).expect_err("a world-writable entry was read");
        assert!(err.contains("lets others write to it"), "{err}");
        fs::set_permissions(&real, fs::Permissions::from_mode(0o600)).expect("chmod");
        assert_eq!(read_private(&real), Ok(Some(b"bytes".to_vec())));
        assert_eq!(read_private(&dir.path().join("missing")), Ok(None));
    }

    #[test]
    fn the_size_bound_evicts_the_entries_used_longest_ago() {
        let dir = private_dir();
        let cache = CompiledCache::open(dir.path(), 2500).expect("opens");
        let now = SystemTime::now();
        for (name, age) in [("old", 30), ("middle", 20), ("new", 10)] {
            let path = dir.path().join(format!("{name}{SUFFIX}"));
            fs::write(&path, vec![0u8; 1000]).expect("write");
            let used = now - std::time::Duration::from_secs(age);
            fs::File::options()
                .write(true)
                .open(&path)
                .and_then(|f| f.set_modified(used))
                .expect("mtime");
        }
        // Not an entry: left alone, and not counted.
        fs::write(dir.path().join("notes.txt"), vec![0u8; 5000]).expect("write");
        assert_eq!(cache.evict(), 1);
        assert!(!dir.path().join(format!("old{SUFFIX}")).exists());
        assert!(dir.path().join(format!("middle{SUFFIX}")).exists());
        assert!(dir.path().join(format!("new{SUFFIX}")).exists());
        assert!(dir.path().join("notes.txt").exists());
        // prune also removes entries that are not weir's.
        assert_eq!(cache.prune(), 2);
    }
}
