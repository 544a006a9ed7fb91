#!/usr/bin/env python3
"""Change-stream conformance with pymongo, an independent driver: event shapes, resumption
(resumeAfter, startAfter, startAtOperationTime), automatic resume after resumable errors and
closed connections, history loss (286), drop + invalidate, pre-images, change events over
the 16 MiB limit (BSONObjectTooLarge) and $changeStreamSplitLargeEvent.

Usage: conformance.py [URI] [--backend sim|secantus|mongod] [--sim-oplog-size N]
The URI defaults to $TEST_MONGODB_URI. Scenarios a backend cannot do are skipped with a
printed reason; the exit status is non-zero if any scenario fails.
"""

import argparse
import os
import sys
import time
import traceback
import uuid

import pymongo
import bson
from bson import Timestamp
from pymongo.errors import OperationFailure, PyMongoError

WAIT_S = 15.0


class Skip(Exception):
    """Raised by a scenario the backend cannot run; the message is the reason."""


def next_event(cs, timeout=WAIT_S):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ev = cs.try_next()
        if ev is not None:
            return ev
        if not cs.alive:
            raise AssertionError("stream closed while waiting for an event")
    raise AssertionError("no event within %.0fs" % timeout)


def ids(cs, n):
    return [next_event(cs)["documentKey"]["_id"] for _ in range(n)]


def expect(cond, msg):
    if not cond:
        raise AssertionError(msg)


class Ctx:
    def __init__(self, client, backend, oplog_size):
        self.client = client
        self.backend = backend
        self.oplog_size = oplog_size

    def db(self, name):
        d = self.client["py_%s_%s" % (name, uuid.uuid4().hex[:8])]
        return d

    def need_failpoints(self):
        if self.backend == "secantus":
            raise Skip("SecantusDB has no configureFailPoint")
        if self.backend == "mongod" and os.environ.get("TEST_MONGODB_FAILPOINTS") != "1":
            raise Skip("fail points on a real server need TEST_MONGODB_FAILPOINTS=1 (enableTestCommands)")

    def fail(self, mode, data):
        self.client.admin.command({"configureFailPoint": "failCommand", "mode": mode, "data": data})


def scenario_event_shapes(ctx):
    db = ctx.db("shapes")
    db.create_collection("orders")
    coll = db.orders
    with coll.watch(full_document="updateLookup") as cs:
        coll.insert_one({"_id": 1, "status": "new", "items": [1], "gone": True})
        coll.update_one({"_id": 1}, {"$set": {"status": "paid"}, "$unset": {"gone": ""}, "$push": {"items": 2}})
        coll.replace_one({"_id": 1}, {"status": "replaced"})
        coll.delete_one({"_id": 1})
        evs = [next_event(cs) for _ in range(4)]
    ns = {"db": db.name, "coll": "orders"}
    for ev, op in zip(evs, ["insert", "update", "replace", "delete"]):
        expect(ev["operationType"] == op, "operationType %r != %r" % (ev["operationType"], op))
        expect(ev["ns"] == ns, "ns %r" % ev["ns"])
        expect(ev["documentKey"] == {"_id": 1}, "documentKey %r" % ev["documentKey"])
        expect(isinstance(ev["clusterTime"], Timestamp), "clusterTime %r" % ev["clusterTime"])
        expect("wallTime" in ev, "wallTime missing")
        data = ev["_id"]["_data"]
        expect(isinstance(data, str) and all(c in "0123456789abcdefABCDEF" for c in data), "_data %r" % data)
    ins, upd, rep, dele = evs
    expect(ins["fullDocument"] == {"_id": 1, "status": "new", "items": [1], "gone": True}, "insert fullDocument %r" % ins["fullDocument"])
    desc = upd["updateDescription"]
    expect(desc["updatedFields"] == {"status": "paid", "items.1": 2}, "updatedFields %r" % desc["updatedFields"])
    expect(desc["removedFields"] == ["gone"], "removedFields %r" % desc["removedFields"])
    expect(desc["truncatedArrays"] == [], "truncatedArrays %r" % desc["truncatedArrays"])
    expect("fullDocument" in upd, "updateLookup must set fullDocument (document or null)")
    expect(rep["fullDocument"] == {"_id": 1, "status": "replaced"}, "replace fullDocument %r" % rep["fullDocument"])
    expect(dele.get("fullDocument") is None, "delete has no fullDocument")
    if ctx.backend != "secantus":
        tokens = [e["_id"]["_data"] for e in evs]
        expect(tokens == sorted(tokens), "tokens must sort in commit order: %r" % tokens)


