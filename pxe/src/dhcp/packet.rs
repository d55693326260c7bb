//! Turning untrusted datagrams into a typed `Request`, and replies into bytes.
//!
//! Decoding is two-staged because `dhcproto` can panic on hostile input (a header whose
//! `hlen` exceeds 16 makes `Message::chaddr` slice out of bounds; several option decoders
//! `debug_assert!` lengths or subtract from them). We first walk the option TLVs ourselves,
//! keep only the options we use and check their lengths, and rebuild a clean packet; only
//! that goes to `dhcproto`. The whole path also runs under `catch_unwind`, so no input can
//! take the server down even if a future `dhcproto` regresses.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use dhcproto::v4::{
    self, DhcpOption, DhcpOptions, Flags, HType, Message, MessageType, Opcode, OptionCode,
    UnknownOption,
};
use dhcproto::{Decodable, Encodable};

use super::boot;
use crate::planner::MacAddr;

/// The DHCP magic cookie (RFC 2131 §3).
const MAGIC: [u8; 4] = [99, 130, 83, 99];
/// Bytes before the options: the fixed BOOTP header plus the magic cookie.
const HEADER_LEN: usize = 240;
/// RFC 1542: BOOTP relays and old PXE ROMs drop replies shorter than 300 bytes.
const MIN_REPLY_LEN: usize = 300;
/// iPXE's encapsulated options; its presence identifies iPXE.
pub const OPT_IPXE_ENCAP: u8 = 175;

/// Why a datagram was dropped before any decision.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// Shorter than a BOOTP header plus magic cookie.
    #[error("packet of {len} bytes is shorter than a DHCP header (240 bytes)")]
    TooShort {
        /// Datagram length.
        len: usize,
    },
    /// Not a BOOTREQUEST (we never act on replies).
    #[error("op {op} is not a BOOTREQUEST")]
    NotRequest {
        /// The op byte.
        op: u8,
    },
    /// Not Ethernet with a 6-byte address; PXE clients always are.
    #[error("hardware type {htype} / length {hlen} is not Ethernet")]
    NotEthernet {
        /// htype byte.
        htype: u8,
        /// hlen byte.
        hlen: u8,
    },
    /// The magic cookie is missing, so this is BOOTP or garbage.
    #[error("magic cookie missing (BOOTP is not served)")]
    NoMagic,
    /// An option runs past the end of the datagram.
    #[error("option {code} is truncated")]
    Truncated {
        /// The option code.
        code: u8,
    },
    /// An option we use has an impossible length.
    #[error("option {code} has invalid length {len}")]
    BadLength {
        /// The option code.
        code: u8,
        /// Its (concatenated) length.
        len: usize,
    },
    /// No option 53.
    #[error("no DHCP message type (option 53)")]
    NoMessageType,
    /// `dhcproto` rejected the cleaned packet.
    #[error("decoder rejected the packet: {0}")]
    Decode(String),
    /// `dhcproto` panicked on the cleaned packet; a bug, contained.
    #[error("decoder panicked on the packet")]
    DecoderPanic,
}

/// The parts of a client's request that the server uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// The decoded message, kept to build the reply from.
    pub msg: Message,
    /// Option 53.
    pub msg_type: MessageType,
    /// `chaddr`.
    pub mac: MacAddr,
    /// Option 50.
    pub requested_ip: Option<Ipv4Addr>,
    /// Option 54.
    pub server_id: Option<Ipv4Addr>,
    /// Option 60, raw.
    pub vendor_class: Option<Vec<u8>>,
    /// Option 77, raw.
    pub user_class: Option<Vec<u8>>,
    /// The first architecture of option 93.
    pub arch: Option<u16>,
    /// Option 97, raw (type byte then GUID).
    pub machine_id: Option<Vec<u8>>,
    /// Whether option 175 (iPXE) was present.
    pub ipxe_encap: bool,
}

/// Length rule of an option we keep; options not listed are dropped before decoding.
fn length_ok(code: u8, len: usize) -> Option<bool> {
    Some(match code {
        53 => len == 1,
        50 | 54 => len == 4,
        60 | 77 | 97 => len >= 1,
        93 => len >= 2 && len.is_multiple_of(2),
        OPT_IPXE_ENCAP => true,
        _ => return None,
    })
}

