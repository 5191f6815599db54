//! Where the configuration comes from: one seam. A [`ConfigSource`] gives
//! the configuration as it is now; the gateway lays the admin API's pool
//! changes over it and makes it current through its one rebuild-and-swap.
//! The source is the config file ([`FileSource`]), or etcd in fleet mode
//! (`crate::fleet`), which also keeps the admin API's pool changes for
//! every node ([`SharedPools`]).

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;

use crate::config::{Config, ConfigError, PoolConfig};

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

/// Why a shared pool change was not stored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SetPoolError {
    /// The pool changed elsewhere since this node read it: read again and retry.
    #[error("the pool was changed meanwhile by another node")]
    Conflict,
    /// The store could not be written, or the change did not apply.
    #[error("{0}")]
    Failed(String),
}

/// Where the admin API's pool changes go when nodes share them (fleet
/// mode): stored for every node, and applied here before the call returns.
pub trait SharedPools: Send + Sync {
    /// Stores `pool` as `name` (`None` removes it), if the pool is still as
    /// this node last read it, and applies the result.
    fn set_pool<'a>(
        &'a self,
        name: &'a str,
        pool: Option<PoolConfig>,
    ) -> Pin<Box<dyn Future<Output = Result<(), SetPoolError>> + Send + 'a>>;

    /// This node and the others, for `GET /api/fleet`.
    fn fleet_status(&self) -> Pin<Box<dyn Future<Output = serde_json::Value> + Send + '_>>;
}
