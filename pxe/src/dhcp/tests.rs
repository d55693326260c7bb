//! Tests of the DHCP request handler without sockets: proxy and full exchanges (PXE ROMs,
//! UEFI HTTP Boot, iPXE), where replies go, lease storage through the planner, and fuzzing
//! of the whole handler; and, with sockets, the bound server's receive buffers.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;

use dhcproto::v4::{Architecture, DhcpOption, Message, MessageType, OptionCode};
use dhcproto::{Decodable, Encodable};
use proptest::prelude::*;

use super::packet::{build_request, decode_reply, ipxe_encap_option};
use super::*;
use crate::planner::{Lease, LeaseChange, MacAddr, MemPlanner};

const BOOT: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
const NOW: u64 = 1_700_000_000;
const BASE: &str = "http://10.0.0.1:8090/api/2.0/profiles";
const HTTP_BASE: &str = "http://10.0.0.1:8090/boot/";

fn mac(n: u8) -> MacAddr {
    MacAddr([0x52, 0x54, 0, 0, 0, n])
}

fn src() -> SocketAddr {
    "0.0.0.0:68".parse().unwrap()
}

fn broadcast() -> SocketAddr {
    "255.255.255.255:68".parse().unwrap()
}

async fn handler(mode: Mode, planner: Arc<MemPlanner>) -> Handler {
    handler_with(mode, planner, BootFiles::default()).await
}

async fn handler_with(mode: Mode, planner: Arc<MemPlanner>, boot_files: BootFiles) -> Handler {
    let mut o = Options::new(mode, BOOT);
    o.ports.relay = 1068;
    o.boot_files = boot_files;
    Handler::new(o, planner).await.unwrap()
}

/// Boot files also served over HTTP, as the binary configures them.
fn http_served() -> BootFiles {
    BootFiles {
        http_base: Some(HTTP_BASE.to_owned()),
        ..BootFiles::default()
    }
}

fn full() -> Mode {
    Mode::Full(FullOptions::new(
        Ipv4Addr::new(10, 0, 0, 10),
        Ipv4Addr::new(10, 0, 0, 12),
    ))
}

fn pxe(arch: u16) -> Vec<DhcpOption> {
    vec![
        DhcpOption::ClassIdentifier(format!("PXEClient:Arch:{arch:05}:UNDI:002001").into_bytes()),
        DhcpOption::ClientSystemArchitecture(Architecture::from(arch)),
        DhcpOption::ClientMachineIdentifier(vec![0; 17]),
    ]
}

/// What UEFI HTTP Boot firmware sends (EDK2's HttpBootDxe: vendor class
/// `HTTPClient:Arch:NNNNN:UNDI:003000`, option 93 the same architecture).
fn http(arch: u16) -> Vec<DhcpOption> {
    vec![
        DhcpOption::ClassIdentifier(format!("HTTPClient:Arch:{arch:05}:UNDI:003000").into_bytes()),
        DhcpOption::ClientSystemArchitecture(Architecture::from(arch)),
        DhcpOption::ClientMachineIdentifier(vec![0; 17]),
    ]
}

fn ipxe() -> Vec<DhcpOption> {
    let mut o = pxe(0);
    o.push(DhcpOption::UserClass(b"iPXE".to_vec()));
    o.push(ipxe_encap_option());
    o
}

/// A request from `m` with `opts`, with `ciaddr`/`giaddr` set when given.
fn request(
    t: MessageType,
    m: MacAddr,
    mut opts: Vec<DhcpOption>,
    extra: Vec<DhcpOption>,
    ciaddr: Option<Ipv4Addr>,
    giaddr: Option<Ipv4Addr>,
) -> Vec<u8> {
    opts.extend(extra);
    let bytes = build_request(t, m, 0x1234, opts);
    let mut msg = Message::from_bytes(&bytes).unwrap();
    if let Some(c) = ciaddr {
        msg.set_ciaddr(c);
    }
    if let Some(g) = giaddr {
        msg.set_giaddr(g);
    }
    msg.to_vec().unwrap()
}

fn opt(m: &Message, code: OptionCode) -> Option<&DhcpOption> {
    m.opts().get(code)
}

