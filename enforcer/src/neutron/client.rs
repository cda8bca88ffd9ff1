//! Neutron's API as the sync needs it, through a Keystone v3 session
//! (osauth: password or application credential login, the service
//! catalog, renewal of the token before it expires).
//!
//! A 401 from Neutron drops the session and logs in again once. A token
//! that is not scoped to a project with the admin role is refused: Neutron
//! 29 answers such a token with empty lists and 404s, which must never be
//! read as "every router is gone".

use std::time::Duration;

use osauth::{
    ErrorKind,
    services::{GenericService, NETWORK, VersionSelector},
};
use serde::Deserialize;

use super::{
    NeutronConfig,
    plan::{NeutronHelper, NeutronRouter},
};

/// Why talking to OpenStack failed; every kind leaves enforcement as it is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NeutronError {
    /// Keystone refused the credentials, or the token cannot see all routers.
    #[error("credentials: {0}")]
    Credentials(String),
    /// The configuration or the catalog does not lead to Neutron.
    #[error("configuration: {0}")]
    Config(String),
    /// Keystone or Neutron is down, slow or failing (retried with backoff).
    #[error("unavailable: {0}")]
    Unavailable(String),
}

/// Keystone's v3 API, found through the catalog like Neutron's.
const IDENTITY: GenericService = GenericService::new("identity", VersionSelector::Major(3));

/// Longest wait for one HTTP request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

pub struct Neutron {
    config: NeutronConfig,
    session: Option<osauth::Session>,
    /// HTTP requests made so far (logins included).
    pub requests: u64,
}

fn login_error(e: osauth::Error) -> NeutronError {
    match e.kind() {
        // Keystone answers 404 for an application credential it does not know.
        ErrorKind::AuthenticationFailed | ErrorKind::ResourceNotFound | ErrorKind::AccessDenied => {
            NeutronError::Credentials(format!("Keystone refused the login: {e}"))
        }
        ErrorKind::InvalidConfig | ErrorKind::InvalidInput => NeutronError::Config(e.to_string()),
        _ => NeutronError::Unavailable(format!("Keystone: {e}")),
    }
}

fn api_error(e: osauth::Error) -> NeutronError {
    match e.kind() {
        ErrorKind::EndpointNotFound => NeutronError::Config(format!("no Neutron endpoint in the catalog: {e}")),
        ErrorKind::AccessDenied => NeutronError::Credentials(format!("Neutron refused the request: {e}")),
        _ => NeutronError::Unavailable(format!("Neutron: {e}")),
    }
}

#[derive(Deserialize)]
struct TokenInfo {
    token: TokenBody,
}

#[derive(Deserialize)]
struct TokenBody {
    project: Option<serde_json::Value>,
    #[serde(default)]
    roles: Vec<Role>,
}

#[derive(Deserialize)]
struct Role {
    name: String,
}

impl Neutron {
    pub fn new(config: NeutronConfig) -> Self {
        Self { config, session: None, requests: 0 }
    }

    /// A session with a token that sees every router: logs in if needed.
    async fn session(&mut self) -> Result<&osauth::Session, NeutronError> {
        if self.session.is_none() {
            let cloud = self.config.cloud_config().map_err(|e| NeutronError::Config(format!("{e:#}")))?;
            self.requests += 1;
            let session = tokio::time::timeout(REQUEST_TIMEOUT, cloud.create_session())
                .await
                .map_err(|_| NeutronError::Unavailable("Keystone did not answer the login in time".into()))?
                .map_err(login_error)?;
            self.check_scope(&session).await?;
            self.session = Some(session);
        }
        Ok(self.session.as_ref().expect("just made"))
    }

    /// Asks Keystone what the session's token may do.
    async fn check_scope(&mut self, session: &osauth::Session) -> Result<(), NeutronError> {
        let client = session.client();
        let probe = client.inner().get("http://127.0.0.1/");
        let token = client
            .auth_type()
            .authenticate(client.inner(), probe)
            .await
            .map_err(login_error)?
            .build()
            .ok()
            .and_then(|r| r.headers().get("x-auth-token").and_then(|v| v.to_str().ok()).map(str::to_string))
            .ok_or_else(|| NeutronError::Credentials("the login gave no token".into()))?;
        self.requests += 1;
        let info: TokenInfo = session
            .get(IDENTITY, ["auth", "tokens"])
            .header("X-Subject-Token", token.as_str())
            .timeout(REQUEST_TIMEOUT)
            .fetch()
            .await
            .map_err(login_error)?;
        if info.token.project.is_none() {
            return Err(NeutronError::Credentials(
                "the token is not scoped to a project (system, domain or unscoped): Neutron would show it no routers".into(),
            ));
        }
        if !info.token.roles.iter().any(|r| r.name == "admin") {
            return Err(NeutronError::Credentials(
                "the token has no admin role on its project: Neutron would hide other projects' routers".into(),
            ));
        }
        Ok(())
    }

    /// GET on Neutron's API; `None` on 404. A 401 logs in again once.
    async fn get<T: serde::de::DeserializeOwned + Send>(&mut self, path: &[&str], query: &[(&str, &str)]) -> Result<Option<T>, NeutronError> {
        for attempt in 0..2 {
            let session = self.session().await?;
            let result = session.get(NETWORK, path.iter().copied()).query(&query).timeout(REQUEST_TIMEOUT).fetch::<T>().await;
            self.requests += 1;
            match result {
                Ok(v) => return Ok(Some(v)),
                Err(e) if e.kind() == ErrorKind::ResourceNotFound => return Ok(None),
                Err(e) if e.kind() == ErrorKind::AuthenticationFailed && attempt == 0 => {
                    tracing::info!("Neutron answered 401: logging in again");
                    self.session = None;
                }
                Err(e) => return Err(api_error(e)),
            }
        }
        Err(NeutronError::Credentials("Neutron refused a fresh token (401)".into()))
    }

    /// Every router Neutron has (id, project, revision): one request.
    pub async fn routers(&mut self) -> Result<Vec<NeutronRouter>, NeutronError> {
        #[derive(Deserialize)]
        struct List {
            routers: Vec<NeutronRouter>,
        }
        let fields = [("fields", "id"), ("fields", "project_id"), ("fields", "revision_number")];
        let list: Option<List> = self.get(&["routers"], &fields).await?;
        list.map(|l| l.routers).ok_or_else(|| NeutronError::Config("Neutron has no routers API (404)".into()))
    }

    /// Whether Neutron still has the router (false only on a 404).
    pub async fn router_exists(&mut self, id: &str) -> Result<bool, NeutronError> {
        Ok(self.get::<serde_json::Value>(&["routers", id], &[("fields", "id")]).await?.is_some())
    }

    /// The router's helpers; `None` if Neutron says the router is gone.
    pub async fn helpers(&mut self, router: &str) -> Result<Option<Vec<NeutronHelper>>, NeutronError> {
        #[derive(Deserialize)]
        struct List {
            conntrack_helpers: Vec<NeutronHelper>,
        }
        let list: Option<List> = self.get(&["routers", router, "conntrack_helpers"], &[]).await?;
        Ok(list.map(|l| l.conntrack_helpers))
    }

    /// Forgets the session: the next request logs in again.
    pub fn logout(&mut self) {
        self.session = None;
    }
}
