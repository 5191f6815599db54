//! ACME in a fleet: one node orders a certificate at a time, and every
//! node shares what it issued.
//!
//! Under `<prefix>acme/<certificate>/`:
//!
//! - `lock`: the ordering node's name, under its lease — a node that dies
//!   mid-order frees it when the lease expires, and another orders;
//! - `issued`: the chain and key ([`Issued`]), which every node takes
//!   instead of ordering while it is not due (so a renewal is decided on
//!   the same certificate everywhere, under the lock);
//! - `last`: the last order ([`LastOrder`]), shown by every node;
//! - `account`: the ACME account's credentials, one account for the fleet;
//! - `alpn`: the open TLS-ALPN-01 challenges (name → SHA-256 of the key
//!   authorization, hex), under the orderer's lease: every node answers
//!   them, whichever one the CA reaches, and says so at
//!   `acme/~seen/<certificate>/<node>` (the revision it installed) before
//!   the orderer lets the CA validate: a key outside the range the nodes
//!   watch.
//!
//! These keys hold private keys: only the gateway's etcd role may read
//! `acme/`.

use std::collections::BTreeMap;
use std::sync::{Arc, Weak};
use std::time::Duration;

use etcd_client::{Compare, CompareOp, GetOptions, PutOptions, Txn, TxnOp, WatchOptions};
use serde::{Deserialize, Serialize};

use crate::acme::{Boxed, Coordinator, Issued, LastOrder, Taken};
use crate::config::AcmeConfig;
use crate::fleet::node::Node;
use crate::fleet::{FleetError, Keys};

/// Longest wait for every node to answer a shared TLS-ALPN-01 challenge.
const SEEN_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest value under `acme/` a node reads (a chain and key, an account).
const MAX_VALUE: usize = 256 * 1024;
/// Most names one order's shared challenges may hold (each costs every
/// node a key pair).
const MAX_CHALLENGE_NAMES: usize = 100;

/// The open TLS-ALPN-01 challenges of one order, at `acme/<c>/alpn`.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
struct Alpn {
    /// The node ordering.
    node: String,
    /// Name → SHA-256 of the key authorization, hex.
    names: BTreeMap<String, String>,
}

/// A name as one key segment or file name: bytes outside `[A-Za-z0-9._-]`
/// as `%XX`, so that no name reaches another's keys or leaves its
/// directory.
pub(super) fn segment(name: &str) -> String {
    name.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'.' | b'_' | b'-' => (b as char).to_string(),
            other => format!("%{other:02X}"),
        })
        .collect()
}

impl Keys {
    /// Everything the fleet keeps of ACME.
    pub fn acme_root(&self) -> String {
        format!("{}acme/", self.prefix())
    }

    /// Where the nodes say which challenges of `certificate` they answer
    /// (`<node>` → revision). Under `acme/~seen/`, past every
    /// certificate's keys (a segment has no `~`), so that the nodes' watch
    /// of `acme/` leaves it out: N nodes saying so is N puts, not N² events.
    pub fn acme_seen(&self, certificate: &str) -> String {
        format!("{}~seen/{}/", self.acme_root(), segment(certificate))
    }

    /// The end of the range the nodes watch under `acme/` (all of it but
    /// `~seen/`).
    fn acme_watched_end(&self) -> String {
        format!("{}~", self.acme_root())
    }

    /// One key of `certificate`'s (`lock`, `issued`, `last`, `account`, `alpn`).
    pub fn acme(&self, certificate: &str, what: &str) -> String {
        format!("{}{}/{what}", self.acme_root(), segment(certificate))
    }
}

impl Node {
    fn node_lease(&self) -> Option<i64> {
        *crate::sync::lock(&self.lease)
    }

    /// The value at `key`, refused (naming the key) over [`MAX_VALUE`].
    async fn get_value(&self, key: &str) -> Result<Option<Vec<u8>>, FleetError> {
        let mut client = self.client().await?;
        let answer = client.get(key, None).await?;
        match answer.kvs().first() {
            Some(kv) if kv.value().len() > MAX_VALUE => Err(FleetError::BadValue {
                key: key.to_owned(),
                reason: format!("{} bytes, more than {MAX_VALUE}", kv.value().len()),
            }),
            Some(kv) => Ok(Some(kv.value().to_vec())),
            None => Ok(None),
        }
    }

