//! Real Keystone and neutron-server on loopback, from the pinned releases in
//! the venv `cargo xtask setup` makes: Keystone issues fernet tokens,
//! Neutron validates every token against it (keystonemiddleware) and keeps
//! routers and conntrack helpers in SQLite. Each test run gets its own
//! state directory and ports; the servers are stopped by PID on drop.
//!
//! The bootstrapped Keystone database and the empty Neutron schema are
//! built once (`peers/openstack/template.sh`) and copied per run.

use std::{
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::{Value, json};

use crate::{Process, neutron::VENV, peers_dir, unique};

const ADMIN_PASSWORD: &str = "admin-secret";
const TEMPLATE: &str = "/var/cache/enforcer/openstack-template-k30.0.0-n29.0.0";

/// Keystone and Neutron of one test.
pub struct OpenStack {
    pub dir: PathBuf,
    pub keystone_url: String,
    pub neutron_url: String,
    /// Ids and secrets the seed made (see `peers/openstack/seed.py`).
    pub seed: Value,
    neutron_port: u16,
    keystone: Option<Process>,
    neutron: Option<Process>,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("a free port")
}

fn venv_python() -> PathBuf {
    let python = Path::new(VENV).join("bin/python");
    assert!(python.exists(), "{} is missing: run `cargo xtask setup`", python.display());
    python
}

/// Builds the template once per machine; concurrent tests wait on a lock.
fn template() -> PathBuf {
    let dir = PathBuf::from(TEMPLATE);
    std::fs::create_dir_all(dir.parent().unwrap()).unwrap();
    let lock = std::fs::File::create(format!("{TEMPLATE}.lock")).unwrap();
    let _held = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive).expect("template lock");
    if !dir.join("neutron.db").exists() {
        let out = Command::new(peers_dir().join("openstack/template.sh"))
            .arg(VENV)
            .arg(&dir)
            .arg(ADMIN_PASSWORD)
            .output()
            .expect("template.sh");
        assert!(out.status.success(), "building the OpenStack template failed:\n{}", String::from_utf8_lossy(&out.stderr));
    }
    dir
}

fn wait_http(what: &str, url: &str, process: &mut Process, log: &Path) {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        if ureq::get(url).timeout(Duration::from_secs(2)).call().is_ok() {
            return;
        }
        if let Ok(Some(status)) = process.child.try_wait() {
            panic!("{what} exited ({status}):\n{}", std::fs::read_to_string(log).unwrap_or_default());
        }
        assert!(Instant::now() < deadline, "{what} did not answer on {url}:\n{}", std::fs::read_to_string(log).unwrap_or_default());
        std::thread::sleep(Duration::from_millis(100));
    }
}

impl OpenStack {
    /// The password of every seeded user but admin.
    pub const USER_PASSWORD: &str = "user-secret";

