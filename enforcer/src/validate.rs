//! Validation of everything a caller sends. Each function turns raw input
//! into a checked value or an error that names the field, the value and what
//! is allowed; nothing unchecked reaches the kernel, a rule or a path.

use uuid::Uuid;

use crate::{
    api::{ApiError, Protocol},
    catalogue::{HelperKind, Offered},
};

/// Longest value echoed back in an error message.
const ECHO_MAX: usize = 64;
const PROJECT_MAX: usize = 64;
/// Linux limits network namespace names to a file name; keep well below.
const NETNS_MAX: usize = 64;

/// The value as shown in an error: quoted, escaped, cut to a sane length.
fn shown(value: &str) -> String {
    let cut: String = value.chars().take(ECHO_MAX).collect();
    let more = if cut.len() < value.len() { "..." } else { "" };
    format!("{cut:?}{more}")
}

/// A UUID in lowercase hyphenated form, encoded into a buffer and copied
/// once (through `Display` the string grew three times).
pub fn uuid_text(u: Uuid) -> String {
    u.hyphenated().encode_lower(&mut Uuid::encode_buffer()).to_owned()
}

/// A router or helper id: a UUID, normalised to lowercase hyphenated form.
pub fn uuid(field: &str, value: &str) -> Result<String, ApiError> {
    Uuid::parse_str(value)
        .ok()
        .filter(|_| value.len() == 36)
        .map(uuid_text)
        .ok_or_else(|| {
            ApiError::invalid(field, format!("{field} {}: must be a UUID like 0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0", shown(value)))
        })
}

pub fn protocol(value: &str) -> Result<Protocol, ApiError> {
    match value {
        "tcp" => Ok(Protocol::Tcp),
        "udp" => Ok(Protocol::Udp),
        _ => Err(ApiError::invalid("protocol", format!("protocol {}: must be tcp or udp", shown(value)))),
    }
}

pub fn port(value: i64) -> Result<u16, ApiError> {
    u16::try_from(value)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| ApiError::invalid("port", format!("port {value}: must be 1-65535")))
}

/// A helper this host offers (probed kernel, narrowed by configuration)
/// for `protocol`.
pub fn helper(offered: &Offered, value: &str, protocol: Protocol) -> Result<&'static HelperKind, ApiError> {
    let protocols = offered.protocols_of(value);
    if protocols.is_empty() {
        return Err(ApiError::invalid(
            "helper",
            format!("helper {}: not available here; available: {}", shown(value), offered.names().join(", ")),
        ));
    }
    offered.find(value, protocol).ok_or_else(|| {
        let supported: Vec<_> = protocols.iter().map(|p| p.as_str()).collect();
        ApiError::invalid(
            "protocol",
            format!("helper {value} does not support protocol {protocol}; it supports {}", supported.join(", ")),
        )
    })
}

fn safe_name(field: &str, value: &str, max: usize, first_alnum: bool) -> Result<String, ApiError> {
    let ok = !value.is_empty()
        && value.len() <= max
        && value.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && (!first_alnum || value.as_bytes()[0].is_ascii_alphanumeric());
    if ok {
        Ok(value.to_string())
    } else {
        Err(ApiError::invalid(
            field,
            format!(
                "{field} {}: must be 1-{max} characters of A-Z a-z 0-9 . _ -{}",
                shown(value),
                if first_alnum { ", starting with a letter or digit" } else { "" }
            ),
        ))
    }
}

/// A network namespace name: a plain file name under /run/netns.
pub fn netns(value: &str) -> Result<String, ApiError> {
    safe_name("netns", value, NETNS_MAX, true)
}

