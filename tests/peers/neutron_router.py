"""Installs a Neutron L3 agent's iptables rules in a router namespace, with
Neutron's own code (RouterInfo and IptablesManager from the pinned neutron
release), the way the agent's router processing does, minus the device and
address plumbing that the test bed does itself.

Usage: neutron_router.py SPEC_JSON
SPEC: {"router_id", "internal": [{"id", "cidrs": [..], "scope"}],
       "gateway": {"id", "cidrs": [..], "scope"}, "floating_ips": [{"floating", "fixed"}]}
Device names follow Neutron: qr-/qg- plus the port id's first 11 characters.
Running it again re-applies everything, as an agent resync does.
"""

import json
import sys

# IptablesManager names its chains after the running program: be the agent.
sys.argv[0] = "neutron-l3-agent"

from oslo_config import cfg  # noqa: E402

from neutron import privileged  # noqa: E402
from neutron.agent.l3 import router_info  # noqa: E402
from neutron.agent.linux import interface  # noqa: E402
from neutron.conf.agent import common as agent_config  # noqa: E402
from neutron.conf.agent.l3 import config as l3_config  # noqa: E402


def port(p):
    fixed = []
    for cidr in p["cidrs"]:
        ip, prefix = cidr.split("/")
        fixed.append({"ip_address": ip, "prefixlen": int(prefix), "subnet_id": p["id"]})
    scopes = {}
    if p.get("scope"):
        scopes = {"4": p["scope"], "6": p["scope"]}
    return {"id": p["id"], "fixed_ips": fixed, "address_scopes": scopes, "subnets": []}


def main():
    spec = json.loads(sys.argv[1])
    l3_config.register_l3_agent_config_opts(l3_config.OPTS, cfg.CONF)
    agent_config.register_interface_opts(cfg.CONF)
    agent_config.register_agent_state_opts_helper(cfg.CONF)
    agent_config.register_root_helper(cfg.CONF)
    cfg.CONF([], project="neutron")
    # IptablesManager serializes applies with an external lock, as the agent.
    lock_path = spec.get("lock_path", "/tmp")
    cfg.CONF.set_override("lock_path", lock_path, "oslo_concurrency")
    # Root already: privileged calls run in this process, no privsep daemon.
    privileged.default.set_client_mode(False)

    gw = port(spec["gateway"])
    router = {
        "id": spec["router_id"],
        "gw_port": gw,
        "enable_snat": True,
        "_interfaces": [port(p) for p in spec["internal"]],
        "_floatingips": [
            {"floating_ip_address": f["floating"], "fixed_ip_address": f["fixed"], "fixed_ip_address_scope": f.get("scope")}
            for f in spec.get("floating_ips", [])
        ],
        "routes": [],
    }
    # The null interface driver plugs nothing: the test bed made the devices.
    driver = interface.NullDriver(cfg.CONF)
    ri = router_info.RouterInfo(None, spec["router_id"], router, cfg.CONF, driver, use_ipv6=True)
    gw_device = ri.get_external_device_name(gw["id"])
    # What RouterInfo.process() does for iptables: SNAT and gateway marks,
    # floating IP NAT, address scope marks and filters (metadata and scope
    # chains were set up by the constructor).
    with ri.iptables_manager.defer_apply():
        ri._handle_router_snat_rules(gw, gw_device)
        ri.process_floating_ip_nat_rules()
        ri.process_ports_address_scope_iptables()
        ri.process_floating_ip_address_scope_rules()
    print(json.dumps({"internal": [ri.get_internal_device_name(p["id"]) for p in spec["internal"]], "gateway": gw_device}))


if __name__ == "__main__":
    main()