def scenario_resume_options(ctx):
    db = ctx.db("resume")
    db.create_collection("c")
    coll = db.c
    with coll.watch() as cs:
        for i in range(1, 5):
            coll.insert_one({"_id": i})
        first = next_event(cs)
        second = next_event(cs)
    with coll.watch(resume_after=first["_id"]) as r, coll.watch(start_after=first["_id"]) as s, coll.watch(
        start_at_operation_time=second["clusterTime"]
    ) as a:
        for name, stream in (("resumeAfter", r), ("startAfter", s), ("startAtOperationTime", a)):
            got = ids(stream, 3)
            expect(got == [2, 3, 4], "%s gave %r" % (name, got))
        coll.insert_one({"_id": 5})
        for name, stream in (("resumeAfter", r), ("startAfter", s), ("startAtOperationTime", a)):
            got = ids(stream, 1)
            expect(got == [5], "%s after new write gave %r" % (name, got))


def scenario_idle_token_advances(ctx):
    db = ctx.db("idle")
    db.create_collection("c")
    with db.c.watch(max_await_time_ms=200) as cs:
        t0 = cs.resume_token
        db.other.insert_one({"x": 1})
        expect(cs.try_next() is None, "no event expected")
        expect(cs.try_next() is None, "no event expected")
        t1 = cs.resume_token
    expect(t1 is not None, "postBatchResumeToken on empty batches")
    if ctx.backend == "sim":
        expect(t1["_data"] > t0["_data"], "high-water mark must advance: %r -> %r" % (t0, t1))
    db.c.insert_one({"_id": 7})
    with db.c.watch(resume_after=t1) as r:
        expect(ids(r, 1) == [7], "resume from the high-water mark")


def assert_no_more(cs):
    ev = cs.try_next()
    expect(ev is None, "unexpected extra event %r" % ev)


def scenario_resumable_error(ctx):
    ctx.need_failpoints()
    db = ctx.db("resumable")
    db.create_collection("c")
    with db.c.watch() as cs:
        db.c.insert_one({"_id": 1})
        expect(ids(cs, 1) == [1], "first event")
        ctx.fail({"times": 1}, {"failCommands": ["getMore"], "errorCode": 6, "errorLabels": ["ResumableChangeStreamError"]})
        db.c.insert_one({"_id": 2})
        db.c.insert_one({"_id": 3})
        got = ids(cs, 2)
        expect(got == [2, 3], "after a resumable error got %r" % got)
        assert_no_more(cs)


def scenario_closed_connection(ctx):
    ctx.need_failpoints()
    db = ctx.db("closed")
    db.create_collection("c")
    with db.c.watch() as cs:
        db.c.insert_one({"_id": 1})
        expect(ids(cs, 1) == [1], "first event")
        ctx.fail({"times": 1}, {"failCommands": ["getMore"], "closeConnection": True})
        db.c.insert_one({"_id": 2})
        got = ids(cs, 1)
        expect(got == [2], "after a closed connection got %r" % got)
        assert_no_more(cs)