/// A project id (Neutron uses 32 hex digits; accept a bounded safe set).
pub fn project(value: &str) -> Result<String, ApiError> {
    safe_name("project_id", value, PROJECT_MAX, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0";

    #[test]
    fn uuids() {
        assert_eq!(uuid("router_id", ID).unwrap(), ID);
        assert_eq!(uuid("router_id", &ID.to_uppercase()).unwrap(), ID);
        for bad in ["", "x", "0f1e2d3c4b5a69788796a5b4c3d2e1f0", "{0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0}", "../etc"] {
            let e = uuid("router_id", bad).unwrap_err();
            assert_eq!(e.field.as_deref(), Some("router_id"), "{bad}");
        }
    }

    #[test]
    fn ports() {
        assert_eq!(port(1).unwrap(), 1);
        assert_eq!(port(65535).unwrap(), 65535);
        for bad in [0, -1, 65536, i64::MAX] {
            let e = port(bad).unwrap_err();
            assert!(e.message.contains("1-65535"), "{}", e.message);
        }
    }

    #[test]
    fn protocols() {
        assert_eq!(protocol("tcp").unwrap(), Protocol::Tcp);
        assert_eq!(protocol("udp").unwrap(), Protocol::Udp);
        for bad in ["TCP", "sctp", "", "tcp;rm -rf /"] {
            assert!(protocol(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn helpers_and_their_protocols() {
        let all = Offered::everything();
        assert_eq!(helper(&all, "ftp", Protocol::Tcp).unwrap().name, "ftp");
        let e = helper(&all, "ftp", Protocol::Udp).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("protocol"));
        assert!(e.message.contains("supports tcp"), "{}", e.message);
        let e = helper(&all, "h323", Protocol::Tcp).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("helper"));
        assert!(e.message.contains("Q.931"), "lists what is available: {}", e.message);
        assert!(helper(&all, "ftp\n-j ACCEPT", Protocol::Tcp).is_err());
        // Known to the catalogue but not offered here.
        let narrow = Offered::new(all.offers.clone(), Some(&["tftp".into()])).unwrap();
        let e = helper(&narrow, "ftp", Protocol::Tcp).unwrap_err();
        assert!(e.message.contains("not available") && e.message.contains("tftp"), "{}", e.message);
    }

    #[test]
    fn names_refuse_hostile_strings() {
        assert!(netns("qrouter-abc_1.2").is_ok());
        let long = "a".repeat(10_000);
        for bad in ["", "../x", "a/b", "a b", "$(reboot)", "a;b", "a\nb", ".hidden", "-rf", long.as_str()] {
            let e = netns(bad).unwrap_err();
            assert!(e.message.len() < 300, "error echoes a bounded value");
            assert!(project(bad).is_err(), "{bad:?}");
        }
    }
}

#[cfg(test)]
mod fuzz {
    //! Property tests: request parsing and validation never panic, and
    //! whatever they accept satisfies the invariants the kernel side relies on.
    use proptest::prelude::*;

    use super::*;
    use crate::api::Request;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

        #[test]
        fn parsing_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = serde_json::from_slice::<Request>(&bytes);
        }

        #[test]
        fn parsing_request_shaped_json_never_panics(
            op in prop::sample::select(vec!["router_add", "helper_create", "helper_update", "helper_delete", "helper_show", "audit", "x"]),
            router in ".{0,80}",
            port in any::<i64>(),
            helper in ".{0,40}",
            extra in prop::option::of("[a-z_]{1,12}"),
        ) {
            let mut v = serde_json::json!({"op": op, "router_id": router, "helper_id": router, "protocol": "tcp", "port": port, "helper": helper});
            if let Some(k) = extra {
                v[k] = serde_json::json!(1);
            }
            let _ = serde_json::from_value::<Request>(v);
        }

        #[test]
        fn accepted_names_are_safe(s in "\\PC{0,100}") {
            for (field, checked) in [("netns", netns(&s)), ("project_id", project(&s))] {
                match checked {
                    Ok(v) => {
                        prop_assert!(!v.is_empty() && v.len() <= 64);
                        prop_assert!(v.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)));
                        prop_assert!(!v.starts_with('.') && !v.starts_with('-'));
                    }
                    Err(e) => {
                        prop_assert_eq!(e.field.as_deref(), Some(field));
                        prop_assert!(e.message.len() < 400);
                    }
                }
            }
        }

        #[test]
        fn accepted_ids_are_canonical_uuids(s in "\\PC{0,60}") {
            if let Ok(id) = uuid("router_id", &s) {
                prop_assert_eq!(id.len(), 36);
                prop_assert!(id.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-'));
            }
        }

        #[test]
        fn ports_and_protocols(p in any::<i64>(), proto in "\\PC{0,8}") {
            match port(p) {
                Ok(v) => prop_assert!(v >= 1 && i64::from(v) == p),
                Err(e) => prop_assert!(!(1..=65535).contains(&p) && e.field.as_deref() == Some("port")),
            }
            if protocol(&proto).is_ok() {
                prop_assert!(proto == "tcp" || proto == "udp");
            }
        }
    }
}
