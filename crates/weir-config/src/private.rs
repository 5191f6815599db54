//! Files that must be weir's own: the compiled-code cache, the fleet state
//! directory, and secrets (etcd passwords, TSIG keys).

use std::fs;
use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::Path;

/// Why a file is not private to weir's user: another user owns it, or its
/// mode has a bit of `forbidden` (0o022: group or others may write).
pub fn not_private(metadata: &fs::Metadata, forbidden: u32) -> Option<String> {
    let me = rustix::process::geteuid().as_raw();
    if metadata.uid() != me {
        return Some(format!("owned by uid {}, not weir's uid {me}", metadata.uid()));
    }
    let mode = metadata.permissions().mode() & 0o777;
    if mode & forbidden & 0o022 != 0 {
        return Some(format!("mode {mode:03o} lets others write to it"));
    }
    if mode & forbidden != 0 {
        return Some(format!("mode {mode:03o} lets others read it"));
    }
    None
}

/// Refuses a secret file that anyone but weir's user may read or write,
/// saying why and how to fix it.
pub fn check_secret(path: &Path) -> Result<(), String> {
    let metadata = fs::metadata(path).map_err(|e| e.to_string())?;
    match not_private(&metadata, 0o077) {
        None => Ok(()),
        Some(reason) => Err(format!(
            "{reason}; a secret must be readable by weir's user alone (chmod 600)"
        )),
    }
}