fn boot_file(m: &Message) -> Option<String> {
    match opt(m, OptionCode::BootfileName) {
        Some(DhcpOption::BootfileName(b)) => Some(String::from_utf8_lossy(b).into_owned()),
        _ => None,
    }
}

async fn exchange(
    h: &Handler,
    bytes: Vec<u8>,
    port: Port,
    now: u64,
) -> Option<(SocketAddr, Message)> {
    let reply = h.handle(&bytes, src(), port, now).await?;
    assert!(reply.bytes.len() >= 300, "replies are padded to 300 bytes");
    Some((reply.to, decode_reply(&reply.bytes).unwrap()))
}

#[tokio::test]
async fn proxy_offers_boot_information_without_an_address() {
    let planner = Arc::new(MemPlanner::new(BASE));
    let h = handler(Mode::Proxy, planner.clone()).await;
    // (client options, expected boot file)
    let cases = [
        (pxe(0), "undionly.kpxe".to_owned()),
        (pxe(7), "snponly.efi".to_owned()),
        (pxe(9), "snponly.efi".to_owned()),
        (ipxe(), format!("{BASE}?macs=52:54:00:00:00:01")),
    ];
    for (opts, want) in cases {
        let (to, m) = exchange(
            &h,
            request(MessageType::Discover, mac(1), opts, vec![], None, None),
            Port::Server,
            NOW,
        )
        .await
        .expect("a PXE client gets a proxy offer");
        assert_eq!(to, broadcast());
        assert_eq!(m.opts().msg_type(), Some(MessageType::Offer));
        assert_eq!(m.yiaddr(), Ipv4Addr::UNSPECIFIED);
        assert_eq!(m.siaddr(), BOOT);
        assert_eq!(m.xid(), 0x1234);
        assert_eq!(boot_file(&m).as_deref(), Some(want.as_str()));
        assert_eq!(
            opt(&m, OptionCode::ServerIdentifier),
            Some(&DhcpOption::ServerIdentifier(BOOT))
        );
        assert_eq!(
            opt(&m, OptionCode::ClassIdentifier),
            Some(&DhcpOption::ClassIdentifier(b"PXEClient".to_vec()))
        );
        assert_eq!(
            opt(&m, OptionCode::VendorExtensions),
            Some(&DhcpOption::VendorExtensions(vec![6, 1, 8, 255]))
        );
        assert!(
            opt(&m, OptionCode::ClientMachineIdentifier).is_some(),
            "GUID echoed"
        );
        assert!(opt(&m, OptionCode::AddressLeaseTime).is_none());
    }
}

#[tokio::test]
async fn proxy_answers_requests_on_4011_only_and_unicasts_back() {
    let planner = Arc::new(MemPlanner::new(BASE));
    let h = handler(Mode::Proxy, planner).await;
    let client_ip = Ipv4Addr::new(10, 0, 0, 77);
    let req = request(
        MessageType::Request,
        mac(1),
        pxe(7),
        vec![],
        Some(client_ip),
        None,
    );
    assert!(
        exchange(&h, req.clone(), Port::Server, NOW).await.is_none(),
        "REQUESTs on 67 belong to the address server"
    );
    let from: SocketAddr = "10.0.0.77:4011".parse().unwrap();
    let reply = h.handle(&req, from, Port::Proxy, NOW).await.unwrap();
    assert_eq!(reply.to, from);
    let m = decode_reply(&reply.bytes).unwrap();
    assert_eq!(m.opts().msg_type(), Some(MessageType::Ack));
    assert_eq!(boot_file(&m).as_deref(), Some("snponly.efi"));
    assert_eq!(m.ciaddr(), client_ip);
}

