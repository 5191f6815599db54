//! Watching the files a config depends on: a reload when what weir reads
//! changed (by signature: resolved path, inode, length, mtime), after a
//! burst of changes settles and every write in place has been closed.
//!
//! A file written in place is read only once its writer closes it
//! (inotify's `IN_CLOSE_WRITE`): a writer that stalls mid-file (a slow
//! pipe, a copy over the network) leaves a prefix that may itself be a
//! valid config, missing its last routes or tenants. A file renamed into
//! place is complete when it appears. A file still open for writing
//! [`OPEN_WRITE_PATIENCE`] after its last change is read anyway, with a
//! warning: a writer that never closes cannot hold reloads back for ever.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;

use crate::gateway::Gateway;

impl Gateway {
    /// Every file the current config depends on: itself, plugin `.wasm` and
    /// config files, certificates, keys, OCSP responses, CA bundles,
    /// collateral.
    pub fn watched_files(&self) -> Vec<PathBuf> {
        let mut config = self.snapshot.load().config.clone();
        let named: Vec<PathBuf> = config.files_mut().into_iter().map(|(_, path)| path.clone()).collect();
        let mut files = self.source.files();
        files.extend(named.iter().map(|path| config.resolve(path)));
        files
    }

    /// Watches every file the config depends on and reloads when one
    /// changes; bursts of events (an editor's write-rename-chmod, a build
    /// writing several plugins) become one reload after they settle for
    /// `debounce`. Runs until the gateway is dropped.
    pub fn watch(self: &Arc<Self>, debounce: Duration) -> Result<JoinHandle<()>, String> {
        use notify::{RecursiveMode, Watcher};
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            use notify::event::{AccessKind, AccessMode, EventKind, ModifyKind};
            let Ok(event) = event else { return };
            let write = match event.kind {
                // A write in place closed: the file is complete.
                EventKind::Access(AccessKind::Close(AccessMode::Write)) => Write::Closed,
                // Reading a file (as a reload does) is not a change.
                EventKind::Access(_) => return,
                // Opened (created) or written in place: not complete until closed.
                EventKind::Create(_) | EventKind::Modify(ModifyKind::Data(_) | ModifyKind::Any) => Write::Open,
                // Renamed into place, removed, attributes: complete as it is.
                _ => Write::Closed,
            };
            let _ = tx.send((event.paths, write));
        })
        .map_err(|e| format!("cannot watch files: {e}"))?;
        let gateway = Arc::downgrade(self);
        let mut files = self.watched_files();
        let mut watched = watch_set(&files);
        for dir in watched.keys() {
            watcher
                .watch(dir, RecursiveMode::NonRecursive)
                .map_err(|e| format!("cannot watch {}: {e}", dir.display()))?;
        }
        let mut last = signature(&files);
        Ok(tokio::spawn(async move {
            // An event only says that something in a watched directory
            // changed; what weir reads changed when the files' signatures
            // did. That catches a symlink swapped above a file (Kubernetes
            // ConfigMaps swap `..data`) and ignores other files' churn (a
            // log written beside the config).
            // Watched files open for writing, by the path events name.
            let mut open: std::collections::BTreeSet<PathBuf> = std::collections::BTreeSet::new();
            while let Some((paths, write)) = rx.recv().await {
                note_writes(&mut open, &paths, write, &files);
                let mut settled = signature(&files);
                if settled == last {
                    continue;
                }
                // Let the burst settle: only changes to what weir reads
                // extend the quiet period; a write left open extends it
                // until it is closed, or for OPEN_WRITE_PATIENCE.
                let mut quiet_until = tokio::time::Instant::now() + debounce;
                let mut changed_at = tokio::time::Instant::now();
                loop {
                    match tokio::time::timeout_at(quiet_until, rx.recv()).await {
                        Ok(Some((paths, write))) => {
                            note_writes(&mut open, &paths, write, &files);
                            let now = signature(&files);
                            if now != settled {
                                settled = now;
                                changed_at = tokio::time::Instant::now();
                                quiet_until = changed_at + debounce;
                            }
                        }
                        Ok(None) => return,
                        Err(_) if !open.is_empty() && changed_at.elapsed() < OPEN_WRITE_PATIENCE => {
                            quiet_until = tokio::time::Instant::now() + debounce;
                        }
                        Err(_) => break,
                    }
                }
                if !open.is_empty() {
                    let files: Vec<String> = open.iter().map(|p| p.display().to_string()).collect();
                    tracing::warn!(
                        files = %files.join(", "),
                        "reloading although a watched file is still open for writing: nothing changed it for {OPEN_WRITE_PATIENCE:?}"
                    );
                    open.clear();
                }
                let Some(gateway) = gateway.upgrade() else { return };
                gateway.reload("file").await;
                // What the reload read is what `settled` describes: a change
                // made while it ran still differs from it. Files the new
                // config adds are taken as they are now.
                files = gateway.watched_files();
                let mut next = signature(&files);
                for (file, seen) in &mut next {
                    if let Some(before) = settled.get(file) {
                        seen.clone_from(before);
                    }
                }
                last = next;
                let now = watch_set(&files);
                for dir in now.keys().filter(|d| !watched.contains_key(*d)) {
                    if let Err(e) = watcher.watch(dir, RecursiveMode::NonRecursive) {
                        tracing::warn!(dir = %dir.display(), error = %e, "cannot watch");
                    }
                }
                for dir in watched.keys().filter(|d| !now.contains_key(*d)) {
                    let _ = watcher.unwatch(dir);
                }
                watched = now;
            }
        }))
    }
}

