//! Integration tests: authorization matrix and the admin observer.