#[tokio::test]
async fn silence_for_non_boot_clients_the_planner_and_unknown_architectures() {
    let planner = Arc::new(MemPlanner::new(BASE));
    planner.set_silent(mac(2), "known node without network boot work");
    for mode in [Mode::Proxy, full()] {
        let h = handler(mode, planner.clone()).await;
        let udhcpc = vec![DhcpOption::ClassIdentifier(b"udhcp 1.35.0".to_vec())];
        let cases = [
            (
                "non-boot client",
                request(MessageType::Discover, mac(1), udhcpc, vec![], None, None),
            ),
            (
                "planner silent",
                request(MessageType::Discover, mac(2), pxe(0), vec![], None, None),
            ),
            (
                "ARM64 UEFI",
                request(MessageType::Discover, mac(3), pxe(11), vec![], None, None),
            ),
            ("an OFFER", {
                let mut m = Message::from_bytes(&request(
                    MessageType::Offer,
                    mac(1),
                    pxe(0),
                    vec![],
                    None,
                    None,
                ))
                .unwrap();
                m.set_opcode(dhcproto::v4::Opcode::BootReply);
                m.to_vec().unwrap()
            }),
            (
                "an INFORM",
                request(MessageType::Inform, mac(1), pxe(0), vec![], None, None),
            ),
        ];
        for (name, bytes) in cases {
            assert!(
                exchange(&h, bytes, Port::Server, NOW).await.is_none(),
                "{name}"
            );
        }
    }
    let asked: Vec<MacAddr> = planner.decisions().iter().map(|c| c.mac).collect();
    assert!(
        !asked.contains(&mac(1)),
        "the planner is never asked about non-boot clients"
    );
    assert!(asked.contains(&mac(2)));
}

fn class(m: &Message) -> Option<Vec<u8>> {
    match opt(m, OptionCode::ClassIdentifier) {
        Some(DhcpOption::ClassIdentifier(c)) => Some(c.clone()),
        _ => None,
    }
}

/// The answer UEFI HTTP Boot takes (UEFI 2.x, "HTTP Boot"; EDK2's HttpBootDhcp4.c): option
/// 60 `HTTPClient` and the boot file a URI, in option 67 and in `file`; with an address it
/// is a DHCP offer, without one a proxy offer beside the address server's.
fn assert_http_boot_answer(m: &Message, want_type: MessageType, url: &str) {
    assert_eq!(m.opts().msg_type(), Some(want_type));
    assert_eq!(class(m).as_deref(), Some(&b"HTTPClient"[..]));
    assert_eq!(boot_file(m).as_deref(), Some(url));
    let mut file = url.as_bytes().to_vec();
    file.push(0);
    assert!(
        m.fname().is_some_and(|f| f.starts_with(&file)),
        "the URI also in the file field: {:?}",
        m.fname()
    );
    assert!(
        opt(m, OptionCode::VendorExtensions).is_none(),
        "no PXE options for an HTTP client"
    );
    assert!(
        opt(m, OptionCode::TFTPServerName).is_none(),
        "no TFTP server for an HTTP client"
    );
    assert_eq!(
        opt(m, OptionCode::ServerIdentifier),
        Some(&DhcpOption::ServerIdentifier(BOOT))
    );
}

