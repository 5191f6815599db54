//! `weir publish`: a config (checked beforehand as `weir check` does) and
//! the files it names go to etcd — the files etcd does not hold yet (or
//! holds other bytes of) first, chunk by chunk, then the config in one
//! transaction — and, with
//! `--wait`, the nodes' reports are followed until each applied it or
//! said why not.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::clock::unix_now as now;
use crate::config::Config;
use crate::fleet::node::{TenantReport, list_nodes, list_tenant_nodes};
use crate::fleet::tenant::TenantPolicy;
use crate::fleet::{BlobMeta, Blobs, CHUNK, FORMAT, FleetError, Keys, MAX_CONFIG_BYTES, Published};

/// What a publish did.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The etcd revision of the published config.
    pub revision: i64,
    /// Files uploaded now: field, SHA-256, bytes.
    pub uploaded: Vec<(String, String, u64)>,
    /// Files etcd already held, every byte checked.
    pub reused: usize,
    /// Files etcd held other bytes under (written again, so also in
    /// `uploaded`): field, SHA-256, what was wrong.
    pub repaired: Vec<(String, String, String)>,
}

/// Where the nodes stand on a revision.
#[derive(Debug, Clone, Default)]
pub struct Progress {
    /// Nodes that serve it (or a later one).
    pub applied: Vec<String>,
    /// Nodes that refused it, and why.
    pub failed: Vec<(String, String)>,
    /// Nodes that have done neither yet.
    pub pending: Vec<String>,
}

fn read(path: &Path, limit: u64) -> Result<Vec<u8>, FleetError> {
    let io = |reason: String| FleetError::Io {
        path: path.to_owned(),
        reason,
    };
    let length = std::fs::metadata(path).map_err(|e| io(e.to_string()))?.len();
    if length > limit {
        return Err(io(format!(
            "{length} bytes; a publish carries files of at most {limit} bytes"
        )));
    }
    std::fs::read(path).map_err(|e| io(e.to_string()))
}

/// The text of the file at `path`, bounded.
fn read_text(path: &Path) -> Result<String, FleetError> {
    String::from_utf8(read(path, MAX_CONFIG_BYTES as u64)?).map_err(|_| FleetError::Io {
        path: path.to_owned(),
        reason: "not UTF-8".into(),
    })
}

/// Publishes the config at `path` under `keys`.
pub async fn publish(client: &mut etcd_client::Client, keys: &Keys, path: &Path) -> Result<Outcome, FleetError> {
    let text = read_text(path)?;
    let mut config = Config::parse(&text, path)?;
    // ACME certificates are ordered by the nodes and shared through etcd:
    // their files are not the publisher's to give.
    let ordered = config.acme_files();
    let base = config.clone();
    let named = config
        .files_mut()
        .into_iter()
        .filter(|(field, _)| !ordered.contains(field))
        .map(|(field, file)| (field, base.resolve(file)))
        .collect();
    put_published(client, &keys.blobs(), keys.config(), text, named, path).await
}

/// Publishes the policy at `path` as `tenant`'s.
pub async fn publish_tenant(
    client: &mut etcd_client::Client,
    keys: &Keys,
    tenant: &str,
    path: &Path,
) -> Result<Outcome, FleetError> {
    let text = read_text(path)?;
    let mut policy = TenantPolicy::parse(&text, tenant).map_err(|reason| FleetError::Io {
        path: path.to_owned(),
        reason,
    })?;
    check_against_published(client, keys, tenant, &policy)
        .await
        .map_err(|reason| FleetError::Io {
            path: path.to_owned(),
            reason,
        })?;
    let dir = path.parent().unwrap_or(Path::new("."));
    let named = policy
        .files_mut()
        .into_iter()
        .map(|(field, file)| (field, dir.join(file)))
        .collect();
    put_published(
        client,
        &keys.tenant_blobs(tenant),
        keys.policy(tenant),
        text,
        named,
        path,
    )
    .await
}

/// Lays `policy` over the operator's published config, when this user may
/// read it, and checks the whole as every node will: a pool server outside
/// the tenant's ranges, a pool its section does not list, a timeout above
/// its limit are refused before anything is written. A tenant's own etcd
/// user may not read the operator's config: then the nodes alone check
/// (and `--wait` prints what they said).
async fn check_against_published(
    client: &mut etcd_client::Client,
    keys: &Keys,
    tenant: &str,
    policy: &TenantPolicy,
) -> Result<(), String> {
    let Ok(response) = client.get(keys.config(), None).await else {
        return Ok(());
    };
    let Some(kv) = response.kvs().first() else {
        return Ok(());
    };
    let Ok(published) = serde_json::from_slice::<Published>(kv.value()) else {
        return Ok(());
    };
    let Ok(mut config) = Config::parse(&published.toml, Path::new("fleet.toml")) else {
        return Ok(());
    };
    policy.clone().apply(tenant, &mut config).map_err(|reason| {
        format!(
            "against the published config (revision {}): {reason}",
            kv.mod_revision()
        )
    })
}

