//! `attestation-allowlist`: admits TLS peers by what they run. On every
//! `admit` (a client on a terminated connection, an upstream on a
//! re-encrypted one) the rules that cover the connection are checked against
//! the peer's attestation: allowed MRTDs, RTMR0-3 values, app ids, the
//! dstack compose-hash, os-image-hash and instance-id (from runtime events,
//! which weir lists only when they replay to RTMR3), and dstack's
//! `mr_system` and `mr_aggregated` (from the certificate's app-info, which
//! weir hands on only once it has checked them against the quote; dstack's
//! KMS allow-lists by these). A peer passes when it satisfies one
//! covering rule; a deny names the measurement that failed and its value.
//! Connections no rule covers are left alone (allowed). `route` always
//! abstains.
//!
//! ```json
//! {
//!   "require_verified": true,
//!   "allow_debug": false,
//!   "rules": [
//!     { "sni": "*.tee.example.com", "side": "client",
//!       "mrtd": ["91eb2b44d1..."], "app_id": ["3327603e03f5bd1f830812ca4a789277fc31f577"] },
//!     { "tenant": "acme", "compose_hash": ["ab12..."] }
//!   ]
//! }
//! ```
//!
//! A rule covers a connection when its `sni` pattern (exact or `*.` one
//! label) matches, its `tenant` and `listener` are the connection's, and its `side`
//! (`client` or `upstream`) is the peer's; absent fields cover everything.
//! Each measurement list that is present must contain the peer's value (hex,
//! any case); absent lists do not constrain.
#![deny(unsafe_code)]

use serde::Deserialize;
use weir_plugin_sdk::hex;
use weir_plugin_sdk::names::Pattern;
use weir_plugin_sdk::{Attestation, Connection, Decision, Peer, Plugin, Side, Verdict, export_plugin, parse_config};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum SideFilter {
    Client,
    Upstream,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleConfig {
    sni: Option<String>,
    tenant: Option<String>,
    listener: Option<String>,
    side: Option<SideFilter>,
    mrtd: Option<Vec<String>>,
    rtmr0: Option<Vec<String>>,
    rtmr1: Option<Vec<String>>,
    rtmr2: Option<Vec<String>>,
    rtmr3: Option<Vec<String>>,
    app_id: Option<Vec<String>>,
    compose_hash: Option<Vec<String>>,
    os_image_hash: Option<Vec<String>>,
    instance_id: Option<Vec<String>>,
    mr_system: Option<Vec<String>>,
    mr_aggregated: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default = "yes")]
    require_verified: bool,
    #[serde(default)]
    allow_debug: bool,
    rules: Vec<RuleConfig>,
}

fn yes() -> bool {
    true
}

/// A measurement a rule can constrain.
#[derive(Debug, Clone, Copy)]
enum Measure {
    Mrtd,
    Rtmr(usize),
    AppId,
    Event(&'static str),
    MrSystem,
    MrAggregated,
}

impl Measure {
    fn name(self) -> String {
        match self {
            Measure::Mrtd => "MRTD".into(),
            Measure::Rtmr(i) => format!("RTMR{i}"),
            Measure::AppId => "app id".into(),
            Measure::Event(name) => name.into(),
            Measure::MrSystem => "mr_system".into(),
            Measure::MrAggregated => "mr_aggregated".into(),
        }
    }