#[tokio::test]
async fn http_boot_clients_get_the_binary_url_with_the_vendor_class_echoed() {
    let url = "http://10.0.0.1:8090/boot/snponly.efi";
    // ProxyDHCP: a proxy offer on port 67 (HTTP Boot does not ask port 4011).
    let planner = Arc::new(MemPlanner::new(BASE));
    let h = handler_with(Mode::Proxy, planner.clone(), http_served()).await;
    let (to, m) = exchange(
        &h,
        request(MessageType::Discover, mac(1), http(16), vec![], None, None),
        Port::Server,
        NOW,
    )
    .await
    .expect("an x86-64 HTTP Boot client gets a proxy offer");
    assert_eq!(to, broadcast());
    assert_http_boot_answer(&m, MessageType::Offer, url);
    assert_eq!(
        m.yiaddr(),
        Ipv4Addr::UNSPECIFIED,
        "a proxy offer has no address"
    );
    assert!(opt(&m, OptionCode::AddressLeaseTime).is_none());
    let asked = planner.decisions();
    assert_eq!(asked.len(), 1);
    assert_eq!(asked[0].firmware, crate::planner::Firmware::Http);
    assert_eq!(asked[0].arch, Some(16));
    assert_eq!(
        asked[0].vendor_class.as_deref(),
        Some("HTTPClient:Arch:00016:UNDI:003000")
    );

    // Full DHCP: the address and the URI in one offer, then the ACK, with the lease stored.
    let planner = Arc::new(MemPlanner::new(BASE));
    let h = handler_with(full(), planner.clone(), http_served()).await;
    let (_, offer) = exchange(
        &h,
        request(MessageType::Discover, mac(1), http(16), vec![], None, None),
        Port::Server,
        NOW,
    )
    .await
    .expect("an offer");
    assert_http_boot_answer(&offer, MessageType::Offer, url);
    let ip = offer.yiaddr();
    assert_eq!(ip, Ipv4Addr::new(10, 0, 0, 10));
    assert_eq!(
        opt(&offer, OptionCode::AddressLeaseTime),
        Some(&DhcpOption::AddressLeaseTime(3600))
    );
    let selecting = vec![
        DhcpOption::ServerIdentifier(BOOT),
        DhcpOption::RequestedIpAddress(ip),
    ];
    let (_, ack) = exchange(
        &h,
        request(
            MessageType::Request,
            mac(1),
            http(16),
            selecting,
            None,
            None,
        ),
        Port::Server,
        NOW,
    )
    .await
    .expect("an ACK");
    assert_http_boot_answer(&ack, MessageType::Ack, url);
    assert_eq!(ack.yiaddr(), ip);
    assert_eq!(planner.leases().len(), 1);

    // The same machine as PXE (architectures 7 and 9) or once it runs iPXE: TFTP names and
    // the profile URL, as before, whatever HTTP serves.
    for mode in [Mode::Proxy, full()] {
        let proxy = mode == Mode::Proxy;
        let h = handler_with(mode, Arc::new(MemPlanner::new(BASE)), http_served()).await;
        for (opts, want) in [
            (pxe(7), "snponly.efi".to_owned()),
            (pxe(9), "snponly.efi".to_owned()),
            (ipxe(), format!("{BASE}?macs=52:54:00:00:00:02")),
        ] {
            let (_, m) = exchange(
                &h,
                request(MessageType::Discover, mac(2), opts, vec![], None, None),
                Port::Server,
                NOW,
            )
            .await
            .expect("PXE and iPXE are answered");
            assert_eq!(boot_file(&m).as_deref(), Some(want.as_str()));
            let want_class = proxy.then(|| b"PXEClient".to_vec());
            assert_eq!(class(&m), want_class, "{want}");
            assert_eq!(
                opt(&m, OptionCode::TFTPServerName),
                Some(&DhcpOption::TFTPServerName(b"10.0.0.1".to_vec()))
            );
        }
    }
}

#[tokio::test]
async fn http_boot_clients_without_a_binary_or_with_a_malformed_class_get_silence() {
    let odd_class = |c: &str, arch: Option<u16>| {
        let mut o = vec![DhcpOption::ClassIdentifier(c.as_bytes().to_vec())];
        if let Some(a) = arch {
            o.push(DhcpOption::ClientSystemArchitecture(Architecture::from(a)));
        }
        o
    };
    for mode in [Mode::Proxy, full()] {
        let planner = Arc::new(MemPlanner::new(BASE));
        let h = handler_with(mode.clone(), planner.clone(), http_served()).await;
        // (what, options, whether the planner is asked)
        let cases = [
            ("ARM64 HTTP Boot", http(19), true),
            ("32-bit x86 HTTP Boot", http(15), true),
            (
                "no architecture at all",
                odd_class("HTTPClient", None),
                true,
            ),
            (
                "class and option 93 disagree",
                odd_class("HTTPClient:Arch:00016:UNDI:003000", Some(19)),
                false,
            ),
            (
                "not HTTPClient:Arch:NNNNN",
                odd_class("HTTPClient:Arch:16:UNDI:003000", Some(16)),
                false,
            ),
            (
                "junk after the class",
                odd_class("HTTPClientX", Some(16)),
                false,
            ),
        ];
        for (i, (what, opts, asked)) in cases.into_iter().enumerate() {
            let m = mac(10 + i as u8);
            assert!(
                exchange(
                    &h,
                    request(MessageType::Discover, m, opts, vec![], None, None),
                    Port::Server,
                    NOW
                )
                .await
                .is_none(),
                "{mode:?}: {what}"
            );
            assert_eq!(
                planner.decisions().iter().any(|c| c.mac == m),
                asked,
                "{mode:?}: {what}: whether the planner is asked"
            );
        }
        // Without an HTTP URL for the binaries, HTTP Boot is not answered at all.
        let h = handler(mode.clone(), Arc::new(MemPlanner::new(BASE))).await;
        assert!(
            exchange(
                &h,
                request(MessageType::Discover, mac(1), http(16), vec![], None, None),
                Port::Server,
                NOW
            )
            .await
            .is_none(),
            "{mode:?}: HTTP Boot off"
        );
    }
}