/// Walks the option TLVs, concatenating repeated options (RFC 3396), and returns the ones
/// we use, validated.
fn kept_options(opts: &[u8]) -> Result<BTreeMap<u8, Vec<u8>>, Error> {
    let mut kept: BTreeMap<u8, Vec<u8>> = BTreeMap::new();
    let mut i = 0;
    while i < opts.len() {
        let code = opts[i];
        match code {
            0 => {
                i += 1;
                continue;
            }
            255 => break,
            _ => {}
        }
        let len = *opts.get(i + 1).ok_or(Error::Truncated { code })? as usize;
        let data = opts
            .get(i + 2..i + 2 + len)
            .ok_or(Error::Truncated { code })?;
        if length_ok(code, 0).is_some() {
            kept.entry(code).or_default().extend_from_slice(data);
        }
        i += 2 + len;
    }
    for (code, data) in &kept {
        if length_ok(*code, data.len()) != Some(true) {
            return Err(Error::BadLength {
                code: *code,
                len: data.len(),
            });
        }
    }
    Ok(kept)
}

/// Re-encodes kept options, splitting values longer than 255 bytes (RFC 3396).
fn encode_options(kept: &BTreeMap<u8, Vec<u8>>, out: &mut Vec<u8>) {
    for (code, data) in kept {
        if data.is_empty() {
            out.extend_from_slice(&[*code, 0]);
        }
        for chunk in data.chunks(255) {
            out.push(*code);
            out.push(chunk.len() as u8);
            out.extend_from_slice(chunk);
        }
    }
    out.push(255);
}

/// Parses a datagram into a `Request`. Never panics, whatever the input.
pub fn parse(bytes: &[u8]) -> Result<Request, Error> {
    std::panic::catch_unwind(|| parse_inner(bytes)).unwrap_or(Err(Error::DecoderPanic))
}

fn parse_inner(bytes: &[u8]) -> Result<Request, Error> {
    if bytes.len() < HEADER_LEN {
        return Err(Error::TooShort { len: bytes.len() });
    }
    if bytes[0] != 1 {
        return Err(Error::NotRequest { op: bytes[0] });
    }
    if bytes[1] != 1 || bytes[2] != 6 {
        return Err(Error::NotEthernet {
            htype: bytes[1],
            hlen: bytes[2],
        });
    }
    if bytes[236..240] != MAGIC {
        return Err(Error::NoMagic);
    }
    let kept = kept_options(&bytes[HEADER_LEN..])?;
    if !kept.contains_key(&53) {
        return Err(Error::NoMessageType);
    }
    let mut clean = Vec::with_capacity(bytes.len());
    // The sname and file fields are copied as they are: dhcproto reads them as plain
    // NUL-terminated bytes. Option overload (52) is not supported, so they never hold options.
    clean.extend_from_slice(&bytes[..HEADER_LEN]);
    encode_options(&kept, &mut clean);
    let msg = Message::from_bytes(&clean).map_err(|e| Error::Decode(e.to_string()))?;

    let mut mac = [0u8; 6];
    mac.copy_from_slice(&bytes[28..34]);
    let opts = msg.opts();
    let msg_type = opts.msg_type().ok_or(Error::NoMessageType)?;
    let requested_ip = match opts.get(OptionCode::RequestedIpAddress) {
        Some(DhcpOption::RequestedIpAddress(ip)) => Some(*ip),
        _ => None,
    };
    let server_id = match opts.get(OptionCode::ServerIdentifier) {
        Some(DhcpOption::ServerIdentifier(ip)) => Some(*ip),
        _ => None,
    };
    let vendor_class = match opts.get(OptionCode::ClassIdentifier) {
        Some(DhcpOption::ClassIdentifier(v)) => Some(v.clone()),
        _ => None,
    };
    let user_class = match opts.get(OptionCode::UserClass) {
        Some(DhcpOption::UserClass(v)) => Some(v.clone()),
        _ => None,
    };
    let arch = match opts.get(OptionCode::ClientSystemArchitecture) {
        Some(DhcpOption::ClientSystemArchitecture(a)) => Some(u16::from(*a)),
        _ => None,
    };
    let machine_id = match opts.get(OptionCode::ClientMachineIdentifier) {
        Some(DhcpOption::ClientMachineIdentifier(v)) => Some(v.clone()),
        _ => None,
    };
    let ipxe_encap = opts.get(OptionCode::Unknown(OPT_IPXE_ENCAP)).is_some();
    Ok(Request {
        msg_type,
        mac: MacAddr(mac),
        requested_ip,
        server_id,
        vendor_class,
        user_class,
        arch,
        machine_id,
        ipxe_encap,
        msg,
    })
}

