//! The files a config names, field by field: what the file watcher
//! watches, and what a fleet publish uploads and a node replaces with the
//! blobs it fetched.

use std::collections::BTreeMap;
use std::path::PathBuf;

use super::{Config, PluginConfig};

/// The files of a set of plugins, by field (`plugins.NAME.wasm`,
/// `plugins.NAME.config_file`).
pub fn plugin_files_mut(plugins: &mut BTreeMap<String, PluginConfig>) -> Vec<(String, &mut PathBuf)> {
    let mut files = Vec::new();
    for (name, plugin) in plugins {
        files.push((format!("plugins.{name}.wasm"), &mut plugin.wasm));
        if let Some(file) = &mut plugin.config_file {
            files.push((format!("plugins.{name}.config_file"), file));
        }
    }
    files
}

impl Config {
    /// The fields naming files ACME keeps (`certificates.NAME.cert` and
    /// `.key` of each certificate with `acme`): written by weir, not given.
    pub fn acme_files(&self) -> std::collections::BTreeSet<String> {
        self.certificates
            .iter()
            .filter(|(_, c)| c.acme.is_some())
            .flat_map(|(name, _)| [format!("certificates.{name}.cert"), format!("certificates.{name}.key")])
            .collect()
    }

    /// Every file the config names, by the dotted field that names it
    /// (`plugins.router.wasm`, `certificates.site.key`, `attestation.collateral.0`),
    /// as written (relative to the file, but `config_file`, resolved at parse).
    pub fn files_mut(&mut self) -> Vec<(String, &mut PathBuf)> {
        let mut files = plugin_files_mut(&mut self.plugins);
        for (name, cert) in &mut self.certificates {
            files.push((format!("certificates.{name}.cert"), &mut cert.cert));
            files.push((format!("certificates.{name}.key"), &mut cert.key));
            if let Some(ocsp) = &mut cert.ocsp {
                files.push((format!("certificates.{name}.ocsp"), ocsp));
            }
            if let Some(roots) = cert.acme.as_mut().and_then(|acme| acme.directory_ca.as_mut()) {
                files.push((format!("certificates.{name}.acme.directory_ca"), roots));
            }
        }
        for (name, ca) in &mut self.cas {
            if let Some(file) = &mut ca.file {
                files.push((format!("cas.{name}.file"), file));
            }
        }
        for (name, dns) in &mut self.dns {
            if let Some(file) = &mut dns.tsig_secret_file {
                files.push((format!("dns.{name}.tsig_secret_file"), file));
            }
        }
        for (n, file) in self.attestation.collateral.iter_mut().enumerate() {
            files.push((format!("attestation.collateral.{n}"), file));
        }
        files
    }
}