/// How a file event leaves the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Write {
    /// Opened for writing or written, not yet closed.
    Open,
    /// Complete: a write closed, or renamed into place.
    Closed,
}

/// How long a watched file may stay open for writing, unchanged, before a
/// reload reads it anyway.
pub const OPEN_WRITE_PATIENCE: Duration = Duration::from_secs(30);

/// Notes which of the watched `files` an event leaves open for writing.
/// Events name the path written (a symlink's target, where one is
/// watched): both the path and what it resolves to are compared.
fn note_writes(open: &mut std::collections::BTreeSet<PathBuf>, paths: &[PathBuf], write: Write, files: &[PathBuf]) {
    for path in paths {
        let watched = files.iter().any(|file| {
            let absolute = std::path::absolute(file).unwrap_or_else(|_| file.clone());
            let in_dir = match (absolute.parent(), absolute.file_name()) {
                (Some(dir), Some(name)) => std::fs::canonicalize(dir).ok().map(|dir| dir.join(name)),
                _ => None,
            };
            absolute == *path
                || in_dir.as_ref() == Some(path)
                || std::fs::canonicalize(&absolute).is_ok_and(|resolved| resolved == *path)
        });
        if !watched {
            continue;
        }
        match write {
            Write::Open => open.insert(path.clone()),
            Write::Closed => open.remove(path),
        };
    }
}

/// The directories to watch for `files` (non-recursively, so that files
/// replaced by rename are seen): each file's own directory and, when it is
/// reached through a symlink, its target's.
fn watch_set(files: &[PathBuf]) -> BTreeMap<PathBuf, Vec<PathBuf>> {
    let mut set: BTreeMap<PathBuf, Vec<PathBuf>> = BTreeMap::new();
    for file in files {
        let absolute = std::path::absolute(file).unwrap_or_else(|_| file.clone());
        let target = std::fs::canonicalize(&absolute).ok();
        for path in std::iter::once(absolute).chain(target) {
            // A directory that does not exist yet (where an ACME certificate
            // will be kept) is watched from the first reload after it appears.
            if let (Some(dir), Some(name)) = (path.parent(), path.file_name())
                && dir.is_dir()
            {
                let dir = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_owned());
                let entry = set.entry(dir.clone()).or_default();
                entry.push(dir.join(name));
            }
        }
    }
    set
}

/// What a reload would read, as far as the file system says without
/// reading it: each file's resolved path (a swapped symlink changes it),
/// inode, length and modification time; `None` for a missing file.
type Signature = BTreeMap<PathBuf, Option<(PathBuf, u64, u64, Option<std::time::SystemTime>)>>;

fn signature(files: &[PathBuf]) -> Signature {
    files
        .iter()
        .map(|file| {
            let seen = std::fs::canonicalize(file).ok().and_then(|resolved| {
                let meta = std::fs::metadata(&resolved).ok()?;
                #[cfg(unix)]
                let inode = std::os::unix::fs::MetadataExt::ino(&meta);
                #[cfg(not(unix))]
                let inode = 0;
                Some((resolved, inode, meta.len(), meta.modified().ok()))
            });
            (file.clone(), seen)
        })
        .collect()
}
