//! Secrets as the proxy uses them: each bound to host patterns and to
//! how it is sent (a header it sets, basic auth, or only where the guest
//! puts its placeholder). A guest granted one holds its placeholder, an
//! opaque token; the proxy replaces it, in the headers of requests to a
//! bound host over TLS it terminates, and refuses any request that
//! carries a placeholder anywhere else (an exfiltration attempt). Bodies
//! are never read or rewritten.

use std::sync::Arc;

use hyper::header::{HeaderMap, HeaderName, HeaderValue};
use serde::{Deserialize, Serialize};

use super::Allowlist;

/// What a secret is bound to, as kept in the catalog (JSON).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Binding {
    /// Host patterns (egress allowlist syntax) it may be sent to.
    pub hosts: Vec<String>,
    /// A header set on every request to those hosts, `{secret}` standing
    /// for the value: `Authorization: Bearer {secret}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header: Option<String>,
    /// Basic auth on every request to those hosts: this user name, the
    /// secret as password.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub basic_user: Option<String>,
}

/// How a secret reaches a request.
#[derive(Clone)]
enum Inject {
    /// Only where the guest wrote its placeholder.
    Placeholder,
    /// This header, `{secret}` replaced.
    Header(HeaderName, String),
    /// `Authorization: Basic` with this user.
    Basic(String),
}

/// One secret, ready for the proxy.
#[derive(Clone)]
pub struct Secret {
    pub name: String,
    value: String,
    hosts: Allowlist,
    inject: Inject,
    pub placeholder: String,
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Secret")
            .field("name", &self.name)
            .field("placeholder", &self.placeholder)
            .finish_non_exhaustive()
    }
}

/// The longest secret value taken.
pub const MAX_VALUE_BYTES: usize = 8192;

impl Binding {
    /// Checks the binding; an error names the field and what is allowed.
    pub fn check(&self) -> Result<(), String> {
        self.compile().map(|_| ())
    }

    fn compile(&self) -> Result<(Allowlist, Inject), String> {
        if self.hosts.is_empty() {
            return Err("`hosts` must name at least one host pattern (such as api.example.com or *.example.com)".into());
        }
        let hosts = Allowlist::new(&self.hosts).map_err(|why| format!("`hosts`: {why}"))?;
        let inject = match (&self.header, &self.basic_user) {
            (Some(_), Some(_)) => {
                return Err("give `header` or `basic_user`, not both".into());
            }
            (Some(header), None) => {
                let (name, template) = header.split_once(':').ok_or_else(|| {
                    format!("`header` {header:?} must read `Name: value with {{secret}}`, such as `Authorization: Bearer {{secret}}`")
                })?;
                let name = HeaderName::from_bytes(name.trim().as_bytes()).map_err(|_| {
                    format!("`header` {header:?} has no valid header name before ':'")
                })?;
                let template = template.trim().to_owned();
                if !template.contains("{secret}") {
                    return Err(format!(
                        "`header` {header:?} must hold {{secret}} where the value goes"
                    ));
                }
                if HeaderValue::from_str(&template).is_err() {
                    return Err(format!(
                        "`header` {header:?} holds characters a header cannot"
                    ));
                }
                Inject::Header(name, template)
            }
            (None, Some(user)) => {
                if user.is_empty() || user.contains(':') || user.chars().any(char::is_control) {
                    return Err("`basic_user` must be a non-empty user name without ':' or control characters".into());
                }
                Inject::Basic(user.clone())
            }
            (None, None) => Inject::Placeholder,
        };
        Ok((hosts, inject))
    }
}

/// Checks a secret's value: what a header can carry.
pub fn check_value(value: &str) -> Result<(), String> {
    if value.is_empty() || value.len() > MAX_VALUE_BYTES {
        return Err(format!(
            "`value` must be 1 to {MAX_VALUE_BYTES} bytes, got {}",
            value.len()
        ));
    }
    if value.chars().any(|c| c.is_control()) {
        return Err(
            "`value` must hold no control characters (no newlines): it goes into a header".into(),
        );
    }
    Ok(())
}

impl Secret {
    pub fn new(
        name: &str,
        value: &str,
        binding: &Binding,
        placeholder: &str,
    ) -> Result<Self, String> {
        let (hosts, inject) = binding.compile()?;
        Ok(Self {
            name: name.to_owned(),
            value: value.to_owned(),
            hosts,
            inject,
            placeholder: placeholder.to_owned(),
        })
    }

    fn bound_to(&self, host: &str, port: u16) -> bool {
        self.hosts.allows(host, port)
    }
}

