//! Where the configuration comes from: one seam. A [`ConfigSource`] gives
//! the configuration as it is now; the gateway lays the admin API's pool
//! changes over it and makes it current through its one rebuild-and-swap.
//! Today the source is the config file ([`FileSource`]); a store shared by
//! many nodes goes behind the same trait.

use std::path::{Path, PathBuf};

use crate::config::{Config, ConfigError};

/// A source of configuration.
pub trait ConfigSource: Send + Sync {
    /// The configuration as the source has it now, checked.
    fn load(&self) -> Result<Config, ConfigError>;
    /// The local files that hold it, watched for changes (besides the files
    /// the configuration itself names).
    fn files(&self) -> Vec<PathBuf>;
}

/// The config file weir was started with.
#[derive(Debug, Clone)]
pub struct FileSource {
    path: PathBuf,
}

impl FileSource {
    /// The config file at `path`.
    pub fn new(path: PathBuf) -> FileSource {
        FileSource { path }
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl ConfigSource for FileSource {
    fn load(&self) -> Result<Config, ConfigError> {
        Config::load(&self.path)
    }

    fn files(&self) -> Vec<PathBuf> {
        vec![self.path.clone()]
    }
}
