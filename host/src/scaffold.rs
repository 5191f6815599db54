//! `weir plugin new`: a plugin crate that builds to a component and tests
//! natively, from templates compiled into the binary.

use std::path::{Path, PathBuf};

/// Why a plugin crate could not be written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ScaffoldError {
    /// The name cannot be a crate name.
    #[error("`{0}` is not a plugin name: use lower-case letters, digits and `-`, starting with a letter")]
    Name(String),
    /// The directory exists.
    #[error("{0} already exists")]
    Exists(PathBuf),
    /// Writing failed.
    #[error("{path}: {error}")]
    Write {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        error: std::io::Error,
    },
}

const CARGO: &str = include_str!("scaffold/Cargo.toml.tmpl");
const LIB: &str = include_str!("scaffold/lib.rs.tmpl");
const CONFIG: &str = include_str!("scaffold/weir.toml.tmpl");

/// The guest SDK of the weir source this binary was built from.
pub fn default_sdk() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../guest-sdk")
}

/// Writes a new plugin crate `name` into `dir/name`; returns the crate's
/// directory.
pub fn new_plugin(name: &str, dir: &Path, sdk: &Path) -> Result<PathBuf, ScaffoldError> {
    let valid = name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !name.ends_with('-');
    if !valid {
        return Err(ScaffoldError::Name(name.to_owned()));
    }
    let root = dir.join(name);
    if root.exists() {
        return Err(ScaffoldError::Exists(root));
    }
    let sdk = std::path::absolute(sdk).unwrap_or_else(|_| sdk.to_owned());
    let sdk = std::fs::canonicalize(&sdk).unwrap_or(sdk);
    let fill = |template: &str| {
        template
            .replace("{{name}}", name)
            .replace("{{crate}}", &name.replace('-', "_"))
            .replace("{{sdk}}", &sdk.display().to_string())
    };
    let write = |relative: &str, text: String| {
        let path = root.join(relative);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|error| ScaffoldError::Write {
                path: parent.to_owned(),
                error,
            })?;
        }
        std::fs::write(&path, text).map_err(|error| ScaffoldError::Write { path, error })
    };
    write("Cargo.toml", fill(CARGO))?;
    write("src/lib.rs", fill(LIB))?;
    write("weir.toml", fill(CONFIG))?;
    write(".gitignore", "/target\n".into())?;
    Ok(root)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked_and_files_written() {
        let dir = tempfile::tempdir().expect("temp dir");
        for bad in ["", "Upper", "1st", "a_b", "end-", "sp ace"] {
            assert!(
                matches!(new_plugin(bad, dir.path(), &default_sdk()), Err(ScaffoldError::Name(_))),
                "{bad}"
            );
        }
        let root = new_plugin("geo-router", dir.path(), &default_sdk()).expect("written");
        let cargo = std::fs::read_to_string(root.join("Cargo.toml")).expect("Cargo.toml");
        assert!(cargo.contains("name = \"geo-router\""));
        assert!(!cargo.contains("{{"), "{cargo}");
        let config = std::fs::read_to_string(root.join("weir.toml")).expect("weir.toml");
        assert!(config.contains("release/geo_router.wasm"), "{config}");
        assert!(matches!(
            new_plugin("geo-router", dir.path(), &default_sdk()),
            Err(ScaffoldError::Exists(_))
        ));
    }
}
