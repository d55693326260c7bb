//! TLS for the management and gRPC listeners (docs/security.md).
//!
//! With `--tls-cert`/`--tls-key` the operator's certificate is served. Otherwise `serve`
//! keeps a small local CA under `<data-dir>/tls/`: on first start it makes `ca.pem` (what
//! clients trust) with its key `ca.key`, and `server.pem`/`server.key` signed by it, whose
//! names cover `localhost`, the host name, the loopback addresses and the listen addresses
//! (and, for a wildcard listen address, the host name's addresses). Later starts reuse them;
//! the server certificate alone is made again, by the same CA, when the names it must cover
//! change or it has less than 30 days left. Keys are written readable by their owner only.
//!
//! `--tls-client-ca` makes both listeners require a client certificate signed by that CA
//! (mutual TLS); the bearer token is still required on top.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, ToSocketAddrs as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context as _, bail};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};
use tokio_rustls::TlsAcceptor;
use tracing::{info, warn};

use crate::config::SecurityConfig;
use crate::datadir::{PRIVATE, PUBLIC, write_whole};

/// The acceptors of the two TLS listeners.
#[derive(Clone)]
pub struct Tls {
    /// The management listener's: HTTP/1.1.
    pub http: TlsAcceptor,
    /// The gRPC listener's: HTTP/2.
    pub grpc: TlsAcceptor,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Tls")
    }
}

/// The directory of the generated CA and certificate.
pub fn dir(data_dir: &Path) -> PathBuf {
    data_dir.join("tls")
}

/// The CA certificate clients trust when `serve` made its own.
pub fn ca_file(data_dir: &Path) -> PathBuf {
    dir(data_dir).join("ca.pem")
}