/// A new placeholder: opaque, unguessable, and recognisable in a request.
pub fn new_placeholder() -> String {
    let mut bytes = [0u8; 16];
    // getrandom fails only without any entropy source; then a time-based
    // token is still unique, and a placeholder is no secret.
    if getrandom::fill(&mut bytes).is_err() {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        bytes = nanos.to_le_bytes();
    }
    format!("nexus-placeholder-{}", hex::encode(bytes))
}

/// The secrets of one VM at one moment, and every placeholder known.
#[derive(Debug, Clone, Default)]
pub struct Granted {
    /// The secrets the VM may use.
    pub secrets: Vec<Arc<Secret>>,
    /// Every secret's (placeholder, name), granted or not.
    pub placeholders: Arc<Vec<(String, String)>>,
}

impl Granted {
    /// Whether a request to `host:port` has a secret to receive: then
    /// the proxy terminates its TLS.
    pub fn intercepts(&self, host: &str, port: u16) -> bool {
        self.secrets.iter().any(|s| s.bound_to(host, port))
    }

    /// The first secret whose placeholder is in `text`.
    fn found_in(&self, text: &str) -> Option<&str> {
        self.placeholders
            .iter()
            .find(|(p, _)| text.contains(p.as_str()))
            .map(|(_, name)| name.as_str())
    }

    /// Refuses a request to `host:port` whose target or headers carry a
    /// placeholder when nothing here replaces it (not over TLS this
    /// proxy terminates, or not granted, or not bound to that host).
    pub fn refuse_unplaced(
        &self,
        host: &str,
        port: u16,
        target: &str,
        headers: &HeaderMap,
        intercepted: bool,
    ) -> Result<(), String> {
        if let Some(name) = self.found_in(target) {
            return Err(exfiltration(
                name,
                host,
                port,
                "in the request target (placeholders are replaced in headers only)",
            ));
        }
        for value in headers.values() {
            let Some(name) = self.found_in(&String::from_utf8_lossy(value.as_bytes())) else {
                continue;
            };
            let secret = self.secrets.iter().find(|s| s.name == name);
            let why = match secret {
                None => "not granted to this VM",
                Some(s) if !s.bound_to(host, port) => "not bound to this host",
                Some(_) if !intercepted => {
                    "sent where nexusd cannot replace it (plain http, or a tunnel's own request)"
                }
                Some(_) => continue,
            };
            return Err(exfiltration(name, host, port, why));
        }
        Ok(())
    }

    /// Puts the VM's secrets bound to `host:port` into `headers`: its
    /// placeholders replaced, then each bound header or basic auth set.
    /// Call [`Granted::refuse_unplaced`] first. Returns the secrets used,
    /// by name.
    pub fn inject(&self, host: &str, port: u16, headers: &mut HeaderMap) -> Vec<String> {
        let mut used = Vec::new();
        let bound: Vec<&Arc<Secret>> = self
            .secrets
            .iter()
            .filter(|s| s.bound_to(host, port))
            .collect();
        for value in headers.values_mut() {
            let mut text = String::from_utf8_lossy(value.as_bytes()).into_owned();
            let mut changed = false;
            for secret in &bound {
                if text.contains(&secret.placeholder) {
                    text = text.replace(&secret.placeholder, &secret.value);
                    changed = true;
                    if !used.contains(&secret.name) {
                        used.push(secret.name.clone());
                    }
                }
            }
            if changed && let Ok(new) = HeaderValue::from_str(&text) {
                *value = new;
            }
        }
        for secret in bound {
            let set = match &secret.inject {
                Inject::Placeholder => continue,
                Inject::Header(name, template) => {
                    HeaderValue::from_str(&template.replace("{secret}", &secret.value))
                        .map(|v| (name.clone(), v))
                }
                Inject::Basic(user) => {
                    use base64::Engine;
                    let token = base64::engine::general_purpose::STANDARD
                        .encode(format!("{user}:{}", secret.value));
                    HeaderValue::from_str(&format!("Basic {token}"))
                        .map(|v| (hyper::header::AUTHORIZATION, v))
                }
            };
            if let Ok((name, mut value)) = set {
                value.set_sensitive(true);
                headers.insert(name, value);
                if !used.contains(&secret.name) {
                    used.push(secret.name.clone());
                }
            }
        }
        used
    }
}

