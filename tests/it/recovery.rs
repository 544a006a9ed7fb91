//! Integration tests: reconnect recovery: history, second process, oplog replay, resync.