/// The TLS settings of the listeners: `None` with TLS off (which is logged as a warning).
/// `listen` are the addresses the certificate must cover; `extra_names` host names (from
/// configured base URLs) it must cover too.
pub fn load(
    security: &SecurityConfig,
    data_dir: &Path,
    listen: &[SocketAddr],
    extra_names: &[String],
) -> anyhow::Result<Option<Tls>> {
    if !security.tls {
        warn!(
            "TLS is OFF (--no-tls): tokens and BMC passwords cross the network in clear text; not recommended"
        );
        return Ok(None);
    }
    let (chain, key) = match (&security.tls_cert, &security.tls_key) {
        (Some(cert), Some(key)) => (read_chain(cert)?, read_key(key)?),
        _ => local_ca(data_dir, listen, extra_names)?,
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .context("the TLS protocol versions")?;
    let builder = match &security.tls_client_ca {
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in read_chain(ca)? {
                roots.add(cert).with_context(|| {
                    format!("tls_client_ca {}: not a CA certificate", ca.display())
                })?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()
            .with_context(|| format!("tls_client_ca {}", ca.display()))?;
            info!(client_ca = %ca.display(), "mutual TLS: clients must present a certificate");
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let config = builder
        .with_single_cert(chain, key)
        .context("the TLS certificate and key do not go together")?;
    let with_alpn = |protocol: &[u8]| {
        let mut c = config.clone();
        c.alpn_protocols = vec![protocol.to_vec()];
        TlsAcceptor::from(Arc::new(c))
    };
    Ok(Some(Tls {
        http: with_alpn(b"http/1.1"),
        grpc: with_alpn(b"h2"),
    }))
}

fn read_chain(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let chain = CertificateDer::pem_file_iter(path)
        .with_context(|| format!("cannot read the certificate {}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("{} is not a PEM certificate file", path.display()))?;
    if chain.is_empty() {
        bail!("{} holds no certificate", path.display());
    }
    Ok(chain)
}

fn read_key(path: &Path) -> anyhow::Result<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_file(path)
        .with_context(|| format!("{} is not a PEM private key", path.display()))
}

/// What the generated files were made for, kept beside them.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
struct State {
    /// The CA's common name (the server certificate's issuer).
    ca_name: String,
    /// The server certificate's names.
    names: BTreeSet<String>,
    /// The server certificate's last day, `YYYY-MM-DD`.
    server_not_after: String,
}

/// How long the local CA and the server certificate are valid, in years; the server one is
/// made again when less than [`RENEW_DAYS`] remain.
const CA_YEARS: i32 = 10;
const SERVER_YEARS: i32 = 1;
const RENEW_DAYS: u64 = 30;

/// The local CA's server certificate and key, made or reused.
fn local_ca(
    data_dir: &Path,
    listen: &[SocketAddr],
    extra_names: &[String],
) -> anyhow::Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)> {
    let dir = dir(data_dir);
    let file = |name: &str| dir.join(name);
    let names = names(listen, extra_names);
    let state: Option<State> = std::fs::read(file("state.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    let today = metalgraph_engine::clock::now_rfc3339();
    let today = &today[..10];
    let ca_key = std::fs::read_to_string(file("ca.key")).ok();
    let have_ca = ca_key.is_some() && file("ca.pem").exists() && state.is_some();

    let (ca_name, ca_key) = match (have_ca, ca_key, &state) {
        (true, Some(pem), Some(state)) => {
            let key = rcgen::KeyPair::from_pem(&pem)
                .with_context(|| format!("{} is not a key", file("ca.key").display()))?;
            (state.ca_name.clone(), key)
        }
        _ => {
            let key = rcgen::KeyPair::generate().context("cannot make the CA's key")?;
            let name = format!("metalgraph local CA {}", &random_hex(4)?);
            let cert = ca_params(&name, today, CA_YEARS)
                .self_signed(&key)
                .context("cannot make the CA certificate")?;
            write_whole(&file("ca.key"), key.serialize_pem().as_bytes(), PRIVATE)?;
            write_whole(&file("ca.pem"), cert.pem().as_bytes(), PUBLIC)?;
            info!(ca = %file("ca.pem").display(), "made a local CA; clients trust this file");
            (name, key)
        }
    };

    let reusable = have_ca
        && state.as_ref().is_some_and(|s| {
            s.names == names && days_between(today, &s.server_not_after) > RENEW_DAYS
        })
        && file("server.pem").exists()
        && file("server.key").exists();
    if !reusable {
        let issuer = rcgen::Issuer::new(ca_params(&ca_name, today, CA_YEARS), &ca_key);
        let key = rcgen::KeyPair::generate().context("cannot make the server's key")?;
        let mut params = rcgen::CertificateParams::new(names.iter().cloned().collect::<Vec<_>>())
            .context("a certificate name")?;
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "metalgraph");
        set_validity(&mut params, today, SERVER_YEARS)?;
        params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let cert = params
            .signed_by(&key, &issuer)
            .context("cannot sign the server certificate")?;
        write_whole(&file("server.key"), key.serialize_pem().as_bytes(), PRIVATE)?;
        write_whole(&file("server.pem"), cert.pem().as_bytes(), PUBLIC)?;
        let state = State {
            ca_name,
            names: names.clone(),
            server_not_after: shift_years(today, SERVER_YEARS)?,
        };
        write_whole(
            &file("state.json"),
            &serde_json::to_vec_pretty(&state).expect("the TLS state serialises"),
            PUBLIC,
        )?;
        info!(names = ?names, "made the server certificate");
    }
    Ok((
        read_chain(&file("server.pem"))?,
        read_key(&file("server.key"))?,
    ))
}

/// The CA's parameters, the same each time for the same name: a server certificate signed
/// later names this issuer.
fn ca_params(name: &str, today: &str, years: i32) -> rcgen::CertificateParams {
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    // A date that does not parse leaves rcgen's default validity.
    let _ = set_validity(&mut params, today, years);
    params
}

/// The names a server certificate covers: `localhost`, the host name, the loopback
/// addresses, every listen address that is not a wildcard, the host name's addresses when
/// one is, and `extra` (host names of configured base URLs).
fn names(listen: &[SocketAddr], extra: &[String]) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    names.insert("localhost".to_owned());
    names.insert(Ipv4Addr::LOCALHOST.to_string());
    names.insert(Ipv6Addr::LOCALHOST.to_string());
    let host = host_name();
    if let Some(h) = &host {
        names.insert(h.clone());
    }
    for addr in listen {
        if addr.ip().is_unspecified() {
            if let Some(h) = &host
                && let Ok(addrs) = (h.as_str(), 0).to_socket_addrs()
            {
                names.extend(addrs.map(|a| a.ip().to_string()));
            }
        } else {
            names.insert(addr.ip().to_string());
        }
    }
    for name in extra {
        if name.parse::<IpAddr>().is_ok()
            || rcgen::string::Ia5String::try_from(name.as_str()).is_ok()
        {
            names.insert(name.clone());
        }
    }
    names
}

/// The host name, from the kernel.
fn host_name() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_graphic()))
}

