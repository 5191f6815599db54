//! Reads of the fleet's state that take more than one request: the
//! revisions a node must report to be current, and a prefix's keys and
//! values in pages at one revision.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::fleet::{FleetError, Keys, MAX_STATE_BYTES};

/// The revision of the latest write to what every node serves of the
/// operator's (the config, the pools), and of each tenant's policy: what a
/// node must report to be current.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Revisions {
    /// Of the config and the pools ([`State::content_revision`]).
    pub state: i64,
    /// Of each tenant's policy.
    pub tenants: BTreeMap<String, i64>,
}

/// The [`Revisions`] etcd holds now (keys only: one small read).
pub async fn current_revisions(client: &mut etcd_client::Client, keys: &Keys) -> Result<Revisions, FleetError> {
    use etcd_client::{GetOptions, Txn, TxnOp, TxnOpResponse};
    let keys_only = || Some(GetOptions::new().with_prefix().with_keys_only());
    let txn = Txn::new().and_then(vec![
        TxnOp::get(keys.config(), Some(GetOptions::new().with_keys_only())),
        TxnOp::get(keys.pools(), keys_only()),
        TxnOp::get(keys.policies(), keys_only()),
    ]);
    let response = client.txn(txn).await?;
    let mut revisions = Revisions::default();
    let policies = keys.policies();
    for (i, answer) in response.op_responses().into_iter().enumerate() {
        let TxnOpResponse::Get(get) = answer else { continue };
        for kv in get.kvs() {
            if i < 2 {
                revisions.state = revisions.state.max(kv.mod_revision());
            } else if let Some(tenant) = kv.key_str().ok().and_then(|k| k.strip_prefix(&policies)) {
                revisions.tenants.insert(tenant.to_owned(), kv.mod_revision());
            }
        }
    }
    Ok(revisions)
}

/// Pools a page of [`read_pages`] holds: 32 of the largest a node takes
/// (256 KiB) are an eighth of the largest answer it reads.
const PAGE_KEYS: i64 = 32;

/// Every key under `prefix` with its value, as etcd had them at `revision`,
/// [`PAGE_KEYS`] at a time; `expected` is how many the caller saw listed.
pub(super) async fn read_pages(
    client: &mut etcd_client::Client,
    prefix: &str,
    revision: i64,
    expected: usize,
) -> Result<Vec<etcd_client::KeyValue>, FleetError> {
    use etcd_client::GetOptions;
    // The end of the prefix's range: its last byte one higher (a prefix ends
    // in `/`, so there is no carry).
    let mut end = prefix.as_bytes().to_vec();
    if let Some(last) = end.last_mut() {
        *last += 1;
    }
    let mut kvs = Vec::with_capacity(expected);
    if expected == 0 {
        // None listed at `revision`: none to read at it.
        return Ok(kvs);
    }
    let mut from = prefix.as_bytes().to_vec();
    loop {
        let options = GetOptions::new()
            .with_range(end.clone())
            .with_revision(revision)
            .with_limit(PAGE_KEYS);
        let page = client
            .kv_client()
            .max_decoding_message_size(MAX_STATE_BYTES)
            .get(from.clone(), Some(options))
            .await?;
        let more = page.more();
        let mut page = page;
        let taken = page.take_kvs();
        let Some(last) = taken.last() else { break };
        from = last.key().to_vec();
        from.push(0);
        kvs.extend(taken);
        if !more {
            break;
        }
    }
    Ok(kvs)
}
