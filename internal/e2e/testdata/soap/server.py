"""A SOAP 1.1 order service (spyne) for the meshlet e2e tests.

Usage: server.py PORT

Serves the service and its WSDL (GET /?wsdl) on 127.0.0.1:PORT, prints
"ready" once listening, and exits when its stdin closes. PlaceOrder is not
idempotent: it counts its executions per key, and for the first `times`
executions of a key it loses its answer the way `fail` says:

  fault  a SOAP Fault (HTTP 500) whose faultstring names the order
  reset  the body was read and the order run, then the connection is
         reset (TCP RST) without a byte of response

GET /_counts (not SOAP; the test reads it directly, not through the mesh)
answers {"posts": n, "calls": {key: n}, "via": [...]}: POSTs received,
executions per key, and the Via header of every request.
"""

import json
import socket
import struct
import sys
import threading
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from spyne import Application, Fault, Integer, ServiceBase, Unicode, rpc
from spyne.protocol.soap import Soap11
from spyne.server.wsgi import WsgiApplication

TNS = "urn:meshlet:e2e:orders"

lock = threading.Lock()
state = {"posts": 0, "calls": {}, "via": []}
# reset is set by PlaceOrder in the thread serving the request: the
# response is then dropped and the connection reset instead of closed.
local = threading.local()


class OrderService(ServiceBase):
    @rpc(Unicode, Unicode, Unicode, Integer, _returns=Integer)
    def PlaceOrder(ctx, key, item, fail, times):
        with lock:
            n = state["calls"].get(key, 0) + 1
            state["calls"][key] = n
        if fail and n <= (times or 1):
            if fail == "fault":
                raise Fault(faultcode="Server.OutOfStock", faultstring="order %s: %s is out of stock" % (key, item))
            if fail == "reset":
                local.reset = True
        return n


soap = WsgiApplication(Application([OrderService], tns=TNS, name="Orders",
                                   in_protocol=Soap11(validator="lxml"), out_protocol=Soap11()))


def app(environ, start_response):
    if environ.get("PATH_INFO") == "/_counts":
        with lock:
            body = json.dumps(state).encode()
        start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
        return [body]
    with lock:
        state["via"].append(environ.get("HTTP_VIA", ""))
        if environ["REQUEST_METHOD"] == "POST":
            state["posts"] += 1
    return soap(environ, start_response)


class Gate:
    """The handler's output, dropped after a reset was asked for."""

    def __init__(self, w):
        self.w = w

    def write(self, b):
        if getattr(local, "reset", False):
            return len(b)
        return self.w.write(b)

    def flush(self):
        if not getattr(local, "reset", False):
            self.w.flush()

    def __getattr__(self, name):
        return getattr(self.w, name)


class Handler(WSGIRequestHandler):
    def setup(self):
        super().setup()
        self.wfile = Gate(self.wfile)

    def log_message(self, *args):
        pass


class Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True

    def shutdown_request(self, request):
        if getattr(local, "reset", False):
            local.reset = False
            # SO_LINGER 0: close sends RST, not FIN.
            request.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            request.close()
            return
        super().shutdown_request(request)


def main():
    httpd = make_server("127.0.0.1", int(sys.argv[1]), app, server_class=Server, handler_class=Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    print("ready", flush=True)
    sys.stdin.read()  # until the test closes our stdin
    httpd.shutdown()
    httpd.server_close()


if __name__ == "__main__":
    main()
