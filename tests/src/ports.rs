//! Free loopback ports for test servers.
//!
//! A port comes from binding `127.0.0.1:0` and letting the kernel choose; the listener is closed
//! before the server binds the port, so another process may take it in between. The servers
//! detect that (the server exits with "address already in use") and start again on fresh ports.
//! Within this process no port is handed out twice, so parallel tests never race each other.

use std::collections::HashSet;
use std::net::TcpListener;
use std::sync::{Mutex, OnceLock};

/// Every port handed out by this process, so parallel tests never get the same one.
fn handed_out() -> &'static Mutex<HashSet<u16>> {
    static PORTS: OnceLock<Mutex<HashSet<u16>>> = OnceLock::new();
    PORTS.get_or_init(|| Mutex::new(HashSet::new()))
}

/// A loopback TCP port that was free a moment ago and was never handed out before by this process.
///
/// # Panics
/// If the kernel refuses to bind any loopback port.
pub fn free_port() -> u16 {
    loop {
        let listener = TcpListener::bind("127.0.0.1:0")
            .unwrap_or_else(|e| panic!("cannot bind a loopback port: {e}"));
        let port = listener
            .local_addr()
            .unwrap_or_else(|e| panic!("bound loopback socket has no address: {e}"))
            .port();
        drop(listener);
        let mut ports = handed_out().lock().unwrap_or_else(|e| e.into_inner());
        if ports.insert(port) {
            return port;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_distinct() {
        let ports: HashSet<u16> = (0..50).map(|_| free_port()).collect();
        assert_eq!(ports.len(), 50);
        assert!(!ports.contains(&0));
    }
}