#[tokio::test]
async fn full_mode_dora_stores_the_lease_before_acknowledging() {
    let planner = Arc::new(MemPlanner::new(BASE));
    let h = handler(full(), planner.clone()).await;
    let (to, offer) = exchange(
        &h,
        request(MessageType::Discover, mac(1), pxe(0), vec![], None, None),
        Port::Server,
        NOW,
    )
    .await
    .unwrap();
    assert_eq!(to, broadcast());
    assert_eq!(offer.opts().msg_type(), Some(MessageType::Offer));
    let ip = offer.yiaddr();
    assert_eq!(ip, Ipv4Addr::new(10, 0, 0, 10));
    assert_eq!(offer.siaddr(), BOOT);
    // dhcproto returns the fixed-size field up to and including its NUL terminator.
    assert!(
        offer
            .fname()
            .is_some_and(|f| f.starts_with(b"undionly.kpxe\0"))
    );
    assert_eq!(
        opt(&offer, OptionCode::TFTPServerName),
        Some(&DhcpOption::TFTPServerName(b"10.0.0.1".to_vec()))
    );
    assert_eq!(
        opt(&offer, OptionCode::AddressLeaseTime),
        Some(&DhcpOption::AddressLeaseTime(3600))
    );
    assert_eq!(
        opt(&offer, OptionCode::SubnetMask),
        Some(&DhcpOption::SubnetMask(Ipv4Addr::new(255, 255, 255, 0)))
    );
    assert!(
        opt(&offer, OptionCode::ClassIdentifier).is_none(),
        "full mode is plain DHCP, not proxyDHCP"
    );
    assert!(planner.leases().is_empty(), "offers are not stored");

    let selecting = vec![
        DhcpOption::ServerIdentifier(BOOT),
        DhcpOption::RequestedIpAddress(ip),
    ];
    let (to, ack) = exchange(
        &h,
        request(MessageType::Request, mac(1), pxe(0), selecting, None, None),
        Port::Server,
        NOW,
    )
    .await
    .unwrap();
    assert_eq!(to, broadcast());
    assert_eq!(ack.opts().msg_type(), Some(MessageType::Ack));
    assert_eq!(ack.yiaddr(), ip);
    assert_eq!(
        planner.leases(),
        vec![Lease {
            mac: mac(1),
            ip,
            expires_unix: NOW + 3600
        }]
    );
    // The REQUEST answered our OFFER (same transaction): acknowledged with the OFFER's
    // decision, so the planner was asked once for the whole exchange.
    assert_eq!(planner.decisions().len(), 1);

    // Renewal: unicast to ciaddr, lease extended.
    let (to, ack) = exchange(
        &h,
        request(MessageType::Request, mac(1), pxe(0), vec![], Some(ip), None),
        Port::Server,
        NOW + 100,
    )
    .await
    .unwrap();
    assert_eq!(to, SocketAddr::new(ip.into(), 68));
    assert_eq!(ack.opts().msg_type(), Some(MessageType::Ack));
    assert_eq!(planner.leases()[0].expires_unix, NOW + 100 + 3600);
    assert_eq!(
        planner.decisions().len(),
        2,
        "a renewal asks the planner again"
    );

    // Another client asking for that address is refused with a broadcast NAK.
    let (to, nak) = exchange(
        &h,
        request(
            MessageType::Request,
            mac(2),
            pxe(0),
            vec![DhcpOption::RequestedIpAddress(ip)],
            None,
            None,
        ),
        Port::Server,
        NOW + 200,
    )
    .await
    .unwrap();
    assert_eq!(to, broadcast());
    assert_eq!(nak.opts().msg_type(), Some(MessageType::Nak));
    assert_eq!(nak.yiaddr(), Ipv4Addr::UNSPECIFIED);

    // Release deletes the stored lease.
    h.handle(
        &request(
            MessageType::Release,
            mac(1),
            vec![],
            vec![DhcpOption::ServerIdentifier(BOOT)],
            Some(ip),
            None,
        ),
        src(),
        Port::Server,
        NOW + 300,
    )
    .await;
    assert!(planner.leases().is_empty());
}