    /// Starts both servers and seeds Keystone. `token_expiration`: the
    /// lifetime of Keystone's tokens in seconds.
    pub fn start(token_expiration: u64) -> Self {
        crate::require_root();
        let template = template();
        let dir = std::env::temp_dir().join(unique("os"));
        std::fs::create_dir_all(&dir).unwrap();
        crate::run(Command::new("cp").arg("-a").arg(template.join("keystone")).arg(&dir));
        std::fs::copy(template.join("neutron.db"), dir.join("neutron.db")).unwrap();
        std::fs::create_dir_all(dir.join("lock")).unwrap();
        let (keystone_port, neutron_port) = (free_port(), free_port());
        let keystone_url = format!("http://127.0.0.1:{keystone_port}");
        let neutron_url = format!("http://127.0.0.1:{neutron_port}");
        let ks = dir.join("keystone");
        std::fs::write(
            ks.join("keystone.conf"),
            format!(
                "[database]\nconnection = sqlite:///{ks}/keystone.db\n[token]\nexpiration = {token_expiration}\n\
                 [fernet_tokens]\nkey_repository = {ks}/fernet-keys\n[fernet_receipts]\nkey_repository = {ks}/fernet-keys\n\
                 [credential]\nkey_repository = {ks}/credential-keys\n[identity]\npassword_hash_rounds = 4\n\
                 [cache]\nenabled = true\nbackend = dogpile.cache.memory\n",
                ks = ks.display()
            ),
        )
        .unwrap();
        std::fs::write(
            dir.join("neutron.conf"),
            format!(
                "[DEFAULT]\ncore_plugin = ml2\nservice_plugins = router,conntrack_helper\nauth_strategy = keystone\n\
                 transport_url = fake:/\nstate_path = {d}\napi_paste_config = {VENV}/etc/neutron/api-paste.ini\n\
                 notify_nova_on_port_status_changes = false\nnotify_nova_on_port_data_changes = false\n\
                 [keystone_authtoken]\nwww_authenticate_uri = {keystone_url}\nauth_url = {keystone_url}\nauth_type = password\n\
                 username = neutron\npassword = {password}\nuser_domain_id = default\nproject_name = service\n\
                 project_domain_id = default\nregion_name = RegionOne\ninterface = public\n\
                 # every request is validated: a revoked token fails at once\ntoken_cache_time = -1\n\
                 [database]\nconnection = sqlite:///{d}/neutron.db\n[oslo_concurrency]\nlock_path = {d}/lock\n\
                 [ml2]\ntype_drivers = local,flat\nproject_network_types = local\nmechanism_drivers =\nextension_drivers =\n",
                d = dir.display(),
                password = Self::USER_PASSWORD
            ),
        )
        .unwrap();
        let mut keystone = Self::serve("keystone", &dir, keystone_port, &ks.join("keystone.conf"));
        let mut os = Self {
            dir: dir.clone(),
            keystone_url: keystone_url.clone(),
            neutron_url: neutron_url.clone(),
            seed: Value::Null,
            neutron_port,
            keystone: None,
            neutron: None,
        };
        // Neutron talks to Keystone only on its first request: both load at once.
        os.start_neutron();
        wait_http("keystone", &format!("{keystone_url}/v3"), &mut keystone, &dir.join("keystone.log"));
        os.keystone = Some(keystone);
        let out = Command::new("python3")
            .arg(peers_dir().join("openstack/seed.py"))
            .args([&keystone_url, &neutron_url, ADMIN_PASSWORD, Self::USER_PASSWORD])
            .arg(&dir)
            .output()
            .expect("seed.py");
        assert!(out.status.success(), "seeding Keystone failed:\n{}", String::from_utf8_lossy(&out.stderr));
        os.seed = serde_json::from_str(&std::fs::read_to_string(dir.join("seed.json")).unwrap()).unwrap();
        os.wait_neutron();
        os
    }