    /// The peer's value, if the attestation has one.
    fn value(self, attestation: &Attestation) -> Option<Vec<u8>> {
        match self {
            Measure::Mrtd => Some(attestation.mrtd.clone()),
            Measure::Rtmr(i) => attestation.rtmr.get(i).cloned(),
            Measure::AppId => attestation.app_id.clone(),
            Measure::Event(name) => attestation
                .runtime_events
                .iter()
                .find(|(event, _)| event == name)
                .map(|(_, payload)| payload.clone()),
            Measure::MrSystem => attestation.app_info.as_ref().map(|info| info.mr_system.clone()),
            Measure::MrAggregated => attestation.app_info.as_ref().map(|info| info.mr_aggregated.clone()),
        }
    }
}

#[derive(Debug)]
struct Rule {
    sni: Option<Pattern>,
    tenant: Option<String>,
    listener: Option<String>,
    side: Option<SideFilter>,
    allowed: Vec<(Measure, Vec<Vec<u8>>)>,
}

/// The configured rules.
#[derive(Debug, Default)]
pub struct AttestationAllowlist {
    require_verified: bool,
    allow_debug: bool,
    rules: Vec<Rule>,
}

fn parse_hex(text: &str) -> Result<Vec<u8>, String> {
    hex::decode(text).map_err(|e| format!("`{text}` is not hex: {e}"))
}

impl Plugin for AttestationAllowlist {
    fn configure(&mut self, config: &str) -> Result<(), String> {
        let config: Config = parse_config(config)?;
        let mut rules = Vec::new();
        for (index, rule) in config.rules.into_iter().enumerate() {
            let at = |why: String| format!("rules[{index}]: {why}");
            let sni = rule
                .sni
                .as_deref()
                .map(Pattern::parse)
                .transpose()
                .map_err(|e| at(format!("sni: {e}")))?;
            let mut allowed = Vec::new();
            for (measure, values, len) in [
                (Measure::Mrtd, rule.mrtd, Some(48)),
                (Measure::Rtmr(0), rule.rtmr0, Some(48)),
                (Measure::Rtmr(1), rule.rtmr1, Some(48)),
                (Measure::Rtmr(2), rule.rtmr2, Some(48)),
                (Measure::Rtmr(3), rule.rtmr3, Some(48)),
                (Measure::AppId, rule.app_id, None),
                (Measure::Event("compose-hash"), rule.compose_hash, None),
                (Measure::Event("os-image-hash"), rule.os_image_hash, None),
                (Measure::Event("instance-id"), rule.instance_id, None),
                (Measure::MrSystem, rule.mr_system, Some(32)),
                (Measure::MrAggregated, rule.mr_aggregated, Some(32)),
            ] {
                let Some(values) = values else { continue };
                if values.is_empty() {
                    return Err(at(format!(
                        "{}: an empty list allows nothing; leave it out instead",
                        measure.name()
                    )));
                }
                let parsed = values
                    .iter()
                    .map(|v| {
                        let bytes = parse_hex(v).map_err(|e| at(format!("{}: {e}", measure.name())))?;
                        match len {
                            Some(len) if bytes.len() != len => Err(at(format!(
                                "{}: `{v}` is {} bytes, not {len}",
                                measure.name(),
                                bytes.len()
                            ))),
                            _ => Ok(bytes),
                        }
                    })
                    .collect::<Result<_, _>>()?;
                allowed.push((measure, parsed));
            }
            rules.push(Rule {
                sni,
                tenant: rule.tenant,
                listener: rule.listener,
                side: rule.side,
                allowed,
            });
        }
        *self = AttestationAllowlist {
            require_verified: config.require_verified,
            allow_debug: config.allow_debug,
            rules,
        };
        Ok(())
    }

    fn route(&self, _conn: &Connection) -> Decision {
        Decision::next()
    }

    fn admit(&self, conn: &Connection, side: Side, peer: &Peer) -> Verdict {
        let covering: Vec<&Rule> = self.rules.iter().filter(|rule| rule.covers(conn, side)).collect();
        if covering.is_empty() {
            return Verdict::Allow;
        }
        let Some(attestation) = &peer.attestation else {
            return Verdict::Deny(format!("`{}` presented no attestation", peer.subject));
        };
        if self.require_verified && !attestation.verified {
            return Verdict::Deny("the quote is not verified against DCAP collateral".into());
        }
        if attestation.debug && !self.allow_debug {
            return Verdict::Deny("the TD runs in debug mode".into());
        }
        let mut first_failure = None;
        for rule in covering {
            match rule.check(attestation) {
                Ok(()) => return Verdict::Allow,
                Err(reason) => {
                    first_failure.get_or_insert(reason);
                }
            }
        }
        Verdict::Deny(first_failure.unwrap_or_default())
    }
}

impl Rule {
    fn covers(&self, conn: &Connection, side: Side) -> bool {
        let sni_ok = match (&self.sni, conn.sni.as_deref()) {
            (None, _) => true,
            (Some(pattern), Some(sni)) => pattern.matches(sni),
            (Some(_), None) => false,
        };
        let tenant_ok = self.tenant.is_none() || self.tenant == conn.tenant;
        let listener_ok = self.listener.as_ref().is_none_or(|l| *l == conn.listener);
        let side_ok = matches!(
            (self.side, side),
            (None, _) | (Some(SideFilter::Client), Side::Client) | (Some(SideFilter::Upstream), Side::Upstream)
        );
        sni_ok && tenant_ok && listener_ok && side_ok
    }