def scenario_non_resumable_error(ctx):
    ctx.need_failpoints()
    db = ctx.db("nonresumable")
    db.create_collection("c")
    with db.c.watch() as cs:
        ctx.fail({"times": 1}, {"failCommands": ["getMore"], "errorCode": 2})
        db.c.insert_one({"_id": 1})
        try:
            next_event(cs)
        except OperationFailure as e:
            expect(e.code == 2, "code %r" % e.code)
            return
        raise AssertionError("a non-resumable error must surface")


def scenario_history_lost(ctx):
    if ctx.backend != "sim":
        raise Skip("cannot shrink the oplog of this backend")
    db = ctx.db("history")
    with db.c.watch() as cs:
        db.c.insert_one({"_id": 0})
        first = next_event(cs)
    db.c.insert_many([{"_id": i} for i in range(1, ctx.oplog_size + 10)])
    try:
        with db.c.watch(resume_after=first["_id"]) as r:
            r.try_next()
    except OperationFailure as e:
        expect(e.code == 286, "code %r" % e.code)
        expect("may no longer be in the oplog" in str(e), "message %s" % e)
        return
    raise AssertionError("resuming from a lost token must fail with 286")


def scenario_drop_invalidate(ctx):
    db = ctx.db("drop")
    db.c.insert_one({"_id": 1})
    with db.c.watch() as cs:
        db.c.drop()
        d = next_event(cs)
        inv = next_event(cs)
    expect(d["operationType"] == "drop", "first %r" % d["operationType"])
    expect(d["ns"] == {"db": db.name, "coll": "c"}, "ns %r" % d["ns"])
    expect(inv["operationType"] == "invalidate", "second %r" % inv["operationType"])
    with db.c.watch(start_after=inv["_id"]) as again:
        db.c.insert_one({"_id": 2})
        expect(ids(again, 1) == [2], "startAfter an invalidate")


def scenario_pre_images(ctx):
    db = ctx.db("pre")
    db.create_collection("w", changeStreamPreAndPostImages={"enabled": True})
    db.w.insert_one({"_id": 1, "v": "old"})
    with db.w.watch(full_document_before_change="whenAvailable", full_document="whenAvailable") as cs:
        db.w.update_one({"_id": 1}, {"$set": {"v": "new"}})
        db.w.delete_one({"_id": 1})
        upd = next_event(cs)
        dele = next_event(cs)
    expect(upd["fullDocumentBeforeChange"] == {"_id": 1, "v": "old"}, "update pre-image %r" % upd.get("fullDocumentBeforeChange"))
    expect(dele["fullDocumentBeforeChange"] == {"_id": 1, "v": "new"}, "delete pre-image %r" % dele.get("fullDocumentBeforeChange"))
    if ctx.backend == "secantus":
        print("  note: SecantusDB returns null for fullDocument: whenAvailable (post-image); not checked there")
    else:
        expect(upd["fullDocument"] == {"_id": 1, "v": "new"}, "post-image %r" % upd.get("fullDocument"))


MIB = 1024 * 1024
SPLIT = {"$changeStreamSplitLargeEvent": {}}


def insert_large(coll):
    coll.insert_one({"_id": 1, "customer": "ana", "lines": "a" * (10 * MIB)})


def update_large(coll):
    """Replaces the 10 MiB order's lines with 9 MiB (an 18 MiB event with updateLookup),
    then writes a small marker order."""
    coll.update_one({"_id": 1}, {"$set": {"lines": "b" * (9 * MIB)}})
    coll.insert_one({"_id": 2, "customer": "bo"})


def seed_large(coll):
    """All the writes; returns a resume token from before them."""
    with coll.watch() as cs:
        start = cs.resume_token
    insert_large(coll)
    update_large(coll)
    return start


