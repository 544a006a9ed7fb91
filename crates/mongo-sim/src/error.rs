//! Command errors shaped as mongod shapes them (`ok: 0`, `errmsg`, `code`, `codeName`, `errorLabels`).

use bson::{doc, Document};

/// A failed command, sent back as an `{ok: 0}` reply.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct CmdError {
    /// mongod's numeric error code.
    pub(crate) code: i32,
    /// Human-readable message; names the unsupported thing when that is the cause.
    pub(crate) msg: String,
    /// Labels such as `ResumableChangeStreamError`.
    pub(crate) labels: Vec<String>,
}

/// Shorthand for command results.
pub(crate) type CmdResult<T = Document> = Result<T, CmdError>;

impl CmdError {
    /// An error with a code and message.
    pub(crate) fn new(code: i32, msg: impl Into<String>) -> Self {
        Self {
            code,
            msg: msg.into(),
            labels: Vec::new(),
        }
    }

    /// `BadValue` (2).
    pub(crate) fn bad_value(msg: impl Into<String>) -> Self {
        Self::new(2, msg)
    }

    /// Something mongod supports but this simulator does not: `BadValue` naming it, so the
    /// caller learns immediately instead of getting a silently wrong answer.
    pub(crate) fn unsupported(what: impl std::fmt::Display) -> Self {
        Self::new(2, format!("mongo-sim does not support {what}"))
    }

    /// `TypeMismatch` (14).
    pub(crate) fn type_mismatch(msg: impl Into<String>) -> Self {
        Self::new(14, msg)
    }

    /// `FailedToParse` (9).
    pub(crate) fn failed_to_parse(msg: impl Into<String>) -> Self {
        Self::new(9, msg)
    }

    /// IDL's error for an unknown field in a command (40415).
    pub(crate) fn unknown_field(cmd: &str, field: &str) -> Self {
        Self::new(
            40415,
            format!("BSON field '{cmd}.{field}' is an unknown field."),
        )
    }

    /// Prefixes the message as mongod does for an error raised while a cursor produced its
    /// results (`"Executor error during getMore :: caused by :: …"`).
    pub(crate) fn context(mut self, what: &str) -> Self {
        self.msg = format!("{what} :: caused by :: {}", self.msg);
        self
    }

    /// The error document (without cluster time, which the server adds).
    pub(crate) fn to_doc(&self) -> Document {
        let mut d = doc! {
            "ok": 0.0,
            "errmsg": self.msg.clone(),
            "code": self.code,
            "codeName": code_name(self.code),
        };
        if !self.labels.is_empty() {
            d.insert("errorLabels", self.labels.clone());
        }
        d
    }
}

/// The `codeName` mongod gives a code.
pub(crate) fn code_name(code: i32) -> &'static str {
    match code {
        1 => "InternalError",
        2 => "BadValue",
        6 => "HostUnreachable",
        7 => "HostNotFound",
        9 => "FailedToParse",
        11 => "UserNotFound",
        13 => "Unauthorized",
        14 => "TypeMismatch",
        20 => "IllegalOperation",
        26 => "NamespaceNotFound",
        28 => "PathNotViable",
        43 => "CursorNotFound",
        47 => "NoMatchingDocument",
        48 => "NamespaceExists",
        50 => "MaxTimeMSExpired",
        52 => "DollarPrefixedFieldName",
        59 => "CommandNotFound",
        66 => "ImmutableField",
        72 => "InvalidOptions",
        73 => "InvalidNamespace",
        89 => "NetworkTimeout",
        91 => "ShutdownInProgress",
        96 => "OperationFailed",
        112 => "WriteConflict",
        115 => "CommandNotSupported",
        133 => "FailedToSatisfyReadPreference",
        168 => "InvalidPipelineOperator",
        189 => "PrimarySteppedDown",
        234 => "RetryChangeStream",
        251 => "NoSuchTransaction",
        260 => "InvalidResumeToken",
        262 => "ExceededTimeLimit",
        280 => "ChangeStreamFatalError",
        286 => "ChangeStreamHistoryLost",
        352 => "UnsupportedOpQueryCommand",
        9001 => "SocketException",
        10334 => "BSONObjectTooLarge",
        17419 => "Location17419",
        10107 => "NotWritablePrimary",
        11000 => "DuplicateKey",
        11600 => "InterruptedAtShutdown",
        11602 => "InterruptedDueToReplStateChange",
        13435 => "NotPrimaryNoSecondaryOk",
        13436 => "NotPrimaryOrSecondary",
        31253 | 31254 => "Location31254",
        40324 => "Location40324",
        40415 => "Location40415",
        7182500 => "Location7182500",
        7182502 => "Location7182502",
        7182800 => "Location7182800",
        7182802 => "Location7182802",
        _ => "UnknownError",
    }
}

/// Codes the change-streams spec treats as resumable; mongod labels getMore errors with them
/// `ResumableChangeStreamError`.
pub(crate) fn is_resumable_change_stream_code(code: i32) -> bool {
    matches!(
        code,
        6 | 7
            | 43
            | 63
            | 89
            | 91
            | 133
            | 150
            | 189
            | 234
            | 262
            | 9001
            | 10107
            | 11600
            | 11602
            | 13388
            | 13435
            | 13436
    )
}

/// Codes for which mongod labels a failed retryable write `RetryableWriteError`.
pub(crate) fn is_retryable_write_code(code: i32) -> bool {
    matches!(
        code,
        6 | 7 | 89 | 91 | 189 | 262 | 9001 | 10107 | 11600 | 11602 | 13435 | 13436
    )
}
