//! The ways an operator enables helpers without enforcer, installed in a
//! router namespace for comparison.

use std::{io::Write, process::Stdio};

use crate::Netns;

/// Runs `tool` (iptables-restore, nft -f -) in `ns` with `script` on stdin.
pub fn feed(ns: &Netns, tool: &str, args: &[&str], script: &str) {
    let mut child = ns.cmd(tool).args(args).stdin(Stdio::piped()).spawn().unwrap_or_else(|e| panic!("{tool}: {e}"));
    child.stdin.take().unwrap().write_all(script.as_bytes()).unwrap();
    assert!(child.wait().unwrap().success(), "{tool} failed: {}", &script[..script.len().min(200)]);
}

/// The chain the Neutron L3 agent makes for helper `i`.
pub fn neutron_chain(i: usize) -> String {
    format!("nl3-cth-{i:07x}")
}

/// The Neutron L3 agent's layout: raw PREROUTING -> agent chain -> helper
/// chains -> one chain per helper with `-j CT --helper`, ports 10000 + i.
pub fn neutron_layout(n: usize) -> String {
    let mut s = String::from("*raw\n:nl3-PREROUTING - [0:0]\n:nl3-cth - [0:0]\n-A PREROUTING -j nl3-PREROUTING\n-A nl3-PREROUTING -j nl3-cth\n");
    for i in 0..n {
        s.push_str(&format!(":{} - [0:0]\n", neutron_chain(i)));
    }
    for i in 0..n {
        let c = neutron_chain(i);
        s.push_str(&format!("-A nl3-cth -j {c}\n-A {c} -p tcp -m tcp --dport {} -j CT --helper ftp\n", 10_000 + i));
    }
    s.push_str("COMMIT\n");
    s
}

pub fn install_neutron(ns: &Netns, n: usize) {
    feed(ns, "iptables-restore", &["--noflush"], &neutron_layout(n));
}

/// An nftables set per helper type with one `ct helper set` rule (nft 1.0.6
/// refuses a map from port to ct helper object), ports 10000 + i.
pub fn install_nft(ns: &Netns, n: usize) {
    feed(
        ns,
        "nft",
        &["-f", "-"],
        "table ip enfbench {\n ct helper ftp-tcp { type \"ftp\" protocol tcp; }\n set ftp_ports { type inet_service; }\n chain pre { type filter hook prerouting priority raw; tcp dport @ftp_ports ct helper set \"ftp-tcp\"; }\n}\n",
    );
    for chunk in (0..n).collect::<Vec<_>>().chunks(5000) {
        let elems: Vec<String> = chunk.iter().map(|i| (10_000 + i).to_string()).collect();
        feed(ns, "nft", &["-f", "-"], &format!("add element ip enfbench ftp_ports {{ {} }}\n", elems.join(", ")));
    }
}
