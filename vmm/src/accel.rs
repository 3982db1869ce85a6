//! Choosing hardware acceleration (KVM) or emulation (TCG).
//!
//! `auto` must never hang to find out. A `/dev/kvm` can exist and still be
//! unable to run a stock kernel: on a PVM host (`kvm_pvm` loaded) only
//! PVM-enabled guest kernels run, and a stock one hangs at boot. So KVM is
//! chosen only when `/dev/kvm` opens read-write and the loaded hypervisor
//! module is the hardware one (`kvm_intel` or `kvm_amd`).

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::VmmError;

/// What the caller asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    #[default]
    Auto,
    Kvm,
    Tcg,
}

impl std::str::FromStr for Accel {
    type Err = VmmError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Accel::Auto),
            "kvm" => Ok(Accel::Kvm),
            "tcg" => Ok(Accel::Tcg),
            other => Err(VmmError::Accel(format!(
                "{other:?} is unknown: use auto, kvm or tcg"
            ))),
        }
    }
}

/// What a VM really runs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Resolved {
    Kvm,
    Tcg,
}

/// What this host offers, read from `/dev/kvm` and `/sys/module`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvmSupport {
    Usable,
    Unusable(String),
}

pub fn probe_kvm() -> KvmSupport {
    probe_kvm_at(Path::new("/dev/kvm"), Path::new("/sys/module"))
}

fn probe_kvm_at(dev: &Path, modules: &Path) -> KvmSupport {
    if modules.join("kvm_pvm").exists() {
        return KvmSupport::Unusable(
            "/dev/kvm is served by the PVM hypervisor (kvm_pvm), which only runs PVM-enabled guest kernels; a stock kernel hangs there".into(),
        );
    }
    if !modules.join("kvm_intel").exists() && !modules.join("kvm_amd").exists() {
        return KvmSupport::Unusable("neither kvm_intel nor kvm_amd is loaded".into());
    }
    match std::fs::OpenOptions::new().read(true).write(true).open(dev) {
        Ok(_) => KvmSupport::Usable,
        Err(e) => KvmSupport::Unusable(format!("{} cannot be opened: {e}", dev.display())),
    }
}

/// What `auto` picks on this host, and why (for status reports).
pub fn auto_choice() -> (Resolved, String) {
    match probe_kvm() {
        KvmSupport::Usable => (
            Resolved::Kvm,
            "/dev/kvm opens and a hardware hypervisor module (kvm_intel or kvm_amd) is loaded"
                .into(),
        ),
        KvmSupport::Unusable(why) => (
            Resolved::Tcg,
            format!("emulation, as KVM cannot be used: {why}"),
        ),
    }
}

impl Accel {
    pub fn resolve(self) -> Result<Resolved, VmmError> {
        self.resolve_with(&probe_kvm())
    }

    fn resolve_with(self, kvm: &KvmSupport) -> Result<Resolved, VmmError> {
        match (self, kvm) {
            (Accel::Tcg, _) => Ok(Resolved::Tcg),
            (Accel::Kvm, KvmSupport::Usable) | (Accel::Auto, KvmSupport::Usable) => {
                Ok(Resolved::Kvm)
            }
            (Accel::Auto, KvmSupport::Unusable(why)) => {
                tracing::debug!(why, "KVM unusable; using TCG");
                Ok(Resolved::Tcg)
            }
            (Accel::Kvm, KvmSupport::Unusable(why)) => Err(VmmError::Accel(format!(
                "kvm was asked for but cannot be used: {why}; use auto or tcg"
            ))),
        }
    }
}

/// The host's TSC frequency in kHz, for `tsc_early_khz` under TCG. Under
/// TCG the guest's clock is the host's, and without this hint the guest
/// sometimes fails to calibrate its TSC and hangs forever (always, with
/// both cores busy).
pub fn host_tsc_khz() -> Option<u64> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    tsc_khz_from_cpuinfo(&cpuinfo)
}

fn tsc_khz_from_cpuinfo(cpuinfo: &str) -> Option<u64> {
    let mhz: f64 = cpuinfo
        .lines()
        .find(|l| l.starts_with("cpu MHz"))?
        .split(':')
        .nth(1)?
        .trim()
        .parse()
        .ok()?;
    (mhz > 0.0).then(|| (mhz * 1000.0).round() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pvm_hosts_fall_back_to_tcg_and_refuse_explicit_kvm() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("kvm_pvm")).unwrap();
        std::fs::create_dir_all(dir.path().join("kvm_amd")).unwrap();
        let kvm = probe_kvm_at(Path::new("/dev/kvm"), dir.path());
        assert!(matches!(&kvm, KvmSupport::Unusable(why) if why.contains("PVM")));
        assert_eq!(Accel::Auto.resolve_with(&kvm).unwrap(), Resolved::Tcg);
        let err = Accel::Kvm.resolve_with(&kvm).unwrap_err().to_string();
        assert!(
            err.contains("PVM") && err.contains("use auto or tcg"),
            "{err}"
        );
    }

    #[test]
    fn hardware_kvm_is_chosen_by_auto() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("kvm_intel")).unwrap();
        let dev = dir.path().join("kvm");
        std::fs::write(&dev, b"").unwrap();
        let kvm = probe_kvm_at(&dev, dir.path());
        assert_eq!(kvm, KvmSupport::Usable);
        assert_eq!(Accel::Auto.resolve_with(&kvm).unwrap(), Resolved::Kvm);
        assert_eq!(Accel::Tcg.resolve_with(&kvm).unwrap(), Resolved::Tcg);
    }

    #[test]
    fn no_hypervisor_module_means_tcg() {
        let dir = tempfile::tempdir().unwrap();
        let kvm = probe_kvm_at(Path::new("/dev/kvm"), dir.path());
        assert_eq!(Accel::Auto.resolve_with(&kvm).unwrap(), Resolved::Tcg);
    }

    #[test]
    fn this_host_resolves_without_hanging() {
        // Whatever the machine, auto answers at once with one of the two.
        let resolved = Accel::Auto.resolve().unwrap();
        assert!(matches!(resolved, Resolved::Kvm | Resolved::Tcg));
    }

    #[test]
    fn reads_the_tsc_frequency_from_cpuinfo() {
        let info = "processor\t: 0\ncpu MHz\t\t: 2596.096\n";
        assert_eq!(tsc_khz_from_cpuinfo(info), Some(2_596_096));
        assert_eq!(tsc_khz_from_cpuinfo("processor: 0\n"), None);
        assert!(
            "fast"
                .parse::<Accel>()
                .unwrap_err()
                .to_string()
                .contains("auto, kvm or tcg")
        );
    }
}
