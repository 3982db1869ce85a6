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

/// Headers a binding may not set: the proxy's own, and framing.
const RESERVED_HEADERS: [&str; 12] = [
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "proxy-connection",
    "keep-alive",
    "te",
    "trailer",
    "upgrade",
    "proxy-authorization",
    "proxy-authenticate",
    "accept-encoding",
];

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
                // The header is not quoted back: an admin may have pasted
                // the value itself into it.
                let (name, template) = header.split_once(':').ok_or_else(|| {
                    "`header` must read `Name: value with {secret}`, such as `Authorization: Bearer {secret}`".to_owned()
                })?;
                let name = HeaderName::from_bytes(name.trim().as_bytes())
                    .map_err(|_| "`header` has no valid header name before ':'".to_owned())?;
                if RESERVED_HEADERS.contains(&name.as_str()) {
                    return Err(format!("`header` may not set {name}: nexusd sets it"));
                }
                let template = template.trim().to_owned();
                if !template.contains("{secret}") {
                    return Err("`header` must hold {secret} where the value goes".into());
                }
                if HeaderValue::from_str(&template).is_err() {
                    return Err("`header` holds characters a header cannot".into());
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

/// What every placeholder starts with; 32 hex digits follow.
const PLACEHOLDER_PREFIX: &str = "nexus-placeholder-";
const PLACEHOLDER_HEX: usize = 32;

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
    format!("{PLACEHOLDER_PREFIX}{}", hex::encode(bytes))
}

/// The secrets of one VM at one moment, and every placeholder known.
#[derive(Debug, Clone, Default)]
pub struct Granted {
    /// The secrets the VM may use.
    pub secrets: Vec<Arc<Secret>>,
    /// Every secret's name by its placeholder, granted or not.
    pub placeholders: Arc<std::collections::HashMap<String, String>>,
}

impl Granted {
    /// Whether a request to `host:port` has a secret to receive: then
    /// the proxy terminates its TLS.
    pub fn intercepts(&self, host: &str, port: u16) -> bool {
        self.secrets.iter().any(|s| s.bound_to(host, port))
    }

    /// The secrets whose placeholders are in `text`: one pass for the
    /// common prefix, one lookup per occurrence (the cost does not grow
    /// with the number of secrets).
    fn found_in<'a>(&'a self, text: &'a [u8]) -> impl Iterator<Item = &'a str> + 'a {
        let prefix = PLACEHOLDER_PREFIX.as_bytes();
        let mut at = 0;
        std::iter::from_fn(move || {
            while at + prefix.len() <= text.len() {
                let start = at + text[at..].windows(prefix.len()).position(|w| w == prefix)?;
                at = start + prefix.len();
                let end = (at + PLACEHOLDER_HEX).min(text.len());
                let candidate = String::from_utf8_lossy(&text[start..end]);
                if let Some(name) = self.placeholders.get(candidate.as_ref()) {
                    return Some(name.as_str());
                }
            }
            None
        })
    }

    /// Refuses a request to `host:port` whose target or headers (names
    /// or values) carry a placeholder that nothing here replaces: not
    /// over TLS this proxy terminates, not granted, not bound to that
    /// host, or of a secret nexusd sends in a header of its own (its
    /// placeholder has no business anywhere).
    pub fn refuse_unplaced(
        &self,
        host: &str,
        port: u16,
        target: &str,
        headers: &HeaderMap,
        intercepted: bool,
    ) -> Result<(), String> {
        if let Some(name) = self.found_in(target.as_bytes()).next() {
            return Err(exfiltration(
                name,
                host,
                port,
                "in the request target (placeholders are replaced in headers only)",
            ));
        }
        for (header, value) in headers {
            if let Some(name) = self.found_in(header.as_str().as_bytes()).next() {
                return Err(exfiltration(name, host, port, "in a header name"));
            }
            for name in self.found_in(value.as_bytes()) {
                let secret = self.secrets.iter().find(|s| s.name == name);
                let why = match secret {
                    None => "not granted to this VM",
                    Some(s) if !s.bound_to(host, port) => "not bound to this host",
                    Some(_) if !intercepted => {
                        "sent where nexusd cannot replace it (plain http, or a tunnel's own request)"
                    }
                    Some(s) if !matches!(s.inject, Inject::Placeholder) => {
                        "whose value nexusd sends in a header of its own"
                    }
                    Some(_) => continue,
                };
                return Err(exfiltration(name, host, port, why));
            }
        }
        Ok(())
    }

    /// Puts the VM's secrets bound to `host:port` into `headers`: the
    /// placeholders of placeholder-only secrets replaced, then each bound
    /// header or basic auth set. Call [`Granted::refuse_unplaced`] first.
    /// Returns the secrets used: what an answer must not echo.
    pub fn inject(&self, host: &str, port: u16, headers: &mut HeaderMap) -> Used {
        let mut used = Used::default();
        let bound: Vec<&Arc<Secret>> = self
            .secrets
            .iter()
            .filter(|s| s.bound_to(host, port))
            .collect();
        for value in headers.values_mut() {
            let mut bytes = value.as_bytes().to_vec();
            let mut changed = false;
            for secret in &bound {
                if matches!(secret.inject, Inject::Placeholder)
                    && let Some(replaced) = replace(
                        &bytes,
                        secret.placeholder.as_bytes(),
                        secret.value.as_bytes(),
                    )
                {
                    bytes = replaced;
                    changed = true;
                    used.add(secret, secret.value.as_bytes().to_vec());
                }
            }
            if changed && let Ok(mut new) = HeaderValue::from_bytes(&bytes) {
                new.set_sensitive(true);
                *value = new;
            }
        }
        for secret in bound {
            let set = match &secret.inject {
                Inject::Placeholder => continue,
                Inject::Header(name, template) => {
                    HeaderValue::from_str(&template.replace("{secret}", &secret.value))
                        .map(|v| (name.clone(), v, secret.value.clone()))
                }
                Inject::Basic(user) => {
                    use base64::Engine;
                    let token = base64::engine::general_purpose::STANDARD
                        .encode(format!("{user}:{}", secret.value));
                    HeaderValue::from_str(&format!("Basic {token}"))
                        .map(|v| (hyper::header::AUTHORIZATION, v, token))
                }
            };
            if let Ok((name, mut value, sent)) = set {
                value.set_sensitive(true);
                headers.insert(name, value);
                used.add(secret, secret.value.as_bytes().to_vec());
                used.add(secret, sent.into_bytes());
            }
        }
        used
    }
}