/// Uploads the `named` files that `blobs` lacks or holds damaged, then puts `text` with
/// their hashes at `key` in one transaction.
async fn put_published(
    client: &mut etcd_client::Client,
    blobs: &Blobs,
    key: String,
    text: String,
    named: Vec<(String, PathBuf)>,
    path: &Path,
) -> Result<Outcome, FleetError> {
    let mut files = BTreeMap::new();
    let mut contents: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let mut fields = BTreeMap::new();
    for (field, file) in named {
        let bytes = read(&file, blobs.limit())?;
        let sha256 = weir_plugin_sdk::hex::encode(&crate::plugin::cache::sha256(&[&bytes]));
        files.insert(field.clone(), sha256.clone());
        fields.entry(sha256.clone()).or_insert(field);
        contents.insert(sha256, bytes);
    }
    let mut outcome = Outcome {
        revision: 0,
        uploaded: Vec::new(),
        reused: 0,
        repaired: Vec::new(),
    };
    for (sha256, bytes) in &contents {
        let field = fields[sha256].clone();
        match held_as(client, blobs, sha256, bytes).await? {
            Held::Intact => {
                outcome.reused += 1;
                continue;
            }
            Held::Damaged(reason) => outcome.repaired.push((field.clone(), sha256.clone(), reason)),
            Held::Missing => {}
        }
        for (n, chunk) in bytes.chunks(CHUNK).enumerate() {
            client.put(blobs.chunk(sha256, n), chunk, None).await?;
        }
        let meta = BlobMeta {
            size: bytes.len() as u64,
            chunks: bytes.len().div_ceil(CHUNK),
        };
        client
            .put(blobs.meta(sha256), serde_json::to_vec(&meta).unwrap_or_default(), None)
            .await?;
        outcome.uploaded.push((field, sha256.clone(), bytes.len() as u64));
    }
    let published = Published {
        format: FORMAT,
        toml: text,
        files,
        published_at: now(),
        source: path.display().to_string(),
    };
    let value = serde_json::to_vec(&published).map_err(|e| FleetError::Etcd(e.to_string()))?;
    let txn = etcd_client::Txn::new().and_then(vec![etcd_client::TxnOp::put(key, value, None)]);
    let answer = client.txn(txn).await?;
    outcome.revision = answer.header().map_or(0, |h| h.revision());
    Ok(outcome)
}

/// What etcd holds of a blob.
enum Held {
    /// Nothing: it is uploaded.
    Missing,
    /// Every byte as the publisher has it.
    Intact,
    /// Something else under its name (why): it is written again.
    Damaged(String),
}

/// Compares what etcd holds under `sha256` with `bytes`, chunk by chunk (a
/// chunk at a time in memory), so that a publish repairs a blob changed or
/// cut short in etcd instead of trusting its name.
async fn held_as(
    client: &mut etcd_client::Client,
    blobs: &Blobs,
    sha256: &str,
    bytes: &[u8],
) -> Result<Held, FleetError> {
    let meta_key = blobs.meta(sha256);
    let answer = client.get(meta_key.clone(), None).await?;
    let Some(kv) = answer.kvs().first() else {
        return Ok(Held::Missing);
    };
    let expected = BlobMeta {
        size: bytes.len() as u64,
        chunks: bytes.len().div_ceil(CHUNK),
    };
    match serde_json::from_slice::<BlobMeta>(kv.value()) {
        Ok(meta) if meta == expected => {}
        _ => return Ok(Held::Damaged(format!("{meta_key} does not describe these bytes"))),
    }
    for (n, chunk) in bytes.chunks(CHUNK).enumerate() {
        let key = blobs.chunk(sha256, n);
        let answer = client.get(key.clone(), None).await?;
        if answer.kvs().first().is_none_or(|kv| kv.value() != chunk) {
            return Ok(Held::Damaged(format!("{key} is not these bytes")));
        }
    }
    Ok(Held::Intact)
}

/// Where the live nodes stand on `revision` now: of the config, or of
/// `tenant`'s policy.
pub async fn progress(
    client: &mut etcd_client::Client,
    keys: &Keys,
    revision: i64,
    tenant: Option<&str>,
) -> Result<Progress, FleetError> {
    let mut progress = Progress::default();
    // Of the config: each node's own report; of a tenant's policy: what the
    // nodes say of it under the tenant's prefix.
    let reports: BTreeMap<String, TenantReport> = match tenant {
        None => list_nodes(client, keys)
            .await?
            .into_iter()
            .map(|(name, r)| {
                let said = TenantReport {
                    revision: r.revision,
                    error: r.error,
                    failed_revision: r.failed_revision,
                };
                (name, said)
            })
            .collect(),
        Some(tenant) => list_tenant_nodes(client, keys, tenant).await?,
    };
    for (name, said) in reports {
        let refused = said.failed_revision.zip(said.error);
        if said.revision >= revision {
            progress.applied.push(name);
        } else if let Some((failed, error)) = refused
            && failed >= revision
        {
            progress.failed.push((name, error));
        } else {
            progress.pending.push(name);
        }
    }
    Ok(progress)
}

/// Follows the nodes' reports until none is pending on `revision`, or
/// `timeout` passes.
pub async fn wait(
    client: &mut etcd_client::Client,
    keys: &Keys,
    revision: i64,
    tenant: Option<&str>,
    timeout: Duration,
) -> Result<Progress, FleetError> {
    let started = Instant::now();
    loop {
        let progress = progress(client, keys, revision, tenant).await?;
        // No node live at all (a fleet starting, leases renewed after an
        // etcd election) is waited out like a node still applying.
        let none = progress.applied.is_empty() && progress.failed.is_empty() && progress.pending.is_empty();
        if (progress.pending.is_empty() && !none) || started.elapsed() >= timeout {
            return Ok(progress);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