/// The vendor class a reply carries, with what the firmware it speaks to expects beside it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Vendor {
    /// None: a plain DHCP reply (full mode to PXE ROMs and iPXE).
    None,
    /// ProxyDHCP to PXE ROMs and iPXE: option 60 `PXEClient`, option 43 telling the ROM to
    /// boot the file without a boot-server discovery or menu, and the client's GUID
    /// (option 97) echoed.
    PxeProxy,
    /// UEFI HTTP Boot, proxy or full: option 60 `HTTPClient`, without which the firmware
    /// does not take the boot file for a URI; no TFTP server name.
    Http,
}

/// The fields of a reply beyond what the request determines.
#[derive(Debug, Clone)]
pub struct ReplyFields {
    /// Option 53 of the reply.
    pub msg_type: Option<MessageType>,
    /// Address offered or acknowledged (`yiaddr`); unspecified for proxyDHCP and NAK.
    pub yiaddr: Option<Ipv4Addr>,
    /// Option 54 and, unless NAK, `siaddr` and option 66.
    pub server_id: Ipv4Addr,
    /// `file` (when it fits) and option 67.
    pub boot_file: Option<String>,
    /// Lease time in seconds (option 51, and T1/T2 as 1/2 and 7/8 of it).
    pub lease_secs: Option<u32>,
    /// Option 1.
    pub subnet_mask: Option<Ipv4Addr>,
    /// Option 3.
    pub router: Option<Ipv4Addr>,
    /// Option 6.
    pub dns: Vec<Ipv4Addr>,
    /// The vendor class the reply speaks as (option 60, and what goes with it).
    pub vendor: Vendor,
    /// Option 56, for NAKs.
    pub message: Option<String>,
    /// Force the broadcast flag (NAK through a relay).
    pub broadcast: bool,
}

impl Default for ReplyFields {
    fn default() -> Self {
        ReplyFields {
            msg_type: None,
            yiaddr: None,
            server_id: Ipv4Addr::UNSPECIFIED,
            boot_file: None,
            lease_secs: None,
            subnet_mask: None,
            router: None,
            dns: Vec::new(),
            vendor: Vendor::None,
            message: None,
            broadcast: false,
        }
    }
}

/// Encodes the reply to `req`.
pub fn encode_reply(req: &Request, f: &ReplyFields) -> Result<Vec<u8>, String> {
    let mut msg = Message::new_with_id(
        req.msg.xid(),
        Ipv4Addr::UNSPECIFIED,
        f.yiaddr.unwrap_or(Ipv4Addr::UNSPECIFIED),
        Ipv4Addr::UNSPECIFIED,
        req.msg.giaddr(),
        &req.mac.0,
    );
    msg.set_opcode(Opcode::BootReply)
        .set_htype(HType::Eth)
        .set_hops(req.msg.hops());
    // The client's ciaddr is echoed, except in NAKs (RFC 2131 table 3).
    let nak = f.msg_type == Some(MessageType::Nak);
    if !nak {
        msg.set_ciaddr(req.msg.ciaddr());
        msg.set_siaddr(f.server_id);
    }
    let mut flags = req.msg.flags();
    if f.broadcast {
        flags = flags.set_broadcast();
    }
    msg.set_flags(Flags::new(u16::from(flags)));
    let mut opts = DhcpOptions::new();
    if let Some(t) = f.msg_type {
        opts.insert(DhcpOption::MessageType(t));
    }
    opts.insert(DhcpOption::ServerIdentifier(f.server_id));
    if let Some(file) = &f.boot_file {
        // The `file` field holds 127 bytes plus NUL; longer names (profile URLs) only
        // travel in option 67, which iPXE prefers anyway.
        if file.len() < 128 {
            msg.set_fname_str(file);
        }
        opts.insert(DhcpOption::BootfileName(file.as_bytes().to_vec()));
        if f.vendor != Vendor::Http {
            opts.insert(DhcpOption::TFTPServerName(
                f.server_id.to_string().into_bytes(),
            ));
        }
    }
    if let Some(secs) = f.lease_secs {
        opts.insert(DhcpOption::AddressLeaseTime(secs));
        opts.insert(DhcpOption::Renewal(secs / 2));
        opts.insert(DhcpOption::Rebinding(secs / 8 * 7));
    }
    if let Some(mask) = f.subnet_mask {
        opts.insert(DhcpOption::SubnetMask(mask));
    }
    if let Some(router) = f.router {
        opts.insert(DhcpOption::Router(vec![router]));
    }
    if !f.dns.is_empty() {
        opts.insert(DhcpOption::DomainNameServer(f.dns.clone()));
    }
    match f.vendor {
        Vendor::None => {}
        Vendor::PxeProxy => {
            opts.insert(DhcpOption::ClassIdentifier(boot::PXE_CLASS.to_vec()));
            // PXE_DISCOVERY_CONTROL (6) = 8: boot the file named in this offer directly.
            opts.insert(DhcpOption::VendorExtensions(vec![6, 1, 8, 255]));
            // The PXE specification requires the client's GUID to be echoed.
            if let Some(id) = &req.machine_id {
                opts.insert(DhcpOption::ClientMachineIdentifier(id.clone()));
            }
        }
        Vendor::Http => {
            opts.insert(DhcpOption::ClassIdentifier(boot::HTTP_CLASS.to_vec()));
        }
    }
    if let Some(m) = &f.message {
        opts.insert(DhcpOption::Message(m.clone()));
    }
    msg.set_opts(opts);
    let mut bytes = msg.to_vec().map_err(|e| e.to_string())?;
    if bytes.len() < MIN_REPLY_LEN {
        bytes.resize(MIN_REPLY_LEN, 0);
    }
    Ok(bytes)
}

