//! Which hosts and ports a VM may reach through the egress proxy:
//! patterns such as `pypi.org`, `*.github.com`, `api.example.com:8443`,
//! `*:*`. A pattern without a port allows 80 and 443 (the web); `:*`
//! allows every port.

use globset::{GlobBuilder, GlobMatcher};

/// Ports a pattern without one allows.
pub const WEB_PORTS: [u16; 2] = [80, 443];

#[derive(Debug, Clone)]
enum Ports {
    Web,
    Any,
    One(u16),
}

#[derive(Debug, Clone)]
struct Rule {
    host: GlobMatcher,
    ports: Ports,
}

/// A compiled list of patterns.
#[derive(Debug, Clone, Default)]
pub struct Allowlist {
    rules: Vec<Rule>,
}

impl Allowlist {
    /// Compiles `patterns`; an error names the pattern and what is wrong.
    pub fn new(patterns: &[String]) -> Result<Self, String> {
        let mut rules = Vec::new();
        for pattern in patterns {
            rules.push(rule(pattern)?);
        }
        Ok(Self { rules })
    }

    /// Whether `host` (a name or an address, as the guest asked) on
    /// `port` is allowed.
    pub fn allows(&self, host: &str, port: u16) -> bool {
        let host = host.to_ascii_lowercase();
        self.rules.iter().any(|r| {
            r.host.is_match(&host)
                && match r.ports {
                    Ports::Web => WEB_PORTS.contains(&port),
                    Ports::Any => true,
                    Ports::One(p) => p == port,
                }
        })
    }
}

fn rule(pattern: &str) -> Result<Rule, String> {
    let bad = |why: &str| format!("egress pattern {pattern:?} {why}");
    let (host, ports) = match pattern.rsplit_once(':') {
        // An IPv6 literal is written in brackets: `[2001:db8::1]:443`.
        Some((host, port)) if !host.ends_with(':') && !port.contains(']') => {
            let ports = match port {
                "*" => Ports::Any,
                p => Ports::One(
                    p.parse::<u16>()
                        .ok()
                        .filter(|p| *p > 0)
                        .ok_or_else(|| bad("has a port that is not 1-65535 or *"))?,
                ),
            };
            (host, ports)
        }
        _ => (pattern, Ports::Web),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() || host.len() > 253 {
        return Err(bad(
            "needs a host (a name, an address, or a glob such as *.example.com)",
        ));
    }
    if !host
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "-.*?:".contains(c))
    {
        return Err(bad(
            "may hold only letters, digits, '-', '.', ':' and the globs * and ?",
        ));
    }
    let host = GlobBuilder::new(&host.to_ascii_lowercase())
        .literal_separator(false)
        .build()
        .map_err(|e| bad(&e.to_string()))?
        .compile_matcher();
    Ok(Rule { host, ports })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(patterns: &[&str]) -> Allowlist {
        let patterns: Vec<String> = patterns.iter().map(|p| (*p).to_owned()).collect();
        Allowlist::new(&patterns).unwrap_or_default()
    }

    #[test]
    fn patterns_allow_their_hosts_on_their_ports() {
        let l = list(&[
            "pypi.org",
            "*.github.com",
            "api.example.com:8443",
            "mirror.test:*",
        ]);
        assert!(l.allows("pypi.org", 443) && l.allows("PyPI.org", 80));
        assert!(!l.allows("pypi.org", 22));
        assert!(l.allows("codeload.github.com", 443));
        assert!(!l.allows("github.com.evil.test", 443));
        assert!(l.allows("api.example.com", 8443) && !l.allows("api.example.com", 443));
        assert!(l.allows("mirror.test", 2222));
        assert!(!l.allows("example.org", 443));
        assert!(list(&["*:*"]).allows("10.0.0.1", 5432));
        assert!(list(&["[2001:db8::1]:443"]).allows("2001:db8::1", 443));
        assert!(!Allowlist::default().allows("pypi.org", 443));
    }

    #[test]
    fn bad_patterns_say_what_is_wrong() {
        for (pattern, says) in [
            ("", "needs a host"),
            ("pypi.org:0", "not 1-65535"),
            ("pypi.org:http", "not 1-65535"),
            ("a/b", "may hold only"),
            ("x y", "may hold only"),
        ] {
            let err = Allowlist::new(&[pattern.to_owned()])
                .err()
                .unwrap_or_default();
            assert!(err.contains(says), "{pattern}: {err}");
        }
    }
}
