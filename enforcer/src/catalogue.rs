//! The conntrack helpers enforcer knows, with the kernel's names, and what
//! the running kernel and the configuration actually offer.
//!
//! The ids are part of the mark layout (4 bits) and so of the kernel ABI of
//! this project: never renumber an entry. H.323 is assigned as `Q.931` and
//! `RAS`; Neutron's `h323`/`amanda:tcp` do not exist in the kernel. Which
//! (helper, protocol, family) the kernel really has is probed at start
//! (`kernel::probe`) and narrowed by `allowed_helpers`.

use crate::api::Protocol;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct HelperKind {
    /// Id carried in the mark, 1..=15.
    pub id: u8,
    /// The kernel's helper name, as `-j CT --helper` takes it.
    pub name: &'static str,
    /// Protocols the kernel may have this helper for.
    pub protocols: &'static [Protocol],
    /// The port the protocol usually runs on.
    pub default_port: u16,
}

use Protocol::{Tcp, Udp};

pub const CATALOGUE: &[HelperKind] = &[
    HelperKind { id: 1, name: "ftp", protocols: &[Tcp], default_port: 21 },
    HelperKind { id: 2, name: "tftp", protocols: &[Udp], default_port: 69 },
    HelperKind { id: 3, name: "sip", protocols: &[Udp, Tcp], default_port: 5060 },
    HelperKind { id: 4, name: "sane", protocols: &[Tcp], default_port: 6566 },
    HelperKind { id: 5, name: "amanda", protocols: &[Udp], default_port: 10080 },
    HelperKind { id: 6, name: "Q.931", protocols: &[Tcp], default_port: 1720 },
    HelperKind { id: 7, name: "RAS", protocols: &[Udp], default_port: 1719 },
    HelperKind { id: 8, name: "irc", protocols: &[Tcp], default_port: 6667 },
    HelperKind { id: 9, name: "pptp", protocols: &[Tcp], default_port: 1723 },
    HelperKind { id: 10, name: "snmp", protocols: &[Udp], default_port: 161 },
    HelperKind { id: 11, name: "netbios-ns", protocols: &[Udp], default_port: 137 },
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

use crate::api::Family;

/// One assignable (helper, protocol, family), as the kernel accepted it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Offer {
    pub kind: &'static HelperKind,
    pub protocol: Protocol,
    pub family: Family,
}

/// What can be assigned on this host: probed from the kernel, narrowed by
/// configuration. Validation and the glue use only this.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Offered {
    pub offers: Vec<Offer>,
}

/// One `allowed_helpers` entry: `NAME` or `NAME:PROTOCOL`.
fn parse_allowed(entry: &str) -> Result<(&'static HelperKind, Option<Protocol>), String> {
    let (name, proto) = match entry.split_once(':') {
        Some((n, p)) => (n, Some(p)),
        None => (entry, None),
    };
    let kind = by_name(name).ok_or_else(|| format!("allowed_helpers: unknown helper {name:?}; known: {}", names().join(", ")))?;
    let proto = match proto {
        None => None,
        Some("tcp") => Some(Protocol::Tcp),
        Some("udp") => Some(Protocol::Udp),
        Some(p) => return Err(format!("allowed_helpers: {entry:?}: protocol {p:?} must be tcp or udp")),
    };
    if let Some(p) = proto
        && !kind.supports(p) {
            return Err(format!("allowed_helpers: {entry:?}: the {} helper does not exist for {p}", kind.name));
        }
    Ok((kind, proto))
}

impl Offered {
    /// `probed` narrowed to `allowed` (None: everything probed).
    pub fn new(probed: Vec<Offer>, allowed: Option<&[String]>) -> Result<Self, String> {
        let Some(allowed) = allowed else { return Ok(Self { offers: probed }) };
        let allowed: Vec<_> = allowed.iter().map(|e| parse_allowed(e)).collect::<Result<_, _>>()?;
        let offers = probed
            .into_iter()
            .filter(|o| allowed.iter().any(|(k, p)| k.id == o.kind.id && p.is_none_or(|p| p == o.protocol)))
            .collect();
        Ok(Self { offers })
    }

    /// Every (helper, protocol, family) the catalogue knows: the offer of a
    /// kernel that has them all (tests, and the probe's candidates).
    pub fn everything() -> Self {
        let offers = CATALOGUE
            .iter()
            .flat_map(|k| k.protocols.iter().flat_map(move |p| Family::ALL.map(|f| Offer { kind: k, protocol: *p, family: f })))
            .collect();
        Self { offers }
    }

    /// The helper named `name`, if offered for `protocol` in some family.
    pub fn find(&self, name: &str, protocol: Protocol) -> Option<&'static HelperKind> {
        self.offers.iter().find(|o| o.kind.name == name && o.protocol == protocol).map(|o| o.kind)
    }

    /// Protocols `name` is offered for.
    pub fn protocols_of(&self, name: &str) -> Vec<Protocol> {
        let mut p: Vec<Protocol> = self.offers.iter().filter(|o| o.kind.name == name).map(|o| o.protocol).collect();
        p.sort();
        p.dedup();
        p
    }

    /// Names offered, for error messages.
    pub fn names(&self) -> Vec<&'static str> {
        let mut n: Vec<&'static str> = Vec::new();
        for o in &self.offers {
            if !n.contains(&o.kind.name) {
                n.push(o.kind.name);
            }
        }
        n
    }

    /// One entry per helper, for `enforcer catalogue`.
    pub fn describe(&self) -> Vec<crate::api::OfferedHelper> {
        self.names()
            .into_iter()
            .filter_map(|name| {
                let kind = by_name(name)?;
                let mut families: Vec<Family> = self.offers.iter().filter(|o| o.kind.id == kind.id).map(|o| o.family).collect();
                families.sort();
                families.dedup();
                Some(crate::api::OfferedHelper {
                    helper: name.to_string(),
                    protocols: self.protocols_of(name),
                    families,
                    usual_port: kind.default_port,
                })
            })
            .collect()
    }

    pub fn in_family(&self, family: Family) -> impl Iterator<Item = &Offer> {
        self.offers.iter().filter(move |o| o.family == family)
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
    }

    #[test]
    fn allowed_helpers_narrow_the_probed_offer() {
        let all = Offered::everything();
        let o = Offered::new(all.offers.clone(), Some(&["ftp".into(), "sip:udp".into()])).unwrap();
        assert_eq!(o.names(), vec!["ftp", "sip"]);
        assert_eq!(o.protocols_of("sip"), vec![Protocol::Udp]);
        assert!(o.find("sip", Protocol::Tcp).is_none());
        assert!(o.find("tftp", Protocol::Udp).is_none());
        assert_eq!(o.in_family(Family::Ipv6).count(), 2);
        // What the kernel lacks is not offered even if allowed.
        let probed: Vec<Offer> = all.offers.iter().copied().filter(|x| x.kind.name != "irc").collect();
        assert!(Offered::new(probed, Some(&["irc".into()])).unwrap().offers.is_empty());
        for bad in ["h323", "ftp:udp", "ftp:sctp", "amanda:tcp"] {
            assert!(Offered::new(all.offers.clone(), Some(&[bad.into()])).is_err(), "{bad}");
        }
        assert_eq!(Offered::new(all.offers.clone(), None).unwrap(), all);
    }
}
