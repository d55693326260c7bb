//! Which clients are network-boot clients, and which boot file each one gets (option 93
//! architecture, iPXE detection by option 175 or user class `iPXE`).

use serde::{Deserialize, Serialize};

use super::packet::Request;
use crate::planner::{ClientInfo, Firmware};

/// Boot file names for PXE firmware, relative to the TFTP root.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootFiles {
    /// For legacy BIOS PXE (architecture 0).
    pub bios: String,
    /// For x86-64 UEFI PXE (architectures 7 and 9): `snponly.efi` (uses the firmware's
    /// network driver; the safe default) or `ipxe.efi` (iPXE's own drivers).
    pub uefi_x64: String,
}

impl Default for BootFiles {
    fn default() -> Self {
        BootFiles {
            bios: "undionly.kpxe".to_owned(),
            uefi_x64: "snponly.efi".to_owned(),
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
}

fn lossy(bytes: &Option<Vec<u8>>) -> Option<String> {
    bytes
        .as_ref()
        .map(|b| String::from_utf8_lossy(b).into_owned())
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

/// Identifies a network-boot client, or says why the request is not from one.
pub fn classify(req: &Request) -> Result<ClientInfo, &'static str> {
    let ipxe = req.ipxe_encap || req.user_class.as_deref().is_some_and(user_class_is_ipxe);
    let pxe = req
        .vendor_class
        .as_deref()
        .is_some_and(|v| v.starts_with(b"PXEClient"));
    let firmware = match (ipxe, pxe) {
        (true, _) => Firmware::Ipxe,
        (false, true) => Firmware::Pxe,
        (false, false) => {
            return Err("not a network-boot client (no PXEClient vendor class, no iPXE marker)");
        }
    };
    let relay = Some(req.msg.giaddr()).filter(|g| !g.is_unspecified());
    Ok(ClientInfo {
        mac: req.mac,
        firmware,
        arch: req.arch,
        uuid: req.machine_id.as_deref().and_then(format_uuid),
        vendor_class: lossy(&req.vendor_class),
        user_class: lossy(&req.user_class),
        relay,
    })
}

/// The boot file for `client`: iPXE gets `profile_url`; PXE firmware gets the iPXE binary
/// for its architecture (a PXE ROM without option 93 is treated as BIOS, as the oldest ROMs
/// are). Other architectures (ARM, 32-bit UEFI) have no binary to chain to.
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
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dhcp::packet::{build_request, ipxe_encap_option, parse};
    use crate::planner::MacAddr;
    use dhcproto::v4::{Architecture, DhcpOption, MessageType};

    const URL: &str = "http://10.0.0.1:8090/api/2.0/profiles?macs=52:54:00:00:00:01";

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
            bios: "undionly.kpxe".into(),
            uefi_x64: "ipxe.efi".into(),
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
                .map_err(str::to_owned)
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
