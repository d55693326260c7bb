//! Which clients are network-boot clients, and which boot file each one gets: PXE ROMs
//! (vendor class `PXEClient...`) an iPXE binary's name on the TFTP server, UEFI HTTP Boot
//! firmware (vendor class `HTTPClient...`) an iPXE binary's URL, iPXE (option 175 or user
//! class `iPXE`) the profile URL; the binary by option 93's architecture.

use serde::{Deserialize, Serialize};

use super::packet::Request;
use crate::planner::{ClientInfo, Firmware};

/// The iPXE binaries PXE and UEFI HTTP Boot firmware boot first, and how that firmware
/// reaches them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct BootFiles {
    /// For legacy BIOS PXE (architecture 0).
    pub bios: String,
    /// For x86-64 UEFI, over PXE (architectures 7 and 9) and over HTTP (architecture 16):
    /// `snponly.efi` (uses the firmware's network driver; the safe default) or `ipxe.efi`
    /// (iPXE's own drivers).
    pub uefi_x64: String,
    /// The URL the same files are served under over HTTP, ending in `/` (for example
    /// `http://10.0.0.1:8090/boot/`): a UEFI HTTP Boot client gets this followed by its
    /// file's name. None: HTTP Boot clients are not answered.
    pub http_base: Option<String>,
}

impl Default for BootFiles {
    fn default() -> Self {
        BootFiles {
            bios: "undionly.kpxe".to_owned(),
            uefi_x64: "snponly.efi".to_owned(),
            http_base: None,
        }
    }
}

/// Architecture types of option 93 (RFC 4578, IANA "Processor Architecture Types").
pub mod arch {
    /// Intel x86PC (legacy BIOS).
    pub const BIOS: u16 = 0;
    /// EFI BC (in practice x86-64 UEFI).
    pub const EFI_BC: u16 = 7;
    /// EFI x86-64.
    pub const EFI_X64: u16 = 9;
    /// ARM 64-bit UEFI (PXE).
    pub const EFI_ARM64: u16 = 11;
    /// x86-64 UEFI HTTP Boot.
    pub const EFI_X64_HTTP: u16 = 16;
    /// ARM 64-bit UEFI HTTP Boot.
    pub const EFI_ARM64_HTTP: u16 = 19;
}

/// The vendor class (option 60) PXE ROMs send, and proxyDHCP answers with.
pub const PXE_CLASS: &[u8] = b"PXEClient";
/// The vendor class (option 60) UEFI HTTP Boot firmware sends (`HTTPClient:Arch:00016:
/// UNDI:003000`), and which an answer to it must carry (UEFI 2.x, "HTTP Boot").
pub const HTTP_CLASS: &[u8] = b"HTTPClient";

/// Why a request gets no boot answer before the planner is asked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unclassified {
    /// Not a network-boot client at all: most DHCP traffic on a shared network.
    #[error("not a network-boot client (no PXEClient or HTTPClient vendor class, no iPXE marker)")]
    NotBoot,
    /// A client that says it network-boots, but whose request cannot be read as such.
    #[error("{0}")]
    Malformed(String),
}

fn lossy(bytes: &Option<Vec<u8>>) -> Option<String> {
    bytes
        .as_ref()
        .map(|b| String::from_utf8_lossy(b).into_owned())
}

/// The first 64 bytes of `bytes`, quoted and escaped, for a log line.
fn preview(bytes: &[u8]) -> String {
    let head = String::from_utf8_lossy(&bytes[..bytes.len().min(64)]);
    let more = if bytes.len() > 64 { "..." } else { "" };
    format!("{head:?}{more}")
}

/// Formats option 97 (type 0 followed by a 16-byte GUID) the way SMBIOS and iPXE print
/// it: the first three fields little-endian.
fn format_uuid(id: &[u8]) -> Option<String> {
    let [0, g @ ..] = id else { return None };
    let g: &[u8; 16] = g.try_into().ok()?;
    Some(format!(
        "{:02x}{:02x}{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}{:02x}{:02x}{:02x}{:02x}",
        g[3],
        g[2],
        g[1],
        g[0],
        g[5],
        g[4],
        g[7],
        g[6],
        g[8],
        g[9],
        g[10],
        g[11],
        g[12],
        g[13],
        g[14],
        g[15]
    ))
}

