"""A zeep SOAP client for the meshlet e2e tests.

Usage: client.py WSDL_URL CALLS_JSON

Loads the WSDL from WSDL_URL, then calls PlaceOrder once per element of
CALLS_JSON, a list of {"key", "item", "fail", "times", "idempotencyKey"},
printing one JSON line per call:

  {"result": n, ...}                      the order ran; n is its execution count
  {"fault": {"code", "message"}, ...}     a SOAP Fault
  {"transportError": "...", ...}          an HTTP answer that is no SOAP
  {"connectionError": "...", ...}         no HTTP answer

Every line also carries "status" and "reason" (x-meshlet-reason) of the
HTTP response. The first line is {"address": ...}, the service address
the WSDL names.
"""

import json
import sys

import requests
import zeep
import zeep.exceptions
from zeep.transports import Transport


def main():
    wsdl, calls = sys.argv[1], json.loads(sys.argv[2])
    session = requests.Session()
    last = {}

    def record(resp, *args, **kwargs):
        last["status"] = resp.status_code
        last["reason"] = resp.headers.get("x-meshlet-reason", "")

    session.hooks["response"].append(record)
    client = zeep.Client(wsdl, transport=Transport(session=session, timeout=10))
    print(json.dumps({"address": client.service._binding_options["address"]}), flush=True)
    for call in calls:
        last.clear()
        session.headers.pop("Idempotency-Key", None)
        if call.get("idempotencyKey"):
            session.headers["Idempotency-Key"] = call["idempotencyKey"]
        out = {}
        try:
            out["result"] = client.service.PlaceOrder(call["key"], call["item"], call.get("fail", ""), call.get("times", 1))
        except zeep.exceptions.Fault as f:
            out["fault"] = {"code": f.code, "message": f.message}
        except zeep.exceptions.TransportError as e:
            out["transportError"] = "%s %s" % (e.status_code, e.message)
        except requests.exceptions.RequestException as e:
            out["connectionError"] = str(e)
        out.update(last)
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
