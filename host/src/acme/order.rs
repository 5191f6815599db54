//! One ACME order: the account, each authorization's challenge (answered
//! by the listeners for TLS-ALPN-01, published through a DNS provider for
//! DNS-01), finalization, and the files; whatever it published is
//! withdrawn however it ends.

use std::path::Path;
use std::sync::Arc;

use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, CertificateIdentifier, ChallengeType, Identifier, NewAccount,
    NewOrder, OrderStatus, RetryPolicy,
};
use rustls::sign::CertifiedKey;

use super::{AcmeError, Challenges, Coordinator, Issued, ORDER_TIMEOUT, dns, replace_file};
use crate::config::{AcmeConfig, CertificateConfig, Challenge, Config};

/// An order's challenges, withdrawn when the order ends however it ends
/// (success, failure, or its timeout dropping it midway).
struct OpenChallenges<'a> {
    challenges: &'a Challenges,
    names: &'a [String],
}

impl Drop for OpenChallenges<'_> {
    fn drop(&mut self) {
        self.challenges.clear(self.names);
    }
}

/// The TLS-ALPN-01 certificate for `name`: self-signed, for that name only,
/// with the SHA-256 of the key authorization in its critical
/// `acmeIdentifier` extension.
pub(crate) fn challenge_certificate(name: &str, digest: &[u8]) -> Result<CertifiedKey, String> {
    let key = rcgen::KeyPair::generate().map_err(|e| e.to_string())?;
    let mut params = rcgen::CertificateParams::new(vec![name.to_owned()]).map_err(|e| e.to_string())?;
    params.custom_extensions = vec![rcgen::CustomExtension::new_acme_identifier(digest)];
    let cert = params.self_signed(&key).map_err(|e| e.to_string())?;
    let der = rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).map_err(str::to_owned)?;
    let signer = rustls::crypto::ring::default_provider()
        .key_provider
        .load_private_key(der)
        .map_err(|e| e.to_string())?;
    Ok(CertifiedKey::new(vec![cert.der().clone()], signer))
}

/// The client of `acme`'s CA, trusting `directory_ca` (every certificate
/// in the file) or the system's verifier; its connections are the
/// operator's, opened by the door (a directory at one of weir's own
/// addresses is refused).
pub(super) fn builder(acme: &AcmeConfig, config: &Config) -> Result<instant_acme::AccountBuilder, instant_acme::Error> {
    use hyper_rustls::HttpsConnectorBuilder;
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let other = |e: Box<dyn std::error::Error + Send + Sync>| instant_acme::Error::Other(e);
    let tls = match &acme.directory_ca {
        Some(file) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in CertificateDer::pem_file_iter(config.resolve(file)).map_err(|e| other(e.into()))? {
                roots
                    .add(cert.map_err(|e| other(e.into()))?)
                    .map_err(|e| other(e.into()))?;
            }
            HttpsConnectorBuilder::new().with_tls_config(
                rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                    .with_safe_default_protocol_versions()
                    .map_err(|e| other(e.into()))?
                    .with_root_certificates(roots)
                    .with_no_client_auth(),
            )
        }
        None => HttpsConnectorBuilder::new()
            .try_with_platform_verifier()
            .map_err(|e| other(e.into()))?,
    };
    let connector = tls
        .https_only()
        .enable_http1()
        .enable_http2()
        .wrap_connector(crate::door::DoorConnector);
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build::<_, instant_acme::BodyWrapper<hyper::body::Bytes>>(connector);
    Ok(Account::builder_with_http(Box::new(client)))
}

/// The account for `acme`: the fleet's (written to its credentials file),
/// the file's, or one created at the CA, saved there and shared.
async fn account(
    name: &str,
    acme: &AcmeConfig,
    config: &Config,
    cert: &Path,
    fleet: &dyn Coordinator,
) -> Result<Account, AcmeError> {
    let builder = || builder(acme, config);
    let file = config.resolve(&acme.account_file(cert));
    let shared = fleet.account(name).await;
    if let Some(text) = &shared {
        replace_file(&file, text.as_bytes(), true)?;
    }
    if let Ok(text) = std::fs::read_to_string(&file)
        && let Ok(credentials) = serde_json::from_str::<AccountCredentials>(&text)
    {
        if shared.is_none() {
            fleet.save_account(name, &text).await;
        }
        return Ok(builder()?.from_credentials(credentials).await?);
    }
    let contact: Vec<&str> = acme.contact.iter().map(String::as_str).collect();
    let new = NewAccount {
        contact: &contact,
        terms_of_service_agreed: true,
        only_return_existing: false,
    };
    let (account, credentials) = builder()?.create(&new, acme.directory.clone(), None).await?;
    let text = serde_json::to_string_pretty(&credentials).map_err(|e| AcmeError::Order(e.to_string()))?;
    replace_file(&file, text.as_bytes(), true)?;
    fleet.save_account(name, &text).await;
    Ok(account)
}