fn exfiltration(name: &str, host: &str, port: u16, why: &str) -> String {
    format!(
        "blocked: the request to {host}:{port} carries the placeholder of secret {name}, {why} (an exfiltration attempt, recorded)"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn granted(bindings: &[(&str, Binding)]) -> Granted {
        let secrets: Vec<Arc<Secret>> = bindings
            .iter()
            .map(|(name, b)| {
                Arc::new(
                    Secret::new(name, &format!("value-of-{name}"), b, &format!("ph-{name}"))
                        .unwrap_or_else(|e| panic!("{e}")),
                )
            })
            .collect();
        let placeholders = Arc::new(
            secrets
                .iter()
                .map(|s| (s.placeholder.clone(), s.name.clone()))
                .chain([("ph-OTHER".to_owned(), "OTHER".to_owned())])
                .collect(),
        );
        Granted {
            secrets,
            placeholders,
        }
    }

    fn hosts(h: &[&str]) -> Vec<String> {
        h.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn placeholders_are_replaced_only_for_bound_hosts_and_bound_headers_set() {
        let g = granted(&[
            (
                "API",
                Binding {
                    hosts: hosts(&["api.test"]),
                    ..Default::default()
                },
            ),
            (
                "GIT",
                Binding {
                    hosts: hosts(&["git.test"]),
                    basic_user: Some("x-access-token".into()),
                    ..Default::default()
                },
            ),
            (
                "HDR",
                Binding {
                    hosts: hosts(&["api.test"]),
                    header: Some("X-Key: k={secret}".into()),
                    ..Default::default()
                },
            ),
        ]);
        assert!(g.intercepts("api.test", 443) && g.intercepts("git.test", 443));
        assert!(!g.intercepts("other.test", 443));
        let mut h = HeaderMap::new();
        h.insert("authorization", HeaderValue::from_static("Bearer ph-API"));
        assert!(g.refuse_unplaced("api.test", 443, "/v1", &h, true).is_ok());
        let used = g.inject("api.test", 443, &mut h);
        assert_eq!(h["authorization"], "Bearer value-of-API");
        assert_eq!(h["x-key"], "k=value-of-HDR");
        assert_eq!(used, ["API", "HDR"]);
        let mut h = HeaderMap::new();
        assert_eq!(g.inject("git.test", 443, &mut h), ["GIT"]);
        assert_eq!(
            h["authorization"],
            "Basic eC1hY2Nlc3MtdG9rZW46dmFsdWUtb2YtR0lU"
        );
    }

    #[test]
    fn a_placeholder_anywhere_it_is_not_replaced_is_refused() {
        let g = granted(&[(
            "API",
            Binding {
                hosts: hosts(&["api.test"]),
                ..Default::default()
            },
        )]);
        let with = |v: &'static str| {
            let mut h = HeaderMap::new();
            h.insert("x-anything", HeaderValue::from_static(v));
            h
        };
        let refused = |host, target, h: &HeaderMap, tls| {
            g.refuse_unplaced(host, 443, target, h, tls)
                .err()
                .unwrap_or_default()
        };
        assert!(
            refused("evil.test", "/", &with("ph-API"), true).contains("not bound to this host")
        );
        assert!(refused("api.test", "/", &with("ph-OTHER"), true).contains("not granted"));
        assert!(
            refused("api.test", "/?k=ph-API", &HeaderMap::new(), true).contains("request target")
        );
        assert!(refused("api.test", "/", &with("ph-API"), false).contains("cannot replace"));
        assert!(refused("api.test", "/", &with("ph-API"), false).contains("exfiltration"));
    }

    #[test]
    fn bad_bindings_and_values_say_what_is_wrong() {
        for (b, says) in [
            (Binding::default(), "`hosts` must name"),
            (
                Binding {
                    hosts: hosts(&["a b"]),
                    ..Default::default()
                },
                "`hosts`",
            ),
            (
                Binding {
                    hosts: hosts(&["a"]),
                    header: Some("NoColon".into()),
                    ..Default::default()
                },
                "must read",
            ),
            (
                Binding {
                    hosts: hosts(&["a"]),
                    header: Some("X: nothing".into()),
                    ..Default::default()
                },
                "{secret}",
            ),
            (
                Binding {
                    hosts: hosts(&["a"]),
                    header: Some("Bad Name: {secret}".into()),
                    ..Default::default()
                },
                "header name",
            ),
            (
                Binding {
                    hosts: hosts(&["a"]),
                    header: Some("X: {secret}".into()),
                    basic_user: Some("u".into()),
                },
                "not both",
            ),
            (
                Binding {
                    hosts: hosts(&["a"]),
                    basic_user: Some("a:b".into()),
                    ..Default::default()
                },
                "basic_user",
            ),
        ] {
            let err = b.check().err().unwrap_or_default();
            assert!(err.contains(says), "{b:?}: {err}");
        }
        assert!(check_value("").is_err());
        assert!(check_value("a\nb").unwrap_err().contains("control"));
        assert!(check_value(&"x".repeat(MAX_VALUE_BYTES + 1)).is_err());
        assert!(check_value("sk-123").is_ok());
    }
}