/// Whether the user class (option 77) names iPXE, either as iPXE sends it (the bare string)
/// or in RFC 3004 form (length-prefixed entries).
fn user_class_is_ipxe(uc: &[u8]) -> bool {
    if uc == b"iPXE" {
        return true;
    }
    let mut rest = uc;
    while let [len, tail @ ..] = rest {
        let len = *len as usize;
        let Some(entry) = tail.get(..len) else {
            return false;
        };
        if entry == b"iPXE" {
            return true;
        }
        rest = &tail[len..];
    }
    false
}

/// The architecture an HTTP Boot client's vendor class names, as the UEFI specification
/// writes it: `HTTPClient:Arch:NNNNN`, five decimal digits, then nothing or `:` and more
/// (`:UNDI:003000`). `HTTPClient` alone names none. Anything else is malformed.
fn http_class_arch(class: &[u8]) -> Result<Option<u16>, Unclassified> {
    let malformed = || {
        Unclassified::Malformed(format!(
            "malformed HTTP Boot vendor class {}: expected HTTPClient or HTTPClient:Arch:NNNNN[:...]",
            preview(class)
        ))
    };
    let rest = class.strip_prefix(HTTP_CLASS).ok_or_else(malformed)?;
    if rest.is_empty() {
        return Ok(None);
    }
    let rest = rest.strip_prefix(b":Arch:").ok_or_else(malformed)?;
    let (digits, tail) = rest.split_at_checked(5).ok_or_else(malformed)?;
    if !digits.iter().all(u8::is_ascii_digit) || !(tail.is_empty() || tail.starts_with(b":")) {
        return Err(malformed());
    }
    // Five digits may exceed a u16 (option 93's width): malformed too.
    let arch = std::str::from_utf8(digits)
        .ok()
        .and_then(|d| d.parse::<u16>().ok())
        .ok_or_else(malformed)?;
    Ok(Some(arch))
}

/// The architecture of an HTTP Boot client: option 93's, which must agree with the one
/// its vendor class names, if it names one; without option 93, the vendor class's.
fn http_arch(class: &[u8], option_93: Option<u16>) -> Result<Option<u16>, Unclassified> {
    match (option_93, http_class_arch(class)?) {
        (Some(a), Some(c)) if a != c => Err(Unclassified::Malformed(format!(
            "HTTP Boot vendor class {} names architecture {c}, but option 93 names {a}",
            preview(class)
        ))),
        (Some(a), _) => Ok(Some(a)),
        (None, c) => Ok(c),
    }
}

/// Identifies a network-boot client, or says why the request is not from one. iPXE's
/// markers win over a vendor class (iPXE sends `PXEClient` too); `PXEClient` and
/// `HTTPClient` are told apart by their vendor class.
pub fn classify(req: &Request) -> Result<ClientInfo, Unclassified> {
    let ipxe = req.ipxe_encap || req.user_class.as_deref().is_some_and(user_class_is_ipxe);
    let class = req.vendor_class.as_deref().unwrap_or_default();
    let (firmware, arch) = if ipxe {
        (Firmware::Ipxe, req.arch)
    } else if class.starts_with(PXE_CLASS) {
        (Firmware::Pxe, req.arch)
    } else if class.starts_with(HTTP_CLASS) {
        (Firmware::Http, http_arch(class, req.arch)?)
    } else {
        return Err(Unclassified::NotBoot);
    };
    let relay = Some(req.msg.giaddr()).filter(|g| !g.is_unspecified());
    Ok(ClientInfo {
        mac: req.mac,
        firmware,
        arch,
        uuid: req.machine_id.as_deref().and_then(format_uuid),
        vendor_class: lossy(&req.vendor_class),
        user_class: lossy(&req.user_class),
        relay,
    })
}