/// The secrets one request carried: their names, and every form in which
/// their values went (as is, basic auth's base64), for the answer to be
/// cleaned of.
#[derive(Default)]
pub struct Used {
    pub names: Vec<String>,
    pub forms: Vec<Vec<u8>>,
}

impl Used {
    fn add(&mut self, secret: &Secret, form: Vec<u8>) {
        if !self.names.contains(&secret.name) {
            self.names.push(secret.name.clone());
        }
        if !form.is_empty() && !self.forms.contains(&form) {
            self.forms.push(form);
        }
    }
}

fn replace(haystack: &[u8], from: &[u8], to: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(haystack.len());
    let mut rest = haystack;
    let mut found = false;
    while let Some(at) = rest.windows(from.len()).position(|w| w == from) {
        out.extend_from_slice(&rest[..at]);
        out.extend_from_slice(to);
        rest = &rest[at + from.len()..];
        found = true;
    }
    out.extend_from_slice(rest);
    found.then_some(out)
}

/// Masks what an upstream sends back of the secrets a request carried
/// (an echo endpoint, an error page quoting the request): each form, as
/// is, becomes as many `*`, so lengths (and Content-Length) hold. A
/// chunk's last bytes wait for the next, so a value split between two
/// chunks is caught too.
pub struct Scrubber {
    forms: Vec<Vec<u8>>,
    keep: usize,
    carry: Vec<u8>,
}

