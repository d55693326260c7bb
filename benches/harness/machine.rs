//! A description of the machine the numbers came from: CPU, memory, kernel, and the file
//! system and device under the data directory (what `fsync` actually waits for).

use std::path::Path;

/// The machine, as far as Linux tells an unprivileged process.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Machine {
    pub cpu: String,
    pub cpus: usize,
    pub memory_gib: f64,
    pub kernel: String,
    pub os: String,
    /// The mount under the data directory: device, mount point, file system type, options.
    pub device: String,
    pub mount_point: String,
    pub fs_type: String,
    pub mount_options: String,
    /// What the kernel says of the disk (`/sys/block/*/queue/rotational`); virtual disks
    /// often claim to rotate whatever lies beneath them.
    pub disk_kind: String,
    pub rustc: String,
}

impl Machine {
    pub fn describe(data_dir: &Path) -> Machine {
        let cpuinfo = read("/proc/cpuinfo");
        let cpu = cpuinfo
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_owned())
            .unwrap_or_else(|| "unknown".into());
        let memory_gib = read("/proc/meminfo")
            .lines()
            .find(|l| l.starts_with("MemTotal:"))
            .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
            .map(|kib| kib / (1024.0 * 1024.0))
            .unwrap_or(0.0);
        let os = read("/etc/os-release")
            .lines()
            .find_map(|l| l.strip_prefix("PRETTY_NAME="))
            .map(|v| v.trim_matches('"').to_owned())
            .unwrap_or_else(|| "unknown".into());
        let (device, mount_point, fs_type, mount_options) = mount_of(data_dir);
        let disk_kind = disk_kind(&device);
        let rustc = std::process::Command::new("rustc")
            .arg("--version")
            .output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_default();
        Machine {
            cpu,
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            memory_gib,
            kernel: read("/proc/sys/kernel/osrelease").trim().to_owned(),
            os,
            device,
            mount_point,
            fs_type,
            mount_options,
            disk_kind,
            rustc,
        }
    }

    /// Whether `fsync` on this file system is a no-op (tmpfs and the like), which would make
    /// every durable figure meaningless.
    pub fn fsync_is_fake(&self) -> bool {
        matches!(self.fs_type.as_str(), "tmpfs" | "ramfs")
    }
}

fn read(path: &str) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// The entry of `/proc/self/mounts` with the longest mount point that contains `dir`.
fn mount_of(dir: &Path) -> (String, String, String, String) {
    let dir = dir.canonicalize().unwrap_or_else(|_| dir.to_owned());
    let mut best: Option<(String, String, String, String)> = None;
    for line in read("/proc/self/mounts").lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let [dev, mnt, fs, opts, ..] = f.as_slice() else {
            continue;
        };
        let mnt = mnt.replace("\\040", " ");
        if dir.starts_with(&mnt) && best.as_ref().is_none_or(|b| mnt.len() >= b.1.len()) {
            best = Some((dev.to_string(), mnt, fs.to_string(), opts.to_string()));
        }
    }
    best.unwrap_or_else(|| {
        (
            "unknown".into(),
            "/".into(),
            "unknown".into(),
            String::new(),
        )
    })
}

/// Whether the block device behind `device` (`/dev/vda1`, `/dev/nvme0n1p2`) spins.
fn disk_kind(device: &str) -> String {
    let Some(name) = device.strip_prefix("/dev/") else {
        return "unknown".into();
    };
    // Try the device itself, then its parent disk (strip a partition suffix).
    let mut candidates = vec![name.to_owned()];
    let trimmed = name.trim_end_matches(|c: char| c.is_ascii_digit());
    candidates.push(trimmed.trim_end_matches('p').to_owned());
    candidates.push(trimmed.to_owned());
    for c in candidates {
        if let Ok(v) = std::fs::read_to_string(format!("/sys/block/{c}/queue/rotational")) {
            return if v.trim() == "0" {
                "reported non-rotational".into()
            } else {
                "reported rotational".into()
            };
        }
    }
    "unknown".into()
}
