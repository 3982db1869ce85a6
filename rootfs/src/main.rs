//! nexus-rootfs: builds a Nexus guest image.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use nexus_rootfs::{BuildOptions, build, default_cache_dir};

#[derive(Debug, Parser)]
#[command(
    version,
    about = "Builds Nexus guest images (kernel, root filesystem, manifest)"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Build an image directory, reusing everything that did not change.
    Build {
        /// The image directory to create or update.
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// The image's name, recorded in its manifest.
        #[arg(long, default_value = "default")]
        name: String,
        /// Use this kernel (bzImage or ELF vmlinux) instead of building
        /// Nexus's microVM kernel from linux-source-6.1.
        #[arg(long, value_name = "PATH")]
        kernel: Option<PathBuf>,
        /// The module tree of a modular --kernel (e.g. /lib/modules/VERSION);
        /// an initrd loads virtio, vsock and ext4 from it in modules.dep order.
        #[arg(long, value_name = "DIR", requires = "kernel")]
        modules: Option<PathBuf>,
        /// The supplied kernel finds its devices through ACPI.
        #[arg(long, requires = "kernel")]
        acpi: bool,
        /// A static guest-mcp binary; by default it is built from this workspace.
        #[arg(long, value_name = "PATH")]
        guest_mcp: Option<PathBuf>,
        /// Where kernel builds are cached [default: $NEXUS_CACHE_DIR, or ~/.cache/nexus].
        #[arg(long, value_name = "DIR")]
        cache_dir: Option<PathBuf>,
        /// Size of the (sparse) root filesystem image [default: the
        /// recipe's, else room for what it holds; 128 for busybox].
        #[arg(long, value_name = "MIB")]
        rootfs_mib: Option<u64>,
        /// What goes into the root filesystem (rootfs/recipes/*.toml);
        /// without one: busybox only.
        #[arg(long, value_name = "FILE")]
        recipe: Option<PathBuf>,
        /// An OCI image layout whose layers make the root (its Env,
        /// WorkingDir and User become the image's defaults).
        #[arg(long, value_name = "DIR")]
        oci: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let Cmd::Build {
        out,
        name,
        kernel,
        modules,
        acpi,
        guest_mcp,
        cache_dir,
        rootfs_mib,
        recipe,
        oci,
    } = cli.command;
    let recipe = match recipe.as_deref().map(nexus_rootfs::Recipe::load) {
        None => nexus_rootfs::Recipe::default(),
        Some(Ok(recipe)) => recipe,
        Some(Err(e)) => {
            eprintln!("nexus-rootfs: error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let opts = BuildOptions {
        out,
        name,
        kernel,
        modules,
        acpi,
        guest_mcp,
        cache_dir: cache_dir.unwrap_or_else(default_cache_dir),
        rootfs_mib,
        recipe,
        oci,
        base: None,
    };
    match build(&opts) {
        Ok(manifest) => {
            eprintln!(
                "[nexus-rootfs] kernel {} with guest-mcp {}",
                manifest.kernel_version, manifest.guest_mcp_version
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            let mut msg = format!("nexus-rootfs: error: {e}");
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                msg.push_str(&format!(": {s}"));
                source = s.source();
            }
            eprintln!("{msg}");
            ExitCode::FAILURE
        }
    }
}