    async fn take_order(&self, certificate: &str, acme: &AcmeConfig, have: Option<&str>) -> Result<Taken, FleetError> {
        let Some(lease) = self.node_lease() else {
            return Ok(Taken::Unavailable("the node has no etcd lease yet".into()));
        };
        let lock = self.keys.acme(certificate, "lock");
        let mut client = self.client().await?;
        let txn = Txn::new()
            .when(vec![Compare::create_revision(lock.clone(), CompareOp::Equal, 0)])
            .and_then(vec![TxnOp::put(
                lock.clone(),
                self.name.clone(),
                Some(PutOptions::new().with_lease(lease)),
            )])
            .or_else(vec![TxnOp::get(lock.clone(), None)]);
        let answer = client.txn(txn).await?;
        if !answer.succeeded() {
            let holder = answer
                .op_responses()
                .into_iter()
                .find_map(|op| match op {
                    etcd_client::TxnOpResponse::Get(get) => get
                        .kvs()
                        .first()
                        .map(|kv| String::from_utf8_lossy(kv.value()).into_owned()),
                    _ => None,
                })
                .unwrap_or_default();
            // A lock of this node's own is left from an order it did not
            // finish (its etcd call failed); it is this node's to go on with.
            if holder != self.name {
                return Ok(Taken::Held(holder.escape_debug().to_string()));
            }
        }
        // Under the lock: a certificate another node issued since this
        // node's files were written is taken, not ordered again; the one
        // this node has and found due is ordered anew.
        let issued = self
            .get_value(&self.keys.acme(certificate, "issued"))
            .await?
            .and_then(|value| serde_json::from_slice::<Issued>(&value).ok());
        if let Some(issued) = issued
            && issued.due(acme).is_none()
            && have != Some(issued.chain.as_str())
        {
            let last = self
                .get_value(&self.keys.acme(certificate, "last"))
                .await?
                .and_then(|value| serde_json::from_slice::<LastOrder>(&value).ok());
            self.release(certificate).await?;
            return Ok(Taken::Issued(issued, last));
        }
        Ok(Taken::Order)
    }

    /// Deletes `certificate`'s lock if it is still this node's.
    async fn release(&self, certificate: &str) -> Result<(), FleetError> {
        let lock = self.keys.acme(certificate, "lock");
        let mut client = self.client().await?;
        let txn = Txn::new()
            .when(vec![Compare::value(lock.clone(), CompareOp::Equal, self.name.clone())])
            .and_then(vec![TxnOp::delete(lock, None)]);
        client.txn(txn).await?;
        Ok(())
    }

    async fn finish_order(
        &self,
        certificate: &str,
        issued: Option<&Issued>,
        last: &LastOrder,
    ) -> Result<(), FleetError> {
        let lock = self.keys.acme(certificate, "lock");
        let mut then = vec![TxnOp::put(
            self.keys.acme(certificate, "last"),
            serde_json::to_vec(last).unwrap_or_default(),
            None,
        )];
        if let Some(issued) = issued {
            then.push(TxnOp::put(
                self.keys.acme(certificate, "issued"),
                serde_json::to_vec(issued).unwrap_or_default(),
                None,
            ));
        }
        then.push(TxnOp::delete(lock.clone(), None));
        let mut client = self.client().await?;
        // What this node issued is shared even if its lock expired meanwhile.
        let answer = client
            .txn(
                Txn::new()
                    .when(vec![Compare::value(lock, CompareOp::Equal, self.name.clone())])
                    .and_then(then.clone())
                    .or_else(then[..then.len() - 1].to_vec()),
            )
            .await?;
        if !answer.succeeded() {
            tracing::warn!(
                certificate,
                "the order's lock had expired before it ended; its result is shared all the same"
            );
        }
        Ok(())
    }