/// Orders the certificate `name` (`certificate`), answering its challenges
/// (TLS-ALPN-01 through `challenges` and every node of the fleet, DNS-01
/// through its `[dns.NAME]` provider), and writes it to its files.
/// Whatever was published for the order is withdrawn however it ends, its
/// timeout included. A renewal the CA's window asked for names the
/// certificate it `replaces`.
pub async fn order(
    name: &str,
    certificate: &CertificateConfig,
    config: &Config,
    challenges: &Challenges,
    fleet: &dyn Coordinator,
    replaces: Option<CertificateIdentifier<'static>>,
) -> Result<Issued, AcmeError> {
    let Some(acme) = &certificate.acme else {
        return Err(AcmeError::Order("not an ACME certificate".into()));
    };
    let open = OpenChallenges {
        challenges,
        names: &acme.domains,
    };
    let mut published = Vec::new();
    let ordered = tokio::time::timeout(
        ORDER_TIMEOUT,
        issue(
            name,
            certificate,
            acme,
            config,
            (challenges, fleet),
            replaces,
            &mut published,
        ),
    )
    .await
    .unwrap_or_else(|_| Err(AcmeError::Order(format!("not done within {ORDER_TIMEOUT:?}"))));
    drop(open);
    if acme.challenge == Challenge::TlsAlpn01 {
        fleet.withdraw_challenges(name).await;
    }
    if let Some(dns) = acme.dns.as_ref().and_then(|name| config.dns.get(name)) {
        for txt in &published {
            if let Err(error) = dns::change(dns, config, dns::Action::Cleanup, txt).await {
                tracing::warn!(fqdn = txt.fqdn.as_str(), %error, "a DNS-01 record could not be removed");
            }
        }
    }
    let (key, chain) = ordered?;
    let issued = Issued { chain, key };
    issued.write(certificate, config)?;
    Ok(issued)
}

/// The order itself: account, authorizations, finalization; the DNS-01
/// records it publishes are pushed on `published`.
async fn issue(
    name: &str,
    certificate: &CertificateConfig,
    acme: &AcmeConfig,
    config: &Config,
    (challenges, fleet): (&Challenges, &dyn Coordinator),
    replaces: Option<CertificateIdentifier<'static>>,
    published: &mut Vec<dns::Txt>,
) -> Result<(String, String), AcmeError> {
    let account = account(name, acme, config, &certificate.cert, fleet).await?;
    let identifiers: Vec<Identifier> = acme.domains.iter().cloned().map(Identifier::Dns).collect();
    let mut new = NewOrder::new(&identifiers);
    if let Some(replaces) = replaces {
        new = new.replaces(replaces);
    }
    let mut order = account.new_order(&new).await?;
    let mut authorizations = order.authorizations();
    while let Some(authorization) = authorizations.next().await {
        let mut authorization = authorization?;
        match authorization.status {
            AuthorizationStatus::Pending => {}
            AuthorizationStatus::Valid => continue,
            other => return Err(AcmeError::Order(format!("an authorization is {other:?}"))),
        }
        let kind = match acme.challenge {
            Challenge::TlsAlpn01 => ChallengeType::TlsAlpn01,
            Challenge::Dns01 => ChallengeType::Dns01,
        };
        let mut challenge = authorization
            .challenge(kind)
            .ok_or_else(|| AcmeError::Order(format!("the CA offers no {} challenge", acme.challenge.as_str())))?;
        let Identifier::Dns(identifier) = challenge.identifier().identifier.clone() else {
            return Err(AcmeError::Order("an identifier is not a DNS name".into()));
        };
        match acme.challenge {
            Challenge::TlsAlpn01 => {
                let digest = challenge.key_authorization().digest();
                let key = challenge_certificate(&identifier, digest.as_ref()).map_err(AcmeError::Order)?;
                challenges.set(&identifier, Arc::new(key));
                fleet.share_challenge(name, &identifier, digest.as_ref()).await;
            }
            Challenge::Dns01 => {
                let provider = acme.dns.as_deref().unwrap_or_default();
                let dns = config
                    .dns
                    .get(provider)
                    .ok_or_else(|| AcmeError::Order(format!("no [dns.{provider}]")))?;
                let txt = dns::Txt::for_name(&identifier, challenge.key_authorization().dns_value());
                let failed = |error: String| AcmeError::Dns {
                    provider: provider.to_owned(),
                    error,
                };
                dns::change(dns, config, dns::Action::Present, &txt)
                    .await
                    .map_err(failed)?;
                published.push(txt.clone());
                dns::wait_visible(dns, std::slice::from_ref(&txt))
                    .await
                    .map_err(failed)?;
            }
        }
        challenge.set_ready().await?;
    }
    let status = order.poll_ready(&RetryPolicy::default()).await?;
    if status != OrderStatus::Ready {
        return Err(AcmeError::Order(format!("the order is {status:?}, not ready")));
    }
    let key = order.finalize().await?;
    let chain = order.poll_certificate(&RetryPolicy::default()).await?;
    Ok((key, chain))
}
