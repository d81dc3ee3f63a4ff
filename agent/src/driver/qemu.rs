//! The `qemu` driver: a VM booted from a kernel and an initramfs (`-kernel`/`-initrd`), with
//! user-mode networking that forwards the agent-allocated host port to the guest's port.
//!
//! KVM is used only where a KVM guest really runs. `/dev/kvm` can exist on a host whose CPU
//! lacks `vmx`/`svm` (nested setups), and a KVM guest there hangs without an error; so the
//! probe requires both the CPU flag and an openable `/dev/kvm`, and falls back to TCG. Under TCG
//! a Debian kernel with a busybox initramfs serves HTTP about 12 s after start with `-M pc` and
//! `virtio-net-pci` (`-M microvm` printed nothing under TCG, so it is not used).
//!
//! The guest learns its port and identity from the kernel command line: `PORT=` and
//! `STRATA_INSTANCE_ID=`, plus the template's `env` as `KEY=VALUE` words (the kernel hands
//! such words to init as environment variables).

use std::fs::OpenOptions;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::group::ProcessGroups;
use super::process::{observe, open_log};
use super::{
    unix_millis, Driver, DriverError, DriverKind, InstanceRecord, LogPaths, Observation,
    StartRequest, StopOutcome,
};
use crate::procfs;

/// The accelerator a VM runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

/// Which accelerator to use: probe, or force one (forcing KVM where it cannot work makes
/// guests hang, so `Auto` is the default).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AccelChoice {
    #[default]
    Auto,
    Kvm,
    Tcg,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QemuConfig {
    /// The emulator; looked up in `PATH` when relative.
    pub binary: PathBuf,
    pub accel: AccelChoice,
}

impl Default for QemuConfig {
    fn default() -> Self {
        QemuConfig {
            binary: PathBuf::from("qemu-system-x86_64"),
            accel: AccelChoice::Auto,
        }
    }
}

/// The guest port when the template names none: what `strata-workload` is told to use.
pub const DEFAULT_GUEST_PORT: u16 = 8080;

/// Cheap to clone: clones share the child table and the accelerator probe.
#[derive(Clone, Debug, Default)]
pub struct QemuDriver {
    config: QemuConfig,
    groups: ProcessGroups,
    probed: Arc<OnceLock<Accel>>,
}

impl QemuDriver {
    pub fn new(config: QemuConfig) -> Self {
        QemuDriver {
            config,
            groups: ProcessGroups::new(),
            probed: Arc::new(OnceLock::new()),
        }
    }

    /// The accelerator new VMs get (probed once per driver).
    pub fn accel(&self) -> Accel {
        match self.config.accel {
            AccelChoice::Kvm => Accel::Kvm,
            AccelChoice::Tcg => Accel::Tcg,
            AccelChoice::Auto => *self.probed.get_or_init(|| {
                let accel = probe_accel();
                tracing::info!(accel = accel.as_str(), "probed qemu accelerator");
                accel
            }),
        }
    }
}

/// KVM only if the CPU advertises `vmx`/`svm` and `/dev/kvm` opens read-write.
pub fn probe_accel() -> Accel {
    let cpu_has_flag = procfs::read_to_string("/proc/cpuinfo")
        .map(|text| procfs::parse_cpuinfo_has_virtualization(&text))
        .unwrap_or(false);
    let kvm_openable = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    choose_accel(cpu_has_flag, kvm_openable)
}

/// The pure rule behind [`probe_accel`].
pub fn choose_accel(cpu_has_virtualization: bool, kvm_openable: bool) -> Accel {
    if cpu_has_virtualization && kvm_openable {
        Accel::Kvm
    } else {
        Accel::Tcg
    }
}

