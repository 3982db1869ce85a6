//! Names of VMs, images and snapshots. They become path components, so the
//! rule is strict: `[a-z0-9][a-z0-9-]{0,62}`, which also rules out `.`,
//! `..`, separators and NUL.

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{kind} name {name:?} is invalid: use 1 to 63 of a-z, 0-9 and '-', starting with a letter or digit"
)]
pub struct NameError {
    pub kind: &'static str,
    pub name: String,
}

/// Checks a name of the given kind ("VM", "image", "snapshot").
pub fn validate_name(kind: &'static str, name: &str) -> Result<(), NameError> {
    let bytes = name.as_bytes();
    let ok = !bytes.is_empty()
        && bytes.len() <= 63
        && (bytes[0].is_ascii_lowercase() || bytes[0].is_ascii_digit())
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-');
    if ok {
        Ok(())
    } else {
        Err(NameError {
            kind,
            name: name.to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_documented_alphabet_only() {
        for good in ["a", "vm-1", "9", &"z".repeat(63)] {
            validate_name("VM", good).unwrap();
        }
        for bad in [
            "",
            "-a",
            "a_b",
            "A",
            "..",
            "a/b",
            "a\0",
            "é",
            &"z".repeat(64),
        ] {
            let err = validate_name("snapshot", bad).unwrap_err();
            assert!(err.to_string().starts_with("snapshot name"), "{err}");
        }
    }
}
