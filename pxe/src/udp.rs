//! The receive buffer of the sockets where a rack's requests arrive (DHCP's, TFTP's request
//! socket).
//!
//! A rack powering on sends its DHCP DISCOVERs within a millisecond, faster than any server
//! reads them, and the kernel holds them in the socket's receive buffer until it does. The
//! default buffer (`net.core.rmem_default`, 212,992 bytes on most Linux systems) holds one
//! or two hundred of them (the kernel charges each its overhead besides its bytes): every
//! datagram beyond is dropped, and each drop costs its machine a
//! resend two or more seconds later (BENCHMARKS.md, "Rack power-on"). So these sockets ask
//! for [`RECV_BUFFER`] instead. The kernel caps the request at `net.core.rmem_max` (and
//! Linux then doubles it for its own accounting); whatever it grants is logged at debug and
//! start-up goes on, since a smaller buffer only means more resends. Memory is taken only
//! by datagrams actually waiting, not by the size granted.

use std::io;

use tokio::net::UdpSocket;
use tracing::{debug, warn};

/// What the request sockets ask the kernel for: 4 MiB, room for thousands of DHCP
/// requests.
pub(crate) const RECV_BUFFER: usize = 4 << 20;

/// Asks for a receive buffer of [`RECV_BUFFER`] on `socket` and logs at debug what the
/// kernel granted (`SO_RCVBUF` read back), naming the socket `what`. Never fails: a
/// smaller grant is what `net.core.rmem_max` allows, and a socket option the kernel
/// refuses leaves the default buffer, with a warning, which costs resends but serves.
pub(crate) fn enlarge_recv_buffer(socket: &UdpSocket, what: &str) {
    match set_recv_buffer(socket) {
        Ok((before, granted)) => debug!(
            socket = what,
            requested = RECV_BUFFER,
            before,
            granted,
            "UDP receive buffer set (the kernel caps it at net.core.rmem_max)"
        ),
        Err(e) => warn!(
            socket = what,
            requested = RECV_BUFFER,
            error = %e,
            "cannot enlarge the UDP receive buffer; a burst of requests beyond the default buffer will be dropped and resent"
        ),
    }
}

/// Sets `SO_RCVBUF`; returns its value before and after.
fn set_recv_buffer(socket: &UdpSocket) -> io::Result<(usize, usize)> {
    let sock = socket2::SockRef::from(socket);
    let before = sock.recv_buffer_size()?;
    sock.set_recv_buffer_size(RECV_BUFFER)?;
    Ok((before, sock.recv_buffer_size()?))
}

/// Asserts that `socket` got the receive buffer [`enlarge_recv_buffer`] asks for, or as much
/// of it as `net.core.rmem_max` allows, and more than a socket gets by default; the
/// servers' tests call it on their bound sockets.
#[cfg(test)]
pub(crate) fn assert_enlarged(socket: &UdpSocket) {
    let granted = socket2::SockRef::from(socket).recv_buffer_size().unwrap();
    // What a socket nobody enlarged gets on this host (rmem_default): the old behaviour.
    let plain = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let default = socket2::SockRef::from(&plain).recv_buffer_size().unwrap();
    let rmem_max: usize = std::fs::read_to_string("/proc/sys/net/core/rmem_max")
        .expect("Linux exposes net.core.rmem_max")
        .trim()
        .parse()
        .expect("rmem_max is a number");
    assert!(
        granted > default,
        "SO_RCVBUF {granted} is not above the default {default}"
    );
    assert!(
        granted >= RECV_BUFFER.min(rmem_max),
        "SO_RCVBUF {granted} is below both the request {RECV_BUFFER} and rmem_max {rmem_max}"
    );
}
