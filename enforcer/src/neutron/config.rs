//! The `[neutron]` section of the daemon's configuration.
//!
//! Either `cloud = "NAME"`, looked up in `clouds.yaml` where the OpenStack
//! tools look (`OS_CLIENT_CONFIG_FILE`, `./clouds.yaml`,
//! `~/.config/openstack/`, `/etc/openstack/`), or the credentials inline with
//! keystoneauth's names. Secrets never appear in `Debug` output.

use std::{fmt, path::PathBuf, time::Duration};

use anyhow::{Context, Result, bail};
use serde::Deserialize;

/// A value that must never be logged.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"***\"")
    }
}

/// Default time between two polls of Neutron.
pub const DEFAULT_POLL_SECS: f64 = 2.0;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NeutronConfig {
    /// A cloud of clouds.yaml; excludes the inline credentials.
    pub cloud: Option<String>,
    pub auth_url: Option<String>,
    pub application_credential_id: Option<String>,
    pub application_credential_secret: Option<Secret>,
    pub username: Option<String>,
    pub password: Option<Secret>,
    pub project_name: Option<String>,
    pub user_domain_name: Option<String>,
    pub project_domain_name: Option<String>,
    pub region_name: Option<String>,
    /// Which catalog endpoint of Neutron: public, internal or admin.
    pub interface: Option<String>,
    /// CA bundle (PEM) for Keystone's and Neutron's certificates.
    pub cacert: Option<PathBuf>,
    /// Seconds between two polls.
    #[serde(default = "default_poll")]
    pub poll_interval: f64,
}

fn default_poll() -> f64 {
    DEFAULT_POLL_SECS
}

/// Where the OpenStack tools look for clouds.yaml, in order.
pub fn clouds_yaml_candidates() -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Some(p) = std::env::var_os("OS_CLIENT_CONFIG_FILE") {
        out.push(PathBuf::from(p));
    }
    out.push(PathBuf::from("clouds.yaml"));
    if let Some(home) = std::env::var_os("HOME") {
        out.push(PathBuf::from(home).join(".config/openstack/clouds.yaml"));
    }
    out.push(PathBuf::from("/etc/openstack/clouds.yaml"));
    out
}

impl NeutronConfig {
    pub fn poll_interval(&self) -> Duration {
        Duration::from_secs_f64(self.poll_interval)
    }

    /// Checks what can be checked without the network.
    pub fn check(&self) -> Result<()> {
        if !(self.poll_interval.is_finite() && (0.1..=3600.0).contains(&self.poll_interval)) {
            bail!("[neutron] poll_interval must be between 0.1 and 3600 seconds, not {}", self.poll_interval);
        }
        let inline = self.auth_url.is_some()
            || self.application_credential_id.is_some()
            || self.application_credential_secret.is_some()
            || self.username.is_some()
            || self.password.is_some();
        match (&self.cloud, inline) {
            (Some(_), true) => bail!("[neutron] has both `cloud` and inline credentials; use one"),
            (None, false) => bail!("[neutron] needs `cloud = \"NAME\"` (clouds.yaml) or `auth_url` with credentials"),
            (Some(_), false) => Ok(()),
            (None, true) => {
                if self.auth_url.is_none() {
                    bail!("[neutron] inline credentials need `auth_url`");
                }
                match (&self.application_credential_id, &self.application_credential_secret, &self.username, &self.password) {
                    (Some(_), Some(_), None, None) => Ok(()),
                    (None, None, Some(_), Some(_)) if self.project_name.is_some() => Ok(()),
                    (None, None, Some(_), Some(_)) => bail!("[neutron] password login needs `project_name`: a token without a project sees no routers in Neutron"),
                    _ => bail!("[neutron] give either application_credential_id and application_credential_secret, or username and password"),
                }
            }
        }
    }

    /// The cloud as osauth takes it: from clouds.yaml, or from the inline keys.
    pub fn cloud_config(&self) -> Result<osauth::CloudConfig> {
        self.check()?;
        let mut value = match &self.cloud {
            Some(name) => cloud_from_yaml(name)?,
            None => self.inline(),
        };
        // Explicit settings win over the cloud's.
        if let Some(map) = value.as_mapping_mut() {
            for (key, v) in [("region_name", &self.region_name), ("interface", &self.interface)] {
                if let Some(v) = v {
                    map.insert(key.into(), v.clone().into());
                }
            }
            if let Some(c) = &self.cacert {
                map.insert("cacert".into(), c.display().to_string().into());
            }
        }
        serde_yaml::from_value(value).context("[neutron]: the cloud's settings are not understood")
    }

