//! The `failCommand` fail point as the driver specifications use it: which commands fail, how
//! (error, closed connection, delay) and how often.

use bson::{Bson, Document};

use crate::error::{CmdError, CmdResult};
use crate::query::as_f64;

/// A configured `failCommand`.
#[derive(Debug, Clone)]
pub(crate) struct FailPoint {
    /// Remaining activations; `None` = `alwaysOn`.
    remaining: Option<u64>,
    commands: Vec<String>,
    error_code: Option<i32>,
    error_labels: Option<Vec<String>>,
    close_connection: bool,
    block_ms: Option<u64>,
    app_name: Option<String>,
    write_concern_error: Option<Document>,
}

/// What a triggered fail point does to one command.
#[derive(Debug, Clone, Default)]
pub(crate) struct Triggered {
    /// Sleep this long before anything else.
    pub(crate) block_ms: Option<u64>,
    /// Close the connection without replying.
    pub(crate) close: bool,
    /// Reply with this error (labels `None` = let the server add its usual labels).
    pub(crate) error: Option<(i32, Option<Vec<String>>)>,
    /// Run the command, then attach this `writeConcernError`.
    pub(crate) write_concern_error: Option<Document>,
}

fn num(v: &Bson) -> Option<f64> {
    as_f64(v)
}

/// Parses `configureFailPoint`; `Ok(None)` for mode `off`.
pub(crate) fn parse(cmd: &Document) -> CmdResult<Option<FailPoint>> {
    let name = cmd.get_str("configureFailPoint").unwrap_or_default();
    if name != "failCommand" {
        return Err(CmdError::unsupported(format!(
            "the fail point '{name}' (only 'failCommand' exists in mongo-sim)"
        )));
    }
    let remaining = match cmd.get("mode") {
        Some(Bson::String(s)) if s == "off" => return Ok(None),
        Some(Bson::String(s)) if s == "alwaysOn" => None,
        Some(Bson::Document(m)) => {
            if let Some(t) = m.get("times") {
                match num(t) {
                    Some(n) if n >= 0.0 => {
                        if n == 0.0 {
                            return Ok(None);
                        }
                        Some(n as u64)
                    }
                    _ => return Err(CmdError::bad_value("'times' must be a non-negative number")),
                }
            } else {
                let key = m.keys().next().cloned().unwrap_or_default();
                return Err(CmdError::unsupported(format!(
                    "the fail point mode '{key}'"
                )));
            }
        }
        _ => {
            return Err(CmdError::bad_value(
                "missing or invalid 'mode' for configureFailPoint",
            ))
        }
    };
    let data = cmd.get_document("data").cloned().unwrap_or_default();
    let mut fp = FailPoint {
        remaining,
        commands: Vec::new(),
        error_code: None,
        error_labels: None,
        close_connection: false,
        block_ms: None,
        app_name: None,
        write_concern_error: None,
    };
    let mut block = false;
    for (k, v) in &data {
        match k.as_str() {
            "failCommands" => {
                let Bson::Array(a) = v else {
                    return Err(CmdError::bad_value(
                        "'failCommands' must be an array of command names",
                    ));
                };
                fp.commands = a
                    .iter()
                    .filter_map(|c| c.as_str().map(str::to_owned))
                    .collect();
            }
            "errorCode" => fp.error_code = num(v).map(|n| n as i32),
            "errorLabels" => {
                let Bson::Array(a) = v else {
                    return Err(CmdError::bad_value(
                        "'errorLabels' must be an array of strings",
                    ));
                };
                fp.error_labels = Some(
                    a.iter()
                        .filter_map(|c| c.as_str().map(str::to_owned))
                        .collect(),
                );
            }
            "closeConnection" => fp.close_connection = matches!(v, Bson::Boolean(true)),
            "blockConnection" => block = matches!(v, Bson::Boolean(true)),
            "blockTimeMS" => fp.block_ms = num(v).map(|n| n.max(0.0) as u64),
            "appName" => fp.app_name = v.as_str().map(str::to_owned),
            "writeConcernError" => fp.write_concern_error = v.as_document().cloned(),
            "failInternalCommands" => {}
            other => {
                return Err(CmdError::unsupported(format!(
                    "the failCommand data field '{other}'"
                )))
            }
        }
    }
    if !block {
        fp.block_ms = None;
    } else if fp.block_ms.is_none() {
        return Err(CmdError::bad_value("blockConnection requires blockTimeMS"));
    }
    if fp.commands.is_empty() {
        return Err(CmdError::bad_value(
            "failCommand requires a non-empty 'failCommands'",
        ));
    }
    Ok(Some(fp))
}

impl FailPoint {
    /// Checks (and counts) an activation for command `cmd` from a client named `app`.
    /// Returns whether the fail point is now exhausted too.
    pub(crate) fn trigger(&mut self, cmd: &str, app: Option<&str>) -> (Option<Triggered>, bool) {
        if !self.commands.iter().any(|c| c == cmd) {
            return (None, false);
        }
        if let Some(want) = &self.app_name {
            if app != Some(want.as_str()) {
                return (None, false);
            }
        }
        let exhausted = match &mut self.remaining {
            Some(n) => {
                *n = n.saturating_sub(1);
                *n == 0
            }
            None => false,
        };
        let t = Triggered {
            block_ms: self.block_ms,
            close: self.close_connection,
            error: self.error_code.map(|c| (c, self.error_labels.clone())),
            write_concern_error: self.write_concern_error.clone(),
        };
        (Some(t), exhausted)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bson::doc;

    #[test]
    fn times_counts_down() {
        let mut fp = parse(&doc! {"configureFailPoint": "failCommand", "mode": {"times": 2}, "data": {"failCommands": ["getMore"], "errorCode": 6, "errorLabels": ["ResumableChangeStreamError"]}}).unwrap().unwrap();
        assert!(fp.trigger("find", None).0.is_none());
        let (t, done) = fp.trigger("getMore", None);
        assert_eq!(
            t.unwrap().error,
            Some((6, Some(vec!["ResumableChangeStreamError".to_string()])))
        );
        assert!(!done);
        assert!(fp.trigger("getMore", None).1);
    }

    #[test]
    fn off_and_unknown() {
        assert!(
            parse(&doc! {"configureFailPoint": "failCommand", "mode": "off"})
                .unwrap()
                .is_none()
        );
        assert!(parse(&doc! {"configureFailPoint": "other", "mode": "off"})
            .unwrap_err()
            .msg
            .contains("other"));
    }
}