    fn serve(what: &str, dir: &Path, port: u16, conf: &Path) -> Process {
        let log = std::fs::File::create(dir.join(format!("{what}.log"))).unwrap();
        Process::spawn(
            what,
            Command::new(venv_python())
                .args(["-W", "ignore"])
                .arg(peers_dir().join("openstack/serve.py"))
                .args([what, "127.0.0.1", &port.to_string()])
                .arg(conf)
                .env("PYTHONWARNINGS", "ignore")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log),
        )
    }

    /// Starts neutron-server (again) on its port, with the same database.
    pub fn start_neutron(&mut self) {
        assert!(self.neutron.is_none(), "neutron is already running");
        self.neutron = Some(Self::serve("neutron", &self.dir, self.neutron_port, &self.dir.join("neutron.conf")));
        if !self.seed.is_null() {
            self.wait_neutron();
        }
    }

    /// Waits until Neutron answers an authenticated request (the first one
    /// also warms up its token validation and policy engine).
    fn wait_neutron(&mut self) {
        let url = self.neutron_url.clone();
        let log = self.dir.join("neutron.log");
        wait_http("neutron", &format!("{url}/"), self.neutron.as_mut().unwrap(), &log);
        let token = self.token("admin");
        let r = ureq::get(&format!("{url}/v2.0/routers?fields=id")).set("X-Auth-Token", &token).call();
        assert!(r.is_ok(), "first authenticated Neutron request failed: {r:?}\n{}", std::fs::read_to_string(&log).unwrap_or_default());
    }

    /// Stops neutron-server (by PID); Keystone stays up.
    pub fn stop_neutron(&mut self) {
        self.neutron = None;
    }

    /// The clouds.yaml the seed wrote (clouds `admin`, `u1`, `u2`,
    /// `ctdaemon` with a password, `enforcer` with an application credential).
    pub fn clouds_yaml(&self) -> PathBuf {
        self.dir.join("clouds.yaml")
    }

    /// A project-scoped token: `admin`, `u1` (project p1) or `u2` (p2).
    pub fn token(&self, who: &str) -> String {
        let (user, password, project) = match who {
            "admin" => ("admin", ADMIN_PASSWORD, "admin"),
            "u1" => ("u1", Self::USER_PASSWORD, "p1"),
            "u2" => ("u2", Self::USER_PASSWORD, "p2"),
            other => panic!("no such test user {other}"),
        };
        let body = json!({"auth": {
            "identity": {"methods": ["password"], "password": {"user": {"name": user, "domain": {"id": "default"}, "password": password}}},
            "scope": {"project": {"name": project, "domain": {"id": "default"}}}}});
        let r = ureq::post(&format!("{}/v3/auth/tokens", self.keystone_url)).send_json(body).expect("keystone login");
        r.header("X-Subject-Token").expect("X-Subject-Token").to_string()
    }

    /// A Neutron API call as `who`; returns (status, body).
    pub fn neutron(&self, who: &str, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        self.neutron_with(&self.token(who), method, path, body)
    }

    /// A Neutron API call with `token` (see [`OpenStack::token`]).
    pub fn neutron_with(&self, token: &str, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let req = ureq::request(method, &format!("{}/v2.0{path}", self.neutron_url)).set("X-Auth-Token", token);
        let result = match body {
            Some(b) => req.send_json(b),
            None => req.call(),
        };
        let response = match result {
            Ok(r) => r,
            Err(ureq::Error::Status(_, r)) => r,
            Err(e) => panic!("{method} {path}: {e}"),
        };
        let status = response.status();
        let text = response.into_string().unwrap_or_default();
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    /// Creates a router as `who`; returns its id.
    pub fn create_router(&self, who: &str, name: &str) -> String {
        let (status, body) = self.neutron(who, "POST", "/routers", Some(json!({"router": {"name": name}})));
        assert_eq!(status, 201, "creating router {name}: {body}");
        body["router"]["id"].as_str().unwrap().to_string()
    }

    /// Creates a conntrack helper on a router as `who`; returns its id.
    pub fn create_helper(&self, who: &str, router: &str, protocol: &str, port: u16, helper: &str) -> String {
        let (status, body) = self.neutron(
            who,
            "POST",
            &format!("/routers/{router}/conntrack_helpers"),
            Some(json!({"conntrack_helper": {"protocol": protocol, "port": port, "helper": helper}})),
        );
        assert_eq!(status, 201, "creating helper {helper} on {router}: {body}");
        body["conntrack_helper"]["id"].as_str().unwrap().to_string()
    }

    /// Deletes the daemon's application credential, as its owner would.
    pub fn delete_daemon_credential(&self) {
        let body = json!({"auth": {
            "identity": {"methods": ["password"], "password": {"user": {"name": "ctdaemon", "domain": {"id": "default"}, "password": Self::USER_PASSWORD}}},
            "scope": {"project": {"name": "service", "domain": {"id": "default"}}}}});
        let r = ureq::post(&format!("{}/v3/auth/tokens", self.keystone_url)).send_json(body).expect("ctdaemon login");
        let token = r.header("X-Subject-Token").expect("token").to_string();
        let d = &self.seed["ctdaemon"];
        let url = format!("{}/v3/users/{}/application_credentials/{}", self.keystone_url, d["user_id"].as_str().unwrap(), d["app_cred_id"].as_str().unwrap());
        ureq::delete(&url).set("X-Auth-Token", &token).call().expect("deleting the application credential");
    }

    /// Logins Keystone has answered so far (from its access log).
    pub fn logins(&self) -> usize {
        let log = std::fs::read_to_string(self.dir.join("keystone.log")).unwrap_or_default();
        log.lines().filter(|l| l.contains("\"POST /v3/auth/tokens") && l.contains("\" 201 ")).count()
    }

    /// Deletes a resource as `who`, expecting success.
    pub fn delete(&self, who: &str, path: &str) {
        let (status, body) = self.neutron(who, "DELETE", path, None);
        assert_eq!(status, 204, "DELETE {path}: {body}");
    }

    /// Writes a daemon configuration that follows this Neutron through the
    /// cloud `cloud` of the seed's clouds.yaml (found by the daemon through
    /// `OS_CLIENT_CONFIG_FILE`, see [`OpenStack::daemon_env`]).
    /// `top`: more top-level settings.
    pub fn daemon_config(&self, cloud: &str, poll_interval: f64, top: &str) -> PathBuf {
        let path = self.dir.join(format!("enforcer-{cloud}.toml"));
        std::fs::write(&path, format!("{top}\n[neutron]\ncloud = \"{cloud}\"\npoll_interval = {poll_interval:?}\n")).unwrap();
        path
    }

    /// The environment that points a daemon at the seed's clouds.yaml.
    pub fn daemon_env(&self) -> (&'static str, String) {
        ("OS_CLIENT_CONFIG_FILE", self.clouds_yaml().display().to_string())
    }
}

impl Drop for OpenStack {
    fn drop(&mut self) {
        self.neutron = None;
        self.keystone = None;
        if std::thread::panicking() {
            for log in ["keystone.log", "neutron.log"] {
                let text = std::fs::read_to_string(self.dir.join(log)).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(30).collect();
                eprintln!("--- {log} (last lines) ---\n{}", tail.into_iter().rev().collect::<Vec<_>>().join("\n"));
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
