//! Building blocks for the iPXE scripts the binary serves: chain to a profile URL, boot the
//! local disk, or show an error and retry, and the escaping rules for values printed into a
//! script. The binary renders user templates with minijinja; these helpers give it correct,
//! injection-safe defaults.
//!
//! How iPXE reads a script (`src/image/script.c`, `src/core/exec.c`), which is what the
//! escaping has to defeat: lines end at `\n` (a trailing `\r` is dropped, a trailing `\\`
//! joins the next line); a line is split into tokens at whitespace; a token `||`, `&&` or `;`
//! ends one command and starts the next, a token starting with `#` ends the line; `${...}` in
//! a token expands an iPXE setting. iPXE has no quoting, so there is no way to write a
//! literal space or `${` into an argument: a value a node controls must not contain them.

use std::borrow::Cow;

use crate::planner::MacAddr;

/// Why a script could not be rendered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// A URL would end up in a script line but contains whitespace, control characters or a
    /// backslash, which would let it add arguments, commands or lines to the script.
    #[error(
        "URL {url:?} contains whitespace, control characters or a backslash and cannot go into an iPXE script"
    )]
    UnsafeUrl {
        /// The rejected URL.
        url: String,
    },
    /// A value printed into a script would change the script's lines: it holds a control
    /// character (a line break above all) or ends with a backslash (a line continuation).
    #[error("{reason}: {preview} cannot be printed into an iPXE script")]
    UnsafeValue {
        /// What is wrong with it.
        reason: &'static str,
        /// The start of the value, with control characters escaped.
        preview: String,
    },
}

/// Checks a value about to be printed into a script by a template: it must not add, end or
/// join lines, so it may hold no control character (`\n`, `\r`, tab, NUL, ...) and must not
/// end with a backslash. Spaces, `${...}` and the like are allowed, because the operator's
/// own options use them (kernel parameters, `${net0/mac}`); values a node or a BMC controls
/// go through [`word`] first, which removes them.
pub fn check_value(value: &str) -> Result<(), Error> {
    let reason = if value.chars().any(is_line_breaking) {
        "a value with a control character"
    } else if value.ends_with('\\') {
        "a value ending with a backslash"
    } else {
        return Ok(());
    };
    Err(Error::UnsafeValue {
        reason,
        preview: preview(value),
    })
}

/// Control characters, and Unicode's line and paragraph separators, which some consoles
/// and editors treat as line breaks.
fn is_line_breaking(c: char) -> bool {
    c.is_control() || matches!(c, '\u{2028}' | '\u{2029}')
}

/// The first 40 characters of `value`, quoted, control characters escaped.
fn preview(value: &str) -> String {
    let head: String = value.chars().take(40).collect();
    let more = if head.len() < value.len() { "..." } else { "" };
    format!("{head:?}{more}")
}

