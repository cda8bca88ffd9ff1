#!/usr/bin/env bash
# Builds, once, what every test run copies: a bootstrapped Keystone database
# with its key repositories, and an empty Neutron schema. Each keystone-manage
# call costs seconds of imports, so this is cached (about 20 s).
# Usage: template.sh VENV DIR ADMIN_PASSWORD
set -euo pipefail
venv=$1 dir=$2 admin_password=$3
here=$(cd "$(dirname "$0")" && pwd)
rm -rf "$dir.tmp" && mkdir -p "$dir.tmp/keystone"
cat > "$dir.tmp/keystone/keystone.conf" <<CONF
[database]
connection = sqlite:///$dir.tmp/keystone/keystone.db
[fernet_tokens]
key_repository = $dir.tmp/keystone/fernet-keys
[fernet_receipts]
# its default is /etc/keystone/fernet-keys: keep everything in the template
key_repository = $dir.tmp/keystone/fernet-keys
[credential]
key_repository = $dir.tmp/keystone/credential-keys
[identity]
# bcrypt cost 4: a login takes ~20 ms instead of ~500 ms
password_hash_rounds = 4
CONF
km=("$venv/bin/keystone-manage" --config-file "$dir.tmp/keystone/keystone.conf")
{
  "${km[@]}" db_sync
  "${km[@]}" fernet_setup --keystone-user root --keystone-group root
  "${km[@]}" credential_setup --keystone-user root --keystone-group root
  # The real port is only known per run; seed.py moves the endpoints there.
  "${km[@]}" bootstrap --bootstrap-password "$admin_password" --bootstrap-username admin \
    --bootstrap-project-name admin --bootstrap-role-name admin --bootstrap-service-name keystone \
    --bootstrap-region-id RegionOne --bootstrap-admin-url http://127.0.0.1:1/v3 \
    --bootstrap-internal-url http://127.0.0.1:1/v3 --bootstrap-public-url http://127.0.0.1:1/v3
  "$venv/bin/python" "$here/schema.py" "sqlite:///$dir.tmp/neutron.db"
} > "$dir.tmp/build.log" 2>&1 || { tail -30 "$dir.tmp/build.log" >&2; exit 1; }
rm -f "$dir.tmp/keystone/keystone.conf"
rm -rf "$dir" && mv "$dir.tmp" "$dir"