/// A planner whose lease writes take a while and are counted, over `MemPlanner`.
struct SlowWrites {
    inner: Arc<MemPlanner>,
    delay: std::time::Duration,
    /// The number of changes in each `store_leases` call, in order.
    writes: std::sync::Mutex<Vec<usize>>,
}

impl BootPlanner for SlowWrites {
    fn decide<'a>(
        &'a self,
        client: &'a crate::planner::ClientInfo,
    ) -> crate::planner::BoxFuture<'a, Decision> {
        self.inner.decide(client)
    }
    fn save_lease<'a>(
        &'a self,
        _: &'a Lease,
    ) -> crate::planner::BoxFuture<'a, Result<(), crate::planner::LeaseStoreError>> {
        unreachable!("the server stores leases through store_leases")
    }
    fn delete_lease<'a>(
        &'a self,
        _: &'a MacAddr,
    ) -> crate::planner::BoxFuture<'a, Result<(), crate::planner::LeaseStoreError>> {
        unreachable!("the server stores leases through store_leases")
    }
    fn store_leases<'a>(
        &'a self,
        changes: &'a [LeaseChange],
    ) -> crate::planner::BoxFuture<'a, Result<(), crate::planner::LeaseStoreError>> {
        Box::pin(async move {
            self.writes.lock().unwrap().push(changes.len());
            tokio::time::sleep(self.delay).await;
            self.inner.store_leases(changes).await
        })
    }
    fn load_leases(
        &self,
    ) -> crate::planner::BoxFuture<'_, Result<Vec<Lease>, crate::planner::LeaseStoreError>> {
        self.inner.load_leases()
    }
}

