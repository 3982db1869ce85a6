//! `--help` as people read it, checked by snapshots (insta): a change to
//! any command's help shows up in review as a snapshot diff.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::process::Command;

fn help(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_nexusctl"))
        .args(args)
        .arg("--help")
        .env_remove("NEXUS_SOCKET")
        .env_remove("NEXUS_URL")
        .env_remove("NEXUS_TOKEN_FILE")
        .output()
        .unwrap();
    assert!(out.status.success(), "{args:?}");
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn help_reads_as_it_did() {
    for args in [
        &[][..],
        &["vm"],
        &["vm", "create"],
        &["exec"],
        &["shell"],
        &["cp"],
        &["status"],
        &["console"],
        &["image", "build"],
        &["policy", "set-role"],
        &["secret", "set"],
        &["audit"],
    ] {
        let name = if args.is_empty() {
            "nexusctl".to_owned()
        } else {
            format!("nexusctl_{}", args.join("_"))
        };
        insta::assert_snapshot!(name, help(args));
    }
}