impl Scrubber {
    pub fn new(forms: Vec<Vec<u8>>) -> Self {
        let keep = forms
            .iter()
            .map(Vec::len)
            .max()
            .unwrap_or(1)
            .saturating_sub(1);
        Self {
            forms,
            keep,
            carry: Vec::new(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.forms.is_empty()
    }

    /// Masks every form in `bytes` in place.
    pub fn mask(&self, bytes: &mut [u8]) {
        for form in &self.forms {
            let mut at = 0;
            while at + form.len() <= bytes.len() {
                match bytes[at..]
                    .windows(form.len())
                    .position(|w| w == form.as_slice())
                {
                    Some(found) => {
                        let start = at + found;
                        bytes[start..start + form.len()].fill(b'*');
                        at = start + form.len();
                    }
                    None => break,
                }
            }
        }
    }

    /// The next chunk, masked, less the bytes held for the next one.
    pub fn push(&mut self, chunk: &[u8]) -> Vec<u8> {
        let mut buf = std::mem::take(&mut self.carry);
        buf.extend_from_slice(chunk);
        self.mask(&mut buf);
        let split = buf.len().saturating_sub(self.keep);
        self.carry = buf.split_off(split);
        buf
    }

    /// What was held back, masked: the end of the body.
    pub fn finish(&mut self) -> Vec<u8> {
        let mut rest = std::mem::take(&mut self.carry);
        self.mask(&mut rest);
        rest
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

    /// A placeholder of the real form, one per name.
    fn ph(name: &str) -> String {
        let digit = match name {
            "API" => 'a',
            "GIT" => 'b',
            "HDR" => 'c',
            _ => 'd',
        };
        format!(
            "{PLACEHOLDER_PREFIX}{}",
            digit.to_string().repeat(PLACEHOLDER_HEX)
        )
    }

    fn granted(bindings: &[(&str, Binding)]) -> Granted {
        let secrets: Vec<Arc<Secret>> = bindings
            .iter()
            .map(|(name, b)| {
                Arc::new(
                    Secret::new(name, &format!("value-of-{name}"), b, &ph(name))
                        .unwrap_or_else(|e| panic!("{e}")),
                )
            })
            .collect();
        let placeholders = Arc::new(
            secrets
                .iter()
                .map(|s| (s.placeholder.clone(), s.name.clone()))
                .chain([(ph("OTHER"), "OTHER".to_owned())])
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

    fn three() -> Granted {
        granted(&[
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
        ])
    }

    fn with(name: &'static str, value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            name,
            HeaderValue::from_str(value).unwrap_or_else(|e| panic!("{e}")),
        );
        h
    }

    #[test]
    fn placeholders_are_replaced_only_for_bound_hosts_and_bound_headers_set() {
        let g = three();
        assert!(g.intercepts("api.test", 443) && g.intercepts("git.test", 443));
        assert!(!g.intercepts("other.test", 443));
        let mut h = with("authorization", &format!("Bearer {}", ph("API")));
        assert!(g.refuse_unplaced("api.test", 443, "/v1", &h, true).is_ok());
        let used = g.inject("api.test", 443, &mut h);
        assert_eq!(h["authorization"], "Bearer value-of-API");
        assert!(h["authorization"].is_sensitive());
        assert_eq!(h["x-key"], "k=value-of-HDR");
        assert_eq!(used.names, ["API", "HDR"]);
        let mut h = HeaderMap::new();
        let used = g.inject("git.test", 443, &mut h);
        assert_eq!(used.names, ["GIT"]);
        let basic = "eC1hY2Nlc3MtdG9rZW46dmFsdWUtb2YtR0lU";
        assert_eq!(h["authorization"], format!("Basic {basic}").as_str());
        assert!(
            used.forms.contains(&basic.as_bytes().to_vec()),
            "the base64 form is cleaned too"
        );
    }

    #[test]
    fn a_placeholder_anywhere_it_is_not_replaced_is_refused() {
        let g = three();
        let refused = |host: &str, target: &str, h: &HeaderMap, tls: bool| -> String {
            g.refuse_unplaced(host, 443, target, h, tls)
                .err()
                .unwrap_or_default()
        };
        let api = ph("API");
        assert!(
            refused("evil.test", "/", &with("x-anything", &api), true)
                .contains("not bound to this host")
        );
        assert!(
            refused("api.test", "/", &with("x-anything", &ph("OTHER")), true)
                .contains("not granted")
        );
        assert!(
            refused("api.test", &format!("/?k={api}"), &HeaderMap::new(), true)
                .contains("request target")
        );
        assert!(
            refused("api.test", "/", &with("x-anything", &api), false).contains("cannot replace")
        );
        assert!(
            refused("api.test", "/", &with("x-anything", &api), false).contains("exfiltration")
        );
        // A secret nexusd sends in its own header: its placeholder goes
        // nowhere, not even to its host.
        assert!(
            refused("git.test", "/", &with("user-agent", &ph("GIT")), true)
                .contains("header of its own")
        );
        // The second placeholder in one value counts too.
        let both = format!("{api} {}", ph("OTHER"));
        assert!(refused("api.test", "/", &with("x-anything", &both), true).contains("not granted"));
        // A prefix without its digits is no placeholder.
        assert!(
            g.refuse_unplaced(
                "api.test",
                443,
                "/nexus-placeholder-",
                &HeaderMap::new(),
                true
            )
            .is_ok()
        );
    }

    #[test]
    fn echoed_values_are_masked_across_chunks() {
        let mut s = Scrubber::new(vec![b"SECRET".to_vec(), b"U0VDUkVU".to_vec()]);
        let mut out = s.push(b"a SEC");
        out.extend(s.push(b"RET b U0VD"));
        out.extend(s.push(b"UkVU c"));
        out.extend(s.finish());
        assert_eq!(out, b"a ****** b ******** c");
        let mut s = Scrubber::new(vec![b"SECRET".to_vec()]);
        let mut out = s.push(b"no secret here, SECRE");
        out.extend(s.finish());
        assert_eq!(out, b"no secret here, SECRE");
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
                    header: Some("Host: {secret}".into()),
                    ..Default::default()
                },
                "may not set host",
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