/// The host of an `http(s)://HOST[:PORT]/...` URL.
pub fn url_host(url: &str) -> Option<String> {
    let rest = url.split_once("://")?.1;
    let authority = rest.split('/').next()?;
    let host = match authority.strip_prefix('[') {
        Some(v6) => v6.split(']').next()?,
        None => authority.rsplit_once(':').map_or(authority, |(h, _)| h),
    };
    (!host.is_empty()).then(|| host.to_owned())
}

fn ymd(date: &str) -> anyhow::Result<(i32, u8, u8)> {
    let mut parts = date.splitn(3, '-');
    let mut next = || parts.next().context("a date");
    Ok((next()?.parse()?, next()?.parse()?, next()?.parse()?))
}

/// `date` moved `years` years on (the 29th of February becomes the 28th).
fn shift_years(date: &str, years: i32) -> anyhow::Result<String> {
    let (y, m, d) = ymd(date)?;
    Ok(format!("{:04}-{m:02}-{:02}", y + years, d.min(28)))
}

/// Makes `params` valid from the day before `today` (so that a client whose clock is a
/// little behind accepts it) for `years` years.
fn set_validity(
    params: &mut rcgen::CertificateParams,
    today: &str,
    years: i32,
) -> anyhow::Result<()> {
    let (y, m, d) = ymd(today)?;
    params.not_before =
        rcgen::date_time_ymd(y, m, d.min(28)) - std::time::Duration::from_secs(86_400);
    params.not_after = rcgen::date_time_ymd(y + years, m, d.min(28));
    Ok(())
}

/// Whole days from `a` to `b` (`YYYY-MM-DD`); 0 when `b` is not after `a` or either is not
/// a date.
fn days_between(a: &str, b: &str) -> u64 {
    let ms = |d: &str| metalgraph_engine::clock::parse_rfc3339(&format!("{d}T00:00:00Z"));
    match (ms(a), ms(b)) {
        (Some(a), Some(b)) => b.saturating_sub(a) / 86_400_000,
        _ => 0,
    }
}

fn random_hex(bytes: usize) -> anyhow::Result<String> {
    use ring::rand::SecureRandom as _;
    let mut buf = vec![0u8; bytes];
    ring::rand::SystemRandom::new()
        .fill(&mut buf)
        .map_err(|_| anyhow::anyhow!("the system's random source failed"))?;
    Ok(metalgraph_engine::seal::to_hex(&buf))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_of_urls() {
        assert_eq!(
            url_host("https://10.0.0.1:8080/api/2.0").as_deref(),
            Some("10.0.0.1")
        );
        assert_eq!(
            url_host("http://boot.example/api").as_deref(),
            Some("boot.example")
        );
        assert_eq!(
            url_host("http://[fd00::1]:80/x").as_deref(),
            Some("fd00::1")
        );
        assert_eq!(url_host("nonsense"), None);
    }

    #[test]
    fn dates() {
        assert_eq!(shift_years("2026-02-29", 1).unwrap(), "2027-02-28");
        assert_eq!(days_between("2026-12-01", "2026-12-31"), 30);
        assert_eq!(days_between("2026-12-31", "2026-12-01"), 0);
    }

    #[test]
    fn the_local_ca_is_made_once_and_its_certificate_again_when_names_change() {
        let dir = tempfile::tempdir().unwrap();
        let a: SocketAddr = "127.0.0.1:8080".parse().unwrap();
        let b: SocketAddr = "127.0.0.2:8080".parse().unwrap();
        local_ca(dir.path(), &[a], &[]).unwrap();
        let ca = std::fs::read(ca_file(dir.path())).unwrap();
        let server = std::fs::read(dir.path().join("tls/server.pem")).unwrap();
        local_ca(dir.path(), &[a], &[]).unwrap();
        assert_eq!(
            std::fs::read(dir.path().join("tls/server.pem")).unwrap(),
            server
        );
        local_ca(dir.path(), &[a, b], &[]).unwrap();
        assert_ne!(
            std::fs::read(dir.path().join("tls/server.pem")).unwrap(),
            server
        );
        assert_eq!(std::fs::read(ca_file(dir.path())).unwrap(), ca);
        use std::os::unix::fs::PermissionsExt as _;
        for key in ["ca.key", "server.key"] {
            let mode = std::fs::metadata(dir.path().join("tls").join(key))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o077, 0, "{key} is private");
        }
    }
}
