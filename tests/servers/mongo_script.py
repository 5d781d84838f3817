"""A scripted MongoDB wire-protocol server (mockupdb, MongoDB's driver-test server) on
127.0.0.1:PORT, for what a data server cannot be made to do on demand:
- shop.kinds: one document with every BSON type the mapping names;
- shop.slow: answers after maxTimeMS with MaxTimeMSExpired (50), as a server does, and writes
  the maxTimeMS it was given to DIR/max_time_ms;
- shop.broken: a command error (2, BadValue);
- saslStart: AuthenticationFailed (18), so any password is wrong.
The hello reply carries the fields the Rust driver needs (shared/TEST-SERVERS.md §4)."""
import datetime, sys, time
from bson import Binary, Decimal128, Int64, ObjectId, Regex, Timestamp
from mockupdb import MockupDB

PORT, DIR = int(sys.argv[1]), sys.argv[2]
KINDS = {"_id": ObjectId("6b1414bdfa6b4d4a1dafdd4b"), "i32": 7, "i64": Int64(9007199254740993), "f": 1.5,
         "s": "héllo", "b": True, "n": None, "dec": Decimal128("12345678901234567890.0123"),
         "bin": Binary(b"\x00\xff\x10"), "at": datetime.datetime(2026, 3, 4, 5, 6, 7, 123000),
         "doc": {"x": [1, {"y": "z"}]}, "re": Regex("^a", "i"), "ts": Timestamp(1, 2)}
HELLO = {"ismaster": True, "isWritablePrimary": True, "helloOk": True, "minWireVersion": 0,
         "maxWireVersion": 21, "maxBsonObjectSize": 16777216, "maxMessageSizeBytes": 48000000,
         "maxWriteBatchSize": 100000, "logicalSessionTimeoutMinutes": 30, "connectionId": 1}

def cursor(req, db, coll, docs):
    return req.ok(cursor={"id": Int64(0), "ns": f"{db}.{coll}", "firstBatch": docs})

def handle(req):
    name = (req.command_name or "").lower()
    db = req.doc.get("$db", "shop")
    if name in ("hello", "ismaster"):
        return req.ok(dict(HELLO, localTime=datetime.datetime.now(datetime.timezone.utc)))
    if name in ("ping", "endsessions", "killcursors", "buildinfo"):
        return req.ok()
    if name in ("saslstart", "authenticate"):
        return req.command_err(18, "Authentication failed.")
    if name in ("find", "aggregate"):
        coll = req.doc[name]
        if coll == "slow":
            max_time = req.doc.get("maxTimeMS")
            open(f"{DIR}/max_time_ms", "w").write(str(max_time))
            time.sleep((max_time or 30000) / 1000)
            return req.command_err(50, "operation exceeded time limit")
        if coll == "broken":
            return req.command_err(2, "unknown operator: $bogus")
        return cursor(req, db, coll, [KINDS] if coll == "kinds" else [])
    return req.command_err(59, f"no such command: {name}")

server = MockupDB(port=PORT)
server.autoresponds(handle)
server.run()
print("ready", flush=True)
try:
    while True:
        time.sleep(3600)
finally:
    server.stop()
