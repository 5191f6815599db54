//! A node's state directory: the files of the revisions it serves, by
//! SHA-256 (`blobs/<sha256>`), and the last good revision (`state.json`),
//! so a node restarted while etcd is away serves what it served before.
//! Private to weir's user: weir loads plugin code from it.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::fleet::{FleetError, State};
use crate::private::not_private;

/// A node's state directory.
#[derive(Debug)]
pub(crate) struct LocalStore {
    dir: PathBuf,
    /// Blobs whose bytes this process has hashed, with the length and
    /// modification time they had then: a revision naming the same files
    /// does not read and hash each again.
    checked: std::sync::Mutex<std::collections::HashMap<PathBuf, (u64, std::time::SystemTime)>>,
}

/// Most blobs [`LocalStore`] remembers as checked (then it forgets them all).
const MAX_CHECKED: usize = 1024;

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> FleetError + '_ {
    move |e| FleetError::Io {
        path: path.to_owned(),
        reason: e.to_string(),
    }
}

/// Refuses a secret (a password, a private key) that others may read.
pub(crate) fn check_secret(path: &Path) -> Result<(), FleetError> {
    crate::private::check_secret(path).map_err(|reason| FleetError::Io {
        path: path.to_owned(),
        reason,
    })
}

impl LocalStore {
    /// Opens (creating it, mode 0700) the state directory.
    pub(crate) fn open(dir: &Path) -> Result<LocalStore, FleetError> {
        let blobs = dir.join("blobs");
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&blobs)
            .map_err(io(dir))?;
        for path in [dir, blobs.as_path()] {
            let metadata = fs::symlink_metadata(path).map_err(io(path))?;
            if let Some(reason) = (!metadata.is_dir())
                .then(|| "not a directory (a symlink is not followed)".to_owned())
                .or_else(|| not_private(&metadata, 0o022))
            {
                return Err(FleetError::Io {
                    path: path.to_owned(),
                    reason: format!("{reason}; the fleet state directory must be weir's alone"),
                });
            }
        }
        Ok(LocalStore {
            dir: dir.to_owned(),
            checked: std::sync::Mutex::default(),
        })
    }

    /// The directory.
    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where the blob `sha256` of `owner` (the operator's: `None`; else a
    /// tenant's) is kept. A tenant's blobs are kept apart: a tenant that
    /// names the hash of a file the operator published (a CA bundle, a key)
    /// gets only what its own prefix holds, never the operator's copy.
    pub(crate) fn blob_path(&self, owner: Option<&str>, sha256: &str) -> Result<PathBuf, FleetError> {
        let blobs = self.dir.join("blobs");
        let Some(tenant) = owner else {
            return Ok(blobs.join(sha256));
        };
        crate::config::check_pool_name(tenant).map_err(|reason| FleetError::Io {
            path: blobs.clone(),
            reason: format!("tenant name: {reason}"),
        })?;
        let dir = blobs.join("tenants").join(tenant);
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(io(&dir))?;
        Ok(dir.join(sha256))
    }

    /// Whether the blob is here with the bytes its name says.
    pub(crate) fn has_blob(&self, owner: Option<&str>, sha256: &str) -> bool {
        let Ok(path) = self.blob_path(owner, sha256) else {
            return false;
        };
        let stamp = |metadata: fs::Metadata| metadata.modified().ok().map(|at| (metadata.len(), at));
        let now = fs::metadata(&path).ok().and_then(stamp);
        if now.is_some() && crate::sync::lock(&self.checked).get(&path) == now.as_ref() {
            return true;
        }
        let Ok(bytes) = fs::read(&path) else {
            return false;
        };
        let whole = weir_plugin_sdk::hex::encode(&crate::plugin::cache::sha256(&[&bytes])) == sha256;
        if let (true, Some(now)) = (whole, now) {
            let mut checked = crate::sync::lock(&self.checked);
            if checked.len() >= MAX_CHECKED {
                checked.clear();
            }
            checked.insert(path, now);
        }
        whole
    }

    /// Keeps a blob (already checked against its name).
    pub(crate) fn put_blob(&self, owner: Option<&str>, sha256: &str, bytes: &[u8]) -> Result<PathBuf, FleetError> {
        let path = self.blob_path(owner, sha256)?;
        self.write(&path, bytes)?;
        Ok(path)
    }

    /// Keeps the state a node applied, as its last good one.
    pub(crate) fn save_state(&self, state: &State) -> Result<(), FleetError> {
        let bytes = serde_json::to_vec(state).map_err(|e| FleetError::Io {
            path: self.dir.join("state.json"),
            reason: e.to_string(),
        })?;
        self.write(&self.dir.join("state.json"), &bytes)
    }

    /// The last good state, if one was kept.
    pub(crate) fn load_state(&self) -> Result<Option<State>, FleetError> {
        let path = self.dir.join("state.json");
        match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| FleetError::Io {
                path,
                reason: format!("not a state weir wrote: {e}"),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io(&path)(e)),
        }
    }

    /// Writes `bytes` to `path` whole or not at all (a temporary file, then
    /// a rename), readable by weir's user alone.
    fn write(&self, path: &Path, bytes: &[u8]) -> Result<(), FleetError> {
        let temporary = path.with_extension(format!("{}.tmp", std::process::id()));
        let written = (|| {
            let mut file = fs::File::options()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&temporary)?;
            file.write_all(bytes)?;
            file.sync_all()?;
            fs::rename(&temporary, path)
        })();
        written.map_err(|e| {
            let _ = fs::remove_file(&temporary);
            io(path)(e)
        })
    }
}
