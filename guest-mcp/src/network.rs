//! What the host says of this VM's network (control tool `set_network`):
//! Nexus's CA, which the host's egress proxy signs intercepted hosts'
//! certificates with, goes into the trust store; the placeholders of the
//! secrets this VM may use (`NEXUS_SECRET_<NAME>`) go into every command's
//! environment from then on. Kept in a file so a restarted guest-mcp
//! keeps them; a rebooted VM is told again by the host.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::RwLock;

/// The CA alone (Node's NODE_EXTRA_CA_CERTS adds to its own roots).
pub const CA_FILE: &str = "/etc/nexus/egress-ca.pem";
/// The system's roots and the CA (SSL_CERT_FILE and friends replace
/// the roots, so they get both).
pub const BUNDLE_FILE: &str = "/etc/nexus/ca-bundle.pem";
/// Where distributions keep their bundle (Debian, Ubuntu and Alpine;
/// Fedora and RHEL; openSUSE; others): the first found is the system's
/// roots, and is patched too, for programs that read it and ignore the
/// environment (git built with GnuTLS).
const SYSTEM_BUNDLES: [&str; 4] = [
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/ca-bundle.pem",
    "/etc/ssl/cert.pem",
];
/// Where update-ca-certificates looks, so a rebuild of the system bundle
/// keeps the CA.
const LOCAL_CA: &str = "/usr/local/share/ca-certificates/nexus-egress.crt";
const STATE_FILE: &str = "/run/guest-mcp/network.json";
const BEGIN: &str = "# nexus egress CA (begin)\n";
const END: &str = "# nexus egress CA (end)\n";

/// Set once per change, read at every command's start: commands started
/// by either server (exec, process_start) get it, and nothing else does.
static ENV: RwLock<BTreeMap<String, String>> = RwLock::new(BTreeMap::new());

/// The variables every command gets (its own `env` wins).
pub fn env() -> BTreeMap<String, String> {
    ENV.read().map(|e| e.clone()).unwrap_or_default()
}

/// Takes the host's settings: the CA into the trust store (when given),
/// then the environment. Returns what commands will see, by name.
pub fn apply(
    ca_pem: Option<&str>,
    secrets: &BTreeMap<String, String>,
) -> Result<Vec<String>, String> {
    for key in secrets.keys() {
        if !key.starts_with("NEXUS_SECRET_") || key.contains(['=', '\0']) {
            return Err(format!(
                "`env` may hold only NEXUS_SECRET_<NAME> variables, got {key:?}"
            ));
        }
    }
    let mut env = secrets.clone();
    if let Some(pem) = ca_pem {
        install_ca(pem)?;
        for name in [
            "SSL_CERT_FILE",
            "REQUESTS_CA_BUNDLE",
            "CURL_CA_BUNDLE",
            "GIT_SSL_CAINFO",
        ] {
            env.insert(name.into(), BUNDLE_FILE.into());
        }
        env.insert("NODE_EXTRA_CA_CERTS".into(), CA_FILE.into());
    }
    let text = serde_json::to_string(&env).map_err(|e| e.to_string())?;
    if let Err(e) = write(Path::new(STATE_FILE), &text) {
        tracing::warn!(error = %e, "network settings not kept for a restart");
    }
    let names = env.keys().cloned().collect();
    if let Ok(mut current) = ENV.write() {
        *current = env;
    }
    Ok(names)
}

/// Takes the settings a previous guest-mcp of this boot was given.
pub fn load() {
    let Ok(text) = std::fs::read_to_string(STATE_FILE) else {
        return;
    };
    if let (Ok(env), Ok(mut current)) = (serde_json::from_str(&text), ENV.write()) {
        *current = env;
    }
}

fn install_ca(pem: &str) -> Result<(), String> {
    if !pem.starts_with("-----BEGIN CERTIFICATE-----") || pem.len() > 16 * 1024 {
        return Err("`ca_pem` must be one PEM certificate".into());
    }
    let pem = if pem.ends_with('\n') {
        pem.to_owned()
    } else {
        format!("{pem}\n")
    };
    write(Path::new(CA_FILE), &pem).map_err(|e| format!("writing {CA_FILE}: {e}"))?;
    let _ = write(Path::new(LOCAL_CA), &pem);
    // The system's roots without an earlier copy of the CA, then the CA
    // (no system bundle: there were no roots to keep).
    let system = SYSTEM_BUNDLES.iter().find_map(|path| {
        std::fs::read_to_string(path)
            .ok()
            .map(|text| (*path, without_block(&text)))
    });
    let block = format!("{BEGIN}{pem}{END}");
    let roots = system
        .as_ref()
        .map(|(_, text)| text.as_str())
        .unwrap_or_default();
    write(Path::new(BUNDLE_FILE), &format!("{roots}{block}"))
        .map_err(|e| format!("writing {BUNDLE_FILE}: {e}"))?;
    if let Some((path, text)) = &system
        && let Err(e) = write(Path::new(path), &format!("{text}{block}"))
    {
        tracing::warn!(path, error = %e, "the system trust store was not updated");
    }
    Ok(())
}

fn without_block(text: &str) -> String {
    match (text.find(BEGIN), text.find(END)) {
        (Some(begin), Some(end)) if end > begin => {
            format!("{}{}", &text[..begin], &text[end + END.len()..])
        }
        _ => text.to_owned(),
    }
}

/// Writes `text` to `path` whole (a reader sees the old or the new file).
fn write(path: &Path, text: &str) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("nexus-new");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_earlier_ca_is_replaced_not_repeated() {
        let roots = "ROOT A\nROOT B\n";
        let once = format!("{roots}{BEGIN}old\n{END}");
        assert_eq!(without_block(&once), roots);
        assert_eq!(without_block(roots), roots);
    }

    #[test]
    fn only_placeholder_variables_are_taken() {
        let env: BTreeMap<String, String> = [("PATH".to_owned(), "/evil".to_owned())].into();
        assert!(apply(None, &env).unwrap_err().contains("NEXUS_SECRET_"));
    }
}
