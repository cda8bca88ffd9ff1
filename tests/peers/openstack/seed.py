"""Seeds a freshly started test Keystone through its API (stdlib only).

Creates, in domain "default": project "service" with user "neutron" (role
service: enough for keystonemiddleware to validate tokens); the "network"
service with its endpoints; tenants p1 and p2 with members u1 and u2; the
daemon's user "ctdaemon" (admin on "service") with an application
credential. Writes the ids and secrets to OUT_DIR/seed.json and the clouds
to OUT_DIR/clouds.yaml.

Usage: seed.py KEYSTONE_URL NEUTRON_URL ADMIN_PASSWORD USER_PASSWORD OUT_DIR
"""
import json
import os
import sys
import urllib.error
import urllib.request

keystone, neutron, admin_password, password, out_dir = sys.argv[1:6]
v3 = keystone.rstrip("/") + "/v3"


def call(method, path, body=None, token=None):
    req = urllib.request.Request(v3 + path, method=method,
                                 data=json.dumps(body).encode() if body is not None else None)
    req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("X-Auth-Token", token)
    try:
        with urllib.request.urlopen(req) as r:
            text, headers = r.read(), r.headers
    except urllib.error.HTTPError as e:
        sys.exit("%s %s: %d %s" % (method, path, e.code, e.read()[:300]))
    return headers, (json.loads(text) if text else None)


def login(user, secret, project):
    headers, body = call("POST", "/auth/tokens", {"auth": {
        "identity": {"methods": ["password"], "password": {"user": {
            "name": user, "domain": {"id": "default"}, "password": secret}}},
        "scope": {"project": {"name": project, "domain": {"id": "default"}}}}})
    return headers["X-Subject-Token"], body["token"]


admin, admin_body = login("admin", admin_password, "admin")
roles = {r["name"]: r["id"] for r in call("GET", "/roles", token=admin)[1]["roles"]}

# The template was bootstrapped before this run's port was known.
identity = {s["id"] for s in call("GET", "/services?type=identity", token=admin)[1]["services"]}
for ep in call("GET", "/endpoints", token=admin)[1]["endpoints"]:
    if ep["service_id"] in identity:
        call("PATCH", "/endpoints/" + ep["id"], {"endpoint": {"url": v3}}, admin)


def project(name):
    return call("POST", "/projects", {"project": {"name": name, "domain_id": "default"}}, admin)[1]["project"]["id"]


def user(name):
    return call("POST", "/users", {"user": {"name": name, "domain_id": "default", "password": password}}, admin)[1]["user"]["id"]


def grant(project_id, user_id, role):
    call("PUT", "/projects/%s/users/%s/roles/%s" % (project_id, user_id, roles[role]), token=admin)


seed = {"auth_url": v3, "neutron_url": neutron, "admin_project_id": admin_body["project"]["id"]}
service = project("service")
grant(service, user("neutron"), "service")
network = call("POST", "/services", {"service": {"type": "network", "name": "neutron"}}, admin)[1]["service"]["id"]
for interface in ("public", "internal", "admin"):
    call("POST", "/endpoints", {"endpoint": {"service_id": network, "interface": interface,
                                             "url": neutron, "region_id": "RegionOne"}}, admin)
for p, u in (("p1", "u1"), ("p2", "u2")):
    pid, uid = project(p), user(u)
    grant(pid, uid, "member")
    seed[u] = {"project": p, "project_id": pid, "user_id": uid}
ctdaemon = user("ctdaemon")
grant(service, ctdaemon, "admin")
token, _ = login("ctdaemon", password, "service")
ac = call("POST", "/users/%s/application_credentials" % ctdaemon, {"application_credential": {
    "name": "enforcer", "roles": [{"name": "admin"}]}}, token)[1]["application_credential"]
seed["ctdaemon"] = {"user_id": ctdaemon, "project_id": service,
                    "app_cred_id": ac["id"], "app_cred_secret": ac["secret"]}

with open(os.path.join(out_dir, "seed.json"), "w") as f:
    json.dump(seed, f, indent=1)


def password_cloud(user, project):
    return ("    auth:\n      auth_url: %s\n      username: %s\n      password: %s\n"
            "      project_name: %s\n      user_domain_name: Default\n      project_domain_name: Default\n"
            % (v3, user, password if user != "admin" else admin_password, project))


clouds = {
    "admin": password_cloud("admin", "admin"),
    "u1": password_cloud("u1", "p1"),
    "u2": password_cloud("u2", "p2"),
    "ctdaemon": password_cloud("ctdaemon", "service"),
    "enforcer": "    auth_type: v3applicationcredential\n    auth:\n      auth_url: %s\n"
                "      application_credential_id: %s\n      application_credential_secret: %s\n"
                % (v3, ac["id"], ac["secret"]),
}
with open(os.path.join(out_dir, "clouds.yaml"), "w") as f:
    f.write("clouds:\n")
    for name, body in clouds.items():
        f.write("  %s:\n    region_name: RegionOne\n    interface: public\n"
                "    identity_api_version: 3\n%s" % (name, body))