/// Makes a value that a node or a BMC controls (a node name, a tag, an identifier, catalog
/// data) one inert iPXE word: every byte outside `A-Z a-z 0-9 - . _ ~ : / @ + = , ! * ( ) [ ]
/// ?` becomes `%XX`, as in a URL. What remains cannot split into several arguments (no
/// whitespace), end a command (`||`, `&&`, `;`), start a comment (`#`), expand a setting
/// (`$`), join lines (`\\`) or add one (control characters); quotes, which the Linux kernel's
/// command line honours, are encoded too. Names, MACs, UUIDs and addresses pass unchanged.
pub fn word(value: &str) -> Cow<'_, str> {
    let keep = |b: u8| b.is_ascii_alphanumeric() || b"-._~:/@+=,!*()[]?".contains(&b);
    if value.bytes().all(keep) {
        return Cow::Borrowed(value);
    }
    let mut out = String::with_capacity(value.len() + 8);
    for b in value.bytes() {
        if keep(b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    Cow::Owned(out)
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
    if url.is_empty()
        || url
            .chars()
            .any(|c| c.is_whitespace() || is_line_breaking(c) || c == '\\')
    {
        return Err(Error::UnsafeUrl {
            url: url.to_owned(),
        });
    }
    Ok(url)
}

/// Makes `text` safe for an `echo` line: control characters become spaces, `$` loses its
/// meaning, and `|`, `&`, `;`, `#` and `\\` become `_`, so a message can neither add script
/// lines or commands nor expand iPXE settings.
fn echo_safe(text: &str) -> String {
    text.chars()
        .map(|c| match c {
            c if is_line_breaking(c) => ' ',
            '$' => 'S',
            '|' | '&' | ';' | '#' | '\\' => '_',
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
        for url in [
            "",
            "http://h/a\nreboot",
            "http://h/a b",
            "http://h/\r",
            "http://h/a\\",
            "http://h/a\u{2028}reboot",
        ] {
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
        let s = error_retry("a || b && c ; #d e\\", 1, None).unwrap();
        assert!(
            s.starts_with("#!ipxe\necho metalgraph: a __ b __ c _ _d e_\n"),
            "{s}"
        );
        let s = error_retry("x", 1, None).unwrap();
        assert!(s.ends_with("sleep 1\nreboot\n"), "{s}");
    }

    #[test]
    fn values_that_would_change_the_lines_are_refused() {
        for ok in [
            "",
            "console=ttyS0 inst.ks=http://h/ks?nodeId=n1",
            "BOOTIF=${net0/mac}",
            "a\\b",
            "caf\u{e9}",
        ] {
            assert_eq!(check_value(ok), Ok(()), "{ok:?}");
        }
        for bad in [
            "evil\nchain http://127.0.0.1:1/pwn.ipxe",
            "a\rb",
            "tab\there",
            "nul\0",
            "ends with a backslash\\",
            "line\u{2028}separator",
            "\u{85}next line",
        ] {
            let err = check_value(bad).expect_err(bad);
            assert!(err.to_string().contains("cannot be printed"), "{err}");
            assert!(
                !err.to_string().contains('\n'),
                "the message stays one line: {err}"
            );
        }
    }

    #[test]
    fn words_keep_names_macs_and_urls_and_encode_everything_else() {
        let cases = [
            ("rack1-u08", "rack1-u08"),
            ("52:54:00:12:34:01", "52:54:00:12:34:01"),
            ("https://10.0.0.8/redfish/v1", "https://10.0.0.8/redfish/v1"),
            ("boot-profile=install.ipxe", "boot-profile=install.ipxe"),
            (
                "evil\nchain http://127.0.0.1:1/pwn.ipxe",
                "evil%0Achain%20http://127.0.0.1:1/pwn.ipxe",
            ),
            ("a && reboot", "a%20%26%26%20reboot"),
            ("x ; y || z", "x%20%3B%20y%20%7C%7C%20z"),
            ("#comment", "%23comment"),
            ("${password}", "%24%7Bpassword%7D"),
            ("end\\", "end%5C"),
            ("quote\"d'", "quote%22d%27"),
            ("100%", "100%25"),
            ("caf\u{e9}", "caf%C3%A9"),
        ];
        for (input, want) in cases {
            assert_eq!(word(input), want, "{input:?}");
        }
        assert!(matches!(word("plain"), Cow::Borrowed(_)));
    }

    proptest::proptest! {
        /// Whatever a node sends, its word is one iPXE token that neither ends a command nor
        /// expands a setting, passes `check_value`, and decodes back to the input.
        #[test]
        fn a_word_is_one_inert_token(value in proptest::prelude::any::<String>()) {
            let w = word(&value);
            proptest::prop_assert!(check_value(&w).is_ok());
            proptest::prop_assert!(!w.is_empty() || value.is_empty());
            proptest::prop_assert!(w.bytes().all(|b| b.is_ascii_graphic()), "{w}");
            for forbidden in ["$", "#", "|", "&", ";", "\\", "\"", "'", "{", "}"] {
                proptest::prop_assert!(!w.contains(forbidden), "{w}");
            }
            proptest::prop_assert_eq!(percent_decode(&w), value.into_bytes());
        }
    }

    fn percent_decode(s: &str) -> Vec<u8> {
        let b = s.as_bytes();
        let mut out = Vec::new();
        let mut i = 0;
        while i < b.len() {
            if b[i] == b'%' {
                out.push(u8::from_str_radix(&s[i + 1..i + 3], 16).unwrap());
                i += 3;
            } else {
                out.push(b[i]);
                i += 1;
            }
        }
        out
    }
}
