//! Nexus's own certificate authority, for the hosts whose TLS the proxy
//! terminates (those with a secret bound): made at first start in
//! `<state>/egress-ca/` (key 0600), trusted by every guest, never by the
//! host. Leaf certificates, one per name, are made when first needed and
//! kept in memory.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

/// Leaf configurations kept at most (a guest can ask for any name its
/// secrets' patterns allow; past this the cache starts over).
const MAX_LEAVES: usize = 4096;

pub struct Authority {
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
    /// One key for every leaf: leaves are only as trusted as the CA.
    leaf_key: KeyPair,
    leaves: Mutex<HashMap<String, Arc<rustls::ServerConfig>>>,
}

impl std::fmt::Debug for Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authority").finish_non_exhaustive()
    }
}

/// The CA's parameters, all from its key: the same at every start.
fn ca_params(key: &KeyPair) -> CertificateParams {
    let mut params = CertificateParams::default();
    let id = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(key.public_key_raw()));
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Nexus");
    dn.push(DnType::CommonName, format!("Nexus egress CA {}", &id[..16]));
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params
}

impl Authority {
    /// Loads the CA kept in `dir`, or makes one there.
    pub fn load_or_create(dir: &Path) -> Result<Self, String> {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        let key_path = dir.join("ca.key");
        let cert_path = dir.join("ca.pem");
        let fail = |what: &str, e: &dyn std::fmt::Display| format!("egress CA: {what}: {e}");
        let key = match std::fs::read_to_string(&key_path) {
            Ok(pem) => KeyPair::from_pem(&pem)
                .map_err(|e| fail(&format!("{} does not read", key_path.display()), &e))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::fs::create_dir_all(dir)
                    .map_err(|e| fail(&format!("making {}", dir.display()), &e))?;
                let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
                let key = KeyPair::generate().map_err(|e| fail("making a key", &e))?;
                let tmp = dir.join("ca.key.new");
                let _ = std::fs::remove_file(&tmp);
                let mut file = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&tmp)
                    .map_err(|e| fail(&format!("writing {}", tmp.display()), &e))?;
                std::io::Write::write_all(&mut file, key.serialize_pem().as_bytes())
                    .and_then(|()| file.sync_all())
                    .map_err(|e| fail(&format!("writing {}", tmp.display()), &e))?;
                std::fs::rename(&tmp, &key_path)
                    .map_err(|e| fail(&format!("writing {}", key_path.display()), &e))?;
                tracing::info!(path = %key_path.display(), "egress: made Nexus's CA key");
                key
            }
            Err(e) => return Err(fail(&format!("reading {}", key_path.display()), &e)),
        };
        let params = ca_params(&key);
        let cert = params
            .self_signed(&key)
            .map_err(|e| fail("signing the CA certificate", &e))?;
        let cert_pem = cert.pem();
        // The certificate is made again from the key at each start; the
        // file is for admins and clients that want it.
        if std::fs::read_to_string(&cert_path).ok().as_deref() != Some(cert_pem.as_str()) {
            std::fs::write(&cert_path, &cert_pem)
                .map_err(|e| fail(&format!("writing {}", cert_path.display()), &e))?;
        }
        let leaf_key = KeyPair::generate().map_err(|e| fail("making a leaf key", &e))?;
        Ok(Self {
            cert_pem,
            issuer: Issuer::new(params, key),
            leaf_key,
            leaves: Mutex::new(HashMap::new()),
        })
    }

    /// The CA certificate, PEM: what guests trust.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// A TLS server configuration presenting a leaf for `host` (a name or
    /// an address), HTTP/1.1 only.
    pub fn server_config(&self, host: &str) -> Result<Arc<rustls::ServerConfig>, String> {
        let mut leaves = super::lock(&self.leaves);
        if let Some(config) = leaves.get(host) {
            return Ok(config.clone());
        }
        let mut params = CertificateParams::new(vec![host.to_owned()])
            .map_err(|e| format!("a certificate for {host}: {e}"))?;
        params.distinguished_name.push(DnType::CommonName, host);
        params.use_authority_key_identifier_extension = true;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        let cert = params
            .signed_by(&self.leaf_key, &self.issuer)
            .map_err(|e| format!("signing a certificate for {host}: {e}"))?;
        let chain: Vec<CertificateDer<'static>> = vec![cert.der().clone()];
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.leaf_key.serialize_der()));
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| format!("a TLS configuration for {host}: {e}"))?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let config = Arc::new(config);
        if leaves.len() >= MAX_LEAVES {
            leaves.clear();
        }
        leaves.insert(host.to_owned(), config.clone());
        Ok(config)
    }
}

/// The TLS client configuration for upstreams: the host's trust store
/// plus `extra` PEM files (tests' own CAs), HTTP/1.1 only.
pub fn upstream_config(extra: &[std::path::PathBuf]) -> Result<Arc<rustls::ClientConfig>, String> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    for e in &native.errors {
        tracing::warn!(error = %e, "egress: a host trust store certificate does not load");
    }
    let (added, _) = roots.add_parsable_certificates(native.certs);
    for path in extra {
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
            .and_then(|certs| certs.collect())
            .map_err(|e| format!("egress: extra CA file {}: {e}", path.display()))?;
        if certs.is_empty() {
            return Err(format!(
                "egress: extra CA file {} holds no certificate",
                path.display()
            ));
        }
        for cert in certs {
            roots
                .add(cert)
                .map_err(|e| format!("egress: extra CA file {}: {e}", path.display()))?;
        }
    }
    if roots.is_empty() {
        tracing::warn!(
            "egress: no trusted CA certificates on this host (install ca-certificates): intercepted requests will fail"
        );
    }
    tracing::debug!(added, extra = extra.len(), "egress: upstream trust store");
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}