    fn inline(&self) -> serde_yaml::Value {
        let mut auth = serde_yaml::Mapping::new();
        let mut put = |k: &str, v: Option<&str>| {
            if let Some(v) = v {
                auth.insert(k.into(), v.into());
            }
        };
        put("auth_url", self.auth_url.as_deref());
        put("application_credential_id", self.application_credential_id.as_deref());
        put("application_credential_secret", self.application_credential_secret.as_ref().map(Secret::expose));
        put("username", self.username.as_deref());
        put("password", self.password.as_ref().map(Secret::expose));
        put("project_name", self.project_name.as_deref());
        put("user_domain_name", Some(self.user_domain_name.as_deref().unwrap_or("Default")));
        put("project_domain_name", Some(self.project_domain_name.as_deref().unwrap_or("Default")));
        let mut cloud = serde_yaml::Mapping::new();
        let auth_type = if self.application_credential_id.is_some() { "v3applicationcredential" } else { "password" };
        cloud.insert("auth_type".into(), auth_type.into());
        cloud.insert("auth".into(), auth.into());
        cloud.into()
    }
}

/// The cloud `name` of the first clouds.yaml found.
fn cloud_from_yaml(name: &str) -> Result<serde_yaml::Value> {
    let candidates = clouds_yaml_candidates();
    let Some(path) = candidates.iter().find(|p| p.is_file()) else {
        let tried: Vec<String> = candidates.iter().map(|p| p.display().to_string()).collect();
        bail!("[neutron] cloud {name:?}: no clouds.yaml (looked at {})", tried.join(", "));
    };
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let all: serde_yaml::Value = serde_yaml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    let mut cloud = all
        .get("clouds")
        .and_then(|c| c.get(name))
        .cloned()
        .with_context(|| format!("{} has no cloud {name:?}", path.display()))?;
    // keystoneauth's application credential type is spelt two ways.
    if let Some(map) = cloud.as_mapping_mut()
        && map.get("auth_type").and_then(|t| t.as_str()) == Some("application_credential")
    {
        map.insert("auth_type".into(), "v3applicationcredential".into());
    }
    Ok(cloud)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> NeutronConfig {
        toml::from_str(text).unwrap()
    }

    #[test]
    fn secrets_never_show_in_debug_output() {
        let c = parse("auth_url = \"http://k/v3\"\napplication_credential_id = \"id\"\napplication_credential_secret = \"s3cr3t\"\n");
        let text = format!("{c:?}");
        assert!(!text.contains("s3cr3t"), "{text}");
        let c = parse("auth_url = \"http://k/v3\"\nusername = \"u\"\npassword = \"hunter2\"\nproject_name = \"p\"\n");
        assert!(!format!("{c:?}").contains("hunter2"));
        assert_eq!(c.poll_interval(), Duration::from_secs(2));
    }

    #[test]
    fn exactly_one_way_to_log_in() {
        for bad in [
            "",
            "cloud = \"c\"\nauth_url = \"http://k/v3\"\n",
            "auth_url = \"http://k/v3\"\n",
            "auth_url = \"http://k/v3\"\nusername = \"u\"\npassword = \"p\"\n",
            "auth_url = \"http://k/v3\"\napplication_credential_id = \"i\"\n",
            "auth_url = \"http://k/v3\"\napplication_credential_id = \"i\"\napplication_credential_secret = \"s\"\nusername = \"u\"\n",
            "username = \"u\"\npassword = \"p\"\nproject_name = \"x\"\n",
            "cloud = \"c\"\npoll_interval = 0\n",
        ] {
            assert!(parse(bad).check().is_err(), "{bad:?}");
        }
        assert!(toml::from_str::<NeutronConfig>("cloud = \"c\"\nsecret = \"x\"\n").is_err(), "unknown keys are refused");
        assert!(parse("cloud = \"c\"\npoll_interval = 0.5\n").check().is_ok());
    }

    #[test]
    fn inline_credentials_become_an_osauth_cloud() {
        let c = parse("auth_url = \"http://k/v3\"\napplication_credential_id = \"i\"\napplication_credential_secret = \"s\"\nregion_name = \"RegionOne\"\ninterface = \"internal\"\n");
        let cloud = c.cloud_config().unwrap();
        let v = serde_yaml::to_value(&cloud).unwrap();
        assert_eq!(v["auth_type"].as_str(), Some("v3applicationcredential"));
        assert_eq!(v["auth"]["application_credential_secret"].as_str(), Some("s"));
        assert_eq!(v["region_name"].as_str(), Some("RegionOne"));
        assert_eq!(v["interface"].as_str(), Some("internal"));
    }
}
