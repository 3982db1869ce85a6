//! Paths inside a root filesystem being built, resolved as the guest will
//! see them, never as the host would: a root that came from a Debian
//! archive or an OCI image has symlinks (`bin -> usr/bin`, or a hostile
//! `etc -> /etc`), and a build running as root on the host must not
//! follow one out of the stage. Symlinks on the way are followed inside
//! the root (absolute ones from the root, `..` never above it); the last
//! component is never followed.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::path::{Component, Path, PathBuf};

use crate::BuildError;

/// Symlinks followed at most while resolving one path (the kernel's 40).
const MAX_HOPS: usize = 40;

/// `rel` under `root` (see the module); missing directories on the way
/// are made when `create`.
pub fn resolve(root: &Path, rel: &Path, create: bool) -> Result<PathBuf, BuildError> {
    let mut parts: VecDeque<OsString> = VecDeque::new();
    push_components(&mut parts, rel, false);
    let mut at: Vec<OsString> = Vec::new();
    let mut hops = 0;
    while let Some(part) = parts.pop_front() {
        if part == ".." {
            at.pop();
            continue;
        }
        let here: PathBuf = at.iter().collect();
        let candidate = root.join(&here).join(&part);
        if parts.is_empty() {
            at.push(part);
            break;
        }
        match std::fs::symlink_metadata(&candidate) {
            Ok(m) if m.file_type().is_symlink() => {
                hops += 1;
                if hops > MAX_HOPS {
                    return Err(BuildError::Userland {
                        why: format!("{}: too many symlinks", rel.display()),
                    });
                }
                let target = std::fs::read_link(&candidate)
                    .map_err(|e| BuildError::io("read", &candidate, e))?;
                if target.is_absolute() {
                    at.clear();
                }
                push_components(&mut parts, &target, true);
            }
            Ok(m) if m.is_dir() => at.push(part),
            Ok(_) => {
                return Err(BuildError::Userland {
                    why: format!(
                        "{}: {} is not a directory",
                        rel.display(),
                        here.join(&part).display()
                    ),
                });
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                // Missing: made, or (when only looking) nothing further
                // down exists either.
                if create {
                    std::fs::create_dir(&candidate)
                        .map_err(|e| BuildError::io("create", &candidate, e))?;
                }
                at.push(part);
            }
            Err(e) => return Err(BuildError::io("stat", &candidate, e)),
        }
    }
    Ok(root.join(at.iter().collect::<PathBuf>()))
}

/// `path`'s parts at the front of `parts` (`..` kept, the rest dropped).
fn push_components(parts: &mut VecDeque<OsString>, path: &Path, front: bool) {
    let mut new: Vec<OsString> = Vec::new();
    for c in path.components() {
        match c {
            Component::Normal(p) => new.push(p.to_owned()),
            Component::ParentDir => new.push("..".into()),
            Component::CurDir | Component::RootDir | Component::Prefix(_) => {}
        }
    }
    if front {
        for p in new.into_iter().rev() {
            parts.push_front(p);
        }
    } else {
        parts.extend(new);
    }
}

/// Directory `rel` in `root`, made (with its parents) if missing; a
/// symlink there is followed inside the root.
pub fn make_dir(root: &Path, rel: &Path) -> Result<PathBuf, BuildError> {
    // As a parent of something, `rel` itself is followed and made.
    let below = resolve(root, &rel.join("_"), true)?;
    Ok(below.parent().unwrap_or(root).to_path_buf())
}

/// Where to write `rel` in `root`: resolved, its directories made, and a
/// symlink already at its place removed (the new file replaces it).
pub fn for_writing(root: &Path, rel: &Path) -> Result<PathBuf, BuildError> {
    let path = resolve(root, rel, true)?;
    if std::fs::symlink_metadata(&path).is_ok_and(|m| m.file_type().is_symlink()) {
        std::fs::remove_file(&path).map_err(|e| BuildError::io("remove", &path, e))?;
    }
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn symlinks_are_followed_inside_the_root_only() {
        let outside = tempfile::tempdir().unwrap();
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        std::fs::create_dir_all(r.join("usr/bin")).unwrap();
        std::os::unix::fs::symlink("usr/bin", r.join("bin")).unwrap();
        std::os::unix::fs::symlink(outside.path(), r.join("etc")).unwrap();
        std::os::unix::fs::symlink("../../../../..", r.join("up")).unwrap();
        assert_eq!(
            resolve(r, Path::new("bin/busybox"), false).unwrap(),
            r.join("usr/bin/busybox")
        );
        // An absolute link leads to the root's own directory of that name.
        assert_eq!(
            resolve(r, Path::new("etc/nexus/rcS"), true).unwrap(),
            r.join(outside.path().strip_prefix("/").unwrap())
                .join("nexus/rcS")
        );
        assert!(std::fs::read_dir(outside.path()).unwrap().next().is_none());
        assert_eq!(resolve(r, Path::new("up/x"), false).unwrap(), r.join("x"));
        assert_eq!(
            resolve(r, Path::new("../../x"), false).unwrap(),
            r.join("x")
        );
        // The last component is not followed; for_writing replaces it.
        std::os::unix::fs::symlink(outside.path().join("victim"), r.join("usr/bin/f")).unwrap();
        let f = for_writing(r, Path::new("bin/f")).unwrap();
        assert_eq!(f, r.join("usr/bin/f"));
        assert!(
            std::fs::symlink_metadata(&f).is_err(),
            "the symlink is gone"
        );
    }
}