    async fn publish_challenge(&self, certificate: &str, name: &str, digest: &[u8]) -> Result<(), FleetError> {
        let Some(lease) = self.node_lease() else {
            return Err(FleetError::Etcd("the node has no etcd lease".into()));
        };
        let key = self.keys.acme(certificate, "alpn");
        let mut alpn = self
            .get_value(&key)
            .await?
            .and_then(|value| serde_json::from_slice::<Alpn>(&value).ok())
            .filter(|alpn| alpn.node == self.name)
            .unwrap_or_default();
        alpn.node = self.name.clone();
        alpn.names.insert(name.to_owned(), weir_plugin_sdk::hex::encode(digest));
        let mut client = self.client().await?;
        let answer = client
            .put(
                key,
                serde_json::to_vec(&alpn).unwrap_or_default(),
                Some(PutOptions::new().with_lease(lease)),
            )
            .await?;
        let revision = answer.header().map_or(0, |h| h.revision());
        // Every live node answers the challenge before the CA is told to
        // look: it may reach any of them.
        let started = tokio::time::Instant::now();
        loop {
            let nodes = self.nodes().await?;
            let prefix = self.keys.acme_seen(certificate);
            let seen = client
                .get(prefix.clone(), Some(GetOptions::new().with_prefix()))
                .await?;
            let behind: Vec<&String> = nodes
                .keys()
                .filter(|node| {
                    !seen.kvs().iter().any(|kv| {
                        kv.key() == format!("{prefix}{node}").as_bytes()
                            && std::str::from_utf8(kv.value())
                                .ok()
                                .and_then(|v| v.parse::<i64>().ok())
                                .is_some_and(|r| r >= revision)
                    })
                })
                .collect();
            if behind.is_empty() {
                return Ok(());
            }
            if started.elapsed() > SEEN_TIMEOUT {
                tracing::warn!(certificate, name, nodes = ?behind, "these nodes did not take up the TLS-ALPN-01 challenge in time; the CA is told to validate all the same");
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Answers every order's shared TLS-ALPN-01 challenges on this node,
    /// and says so under `seen/`: a read of everything under `acme/`, then
    /// a watch from the revision after it, again after any error, until
    /// the gateway is gone.
    pub(super) async fn follow_challenges(self: Arc<Self>) {
        let mut installed: BTreeMap<String, Vec<String>> = BTreeMap::new();
        while self.gateway.get().and_then(Weak::upgrade).is_some() {
            if let Err(error) = self.watch_challenges(&mut installed).await {
                tracing::debug!(%error, "following the fleet's ACME challenges; again shortly");
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    async fn watch_challenges(&self, installed: &mut BTreeMap<String, Vec<String>>) -> Result<(), FleetError> {
        let mut client = self.client().await?;
        let root = self.keys.acme_root();
        let end = self.keys.acme_watched_end();
        let answer = client
            .get(
                root.clone(),
                Some(GetOptions::new().with_range(end.clone()).with_keys_only()),
            )
            .await?;
        let start = answer.header().map_or(0, |h| h.revision()) + 1;
        let mut now: BTreeMap<String, (i64, Vec<u8>)> = BTreeMap::new();
        for kv in answer.kvs() {
            let key = String::from_utf8_lossy(kv.key()).into_owned();
            if key.ends_with("/alpn")
                && let Some(value) = self.get_value(&key).await?
            {
                now.insert(key, (kv.mod_revision(), value));
            }
        }
        let stale: Vec<String> = installed.keys().filter(|k| !now.contains_key(*k)).cloned().collect();
        for key in stale {
            self.install(installed, &key, None).await;
        }
        for (key, (revision, value)) in now {
            self.install(installed, &key, Some((revision, &value))).await;
        }
        let options = WatchOptions::new().with_range(end).with_start_revision(start);
        let mut stream = client.watch(root, Some(options)).await?;
        while let Some(response) = stream.message().await? {
            if response.canceled() {
                return Ok(());
            }
            for event in response.events() {
                let Some(kv) = event.kv() else { continue };
                let key = String::from_utf8_lossy(kv.key()).into_owned();
                if !key.ends_with("/alpn") {
                    continue;
                }
                match event.event_type() {
                    etcd_client::EventType::Put => {
                        self.install(installed, &key, Some((kv.mod_revision(), kv.value())))
                            .await;
                    }
                    etcd_client::EventType::Delete => self.install(installed, &key, None).await,
                }
            }
        }
        Ok(())
    }

    /// Makes this node answer the challenges at `key` (`None`: none any
    /// more), and says which revision it answers.
    async fn install(&self, installed: &mut BTreeMap<String, Vec<String>>, key: &str, value: Option<(i64, &[u8])>) {
        let Some(gateway) = self.gateway.get().and_then(Weak::upgrade) else {
            return;
        };
        let state = gateway.snapshot().acme();
        if let Some(names) = installed.remove(key) {
            state.challenges.clear(&names);
        }
        let Some((revision, value)) = value else { return };
        if value.len() > MAX_VALUE {
            tracing::warn!(
                key,
                bytes = value.len(),
                "an ACME challenge value is too large; ignored"
            );
            return;
        }
        let Ok(alpn) = serde_json::from_slice::<Alpn>(value) else {
            tracing::warn!(key, "an ACME challenge value is not readable; ignored");
            return;
        };
        if alpn.names.len() > MAX_CHALLENGE_NAMES {
            tracing::warn!(
                key,
                names = alpn.names.len(),
                "an ACME challenge value names too many names; ignored"
            );
            return;
        }
        let mut names = Vec::new();
        for (name, digest) in &alpn.names {
            let made = weir_plugin_sdk::hex::decode(digest)
                .ok()
                .filter(|d| d.len() == 32)
                .ok_or_else(|| "not a SHA-256".to_owned())
                .and_then(|digest| crate::acme::challenge_certificate(name, &digest));
            match made {
                Ok(key) => {
                    state.challenges.set(name, Arc::new(key));
                    names.push(name.clone());
                }
                Err(error) => {
                    tracing::warn!(name = name.as_str(), %error, "a shared ACME challenge cannot be answered")
                }
            }
        }
        installed.insert(key.to_owned(), names);
        let root = self.keys.acme_root();
        let certificate = key
            .strip_prefix(&root)
            .and_then(|k| k.strip_suffix("/alpn"))
            .unwrap_or(key);
        let seen = format!("{root}~seen/{certificate}/{}", self.name);
        if let (Some(lease), Ok(mut client)) = (self.node_lease(), self.client().await) {
            let options = PutOptions::new().with_lease(lease);
            if let Err(error) = client.put(seen, revision.to_string(), Some(options)).await {
                tracing::debug!(%error, "could not say the ACME challenge is answered");
            }
        }
    }
}

impl Coordinator for Node {
    fn take<'a>(&'a self, certificate: &'a str, acme: &'a AcmeConfig, have: Option<&'a str>) -> Boxed<'a, Taken> {
        Box::pin(async move {
            self.take_order(certificate, acme, have)
                .await
                .unwrap_or_else(|e| Taken::Unavailable(e.to_string()))
        })
    }

    fn finish<'a>(&'a self, certificate: &'a str, issued: Option<&'a Issued>, last: &'a LastOrder) -> Boxed<'a, ()> {
        Box::pin(async move {
            if let Err(error) = self.finish_order(certificate, issued, last).await {
                tracing::error!(certificate, %error, "the order's result could not be shared with the fleet");
            }
        })
    }

    fn share_challenge<'a>(&'a self, certificate: &'a str, name: &'a str, digest: &'a [u8]) -> Boxed<'a, ()> {
        Box::pin(async move {
            if let Err(error) = self.publish_challenge(certificate, name, digest).await {
                tracing::warn!(certificate, name, %error, "the TLS-ALPN-01 challenge could not be shared; only this node answers it");
            }
        })
    }

    fn withdraw_challenges<'a>(&'a self, certificate: &'a str) -> Boxed<'a, ()> {
        Box::pin(async move {
            let key = self.keys.acme(certificate, "alpn");
            if let Ok(mut client) = self.client().await
                && let Err(error) = client.delete(key, None).await
            {
                tracing::debug!(certificate, %error, "the shared challenges stay until the node's lease ends");
            }
        })
    }

    fn account<'a>(&'a self, certificate: &'a str) -> Boxed<'a, Option<String>> {
        Box::pin(async move {
            let value = self.get_value(&self.keys.acme(certificate, "account")).await.ok()??;
            (value.len() <= MAX_VALUE)
                .then(|| String::from_utf8(value).ok())
                .flatten()
        })
    }

    fn save_account<'a>(&'a self, certificate: &'a str, credentials: &'a str) -> Boxed<'a, ()> {
        Box::pin(async move {
            let key = self.keys.acme(certificate, "account");
            let saved = async {
                let mut client = self.client().await?;
                // The first account saved stays the fleet's.
                let txn = Txn::new()
                    .when(vec![Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
                    .and_then(vec![TxnOp::put(key, credentials, None)]);
                client.txn(txn).await?;
                Ok::<_, FleetError>(())
            };
            if let Err(error) = saved.await {
                tracing::warn!(certificate, %error, "the ACME account could not be shared with the fleet");
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_certificate_name_is_one_key_segment() {
        assert_eq!(segment("site-1.a_b"), "site-1.a_b");
        assert_eq!(segment("a/lock"), "a%2Flock");
        assert_eq!(segment("x%2F"), "x%252F");
    }
}
