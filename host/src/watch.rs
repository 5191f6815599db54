//! Watching the files a config depends on: a reload when what weir reads
//! changed (by signature: resolved path, inode, length, mtime), after a
//! burst of changes settles.

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
            // Reading a file (as a reload does) is not a change.
            if let Ok(event) = event
                && !matches!(event.kind, notify::EventKind::Access(_))
            {
                let _ = tx.send(event.paths);
            }
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
            while rx.recv().await.is_some() {
                let mut settled = signature(&files);
                if settled == last {
                    continue;
                }
                // Let the burst settle: only changes to what weir reads
                // extend the quiet period.
                let mut quiet_until = tokio::time::Instant::now() + debounce;
                loop {
                    match tokio::time::timeout_at(quiet_until, rx.recv()).await {
                        Ok(Some(_)) => {
                            let now = signature(&files);
                            if now != settled {
                                settled = now;
                                quiet_until = tokio::time::Instant::now() + debounce;
                            }
                        }
                        Ok(None) => return,
                        Err(_) => break,
                    }
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