/// The full qemu argument list (without the program), pure so it can be checked in tests.
pub fn qemu_args(
    request: &StartRequest<'_>,
    kernel: &Path,
    initrd: &Path,
    append: Option<&str>,
    guest_port: u16,
    accel: Accel,
    console: &Path,
) -> Vec<String> {
    let template = request.template;
    let mut cmdline = vec![
        "console=ttyS0".to_string(),
        // Reboot (and so, with -no-reboot, exit) on panic instead of hanging: a dead guest must
        // end the process so the agent reports it.
        "panic=-1".to_string(),
        format!("PORT={guest_port}"),
        format!("STRATA_INSTANCE_ID={}", request.instance_id),
    ];
    cmdline.extend(
        template
            .env
            .iter()
            .map(|(key, value)| format!("{key}={value}")),
    );
    if let Some(extra) = append {
        cmdline.push(extra.to_string());
    }
    let cpus = template.cpu.ceil().clamp(1.0, 64.0) as u32;
    let mut args: Vec<String> = vec![
        "-M".into(),
        "pc".into(),
        "-accel".into(),
        accel.as_str().into(),
    ];
    if accel == Accel::Kvm {
        args.extend(["-cpu".into(), "host".into()]);
    }
    args.extend([
        "-m".into(),
        template.memory_mb.max(64).to_string(),
        "-smp".into(),
        cpus.to_string(),
        "-nographic".into(),
        "-monitor".into(),
        "none".into(),
        "-serial".into(),
        format!("file:{}", console.display()),
        "-no-reboot".into(),
        "-kernel".into(),
        kernel.display().to_string(),
        "-initrd".into(),
        initrd.display().to_string(),
        "-append".into(),
        cmdline.join(" "),
        "-netdev".into(),
        format!(
            "user,id=n0,hostfwd=tcp:{}:{}-:{}",
            request.advertise_ip, request.host_port, guest_port
        ),
        "-device".into(),
        "virtio-net-pci,netdev=n0".into(),
    ]);
    args
}

fn require_file(what: &'static str, path: &str) -> Result<PathBuf, DriverError> {
    let path = PathBuf::from(path);
    match std::fs::metadata(&path) {
        Ok(metadata) if metadata.is_file() => Ok(path),
        Ok(_) => Err(DriverError::MissingFile {
            what,
            path,
            source: std::io::Error::other("not a regular file"),
        }),
        Err(source) => Err(DriverError::MissingFile { what, path, source }),
    }
}

impl Driver for QemuDriver {
    fn kind(&self) -> DriverKind {
        DriverKind::Qemu
    }

    fn start(&self, request: &StartRequest<'_>) -> Result<InstanceRecord, DriverError> {
        let Some(image) = &request.template.image else {
            return Err(DriverError::InvalidTemplate(
                "the qemu driver needs `image` (kernel and initrd)".to_string(),
            ));
        };
        // Kernel command line words are separated by spaces; a value with whitespace would
        // silently become two words.
        if let Some((key, _)) = request.template.env.iter().find(|(key, value)| {
            key.contains(char::is_whitespace) || value.contains(char::is_whitespace)
        }) {
            return Err(DriverError::InvalidTemplate(format!(
                "env {key:?}: qemu passes env on the kernel command line, which cannot hold whitespace"
            )));
        }
        let kernel = require_file("kernel", &image.kernel)?;
        let initrd = require_file("initrd", &image.initrd)?;
        let guest_port = request.template.port.unwrap_or(DEFAULT_GUEST_PORT);
        let accel = self.accel();
        let logs = LogPaths {
            stdout: request.dir.join("stdout.log"),
            stderr: request.dir.join("stderr.log"),
            console: Some(request.dir.join("console.log")),
        };
        let console = request.dir.join("console.log");
        let args = qemu_args(
            request,
            &kernel,
            &initrd,
            image.append.as_deref(),
            guest_port,
            accel,
            &console,
        );
        let mut command = Command::new(&self.config.binary);
        // qemu gets none of the agent's environment either (another instance of the same user
        // could read it in /proc/PID/environ), only PATH for its helpers.
        command
            .env_clear()
            .env(
                "PATH",
                std::env::var_os("PATH").unwrap_or_else(|| "/usr/bin:/bin".into()),
            )
            .args(&args)
            .current_dir(request.dir)
            .stdin(Stdio::null())
            .stdout(open_log(&logs.stdout)?)
            .stderr(open_log(&logs.stderr)?);
        let program = self.config.binary.display().to_string();
        let identity = self.groups.spawn(command, &program)?;
        tracing::info!(
            instance = %request.instance_id,
            pid = identity.pid,
            accel = accel.as_str(),
            host_port = request.host_port,
            guest_port,
            "started qemu instance"
        );
        Ok(InstanceRecord {
            instance_id: request.instance_id,
            tier: request.tier.to_string(),
            driver: DriverKind::Qemu,
            address: SocketAddr::new(request.advertise_ip, request.host_port),
            process: Some(identity),
            logs,
            accel: Some(accel),
            guest_port: Some(guest_port),
            started_at_ms: unix_millis(),
            exit: None,
        })
    }