    /// The first measurement the attestation fails, with its value.
    fn check(&self, attestation: &Attestation) -> Result<(), String> {
        for (measure, allowed) in &self.allowed {
            match measure.value(attestation) {
                Some(value) if allowed.contains(&value) => {}
                Some(value) => return Err(format!("{} {} is not allowed", measure.name(), hex::encode(&value))),
                None => return Err(format!("the attestation has no {}", measure.name())),
            }
        }
        Ok(())
    }
}

export_plugin!(AttestationAllowlist);

#[cfg(test)]
mod tests {
    use super::*;

    const MRTD: &str =
        "91eb2b44d141d4ece09f0c75c2c53d247a3c68edd7fafe8a3520c942a604a407de03ae6dc5f87f27428b2538873118b7";

    fn attestation(mrtd: &[u8], verified: bool, debug: bool) -> Attestation {
        Attestation {
            tee: "tdx".into(),
            verified,
            tcb_status: verified.then(|| "UpToDate".into()),
            debug,
            mrtd: mrtd.to_vec(),
            rtmr: vec![vec![0; 48]; 4],
            report_data: vec![0; 64],
            app_id: Some(vec![0xaa; 20]),
            runtime_events: vec![("compose-hash".into(), vec![0xcc; 32])],
            app_info: None,
        }
    }

    fn peer(attestation: Option<Attestation>) -> Peer {
        Peer {
            subject: "CN=tee".into(),
            sans: vec![],
            fingerprint: vec![0; 32],
            attestation,
        }
    }

    fn allowlist(config: &str) -> AttestationAllowlist {
        let mut plugin = AttestationAllowlist::default();
        plugin.configure(config).expect("valid");
        plugin
    }

    #[test]
    fn measurements_are_checked_and_named() {
        let plugin = allowlist(&format!(
            r#"{{"rules": [{{"sni": "*.tee.test", "mrtd": ["{MRTD}"], "app_id": ["{}"], "compose_hash": ["{}"]}}]}}"#,
            "aa".repeat(20),
            "CC".repeat(32)
        ));
        let conn = Connection::for_test(Some("a.tee.test"), &[]);
        let good = parse_hex(MRTD).expect("hex");
        assert_eq!(
            plugin.admit(&conn, Side::Client, &peer(Some(attestation(&good, true, false)))),
            Verdict::Allow
        );
        let other = vec![7u8; 48];
        assert_eq!(
            plugin.admit(&conn, Side::Client, &peer(Some(attestation(&other, true, false)))),
            Verdict::Deny(format!("MRTD {} is not allowed", "07".repeat(48)))
        );
        let mut wrong_app = attestation(&good, true, false);
        wrong_app.app_id = Some(vec![0xbb; 20]);
        assert_eq!(
            plugin.admit(&conn, Side::Upstream, &peer(Some(wrong_app))),
            Verdict::Deny(format!("app id {} is not allowed", "bb".repeat(20)))
        );
        let mut no_events = attestation(&good, true, false);
        no_events.runtime_events.clear();
        assert_eq!(
            plugin.admit(&conn, Side::Client, &peer(Some(no_events))),
            Verdict::Deny("the attestation has no compose-hash".into())
        );
        assert_eq!(
            plugin.admit(&conn, Side::Client, &peer(None)),
            Verdict::Deny("`CN=tee` presented no attestation".into())
        );
        assert_eq!(
            plugin.admit(&conn, Side::Client, &peer(Some(attestation(&good, false, false)))),
            Verdict::Deny("the quote is not verified against DCAP collateral".into())
        );
        assert_eq!(
            plugin.admit(&conn, Side::Client, &peer(Some(attestation(&good, true, true)))),
            Verdict::Deny("the TD runs in debug mode".into())
        );
        // Not covered: another name.
        let elsewhere = Connection::for_test(Some("other.test"), &[]);
        assert_eq!(plugin.admit(&elsewhere, Side::Client, &peer(None)), Verdict::Allow);
    }

