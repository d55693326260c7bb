//! The real BMC peers the end-to-end tests drive through the binary: sushy-tools'
//! `sushy-emulator` (fake driver) and OpenIPMI's `ipmi_sim`, each started on free ports in a
//! fresh temporary directory and killed when dropped. They live in the `metalgraph-testkit`
//! crate, shared with the tasks crate's tests. The peers come from scripts/install-peers.sh.

#[allow(unused_imports)] // Each test binary uses a different part of this module.
pub use metalgraph_testkit::{
    IPMI_PASSWORD, IpmiSim, Proc, Sushy, SushyOptions, free_tcp_port, free_udp_port, isoinfo,
    peers_dir, raw_client, system_mac, system_uuid,
};
