//! Recipes that cannot be built say why and leave nothing behind: a
//! package Debian does not have, a recipe that does not read.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use nexus_rootfs::{BuildOptions, Recipe};

fn options(out: &std::path::Path, cache: &std::path::Path, recipe: Recipe) -> BuildOptions {
    BuildOptions {
        cache_dir: cache.to_owned(),
        recipe,
        ..BuildOptions::new(out, "broken")
    }
}

#[test]
fn a_package_debian_lacks_is_named_and_nothing_is_left() {
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "mmdebstrap --mode=root needs root (CI runs as root)"
    );
    let out = tempfile::tempdir().unwrap();
    // The shared cache (the kernel takes minutes to build); this recipe's
    // userland has a digest of its own.
    let cache = nexus_rootfs::default_cache_dir();
    let recipe = Recipe {
        base: Some("bookworm".into()),
        packages: vec!["jq".into(), "no-such-package-nexus".into()],
        ..Recipe::default()
    };
    let digest = nexus_rootfs::userland::digest_of(&recipe);
    let err = nexus_rootfs::build(&options(out.path(), &cache, recipe))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("package \"no-such-package-nexus\" is not in Debian bookworm"),
        "{err}"
    );
    assert!(!out.path().join("rootfs.ext4").exists());
    assert!(!out.path().join("manifest.json").exists());
    let left: Vec<_> = std::fs::read_dir(cache.join("userland"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains(&digest[..16]))
        .collect();
    assert!(left.is_empty(), "a partial userland was left: {left:?}");
}

#[test]
fn a_recipe_that_does_not_read_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("r.toml");
    std::fs::write(&path, "base = \"bookworm\"\npackages = \"git\"\n").unwrap();
    let err = Recipe::load(&path).unwrap_err().to_string();
    assert!(
        err.contains(&path.display().to_string()) && err.contains("invalid type"),
        "{err}"
    );
    std::fs::write(&path, "base = \"hamm\"\n").unwrap();
    let err = Recipe::load(&path).unwrap_err().to_string();
    assert!(err.contains("is not a Debian suite"), "{err}");
}
