//! Building blocks for the iPXE scripts the binary serves: chain to a profile URL, boot the
//! local disk, or show an error and retry. The binary renders user templates with minijinja;
//! these helpers give it correct, injection-safe defaults.

use crate::planner::MacAddr;

/// Why a script could not be rendered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// A URL would end up in a script line but contains whitespace or control characters,
    /// which would let it add commands to the script.
    #[error(
        "URL {url:?} contains whitespace or control characters and cannot go into an iPXE script"
    )]
    UnsafeUrl {
        /// The rejected URL.
        url: String,
    },
}

/// The profile URL for `mac` under `base`, e.g. `http://10.0.0.1:8090/api/2.0/profiles` →
/// `http://10.0.0.1:8090/api/2.0/profiles?macs=52:54:00:00:00:01`.
///
/// DHCP hands this to iPXE as a boot file name, which iPXE does not expand, so the MAC is
/// filled in here rather than written as `${net0/mac}`.
pub fn profile_url(base: &str, mac: &MacAddr) -> String {
    let sep = if base.contains('?') { '&' } else { '?' };
    format!("{base}{sep}macs={mac}")
}

fn check_url(url: &str) -> Result<&str, Error> {
    if url.is_empty() || url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(Error::UnsafeUrl {
            url: url.to_owned(),
        });
    }
    Ok(url)
}

/// Makes `text` safe for an `echo` line: control characters become spaces and `$` loses its
/// meaning, so a message can neither add script lines nor expand iPXE settings.
fn echo_safe(text: &str) -> String {
    text.chars()
        .map(|c| match c {
            c if c.is_control() => ' ',
            '$' => 'S',
            c => c,
        })
        .collect()
}

/// A script that chains to `url` (typically a profile URL; iPXE expands `${...}` in it
/// because it is script text), and shows the error and retries after 10 s if that fails.
pub fn chain(url: &str) -> Result<String, Error> {
    let url = check_url(url)?;
    Ok(format!(
        "#!ipxe\n\
         :retry\n\
         chain --autofree {url} || goto failed\n\
         :failed\n\
         echo metalgraph: chaining to the profile failed, retrying in 10 seconds\n\
         sleep 10\n\
         goto retry\n"
    ))
}

/// A script that leaves network boot so the machine boots from its local disk: BIOS boots
/// drive 0x80 with `sanboot`, UEFI returns to the firmware's boot order with `exit`.
pub fn local_boot() -> String {
    "#!ipxe\n\
     echo metalgraph: booting from local disk\n\
     iseq ${platform} efi && goto uefi ||\n\
     sanboot --no-describe --drive 0x80 || goto fallback\n\
     :uefi\n\
     exit\n\
     :fallback\n\
     echo metalgraph: sanboot failed, returning to the firmware\n\
     exit\n"
        .to_owned()
}

/// A script that shows `message`, waits `delay_secs`, and then chains to `retry_url` (or
/// reboots when there is none). Used when the node's profile cannot be rendered yet.
pub fn error_retry(
    message: &str,
    delay_secs: u32,
    retry_url: Option<&str>,
) -> Result<String, Error> {
    let message = echo_safe(message);
    let next = match retry_url {
        Some(url) => format!("chain --replace --autofree {} || reboot\n", check_url(url)?),
        None => "reboot\n".to_owned(),
    };
    Ok(format!(
        "#!ipxe\n\
         echo metalgraph: {message}\n\
         echo metalgraph: retrying in {delay_secs} seconds\n\
         sleep {delay_secs}\n\
         {next}"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profile_url_fills_in_the_mac() {
        let mac: MacAddr = "52:54:00:00:00:01".parse().unwrap();
        assert_eq!(
            profile_url("http://10.0.0.1:8090/api/2.0/profiles", &mac),
            "http://10.0.0.1:8090/api/2.0/profiles?macs=52:54:00:00:00:01"
        );
        assert_eq!(
            profile_url("http://h/p?x=1", &mac),
            "http://h/p?x=1&macs=52:54:00:00:00:01"
        );
    }

    #[test]
    fn chain_script_starts_with_the_ipxe_magic_and_chains() {
        let s = chain("http://10.0.0.1:8090/api/2.0/profiles?macs=${net0/mac}").unwrap();
        assert!(s.starts_with("#!ipxe\n"), "{s}");
        assert!(
            s.contains("chain --autofree http://10.0.0.1:8090/api/2.0/profiles?macs=${net0/mac} || goto failed"),
            "{s}"
        );
    }

    #[test]
    fn urls_that_could_inject_commands_are_refused() {
        for url in ["", "http://h/a\nreboot", "http://h/a b", "http://h/\r"] {
            assert!(chain(url).is_err(), "{url:?}");
            assert!(error_retry("m", 1, Some(url)).is_err(), "{url:?}");
        }
    }

    #[test]
    fn local_boot_uses_sanboot_on_bios_and_exit_on_uefi() {
        let s = local_boot();
        assert!(s.starts_with("#!ipxe\n"));
        assert!(s.contains("sanboot --no-describe --drive 0x80"));
        assert!(s.contains("iseq ${platform} efi && goto uefi"));
        assert!(s.contains("\nexit\n"));
    }

    #[test]
    fn error_messages_cannot_add_lines_or_expand_settings() {
        let s = error_retry("bad\nreboot ${x}", 5, Some("http://h/p")).unwrap();
        assert_eq!(
            s,
            "#!ipxe\necho metalgraph: bad reboot S{x}\necho metalgraph: retrying in 5 seconds\n\
             sleep 5\nchain --replace --autofree http://h/p || reboot\n"
        );
        let s = error_retry("x", 1, None).unwrap();
        assert!(s.ends_with("sleep 1\nreboot\n"), "{s}");
    }
}