/// Builds a client request, for tests and fuzz seeds.
#[doc(hidden)]
pub fn build_request(
    msg_type: MessageType,
    mac: MacAddr,
    xid: u32,
    extra: Vec<DhcpOption>,
) -> Vec<u8> {
    let mut msg = Message::new_with_id(
        xid,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        &mac.0,
    );
    msg.opts_mut().insert(DhcpOption::MessageType(msg_type));
    for o in extra {
        msg.opts_mut().insert(o);
    }
    msg.to_vec()
        .expect("a request built from typed options encodes")
}

/// Option 175 with iPXE's usual content, for tests.
#[doc(hidden)]
pub fn ipxe_encap_option() -> DhcpOption {
    DhcpOption::Unknown(UnknownOption::new(
        OptionCode::Unknown(OPT_IPXE_ENCAP),
        vec![0xb1, 0x05, 0x01, 0x80, 0x86, 0x10, 0x0e],
    ))
}

/// Decodes a reply (tests only need this; the server never decodes replies).
#[doc(hidden)]
pub fn decode_reply(bytes: &[u8]) -> Option<v4::Message> {
    std::panic::catch_unwind(|| v4::Message::from_bytes(bytes).ok())
        .ok()
        .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;
    use dhcproto::v4::Architecture;
    use proptest::prelude::*;

    fn mac() -> MacAddr {
        MacAddr([0x52, 0x54, 0, 0, 0, 1])
    }

    fn pxe_discover() -> Vec<u8> {
        build_request(
            MessageType::Discover,
            mac(),
            7,
            vec![
                DhcpOption::ClassIdentifier(b"PXEClient:Arch:00007:UNDI:003000".to_vec()),
                DhcpOption::ClientSystemArchitecture(Architecture::from(7)),
                DhcpOption::ClientMachineIdentifier(vec![0; 17]),
                DhcpOption::UserClass(b"iPXE".to_vec()),
                ipxe_encap_option(),
                DhcpOption::RequestedIpAddress(Ipv4Addr::new(10, 0, 0, 9)),
            ],
        )
    }

    #[test]
    fn parses_a_pxe_discover() {
        let req = parse(&pxe_discover()).unwrap();
        assert_eq!(req.msg_type, MessageType::Discover);
        assert_eq!(req.mac, mac());
        assert_eq!(req.arch, Some(7));
        assert!(req.ipxe_encap);
        assert_eq!(req.user_class.as_deref(), Some(&b"iPXE"[..]));
        assert_eq!(req.requested_ip, Some(Ipv4Addr::new(10, 0, 0, 9)));
    }

    #[test]
    fn rejects_what_dhcproto_would_panic_on() {
        // hlen 17 would make Message::chaddr slice out of bounds.
        let mut p = pxe_discover();
        p[2] = 17;
        assert!(matches!(parse(&p), Err(Error::NotEthernet { .. })));
        // Option 94 with a length other than 3 trips a debug_assert in dhcproto; we drop
        // the option before decoding, so the packet still parses.
        let mut p = pxe_discover();
        p.pop();
        p.extend_from_slice(&[94, 1, 1, 81, 0, 255]);
        assert!(parse(&p).is_ok());
    }

    #[test]
    fn dhcproto_alone_panics_on_a_long_hlen_which_is_why_we_check_first() {
        let mut p = pxe_discover();
        p[2] = 17;
        let direct = std::panic::catch_unwind(|| Message::from_bytes(&p).map(|m| m.chaddr().len()));
        assert!(
            direct.is_err(),
            "if dhcproto stops panicking here, the comment above can go"
        );
    }

    #[test]
    fn malformed_packets_are_named() {
        let p = pxe_discover();
        let cases: Vec<(Vec<u8>, Error)> = vec![
            (p[..100].to_vec(), Error::TooShort { len: 100 }),
            (
                {
                    let mut q = p.clone();
                    q[0] = 2;
                    q
                },
                Error::NotRequest { op: 2 },
            ),
            (
                {
                    let mut q = p.clone();
                    q[236] = 0;
                    q
                },
                Error::NoMagic,
            ),
            (
                {
                    let mut q = p[..240].to_vec();
                    q.extend_from_slice(&[53, 1, 1, 50, 3, 1, 2, 3, 255]);
                    q
                },
                Error::BadLength { code: 50, len: 3 },
            ),
            (
                {
                    let mut q = p[..240].to_vec();
                    q.extend_from_slice(&[53, 1, 1, 60, 9, 1]);
                    q
                },
                Error::Truncated { code: 60 },
            ),
            (
                {
                    let mut q = p[..240].to_vec();
                    q.extend_from_slice(&[255]);
                    q
                },
                Error::NoMessageType,
            ),
        ];
        for (bytes, want) in cases {
            assert_eq!(parse(&bytes), Err(want.clone()), "{want}");
        }
    }

    #[test]
    fn repeated_options_are_concatenated() {
        let mut q = pxe_discover()[..240].to_vec();
        q.extend_from_slice(&[53, 1, 1, 60, 3, b'P', b'X', b'E', 60, 6]);
        q.extend_from_slice(b"Client");
        q.push(255);
        let req = parse(&q).unwrap();
        assert_eq!(req.vendor_class.as_deref(), Some(&b"PXEClient"[..]));
    }

    #[test]
    fn long_boot_urls_go_in_option_67_only() {
        let req = parse(&pxe_discover()).unwrap();
        let url = format!("http://10.0.0.1:8090/{}", "x".repeat(200));
        let bytes = encode_reply(
            &req,
            &ReplyFields {
                msg_type: Some(MessageType::Offer),
                server_id: Ipv4Addr::new(10, 0, 0, 1),
                boot_file: Some(url.clone()),
                ..Default::default()
            },
        )
        .unwrap();
        let reply = decode_reply(&bytes).unwrap();
        assert_eq!(reply.fname(), None);
        assert_eq!(
            reply.opts().get(OptionCode::BootfileName),
            Some(&DhcpOption::BootfileName(url.into_bytes()))
        );
        assert_eq!(reply.xid(), 7);
        assert_eq!(reply.chaddr(), &mac().0);
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 20_000, .. ProptestConfig::default() })]

        #[test]
        fn parse_never_panics_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..700)) {
            let _ = parse(&bytes);
        }

        #[test]
        fn parse_never_panics_on_arbitrary_options(opts in proptest::collection::vec(any::<u8>(), 0..400)) {
            let mut bytes = pxe_discover()[..240].to_vec();
            bytes.extend_from_slice(&[53, 1, 1]);
            bytes.extend_from_slice(&opts);
            let _ = parse(&bytes);
        }

        #[test]
        fn parse_never_panics_on_mutated_valid_packets(
            edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..12),
            cut in any::<prop::sample::Index>(),
        ) {
            let mut bytes = pxe_discover();
            for (at, value) in edits {
                let i = at.index(bytes.len());
                bytes[i] = value;
            }
            let keep = 200 + cut.index(bytes.len() - 200);
            bytes.truncate(keep);
            let _ = parse(&bytes);
        }
    }
}
