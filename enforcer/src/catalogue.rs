//! The conntrack helpers enforcer can assign, with the kernel's names.
//!
//! The ids are part of the mark layout (4 bits) and so of the kernel ABI of
//! this project: never renumber an entry. Support per family was probed on
//! kernel 6.18 with `-p PROTO -j CT --helper NAME` (see DESIGN.md); H.323 is
//! assigned as `Q.931` and `RAS`, and Neutron's `h323`/`amanda:tcp` do not
//! exist in the kernel.

use crate::api::Protocol;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HelperKind {
    /// Id carried in the mark, 1..=15.
    pub id: u8,
    /// The kernel's helper name, as `-j CT --helper` takes it.
    pub name: &'static str,
    pub protocols: &'static [Protocol],
    /// Whether the kernel has an IPv6 variant of this helper.
    pub ipv6: bool,
    /// The port the protocol usually runs on.
    pub default_port: u16,
}

use Protocol::{Tcp, Udp};

pub const CATALOGUE: &[HelperKind] = &[
    HelperKind { id: 1, name: "ftp", protocols: &[Tcp], ipv6: true, default_port: 21 },
    HelperKind { id: 2, name: "tftp", protocols: &[Udp], ipv6: true, default_port: 69 },
    HelperKind { id: 3, name: "sip", protocols: &[Udp, Tcp], ipv6: true, default_port: 5060 },
    HelperKind { id: 4, name: "sane", protocols: &[Tcp], ipv6: true, default_port: 6566 },
    HelperKind { id: 5, name: "amanda", protocols: &[Udp], ipv6: true, default_port: 10080 },
    HelperKind { id: 6, name: "Q.931", protocols: &[Tcp], ipv6: true, default_port: 1720 },
    HelperKind { id: 7, name: "RAS", protocols: &[Udp], ipv6: true, default_port: 1719 },
    HelperKind { id: 8, name: "irc", protocols: &[Tcp], ipv6: false, default_port: 6667 },
    HelperKind { id: 9, name: "pptp", protocols: &[Tcp], ipv6: false, default_port: 1723 },
    HelperKind { id: 10, name: "snmp", protocols: &[Udp], ipv6: false, default_port: 161 },
    HelperKind { id: 11, name: "netbios-ns", protocols: &[Udp], ipv6: false, default_port: 137 },
];

/// Looks a helper up by its kernel name (exact, case-sensitive: `Q.931`).
pub fn by_name(name: &str) -> Option<&'static HelperKind> {
    CATALOGUE.iter().find(|h| h.name == name)
}

pub fn by_id(id: u8) -> Option<&'static HelperKind> {
    CATALOGUE.iter().find(|h| h.id == id)
}

/// Every helper name, for error messages and `--help`.
pub fn names() -> Vec<&'static str> {
    CATALOGUE.iter().map(|h| h.name).collect()
}

impl HelperKind {
    pub fn supports(&self, protocol: Protocol) -> bool {
        self.protocols.contains(&protocol)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_unique_and_fit_four_bits() {
        for (i, a) in CATALOGUE.iter().enumerate() {
            assert!((1..=15).contains(&a.id), "{} has id {}", a.name, a.id);
            for b in &CATALOGUE[i + 1..] {
                assert_ne!(a.id, b.id, "{} and {} share an id", a.name, b.name);
                assert_ne!(a.name, b.name);
            }
        }
    }

    #[test]
    fn lookups_match_the_kernel_names() {
        assert_eq!(by_name("ftp").map(|h| h.id), Some(1));
        assert!(by_name("Q.931").is_some());
        assert!(by_name("h323").is_none(), "the kernel has no helper named h323");
        assert!(by_name("FTP").is_none(), "kernel names are case-sensitive");
        assert_eq!(by_id(2).map(|h| h.name), Some("tftp"));
        assert!(by_id(0).is_none());
    }

    #[test]
    fn protocol_support() {
        let sip = by_name("sip").unwrap();
        assert!(sip.supports(Protocol::Tcp) && sip.supports(Protocol::Udp));
        assert!(!by_name("tftp").unwrap().supports(Protocol::Tcp));
        assert!(!by_name("irc").unwrap().ipv6);
    }
}
