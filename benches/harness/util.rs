//! Small helpers the scenarios share: duration formatting and serialising, percentiles,
//! and the process's memory as Linux reports it.

use std::time::Duration;

/// A duration as seconds (a float), which is what people read in JSON; used with
/// `#[serde(with = "crate::util::secs")]`.
pub mod secs {
    use std::time::Duration;

    use serde::Deserialize as _;

    pub fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64())
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let secs = f64::deserialize(d)?;
        Duration::try_from_secs_f64(secs).map_err(serde::de::Error::custom)
    }
}

/// A duration for a table: microseconds, milliseconds or seconds, three significant digits.
pub fn fmt_dur(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s >= 1.0 {
        format!("{} s", sig3(s))
    } else if s >= 1e-3 {
        format!("{} ms", sig3(s * 1e3))
    } else {
        format!("{} µs", sig3(s * 1e6))
    }
}

/// A number with three significant digits (no exponent), for tables.
pub fn sig3(x: f64) -> String {
    if x == 0.0 || !x.is_finite() {
        return format!("{x}");
    }
    let digits = x.abs().log10().floor() as i32;
    let decimals = (2 - digits).max(0) as usize;
    format!("{x:.decimals$}")
}

/// A count with thousands separators: `100000` reads `100,000`.
pub fn fmt_count(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Bytes in MiB, for tables.
pub fn fmt_mib(bytes: u64) -> String {
    format!("{} MiB", sig3(bytes as f64 / (1024.0 * 1024.0)))
}

/// The `q` quantile (0..=1) of `sorted`, by the nearest-rank method.
pub fn quantile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// This process's resident set size now and at its peak, in bytes, from
/// `/proc/self/status` (`VmRSS`, `VmHWM`). `None` off Linux.
/// The resident set of process `pid`, in bytes.
pub fn rss_of(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

pub fn rss() -> Option<(u64, u64)> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let field = |name: &str| -> Option<u64> {
        let line = status.lines().find(|l| l.starts_with(name))?;
        let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib * 1024)
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

/// Resets the peak RSS (`VmHWM`) to the current RSS, so that the next [`rss`] reports the
/// peak of what runs from now on. Returns whether the kernel accepted it.
pub fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// Opens `backend`'s store for the data directory `dir`. PostgreSQL's is a schema in a
/// cluster this process starts, with fsync on as in production (sled and the file store
/// fsync every commit too), found again when `dir` is opened again.
pub fn open_store(
    backend: metalgraph_store::Backend,
    dir: &std::path::Path,
) -> anyhow::Result<std::sync::Arc<dyn metalgraph_store::Store>> {
    let options = metalgraph_store::OpenOptions {
        database: database_url(backend, dir)
            .map(|url| metalgraph_store::PgOptions { url, ca_pem: None }),
        ..Default::default()
    };
    Ok(metalgraph_store::open_with(backend, dir, &options)?)
}

/// The database URL of `backend`'s store for `dir`, when it is PostgreSQL.
pub fn database_url(backend: metalgraph_store::Backend, dir: &std::path::Path) -> Option<String> {
    (backend == metalgraph_store::Backend::Postgres)
        .then(|| metalgraph_testkit::postgres_durable().store_url_for(dir))
}
