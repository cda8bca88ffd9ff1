"""Serves Keystone's or Neutron's WSGI application on loopback for the tests.

Neither ships a standalone server any more (production runs them under
uwsgi or mod_wsgi); the stdlib's threaded wsgiref server is enough here.
Both keep their state in SQLite, which fails under concurrent writers, so
requests run one at a time.

Usage: serve.py keystone|neutron HOST PORT CONFIG_FILE
"""
import os
import socketserver
import sys
import threading
from wsgiref import simple_server

service, host, port, conf = sys.argv[1], sys.argv[2], int(sys.argv[3]), os.path.abspath(sys.argv[4])

if service == "keystone":
    os.environ["OS_KEYSTONE_CONFIG_DIR"] = os.path.dirname(conf)
    os.environ["OS_KEYSTONE_CONFIG_FILES"] = os.path.basename(conf)
    sys.argv = ["keystone-api"]
    from keystone.server import wsgi

    app = wsgi.initialize_public_application()
elif service == "neutron":
    sys.argv = ["neutron-api", "--config-file", conf]
    from neutron.wsgi import api

    app = api.application
else:
    sys.exit("unknown service %r" % service)

lock = threading.Lock()


def serialized(environ, start_response):
    with lock:
        result = app(environ, start_response)
        try:
            return [b"".join(result)]
        finally:
            if hasattr(result, "close"):
                result.close()


class Server(socketserver.ThreadingMixIn, simple_server.WSGIServer):
    daemon_threads = True
    allow_reuse_address = True


class Handler(simple_server.WSGIRequestHandler):
    def log_message(self, fmt, *args):
        sys.stderr.write("access: %s\n" % (fmt % args))


httpd = simple_server.make_server(host, port, serialized, server_class=Server, handler_class=Handler)
sys.stderr.write("%s listening on http://%s:%d\n" % (service, host, port))
sys.stderr.flush()
httpd.serve_forever()