    #[test]
    fn scoping_by_side_and_tenant_and_policy_switches() {
        let plugin = allowlist(&format!(
            r#"{{"require_verified": false, "allow_debug": true, "rules": [
                {{"side": "upstream", "mrtd": ["{MRTD}"]}},
                {{"tenant": "acme", "side": "client", "rtmr0": ["{}"]}}
            ]}}"#,
            "00".repeat(48)
        ));
        let good = parse_hex(MRTD).expect("hex");
        let conn = Connection::for_test(Some("x.test"), &[]);
        let unverified_debug = peer(Some(attestation(&good, false, true)));
        assert_eq!(plugin.admit(&conn, Side::Upstream, &unverified_debug), Verdict::Allow);
        // Clients of other tenants are not covered.
        assert_eq!(plugin.admit(&conn, Side::Client, &peer(None)), Verdict::Allow);
        let mut acme = conn.clone();
        acme.tenant = Some("acme".into());
        assert_eq!(plugin.admit(&acme, Side::Client, &unverified_debug), Verdict::Allow);
        let mut bad = attestation(&good, false, false);
        bad.rtmr[0] = vec![1; 48];
        assert_eq!(
            plugin.admit(&acme, Side::Client, &peer(Some(bad))),
            Verdict::Deny(format!("RTMR0 {} is not allowed", "01".repeat(48)))
        );
    }

    #[test]
    fn a_rule_can_cover_one_listener_alone() {
        let plugin = allowlist(&format!(
            r#"{{"require_verified": false, "rules": [{{"listener": "db", "side": "upstream", "mrtd": ["{MRTD}"]}}]}}"#
        ));
        let stranger = peer(Some(attestation(&[7; 48], false, false)));
        let mut db = Connection::for_test(None, &[]);
        db.listener = "db".into();
        assert_eq!(
            plugin.admit(&db, Side::Upstream, &stranger),
            Verdict::Deny(format!("MRTD {} is not allowed", "07".repeat(48)))
        );
        let good = peer(Some(attestation(&parse_hex(MRTD).expect("hex"), false, false)));
        assert_eq!(plugin.admit(&db, Side::Upstream, &good), Verdict::Allow);
        let other = Connection::for_test(None, &[]);
        assert_eq!(
            plugin.admit(&other, Side::Upstream, &stranger),
            Verdict::Allow,
            "another listener"
        );
    }

    #[test]
    fn dstack_measurements_come_from_the_checked_app_info() {
        let plugin = allowlist(&format!(
            r#"{{"rules": [{{"mr_aggregated": ["{}"], "mr_system": ["{}"]}}]}}"#,
            "a9".repeat(32),
            "5e".repeat(32)
        ));
        let conn = Connection::for_test(None, &[]);
        let mut with_info = attestation(&[7; 48], true, false);
        assert_eq!(
            plugin.admit(&conn, Side::Client, &peer(Some(with_info.clone()))),
            Verdict::Deny("the attestation has no mr_system".into()),
            "no app-info: nothing to match"
        );
        let info = weir_plugin_sdk::AppInfo {
            app_id: vec![0xaa; 20],
            compose_hash: vec![0xcc; 32],
            instance_id: vec![1; 20],
            device_id: vec![2; 32],
            mr_system: vec![0x5e; 32],
            mr_aggregated: vec![0xa9; 32],
            os_image_hash: vec![3; 32],
            key_provider: b"{}".to_vec(),
            init_script_hashes: None,
        };
        with_info.app_info = Some(info.clone());
        assert_eq!(
            plugin.admit(&conn, Side::Client, &peer(Some(with_info.clone()))),
            Verdict::Allow
        );
        with_info.app_info = Some(weir_plugin_sdk::AppInfo {
            mr_system: vec![0x11; 32],
            ..info
        });
        assert_eq!(
            plugin.admit(&conn, Side::Client, &peer(Some(with_info))),
            Verdict::Deny(format!("mr_system {} is not allowed", "11".repeat(32)))
        );
    }

    #[test]
    fn bad_configs_are_refused() {
        for (config, expected) in [
            (r#"{"rules": [{"mrtd": ["zz"]}]}"#, "rules[0]: MRTD: `zz` is not hex"),
            (r#"{"rules": [{"mrtd": ["00"]}]}"#, "is 1 bytes, not 48"),
            (
                r#"{"rules": [{"mr_system": ["00"]}]}"#,
                "mr_system: `00` is 1 bytes, not 32",
            ),
            (r#"{"rules": [{"app_id": []}]}"#, "empty list allows nothing"),
            (r#"{"rules": [{"side": "both"}]}"#, "unknown variant `both`"),
            (r#"{"rules": [{"mrdt": []}]}"#, "unknown field `mrdt`"),
            (r#"{}"#, "missing field `rules`"),
        ] {
            let err = AttestationAllowlist::default().configure(config).expect_err(config);
            assert!(err.contains(expected), "{config}: {err}");
        }
    }
}
