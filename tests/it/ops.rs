//! Integration tests: metrics, readiness, SIGTERM lifecycle and log hygiene.
