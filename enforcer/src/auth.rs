//! Who may do what. Callers are identified by the socket's peer credentials
//! (SO_PEERCRED, and SO_PEERGROUPS for supplementary groups), mapped by
//! configuration to a role: admin (everything),
//! operator bound to a project (its helpers), reader (list, show, maps).
//! Root is always admin; a caller no rule names is refused.

use serde::{Deserialize, Serialize};

use crate::api::{ApiError, ErrorCode, Request};

use crate::api::Caller;

impl Caller {
    fn in_group(&self, gid: u32) -> bool {
        self.gid == gid || self.groups.contains(&gid)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RoleName {
    Admin,
    Operator,
    Reader,
}

/// One `[[access]]` rule of the configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessRule {
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub role: RoleName,
    /// Required for operators; optional for readers (then all projects).
    pub project: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    Admin,
    Operator { project: String },
    Reader { project: Option<String> },
}

impl Role {
    /// The project this role is confined to, if any.
    pub fn scope(&self) -> Option<&str> {
        match self {
            Role::Admin => None,
            Role::Operator { project } => Some(project),
            Role::Reader { project } => project.as_deref(),
        }
    }
}

/// Checks the rules: each needs a uid or a gid, operators a project.
pub fn check_rules(rules: &[AccessRule]) -> Result<(), String> {
    for (i, r) in rules.iter().enumerate() {
        if r.uid.is_none() && r.gid.is_none() {
            return Err(format!("access rule {}: needs uid or gid", i + 1));
        }
        if r.role == RoleName::Operator && r.project.is_none() {
            return Err(format!("access rule {}: an operator needs a project", i + 1));
        }
        if let Some(p) = &r.project {
            crate::validate::project(p).map_err(|e| format!("access rule {}: {}", i + 1, e.message))?;
        }
    }
    Ok(())
}

/// The caller's role: root is admin; else the first rule naming its uid,
/// else the first naming its gid.
pub fn role_of(rules: &[AccessRule], caller: &Caller) -> Option<Role> {
    if caller.uid == 0 {
        return Some(Role::Admin);
    }
    let rule = rules
        .iter()
        .find(|r| r.uid == Some(caller.uid))
        .or_else(|| rules.iter().find(|r| r.uid.is_none() && r.gid.is_some_and(|g| caller.in_group(g))))?;
    Some(match rule.role {
        RoleName::Admin => Role::Admin,
        RoleName::Operator => Role::Operator { project: rule.project.clone()? },
        RoleName::Reader => Role::Reader { project: rule.project.clone() },
    })
}

fn denied(what: &str) -> ApiError {
    ApiError::new(ErrorCode::PermissionDenied, format!("permission denied: {what}"))
}

/// Whether `role` may make `req` at all (project confinement is applied by
/// the daemon on the objects themselves).
pub fn permits(role: Option<&Role>, req: &Request) -> Result<(), ApiError> {
    let Some(role) = role else {
        return Err(denied("no role is configured for this caller"));
    };
    let read = matches!(
        req,
        Request::RouterList {}
            | Request::HelperList { .. }
            | Request::HelperShow { .. }
            | Request::MapsDump {}
            | Request::Catalogue {}
    );
    match role {
        Role::Admin => Ok(()),
        Role::Reader { .. } if read => Ok(()),
        Role::Reader { .. } => Err(denied("readers may only list and show")),
        Role::Operator { project } => match req {
            _ if read => Ok(()),
            Request::HelperCreate { id: Some(_), .. } => Err(denied("only an administrator may choose a helper id")),
            Request::HelperCreate { project_id: Some(p), .. } if p != project => {
                Err(denied("an operator creates helpers in its own project only"))
            }
            Request::HelperSet { helpers, .. } if helpers.iter().any(|h| h.id.is_some()) => {
                Err(denied("only an administrator may name helper ids in a set; leave them out (helpers are matched by protocol and port)"))
            }
            Request::HelperSet { helpers, .. } if helpers.iter().any(|h| h.project_id.as_ref().is_some_and(|p| p != project)) => {
                Err(denied("an operator creates helpers in its own project only"))
            }
            Request::HelperCreate { .. } | Request::HelperUpdate { .. } | Request::HelperDelete { .. } | Request::HelperSet { .. } => Ok(()),
            _ => Err(denied("operators manage the helpers of their project's routers only")),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules() -> Vec<AccessRule> {
        vec![
            AccessRule { uid: Some(1001), gid: None, role: RoleName::Operator, project: Some("p1".into()) },
            AccessRule { uid: None, gid: Some(2000), role: RoleName::Reader, project: None },
            AccessRule { uid: Some(1003), gid: None, role: RoleName::Admin, project: None },
        ]
    }

    fn caller(uid: u32, gid: u32) -> Caller {
        Caller { uid, gid, pid: None, groups: Vec::new() }
    }

    #[test]
    fn supplementary_groups_count_like_the_primary_one() {
        let r = rules();
        let member = Caller { groups: vec![10, 2000], ..caller(1500, 1500) };
        assert_eq!(role_of(&r, &member), Some(Role::Reader { project: None }));
        assert_eq!(role_of(&r, &caller(1500, 1500)), None);
    }

    #[test]
    fn roles_come_from_uid_then_gid() {
        let r = rules();
        assert_eq!(role_of(&r, &caller(0, 0)), Some(Role::Admin));
        assert_eq!(role_of(&r, &caller(1001, 2000)), Some(Role::Operator { project: "p1".into() }), "uid wins over gid");
        assert_eq!(role_of(&r, &caller(1002, 2000)), Some(Role::Reader { project: None }));
        assert_eq!(role_of(&r, &caller(1003, 1003)), Some(Role::Admin));
        assert_eq!(role_of(&r, &caller(1004, 1004)), None);
    }

    #[test]
    fn each_role_gets_exactly_its_rights() {
        let create = |id: Option<&str>, project: Option<&str>| Request::HelperCreate {
            router_id: "r".into(),
            protocol: "tcp".into(),
            port: 21,
            helper: "ftp".into(),
            id: id.map(Into::into),
            project_id: project.map(Into::into),
        };
        let op = Role::Operator { project: "p1".into() };
        let reader = Role::Reader { project: None };
        assert!(permits(Some(&op), &create(None, None)).is_ok());
        assert!(permits(Some(&op), &create(None, Some("p1"))).is_ok());
        assert!(permits(Some(&op), &create(None, Some("p2"))).is_err());
        assert!(permits(Some(&op), &create(Some("0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"), None)).is_err());
        assert!(permits(Some(&op), &Request::RouterAdd { router_id: "r".into(), netns: None, project_id: None }).is_err());
        assert!(permits(Some(&op), &Request::Teardown {}).is_err());
        assert!(permits(Some(&op), &Request::DebugDatapath { drops: 10 }).is_err());
        assert!(permits(Some(&reader), &Request::DebugDatapath { drops: 0 }).is_err());
        assert!(permits(Some(&Role::Admin), &Request::DebugDatapath { drops: 10 }).is_ok());
        assert!(permits(Some(&reader), &Request::HelperList { router_id: None }).is_ok());
        assert!(permits(Some(&reader), &create(None, None)).is_err());
        assert!(permits(Some(&reader), &Request::Status {}).is_err());
        assert!(permits(Some(&Role::Admin), &Request::Teardown {}).is_ok());
        let e = permits(None, &Request::RouterList {}).unwrap_err();
        assert_eq!(e.code, ErrorCode::PermissionDenied);
    }

    #[test]
    fn rules_are_checked() {
        assert!(check_rules(&rules()).is_ok());
        assert!(check_rules(&[AccessRule { uid: None, gid: None, role: RoleName::Reader, project: None }]).is_err());
        assert!(check_rules(&[AccessRule { uid: Some(1), gid: None, role: RoleName::Operator, project: None }]).is_err());
        assert!(check_rules(&[AccessRule { uid: Some(1), gid: None, role: RoleName::Operator, project: Some("../x".into()) }]).is_err());
    }
}