    fn inspect(&self, record: &InstanceRecord) -> Observation {
        observe(&self.groups, record)
    }

    fn adopt(&self, record: &InstanceRecord) -> Observation {
        observe(&self.groups, record)
    }

    fn stop(&self, record: &InstanceRecord, grace: Duration) -> Result<StopOutcome, DriverError> {
        match &record.process {
            // qemu exits promptly on SIGTERM; the guest gets no clean shutdown, which is fine
            // for stateless instances.
            Some(identity) => self.groups.stop(identity, grace),
            None => Ok(StopOutcome::AlreadyGone),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::net::{IpAddr, Ipv4Addr};

    use strata_api::{QemuImage, Template};
    use uuid::Uuid;

    use super::*;

    #[test]
    fn accel_rule() {
        assert_eq!(choose_accel(true, true), Accel::Kvm);
        // The case of this project's machines: /dev/kvm present, no vmx/svm.
        assert_eq!(choose_accel(false, true), Accel::Tcg);
        assert_eq!(choose_accel(true, false), Accel::Tcg);
        assert_eq!(choose_accel(false, false), Accel::Tcg);
    }

    fn template() -> Template {
        Template {
            driver: Some(DriverKind::Qemu),
            image: Some(QemuImage {
                kernel: "/k".into(),
                initrd: "/i".into(),
                append: Some("quiet".into()),
            }),
            memory_mb: 256,
            port: Some(9000),
            env: BTreeMap::from([("MODE".to_string(), "demo".to_string())]),
            ..Template::default()
        }
    }

    #[test]
    fn builds_the_command_line() {
        let template = template();
        let id = Uuid::nil();
        let request = StartRequest {
            instance_id: id,
            tier: "web",
            template: &template,
            dir: Path::new("/d"),
            advertise_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
            host_port: 40001,
        };
        let args = qemu_args(
            &request,
            Path::new("/k"),
            Path::new("/i"),
            Some("quiet"),
            9000,
            Accel::Tcg,
            Path::new("/d/console.log"),
        )
        .join(" ");
        assert_eq!(
            args,
            "-M pc -accel tcg -m 256 -smp 1 -nographic -monitor none \
             -serial file:/d/console.log -no-reboot -kernel /k -initrd /i \
             -append console=ttyS0 panic=-1 PORT=9000 \
             STRATA_INSTANCE_ID=00000000-0000-0000-0000-000000000000 MODE=demo quiet \
             -netdev user,id=n0,hostfwd=tcp:127.0.0.1:40001-:9000 -device virtio-net-pci,netdev=n0"
        );
    }

    #[test]
    fn missing_kernel_is_a_clear_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut template = template();
        template.image = Some(QemuImage {
            kernel: dir.path().join("no-such-kernel").display().to_string(),
            initrd: "/i".into(),
            append: None,
        });
        let driver = QemuDriver::new(QemuConfig::default());
        let request = StartRequest {
            instance_id: Uuid::nil(),
            tier: "web",
            template: &template,
            dir: dir.path(),
            advertise_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
            host_port: 40001,
        };
        let error = driver.start(&request).expect_err("must fail");
        let message = error.to_string();
        assert!(message.starts_with("kernel "), "{message}");
        assert!(message.contains("no-such-kernel is missing"), "{message}");
    }

    #[test]
    fn whitespace_in_env_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut template = template();
        template.env.insert("GREETING".into(), "hello world".into());
        let driver = QemuDriver::new(QemuConfig::default());
        let request = StartRequest {
            instance_id: Uuid::nil(),
            tier: "web",
            template: &template,
            dir: dir.path(),
            advertise_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
            host_port: 40001,
        };
        assert!(matches!(
            driver.start(&request),
            Err(DriverError::InvalidTemplate(_))
        ));
    }
}