def scenario_oversize_event_limit(ctx):
    db = ctx.db("oversize")
    db.create_collection("orders")
    coll = db.orders
    # The insert is read before the update is written: a failed batch returns none of the
    # events before the oversized one.
    with coll.watch(full_document="updateLookup") as cs:
        insert_large(coll)
        ins = next_event(cs)
        expect(ins["operationType"] == "insert", "first %r" % ins["operationType"])
        update_large(coll)
        try:
            ev = next_event(cs)
        except OperationFailure as e:
            expect(e.code == 10334, "code %r: %s" % (e.code, e))
            expect("BSONObj size: " in str(e) and "16793600" in str(e), "message %s" % e)
            expect(not e.has_error_label("ResumableChangeStreamError"), "must not be resumable")
        else:
            size = len(bson.encode(ev))
            if ctx.backend == "secantus":
                raise Skip("SecantusDB delivered a %d-byte change event: it does not enforce the 16 MiB limit" % size)
            raise AssertionError("an %d-byte %s event was delivered" % (size, ev["operationType"]))
    # Resuming from the last event received meets it again, now in the aggregate.
    try:
        with coll.watch(full_document="updateLookup", resume_after=ins["_id"]) as r:
            next_event(r)
    except OperationFailure as e:
        expect(e.code == 10334, "resumed: code %r" % e.code)
    else:
        raise AssertionError("resuming before the oversized event must fail again")
    # The limit applies after the stream's stages: without fullDocument the update fits.
    with coll.watch([{"$project": {"fullDocument": 0}}], full_document="updateLookup", resume_after=ins["_id"]) as r:
        upd = next_event(r)
        expect(upd["operationType"] == "update", "projected %r" % upd["operationType"])
        expect(len(upd["updateDescription"]["updatedFields"]["lines"]) == 9 * MIB, "updatedFields")
        expect(next_event(r)["documentKey"] == {"_id": 2}, "then the marker")


def split_stream(ctx, coll, token, **kw):
    """A split-stage stream, or Skip where the backend refuses the stage."""
    try:
        cs = coll.watch([SPLIT], full_document="updateLookup", resume_after=token, **kw)
    except OperationFailure as e:
        if ctx.backend == "secantus":
            raise Skip("SecantusDB refuses $changeStreamSplitLargeEvent: %s (code %s)" % (e, e.code))
        raise
    return cs


def scenario_split_large_event(ctx):
    db = ctx.db("split")
    db.create_collection("orders")
    coll = db.orders
    start = seed_large(coll)
    with split_stream(ctx, coll, start) as cs:
        ins = next_event(cs)
        if ctx.backend == "secantus" and ins.get("splitEvent") == {"fragment": 1, "of": 1}:
            raise Skip("SecantusDB marks every event, even a small one, splitEvent {fragment: 1, of: 1} "
                       "and gives all fragments of an event the same _id (mongod: small events unchanged, one token per fragment)")
        expect(ins["operationType"] == "insert" and "splitEvent" not in ins, "an event that fits passes unchanged")
        first = next_event(cs)
        if "splitEvent" not in first:
            raise AssertionError("the 18 MiB update was not split")
        of = first["splitEvent"]["of"]
        frags = [first] + [next_event(cs) for _ in range(of - 1)]
        marker = next_event(cs)
    expect(of == 2, "fragments %r" % of)
    whole = {}
    for i, f in enumerate(frags):
        expect(f["splitEvent"] == {"fragment": i + 1, "of": of}, "splitEvent %r" % f["splitEvent"])
        expect(list(f)[:2] == ["_id", "splitEvent"], "fragment starts %r" % list(f)[:2])
        expect(len(bson.encode(f)) <= 16 * MIB + 8 * 1024, "fragment size")
        for k, v in list(f.items())[2:]:
            expect(k not in whole, "%s in two fragments" % k)
            whole[k] = v
    stored = coll.find_one({"_id": 1})
    expect(whole["operationType"] == "update" and whole["documentKey"] == {"_id": 1}, "reassembled %r" % whole.get("operationType"))
    expect(whole["fullDocument"] == stored, "reassembled fullDocument")
    expect(whole["updateDescription"]["updatedFields"]["lines"] == stored["lines"], "reassembled updatedFields")
    expect(marker["documentKey"] == {"_id": 2} and "splitEvent" not in marker, "then the marker")
    # Resuming from a fragment's token continues with the next fragment.
    with split_stream(ctx, coll, frags[0]["_id"]) as r:
        expect(next_event(r)["splitEvent"] == {"fragment": 2, "of": 2}, "resumed from fragment 1")
    with split_stream(ctx, coll, frags[-1]["_id"]) as r:
        expect(next_event(r)["documentKey"] == {"_id": 2}, "resumed from the last fragment")
    try:
        with coll.watch(full_document="updateLookup", resume_after=frags[0]["_id"]) as r:
            next_event(r)
    except OperationFailure as e:
        expect(e.code == 280, "fragment token without the split stage: code %r" % e.code)
    else:
        raise AssertionError("a fragment token without the split stage must fail")