#[tokio::test]
async fn concurrent_requests_share_lease_writes_and_each_ack_follows_its_write() {
    let inner = Arc::new(MemPlanner::new(BASE));
    let planner = Arc::new(SlowWrites {
        inner: inner.clone(),
        delay: std::time::Duration::from_millis(50),
        writes: std::sync::Mutex::new(Vec::new()),
    });
    let mut o = Options::new(
        Mode::Full(FullOptions::new(
            Ipv4Addr::new(10, 0, 0, 10),
            Ipv4Addr::new(10, 0, 0, 200),
        )),
        BOOT,
    );
    o.ports.relay = 1068;
    let h = Arc::new(Handler::new(o, planner.clone()).await.unwrap());
    let clients: Vec<u8> = (1..=40).collect();
    let mut offered = Vec::new();
    for &m in &clients {
        let (_, offer) = exchange(
            &h,
            request(MessageType::Discover, mac(m), pxe(0), vec![], None, None),
            Port::Server,
            NOW,
        )
        .await
        .unwrap();
        offered.push((m, offer.yiaddr()));
    }
    let distinct: std::collections::HashSet<_> = offered.iter().map(|(_, ip)| *ip).collect();
    assert_eq!(distinct.len(), clients.len(), "one address per client");
    // Every REQUEST at once: they queue while the first write is under way.
    let mut tasks = tokio::task::JoinSet::new();
    for (m, ip) in offered.clone() {
        let (h, inner) = (h.clone(), inner.clone());
        tasks.spawn(async move {
            let selecting = vec![
                DhcpOption::ServerIdentifier(BOOT),
                DhcpOption::RequestedIpAddress(ip),
            ];
            let bytes = request(MessageType::Request, mac(m), pxe(0), selecting, None, None);
            let (_, ack) = exchange(&h, bytes, Port::Server, NOW).await.unwrap();
            assert_eq!(ack.opts().msg_type(), Some(MessageType::Ack));
            assert_eq!(ack.yiaddr(), ip);
            // Durable before acknowledged: the lease is in the planner's store already.
            assert!(
                inner.leases().iter().any(|l| l.mac == mac(m) && l.ip == ip),
                "{} was acknowledged before its lease was stored",
                mac(m)
            );
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
    assert_eq!(inner.leases().len(), clients.len());
    let writes = planner.writes.lock().unwrap().clone();
    assert_eq!(writes.iter().sum::<usize>(), clients.len(), "{writes:?}");
    assert!(
        writes.len() < clients.len() / 4,
        "40 concurrent grants should share a few writes: {writes:?}"
    );
}

#[tokio::test]
async fn full_mode_replies_to_relays_and_honours_other_servers_selection() {
    let planner = Arc::new(MemPlanner::new(BASE));
    let h = handler(full(), planner.clone()).await;
    let relay = Ipv4Addr::new(127, 0, 0, 1);
    let (to, offer) = exchange(
        &h,
        request(
            MessageType::Discover,
            mac(1),
            pxe(0),
            vec![],
            None,
            Some(relay),
        ),
        Port::Server,
        NOW,
    )
    .await
    .unwrap();
    assert_eq!(to, SocketAddr::new(relay.into(), 1068));
    assert_eq!(offer.giaddr(), relay);
    // The client picked another server: no answer, and our offer is withdrawn.
    let other = vec![
        DhcpOption::ServerIdentifier(Ipv4Addr::new(10, 0, 0, 2)),
        DhcpOption::RequestedIpAddress(offer.yiaddr()),
    ];
    assert!(
        exchange(
            &h,
            request(
                MessageType::Request,
                mac(1),
                pxe(0),
                other,
                None,
                Some(relay)
            ),
            Port::Server,
            NOW
        )
        .await
        .is_none()
    );
    // Another client asking for that address gets it (new clients get the next address
    // round the pool, so it must ask).
    let asks = vec![DhcpOption::RequestedIpAddress(offer.yiaddr())];
    let (_, offer2) = exchange(
        &h,
        request(MessageType::Discover, mac(2), pxe(0), asks, None, None),
        Port::Server,
        NOW,
    )
    .await
    .unwrap();
    assert_eq!(
        offer2.yiaddr(),
        offer.yiaddr(),
        "the withdrawn offer's address is free again"
    );
}

#[tokio::test]
async fn full_mode_does_not_ack_when_the_lease_cannot_be_stored() {
    let planner = Arc::new(MemPlanner::new(BASE));
    let h = handler(full(), planner.clone()).await;
    planner.fail_saves(true);
    let ip = Ipv4Addr::new(10, 0, 0, 10);
    let req = request(
        MessageType::Request,
        mac(1),
        pxe(0),
        vec![DhcpOption::RequestedIpAddress(ip)],
        None,
        None,
    );
    assert!(exchange(&h, req.clone(), Port::Server, NOW).await.is_none());
    planner.fail_saves(false);
    let (_, ack) = exchange(&h, req, Port::Server, NOW).await.unwrap();
    assert_eq!(ack.opts().msg_type(), Some(MessageType::Ack));
}

#[tokio::test]
async fn full_mode_decline_reservation_and_restored_leases() {
    let planner = Arc::new(MemPlanner::new(BASE));
    let held = Ipv4Addr::new(10, 0, 0, 10);
    planner.insert_lease(Lease {
        mac: mac(9),
        ip: held,
        expires_unix: NOW + 1000,
    });
    planner.set_reservation(mac(3), Ipv4Addr::new(10, 0, 0, 200));
    let h = handler(full(), planner.clone()).await;

    let offer_ip = |m: MacAddr| {
        let h = &h;
        async move {
            exchange(
                h,
                request(MessageType::Discover, m, pxe(0), vec![], None, None),
                Port::Server,
                NOW,
            )
            .await
            .map(|(_, o)| o.yiaddr())
        }
    };
    assert_eq!(
        offer_ip(mac(9)).await,
        Some(held),
        "a restored lease is offered to its holder"
    );
    assert_eq!(
        offer_ip(mac(1)).await,
        Some(Ipv4Addr::new(10, 0, 0, 11)),
        "and to no one else"
    );
    assert_eq!(
        offer_ip(mac(3)).await,
        Some(Ipv4Addr::new(10, 0, 0, 200)),
        "reservations win"
    );

    // mac(1) declines its offered address: the next client skips it.
    h.handle(
        &request(
            MessageType::Decline,
            mac(1),
            vec![],
            vec![DhcpOption::RequestedIpAddress(Ipv4Addr::new(10, 0, 0, 11))],
            None,
            None,
        ),
        src(),
        Port::Server,
        NOW,
    )
    .await;
    assert_eq!(offer_ip(mac(4)).await, Some(Ipv4Addr::new(10, 0, 0, 12)));
    // mac(9) declines its stored lease: it is deleted from storage.
    h.handle(
        &request(
            MessageType::Decline,
            mac(9),
            vec![],
            vec![DhcpOption::RequestedIpAddress(held)],
            None,
            None,
        ),
        src(),
        Port::Server,
        NOW,
    )
    .await;
    assert!(planner.leases().iter().all(|l| l.mac != mac(9)));
}

fn fuzz_seeds() -> Vec<Vec<u8>> {
    let ip = Ipv4Addr::new(10, 0, 0, 10);
    vec![
        request(MessageType::Discover, mac(1), pxe(0), vec![], None, None),
        request(
            MessageType::Discover,
            mac(1),
            ipxe(),
            vec![],
            None,
            Some(Ipv4Addr::LOCALHOST),
        ),
        request(
            MessageType::Request,
            mac(1),
            pxe(7),
            vec![
                DhcpOption::ServerIdentifier(BOOT),
                DhcpOption::RequestedIpAddress(ip),
            ],
            None,
            None,
        ),
        request(MessageType::Request, mac(1), pxe(7), vec![], Some(ip), None),
        request(MessageType::Discover, mac(1), http(16), vec![], None, None),
        request(MessageType::Release, mac(1), vec![], vec![], Some(ip), None),
        request(
            MessageType::Decline,
            mac(1),
            vec![],
            vec![DhcpOption::RequestedIpAddress(ip)],
            None,
            None,
        ),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 3_000, .. ProptestConfig::default() })]

    #[test]
    fn the_handler_never_panics(
        seed in 0usize..7,
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..16),
        tail in proptest::collection::vec(any::<u8>(), 0..64),
        random in proptest::collection::vec(any::<u8>(), 0..600),
        use_random in any::<bool>(),
        proxy_port in any::<bool>(),
    ) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
        rt.block_on(async {
            let planner = Arc::new(MemPlanner::new(BASE));
            for mode in [Mode::Proxy, full()] {
                let h = handler_with(mode, planner.clone(), http_served()).await;
                let bytes = if use_random {
                    random.clone()
                } else {
                    let mut b = fuzz_seeds().swap_remove(seed);
                    for (at, v) in &edits {
                        let i = at.index(b.len());
                        b[i] = *v;
                    }
                    b.extend_from_slice(&tail);
                    b
                };
                let port = if proxy_port { Port::Proxy } else { Port::Server };
                let _ = h.handle(&bytes, src(), port, NOW).await;
            }
        });
    }
}

#[tokio::test]
async fn both_request_sockets_get_a_larger_receive_buffer() {
    let mut o = Options::new(Mode::Proxy, BOOT);
    o.listen = Ipv4Addr::LOCALHOST;
    o.ports.server = 0;
    o.ports.proxy = 0;
    let server = Server::bind(o, Arc::new(MemPlanner::new(BASE)))
        .await
        .unwrap();
    crate::udp::assert_enlarged(&server.server);
    crate::udp::assert_enlarged(server.proxy.as_ref().expect("proxy mode binds 4011"));
}