/// The boot file for `client`: iPXE gets `profile_url`; PXE firmware gets the name of the
/// iPXE binary for its architecture on the TFTP server (a PXE ROM without option 93 is
/// treated as BIOS, as the oldest ROMs are); UEFI HTTP Boot firmware gets that binary's
/// URL. Other architectures (ARM, 32-bit UEFI) have no binary to chain to, nor has HTTP
/// Boot when the binaries are not served over HTTP.
///
/// A PXE ROM is named its TFTP file whether or not this process serves TFTP: another TFTP
/// server may serve the boot address, and where none does, the ROM's transfer fails at
/// once and the firmware moves on to its next boot option (HTTP Boot, say) sooner than it
/// would after waiting out its DHCP retries for an answer that never comes.
pub fn boot_file(
    client: &ClientInfo,
    files: &BootFiles,
    profile_url: &str,
) -> Result<String, String> {
    match (client.firmware, client.arch) {
        (Firmware::Ipxe, _) => Ok(profile_url.to_owned()),
        (Firmware::Pxe, None | Some(arch::BIOS)) => Ok(files.bios.clone()),
        (Firmware::Pxe, Some(arch::EFI_BC | arch::EFI_X64)) => Ok(files.uefi_x64.clone()),
        (Firmware::Pxe, Some(other)) => Err(format!(
            "no boot file for client architecture {other} (option 93)"
        )),
        (Firmware::Http, arch) => {
            let Some(base) = files.http_base.as_deref() else {
                return Err(
                    "UEFI HTTP Boot is off: the boot files are not served over HTTP".to_owned(),
                );
            };
            match arch {
                Some(arch::EFI_X64_HTTP) => Ok(format!("{base}{}", files.uefi_x64)),
                Some(other) => Err(format!(
                    "no boot file for UEFI HTTP Boot client architecture {other}"
                )),
                None => Err(
                    "a UEFI HTTP Boot client that names no architecture (no option 93, \
                     none in its vendor class)"
                        .to_owned(),
                ),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dhcp::packet::{build_request, ipxe_encap_option, parse};
    use crate::planner::MacAddr;
    use dhcproto::v4::{Architecture, DhcpOption, MessageType};

    const URL: &str = "http://10.0.0.1:8090/api/2.0/profiles?macs=52:54:00:00:00:01";
    const HTTP_BASE: &str = "http://10.0.0.1:8090/boot/";
    const HTTP_X64: &str = "HTTPClient:Arch:00016:UNDI:003000";

    fn opts_for(
        vendor: Option<&str>,
        arch: Option<u16>,
        ipxe175: bool,
        user: Option<&[u8]>,
    ) -> Vec<DhcpOption> {
        let mut o = Vec::new();
        if let Some(v) = vendor {
            o.push(DhcpOption::ClassIdentifier(v.as_bytes().to_vec()));
        }
        if let Some(a) = arch {
            o.push(DhcpOption::ClientSystemArchitecture(Architecture::from(a)));
        }
        if ipxe175 {
            o.push(ipxe_encap_option());
        }
        if let Some(u) = user {
            o.push(DhcpOption::UserClass(u.to_vec()));
        }
        o
    }

    #[test]
    fn boot_file_table() {
        let efi = BootFiles {
            uefi_x64: "ipxe.efi".into(),
            ..BootFiles::default()
        };
        let http = BootFiles {
            http_base: Some(HTTP_BASE.into()),
            ..BootFiles::default()
        };

        // (vendor class, arch, option 175, user class, files, expected)
        type Case<'a> = (
            Option<&'a str>,
            Option<u16>,
            bool,
            Option<&'a [u8]>,
            BootFiles,
            Result<&'a str, &'a str>,
        );
        let cases: Vec<Case> = vec![
            (
                Some("PXEClient:Arch:00000:UNDI:002001"),
                Some(0),
                false,
                None,
                BootFiles::default(),
                Ok("undionly.kpxe"),
            ),
            (
                Some("PXEClient:Arch:00007:UNDI:003000"),
                Some(7),
                false,
                None,
                BootFiles::default(),
                Ok("snponly.efi"),
            ),
            (
                Some("PXEClient:Arch:00009:UNDI:003000"),
                Some(9),
                false,
                None,
                BootFiles::default(),
                Ok("snponly.efi"),
            ),
            (
                Some("PXEClient:Arch:00007:UNDI:003000"),
                Some(7),
                false,
                None,
                efi.clone(),
                Ok("ipxe.efi"),
            ),
            (
                Some("PXEClient"),
                None,
                false,
                None,
                BootFiles::default(),
                Ok("undionly.kpxe"),
            ),
            (
                Some("PXEClient:Arch:00011:UNDI:003000"),
                Some(11),
                false,
                None,
                BootFiles::default(),
                Err("architecture 11"),
            ),
            (
                Some("PXEClient:Arch:00006:UNDI:003000"),
                Some(6),
                false,
                None,
                BootFiles::default(),
                Err("architecture 6"),
            ),
            // iPXE by option 175, by bare user class, by RFC 3004 user class; arch is irrelevant.
            (
                Some("PXEClient:Arch:00000:UNDI:002001"),
                Some(0),
                true,
                Some(b"iPXE"),
                BootFiles::default(),
                Ok(URL),
            ),
            (
                Some("PXEClient:Arch:00007:UNDI:003000"),
                Some(7),
                true,
                None,
                BootFiles::default(),
                Ok(URL),
            ),
            (
                None,
                None,
                false,
                Some(b"iPXE"),
                BootFiles::default(),
                Ok(URL),
            ),
            (
                None,
                Some(11),
                false,
                Some(b"\x04iPXE"),
                BootFiles::default(),
                Ok(URL),
            ),
            (None, None, true, None, BootFiles::default(), Ok(URL)),
            // UEFI HTTP Boot: the x86-64 binary's URL, when the binaries are served over HTTP.
            (
                Some(HTTP_X64),
                Some(16),
                false,
                None,
                http.clone(),
                Ok("http://10.0.0.1:8090/boot/snponly.efi"),
            ),
            (
                Some("HTTPClient:Arch:00016:UNDI:003000"),
                Some(16),
                false,
                None,
                BootFiles {
                    uefi_x64: "ipxe.efi".into(),
                    ..http.clone()
                },
                Ok("http://10.0.0.1:8090/boot/ipxe.efi"),
            ),
            // With the binaries also served over HTTP, PXE ROMs still get TFTP names.
            (
                Some("PXEClient:Arch:00007:UNDI:003000"),
                Some(7),
                false,
                None,
                http.clone(),
                Ok("snponly.efi"),
            ),
            (
                Some("PXEClient:Arch:00000:UNDI:002001"),
                Some(0),
                false,
                None,
                http.clone(),
                Ok("undionly.kpxe"),
            ),
            // The architecture from the vendor class when option 93 is missing, and a bare
            // HTTPClient class with option 93.
            (
                Some("HTTPClient:Arch:00016"),
                None,
                false,
                None,
                http.clone(),
                Ok("http://10.0.0.1:8090/boot/snponly.efi"),
            ),
            (
                Some("HTTPClient"),
                Some(16),
                false,
                None,
                http.clone(),
                Ok("http://10.0.0.1:8090/boot/snponly.efi"),
            ),
            (
                Some(HTTP_X64),
                Some(16),
                false,
                None,
                BootFiles::default(),
                Err("UEFI HTTP Boot is off"),
            ),
            (
                Some("HTTPClient:Arch:00019:UNDI:003000"),
                Some(19),
                false,
                None,
                http.clone(),
                Err("HTTP Boot client architecture 19"),
            ),
            (
                Some("HTTPClient:Arch:00015:UNDI:003000"),
                Some(15),
                false,
                None,
                http.clone(),
                Err("HTTP Boot client architecture 15"),
            ),
            // An HTTP client with a PXE architecture is not given a TFTP name or a URL.
            (
                Some("HTTPClient:Arch:00007:UNDI:003000"),
                Some(7),
                false,
                None,
                http.clone(),
                Err("HTTP Boot client architecture 7"),
            ),
            (
                Some("HTTPClient"),
                None,
                false,
                None,
                http.clone(),
                Err("names no architecture"),
            ),
            // Malformed HTTPClient classes.
            (
                Some("HTTPClient:Arch:00016:UNDI:003000"),
                Some(7),
                false,
                None,
                http.clone(),
                Err("names architecture 16, but option 93 names 7"),
            ),
            (
                Some("HTTPClientX"),
                Some(16),
                false,
                None,
                http.clone(),
                Err("malformed HTTP Boot vendor class \"HTTPClientX\""),
            ),
            (
                Some("HTTPClient:Arch:0016:UNDI:003000"),
                Some(16),
                false,
                None,
                http.clone(),
                Err("malformed HTTP Boot vendor class"),
            ),
            (
                Some("HTTPClient:Arch:00016x"),
                Some(16),
                false,
                None,
                http.clone(),
                Err("malformed HTTP Boot vendor class"),
            ),
            (
                Some("HTTPClient:Arch:99999"),
                None,
                false,
                None,
                http.clone(),
                Err("malformed HTTP Boot vendor class"),
            ),
            (
                Some("HTTPClient:Arch:"),
                None,
                false,
                None,
                http.clone(),
                Err("malformed HTTP Boot vendor class"),
            ),
            // iPXE's markers win over an HTTPClient class.
            (
                Some(HTTP_X64),
                Some(16),
                false,
                Some(b"iPXE"),
                http.clone(),
                Ok(URL),
            ),
            // Not boot clients at all.
            (
                None,
                None,
                false,
                None,
                BootFiles::default(),
                Err("not a network-boot client"),
            ),
            (
                Some("udhcp 1.35.0"),
                None,
                false,
                None,
                BootFiles::default(),
                Err("not a network-boot client"),
            ),
            (
                Some("MSFT 5.0"),
                None,
                false,
                Some(b"gPXE"),
                BootFiles::default(),
                Err("not a network-boot client"),
            ),
            (
                Some("pxeclient"),
                Some(0),
                false,
                None,
                BootFiles::default(),
                Err("not a network-boot client"),
            ),
            (
                Some("httpclient:Arch:00016"),
                Some(16),
                false,
                None,
                http.clone(),
                Err("not a network-boot client"),
            ),
        ];
        for (i, (vendor, arch, ipxe, user, files, want)) in cases.into_iter().enumerate() {
            let bytes = build_request(
                MessageType::Discover,
                MacAddr([0x52, 0x54, 0, 0, 0, 1]),
                1,
                opts_for(vendor, arch, ipxe, user),
            );
            let req = parse(&bytes).unwrap();
            let got = classify(&req)
                .map_err(|e| e.to_string())
                .and_then(|c| boot_file(&c, &files, URL));
            match (got, want) {
                (Ok(g), Ok(w)) => assert_eq!(g, w, "case {i}"),
                (Err(g), Err(w)) => assert!(g.contains(w), "case {i}: {g:?} should mention {w:?}"),
                (g, w) => panic!("case {i}: got {g:?}, want {w:?}"),
            }
        }
    }

    #[test]
    fn uuid_from_option_97_reads_like_smbios() {
        let mut id = vec![0u8];
        id.extend_from_slice(&[
            0x59, 0x6b, 0x94, 0x27, 0x44, 0x9e, 0xa9, 0x4f, 0x8e, 0x91, 0, 0, 0, 0, 0, 1,
        ]);
        assert_eq!(
            format_uuid(&id).as_deref(),
            Some("27946b59-9e44-4fa9-8e91-000000000001")
        );
        assert_eq!(format_uuid(&id[1..]), None);
        assert_eq!(format_uuid(&[1; 17]), None);
    }
}