def scenario_split_stage_placement(ctx):
    db = ctx.db("splitplace")
    db.create_collection("c")
    try:
        db.c.watch([SPLIT]).close()
    except OperationFailure as e:
        if ctx.backend == "secantus":
            raise Skip("SecantusDB refuses $changeStreamSplitLargeEvent: %s (code %s)" % (e, e.code))
        raise
    for pipeline in ([SPLIT, {"$project": {"x": 1}}], [SPLIT, SPLIT]):
        try:
            db.c.watch(pipeline).close()
        except OperationFailure as e:
            expect(e.code == 7182802, "code %r for %r" % (e.code, pipeline))
        else:
            if ctx.backend == "secantus":
                raise Skip("SecantusDB accepts $changeStreamSplitLargeEvent before other stages (mongod: 7182802)")
            raise AssertionError("the split stage must be last: %r" % pipeline)
    try:
        list(db.c.aggregate([SPLIT]))
    except OperationFailure as e:
        expect(e.code == 20, "outside a change stream: code %r" % e.code)
    else:
        raise AssertionError("the split stage outside a change stream must fail")


SCENARIOS = [
    scenario_event_shapes,
    scenario_resume_options,
    scenario_idle_token_advances,
    scenario_resumable_error,
    scenario_closed_connection,
    scenario_non_resumable_error,
    scenario_history_lost,
    scenario_drop_invalidate,
    scenario_pre_images,
    scenario_oversize_event_limit,
    scenario_split_large_event,
    scenario_split_stage_placement,
]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("uri", nargs="?", default=os.environ.get("TEST_MONGODB_URI"))
    ap.add_argument("--backend", choices=["sim", "secantus", "mongod"], default="sim")
    ap.add_argument("--sim-oplog-size", type=int, default=64, help="the --oplog-size mongo-sim was started with")
    args = ap.parse_args()
    if not args.uri:
        ap.error("give a URI or set TEST_MONGODB_URI")
    client = pymongo.MongoClient(args.uri, serverSelectionTimeoutMS=10000, appname="mongo-sim-conformance")
    client.admin.command("ping")
    ctx = Ctx(client, args.backend, args.sim_oplog_size)
    failed = passed = skipped = 0
    print("pymongo %s against %s (%s)" % (pymongo.version, args.backend, args.uri))
    for sc in SCENARIOS:
        name = sc.__name__[len("scenario_"):]
        try:
            sc(ctx)
            passed += 1
            print("PASS %s" % name)
        except Skip as s:
            skipped += 1
            print("SKIP %s: %s" % (name, s))
        except (AssertionError, PyMongoError) as e:
            failed += 1
            print("FAIL %s: %s" % (name, e))
            traceback.print_exc()
        finally:
            try:
                client.admin.command({"configureFailPoint": "failCommand", "mode": "off"})
            except PyMongoError:
                pass
    print("conformance: %d passed, %d failed, %d skipped" % (passed, failed, skipped))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
