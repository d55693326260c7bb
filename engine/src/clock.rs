//! Time as the engine sees it: wall-clock milliseconds for persisted instants, so that
//! deadlines survive restarts, and an injectable clock so tests can run under paused time.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A source of wall-clock time in milliseconds since the Unix epoch.
pub trait Clock: Send + Sync + 'static {
    fn now_ms(&self) -> u64;
}

/// The system clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0)
    }
}

/// A clock that follows tokio's (possibly paused) time from a fixed epoch offset. Tests
/// share one between an engine and its successor after a simulated crash, so that virtual
/// time that passed counts against persisted deadlines.
#[derive(Debug, Clone)]
pub struct TokioClock {
    base_ms: u64,
    start: tokio::time::Instant,
}

impl TokioClock {
    pub fn new(base_ms: u64) -> Arc<Self> {
        Arc::new(Self {
            base_ms,
            start: tokio::time::Instant::now(),
        })
    }
}

impl Clock for TokioClock {
    fn now_ms(&self) -> u64 {
        self.base_ms + self.start.elapsed().as_millis() as u64
    }
}

/// Milliseconds from `now_ms` until `at_ms`, zero if past.
pub fn until(now_ms: u64, at_ms: u64) -> Duration {
    Duration::from_millis(at_ms.saturating_sub(now_ms))
}

/// The current system time as RFC 3339 (UTC, milliseconds).
pub fn now_rfc3339() -> String {
    rfc3339(SystemClock.now_ms())
}

/// Formats epoch milliseconds as RFC 3339 in UTC, e.g. `2026-11-21T16:02:03.456Z`.
pub fn rfc3339(ms: u64) -> String {
    let secs = ms / 1000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil-from-days (Howard Hinnant's algorithm), valid for every date after 1970.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60,
        ms % 1000
    )
}

/// Parses what `rfc3339` writes (`2026-11-21T16:02:03.456Z`, milliseconds optional) back
/// into epoch milliseconds; `None` for anything else, including instants before 1970.
pub fn parse_rfc3339(s: &str) -> Option<u64> {
    let b = s.as_bytes();
    let digits = |from: usize, len: usize| -> Option<i64> {
        let part = s.get(from..from + len)?;
        if !part.bytes().all(|c| c.is_ascii_digit()) {
            return None;
        }
        part.parse().ok()
    };
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || b[10] != b'T' || b[13] != b':' {
        return None;
    }
    if b[16] != b':' {
        return None;
    }
    let (year, month, day) = (digits(0, 4)?, digits(5, 2)?, digits(8, 2)?);
    let (hour, minute, second) = (digits(11, 2)?, digits(14, 2)?, digits(17, 2)?);
    let millis = match s.get(19..)? {
        "Z" => 0,
        rest if rest.len() == 5 && rest.starts_with('.') && rest.ends_with('Z') => digits(20, 3)?,
        _ => return None,
    };
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || hour > 23 || minute > 59 {
        return None;
    }
    if second > 60 {
        return None;
    }
    // Days-from-civil (Howard Hinnant's algorithm), the inverse of `rfc3339`'s.
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let ms = ((days * 86_400 + hour * 3600 + minute * 60 + second) * 1000) + millis;
    u64::try_from(ms).ok()
}

#[cfg(test)]
mod tests {
    #[test]
    fn formats_rfc3339() {
        assert_eq!(super::rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(super::rfc3339(951_782_400_123), "2000-02-29T00:00:00.123Z");
        assert_eq!(
            super::rfc3339(1_795_276_923_456),
            "2026-11-21T16:02:03.456Z"
        );
    }

    #[test]
    fn parses_what_it_formats() {
        for ms in [
            0,
            999,
            951_782_400_123,
            1_795_276_923_456,
            4_102_444_800_000,
        ] {
            assert_eq!(super::parse_rfc3339(&super::rfc3339(ms)), Some(ms), "{ms}");
        }
        assert_eq!(
            super::parse_rfc3339("2000-02-29T00:00:00Z"),
            Some(951_782_400_000)
        );
        for bad in [
            "",
            "2026-11-21",
            "2026-11-21 16:02:03Z",
            "2026-13-01T00:00:00Z",
            "2026-11-21T16:02:03.45Z",
            "2026-11-21T16:02:03+01:00",
            "1969-12-31T23:59:59.999Z",
            "2026-11-21T16:0x:03Z",
        ] {
            assert_eq!(super::parse_rfc3339(bad), None, "{bad:?}");
        }
    }
}
