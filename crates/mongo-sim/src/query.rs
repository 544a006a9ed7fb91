//! The query engine: BSON ordering, dotted-path lookup and compiled filters; knows no storage.

use std::cmp::Ordering;

use bson::{Bson, Document};

use crate::error::{CmdError, CmdResult};

/// mongod's canonical type order for comparisons and sorting.
pub(crate) fn type_rank(b: &Bson) -> u8 {
    match b {
        Bson::MinKey => 1,
        Bson::Null | Bson::Undefined => 2,
        Bson::Int32(_) | Bson::Int64(_) | Bson::Double(_) | Bson::Decimal128(_) => 3,
        Bson::String(_) | Bson::Symbol(_) => 4,
        Bson::Document(_) => 5,
        Bson::Array(_) => 6,
        Bson::Binary(_) => 7,
        Bson::ObjectId(_) => 8,
        Bson::Boolean(_) => 9,
        Bson::DateTime(_) => 10,
        Bson::Timestamp(_) => 11,
        Bson::RegularExpression(_) => 12,
        Bson::DbPointer(_) => 13,
        Bson::JavaScriptCode(_) => 14,
        Bson::JavaScriptCodeWithScope(_) => 15,
        Bson::MaxKey => 100,
    }
}

/// The numeric value of a number, if it is one.
pub(crate) fn as_f64(b: &Bson) -> Option<f64> {
    match b {
        Bson::Int32(v) => Some(*v as f64),
        Bson::Int64(v) => Some(*v as f64),
        Bson::Double(v) => Some(*v),
        Bson::Decimal128(d) => d.to_string().parse().ok(),
        _ => None,
    }
}

fn as_i64(b: &Bson) -> Option<i64> {
    match b {
        Bson::Int32(v) => Some(*v as i64),
        Bson::Int64(v) => Some(*v),
        _ => None,
    }
}

/// Total order over BSON values, as mongod compares them.
pub(crate) fn cmp_bson(a: &Bson, b: &Bson) -> Ordering {
    let (ra, rb) = (type_rank(a), type_rank(b));
    if ra != rb {
        return ra.cmp(&rb);
    }
    match (a, b) {
        (Bson::String(x) | Bson::Symbol(x), Bson::String(y) | Bson::Symbol(y)) => x.cmp(y),
        (Bson::Document(x), Bson::Document(y)) => cmp_docs(x, y),
        (Bson::Array(x), Bson::Array(y)) => {
            for (p, q) in x.iter().zip(y.iter()) {
                let o = cmp_bson(p, q);
                if o != Ordering::Equal {
                    return o;
                }
            }
            x.len().cmp(&y.len())
        }
        (Bson::Binary(x), Bson::Binary(y)) => x
            .bytes
            .len()
            .cmp(&y.bytes.len())
            .then(u8::from(x.subtype).cmp(&u8::from(y.subtype)))
            .then(x.bytes.cmp(&y.bytes)),
        (Bson::ObjectId(x), Bson::ObjectId(y)) => x.bytes().cmp(&y.bytes()),
        (Bson::Boolean(x), Bson::Boolean(y)) => x.cmp(y),
        (Bson::DateTime(x), Bson::DateTime(y)) => x.cmp(y),
        (Bson::Timestamp(x), Bson::Timestamp(y)) => {
            (x.time, x.increment).cmp(&(y.time, y.increment))
        }
        (Bson::RegularExpression(x), Bson::RegularExpression(y)) => {
            x.pattern.cmp(&y.pattern).then(x.options.cmp(&y.options))
        }
        (Bson::JavaScriptCode(x), Bson::JavaScriptCode(y)) => x.cmp(y),
        _ => {
            if ra == 3 {
                if let (Some(x), Some(y)) = (as_i64(a), as_i64(b)) {
                    return x.cmp(&y);
                }
                let (x, y) = (as_f64(a).unwrap_or(f64::NAN), as_f64(b).unwrap_or(f64::NAN));
                // NaN sorts below every other number in mongod.
                return match (x.is_nan(), y.is_nan()) {
                    (true, true) => Ordering::Equal,
                    (true, false) => Ordering::Less,
                    (false, true) => Ordering::Greater,
                    _ => x.partial_cmp(&y).unwrap_or(Ordering::Equal),
                };
            }
            Ordering::Equal
        }
    }
}

fn cmp_docs(x: &Document, y: &Document) -> Ordering {
    let mut yi = y.iter();
    for (k, v) in x {
        let Some((k2, v2)) = yi.next() else {
            return Ordering::Greater;
        };
        let o = type_rank(v)
            .cmp(&type_rank(v2))
            .then_with(|| k.cmp(k2))
            .then_with(|| cmp_bson(v, v2));
        if o != Ordering::Equal {
            return o;
        }
    }
    if yi.next().is_some() {
        Ordering::Less
    } else {
        Ordering::Equal
    }
}

/// Equality as the query language means it (1 == 1.0; field order matters in documents).
pub(crate) fn bson_eq(a: &Bson, b: &Bson) -> bool {
    cmp_bson(a, b) == Ordering::Equal
}

/// Collects the values a dotted path reaches, descending through arrays of documents as
/// mongod does; `missing` is set when some branch does not have the field.
pub(crate) fn lookup<'a>(v: &'a Bson, parts: &[&str], out: &mut Vec<&'a Bson>) {
    let Some((first, rest)) = parts.split_first() else {
        out.push(v);
        return;
    };
    match v {
        Bson::Document(d) => {
            if let Some(next) = d.get(*first) {
                lookup(next, rest, out);
            }
        }
        Bson::Array(arr) => {
            if let Ok(i) = first.parse::<usize>() {
                if let Some(e) = arr.get(i) {
                    lookup(e, rest, out);
                }
            } else {
                for e in arr {
                    if matches!(e, Bson::Document(_)) {
                        lookup(e, parts, out);
                    }
                }
            }
        }
        _ => {}
    }
}

/// Values at `path` in `doc`.
pub(crate) fn values_at<'a>(doc: &'a Document, path: &str) -> Vec<&'a Bson> {
    let parts: Vec<&str> = path.split('.').collect();
    let mut out = Vec::new();
    let Some((first, rest)) = parts.split_first() else {
        return out;
    };
    if let Some(v) = doc.get(*first) {
        lookup(v, rest, &mut out);
    }
    out
}

/// The single value at a dotted path, without array traversal (for `_id` and updates).
pub(crate) fn get_path<'a>(doc: &'a Document, path: &str) -> Option<&'a Bson> {
    let mut parts = path.split('.');
    let mut cur = doc.get(parts.next()?)?;
    for p in parts {
        cur = match cur {
            Bson::Document(d) => d.get(p)?,
            Bson::Array(a) => a.get(p.parse::<usize>().ok()?)?,
            _ => return None,
        };
    }
    Some(cur)
}

/// A type selector of `$type`.
#[derive(Debug, Clone)]
enum TypeSel {
    Code(i32),
    Number,
}

fn type_code(b: &Bson) -> i32 {
    match b {
        Bson::Double(_) => 1,
        Bson::String(_) => 2,
        Bson::Document(_) => 3,
        Bson::Array(_) => 4,
        Bson::Binary(_) => 5,
        Bson::Undefined => 6,
        Bson::ObjectId(_) => 7,
        Bson::Boolean(_) => 8,
        Bson::DateTime(_) => 9,
        Bson::Null => 10,
        Bson::RegularExpression(_) => 11,
        Bson::DbPointer(_) => 12,
        Bson::JavaScriptCode(_) => 13,
        Bson::Symbol(_) => 14,
        Bson::JavaScriptCodeWithScope(_) => 15,
        Bson::Int32(_) => 16,
        Bson::Timestamp(_) => 17,
        Bson::Int64(_) => 18,
        Bson::Decimal128(_) => 19,
        Bson::MinKey => -1,
        Bson::MaxKey => 127,
    }
}

fn parse_type(v: &Bson) -> CmdResult<TypeSel> {
    let code = match v {
        Bson::String(s) => match s.as_str() {
            "number" => return Ok(TypeSel::Number),
            "double" => 1,
            "string" => 2,
            "object" => 3,
            "array" => 4,
            "binData" => 5,
            "undefined" => 6,
            "objectId" => 7,
            "bool" => 8,
            "date" => 9,
            "null" => 10,
            "regex" => 11,
            "dbPointer" => 12,
            "javascript" => 13,
            "symbol" => 14,
            "javascriptWithScope" => 15,
            "int" => 16,
            "timestamp" => 17,
            "long" => 18,
            "decimal" => 19,
            "minKey" => -1,
            "maxKey" => 127,
            other => {
                return Err(CmdError::bad_value(format!(
                    "Unknown type name alias: {other}"
                )))
            }
        },
        other => match as_f64(other) {
            Some(f) if f.fract() == 0.0 => f as i32,
            _ => {
                return Err(CmdError::type_mismatch(
                    "type must be represented as a number or a string",
                ))
            }
        },
    };
    Ok(TypeSel::Code(code))
}

/// A compiled predicate on the values at one path.
#[derive(Debug, Clone)]
pub(crate) enum Pred {
    /// `$eq` (and implicit equality).
    Eq(Bson),
    /// `$ne`.
    Ne(Bson),
    /// `$gt`, `$gte`, `$lt`, `$lte`: the operand and the orderings that satisfy it.
    Cmp(Bson, [bool; 3]),
    /// `$in`.
    In(Vec<Bson>),
    /// `$nin`.
    Nin(Vec<Bson>),
    /// `$exists`.
    Exists(bool),
    /// `$type`.
    Type(Vec<TypeSelPub>),
    /// `$size`.
    Size(i64),
    /// `$all`.
    All(Vec<Bson>),
    /// `$elemMatch` over documents.
    ElemMatchDoc(Box<Filter>),
    /// `$elemMatch` over scalars.
    ElemMatchValue(Box<Pred>),
    /// `$mod`.
    Mod(f64, f64),
    /// `$not`.
    Not(Box<Pred>),
    /// Several operators on one path.
    And(Vec<Pred>),
}

/// Opaque wrapper so `TypeSel` stays private.
#[derive(Debug, Clone)]
pub(crate) struct TypeSelPub(TypeSel);

/// A compiled filter document.
#[derive(Debug, Clone)]
pub(crate) enum Filter {
    /// All must match.
    And(Vec<Filter>),
    /// Any must match.
    Or(Vec<Filter>),
    /// None may match.
    Nor(Vec<Filter>),
    /// A predicate on a path.
    Field(String, Pred),
}

fn is_operator_doc(v: &Bson) -> bool {
    matches!(v, Bson::Document(d) if d.keys().next().is_some_and(|k| k.starts_with('$')))
}

fn check_no_regex(v: &Bson) -> CmdResult<()> {
    if matches!(v, Bson::RegularExpression(_)) {
        return Err(CmdError::unsupported("regular expressions in queries"));
    }
    Ok(())
}

impl Filter {
    /// Compiles a filter; unsupported operators fail here, even if no document would be tested.
    pub(crate) fn parse(doc: &Document) -> CmdResult<Filter> {
        let mut all = Vec::new();
        for (k, v) in doc {
            match k.as_str() {
                "$and" | "$or" | "$nor" => {
                    let Bson::Array(arr) = v else {
                        return Err(CmdError::bad_value(format!("{k} must be an array")));
                    };
                    if arr.is_empty() {
                        return Err(CmdError::bad_value(
                            "$and/$or/$nor must be a nonempty array",
                        ));
                    }
                    let mut subs = Vec::new();
                    for e in arr {
                        let Bson::Document(d) = e else {
                            return Err(CmdError::bad_value(format!(
                                "{k} argument's entries must be objects"
                            )));
                        };
                        subs.push(Filter::parse(d)?);
                    }
                    all.push(match k.as_str() {
                        "$and" => Filter::And(subs),
                        "$or" => Filter::Or(subs),
                        _ => Filter::Nor(subs),
                    });
                }
                "$comment" => {}
                "$expr" | "$where" | "$text" | "$jsonSchema" | "$alwaysTrue" | "$alwaysFalse" => {
                    return Err(CmdError::unsupported(format!("the query operator {k}")));
                }
                other if other.starts_with('$') => {
                    return Err(CmdError::bad_value(format!(
                        "unknown top level operator: {other}"
                    )));
                }
                path => all.push(Filter::Field(path.to_owned(), parse_value_pred(v)?)),
            }
        }
        Ok(Filter::And(all))
    }

    /// Whether `doc` matches.
    pub(crate) fn matches(&self, doc: &Document) -> bool {
        match self {
            Filter::And(fs) => fs.iter().all(|f| f.matches(doc)),
            Filter::Or(fs) => fs.iter().any(|f| f.matches(doc)),
            Filter::Nor(fs) => !fs.iter().any(|f| f.matches(doc)),
            Filter::Field(path, pred) => {
                let vals = values_at(doc, path);
                pred.test(&vals)
            }
        }
    }

    /// Top-level equality conditions, used to seed an upserted document.
    pub(crate) fn equalities(&self, out: &mut Vec<(String, Bson)>) {
        match self {
            Filter::And(fs) => fs.iter().for_each(|f| f.equalities(out)),
            Filter::Field(path, Pred::Eq(v)) => out.push((path.clone(), v.clone())),
            Filter::Field(path, Pred::And(ps)) => {
                for p in ps {
                    if let Pred::Eq(v) = p {
                        out.push((path.clone(), v.clone()));
                    }
                }
            }
            _ => {}
        }
    }

    /// `Some(_id)` when the filter is exactly `{_id: <scalar>}`, for the primary-key fast path.
    pub(crate) fn id_equality(&self) -> Option<&Bson> {
        match self {
            Filter::And(fs) if fs.len() == 1 => fs[0].id_equality(),
            Filter::Field(path, Pred::Eq(v))
                if path == "_id"
                    && !matches!(v, Bson::Array(_) | Bson::Null | Bson::Document(_)) =>
            {
                Some(v)
            }
            _ => None,
        }
    }
}

fn parse_value_pred(v: &Bson) -> CmdResult<Pred> {
    check_no_regex(v)?;
    if is_operator_doc(v) {
        let Bson::Document(d) = v else {
            return Err(CmdError::bad_value("expected operators"));
        };
        let mut preds = Vec::new();
        for (op, arg) in d {
            preds.push(parse_op(op, arg)?);
        }
        if preds.len() == 1 {
            return Ok(preds.remove(0));
        }
        Ok(Pred::And(preds))
    } else {
        Ok(Pred::Eq(v.clone()))
    }
}

fn parse_op(op: &str, arg: &Bson) -> CmdResult<Pred> {
    let arr = |arg: &Bson| -> CmdResult<Vec<Bson>> {
        match arg {
            Bson::Array(a) => {
                for e in a {
                    check_no_regex(e)?;
                }
                Ok(a.clone())
            }
            _ => Err(CmdError::bad_value(format!("{op} needs an array"))),
        }
    };
    Ok(match op {
        "$eq" => {
            check_no_regex(arg)?;
            Pred::Eq(arg.clone())
        }
        "$ne" => {
            check_no_regex(arg)?;
            Pred::Ne(arg.clone())
        }
        "$gt" => Pred::Cmp(arg.clone(), [false, false, true]),
        "$gte" => Pred::Cmp(arg.clone(), [false, true, true]),
        "$lt" => Pred::Cmp(arg.clone(), [true, false, false]),
        "$lte" => Pred::Cmp(arg.clone(), [true, true, false]),
        "$in" => Pred::In(arr(arg)?),
        "$nin" => Pred::Nin(arr(arg)?),
        "$exists" => Pred::Exists(match arg {
            Bson::Boolean(b) => *b,
            Bson::Null | Bson::Undefined => false,
            other => as_f64(other).is_none_or(|f| f != 0.0),
        }),
        "$type" => {
            let sels = match arg {
                Bson::Array(a) => a.iter().map(parse_type).collect::<CmdResult<Vec<_>>>()?,
                other => vec![parse_type(other)?],
            };
            Pred::Type(sels.into_iter().map(TypeSelPub).collect())
        }
        "$size" => match as_f64(arg) {
            Some(f) if f.fract() == 0.0 && f >= 0.0 => Pred::Size(f as i64),
            _ => {
                return Err(CmdError::bad_value(
                    "$size needs a non-negative whole number",
                ))
            }
        },
        "$all" => Pred::All(arr(arg)?),
        "$elemMatch" => {
            let Bson::Document(d) = arg else {
                return Err(CmdError::bad_value("$elemMatch needs an Object"));
            };
            if is_operator_doc(arg) && !d.keys().any(|k| k == "$and" || k == "$or" || k == "$nor") {
                Pred::ElemMatchValue(Box::new(parse_value_pred(arg)?))
            } else {
                Pred::ElemMatchDoc(Box::new(Filter::parse(d)?))
            }
        }
        "$mod" => match arg {
            Bson::Array(a) if a.len() == 2 => match (as_f64(&a[0]), as_f64(&a[1])) {
                (Some(d), Some(r)) if d != 0.0 => Pred::Mod(d.trunc(), r.trunc()),
                _ => {
                    return Err(CmdError::bad_value(
                        "malformed mod, divisor and remainder must be numbers, divisor not 0",
                    ))
                }
            },
            _ => {
                return Err(CmdError::bad_value(
                    "malformed mod, needs to be an array of 2 elements",
                ))
            }
        },
        "$not" => {
            if !is_operator_doc(arg) {
                if matches!(arg, Bson::RegularExpression(_)) {
                    return Err(CmdError::unsupported("regular expressions in queries"));
                }
                return Err(CmdError::bad_value("$not needs a regex or a document"));
            }
            Pred::Not(Box::new(parse_value_pred(arg)?))
        }
        "$regex" | "$options" | "$text" | "$geoWithin" | "$geoIntersects" | "$near"
        | "$nearSphere" | "$bitsAllSet" | "$bitsAnySet" | "$bitsAllClear" | "$bitsAnyClear"
        | "$jsonSchema" => {
            return Err(CmdError::unsupported(format!("the query operator {op}")));
        }
        other => return Err(CmdError::bad_value(format!("unknown operator: {other}"))),
    })
}

/// Applies `f` to each value and, for arrays, to each element (mongod's implicit array traversal).
fn any_value(vals: &[&Bson], f: &dyn Fn(&Bson) -> bool) -> bool {
    vals.iter().any(|v| {
        f(v) || match v {
            Bson::Array(a) => a.iter().any(f),
            _ => false,
        }
    })
}

impl Pred {
    /// Tests the values found at a path (empty = field missing).
    pub(crate) fn test(&self, vals: &[&Bson]) -> bool {
        match self {
            Pred::Eq(target) => {
                if matches!(target, Bson::Null)
                    && (vals.is_empty()
                        || vals
                            .iter()
                            .any(|v| matches!(v, Bson::Null | Bson::Undefined)))
                {
                    return true;
                }
                any_value(vals, &|v| bson_eq(v, target))
            }
            Pred::Ne(target) => !Pred::Eq(target.clone()).test(vals),
            Pred::Cmp(target, ok) => {
                let tr = type_rank(target);
                any_value(vals, &|v| {
                    if type_rank(v) != tr {
                        return matches!((v, target), (Bson::Null, Bson::Null)) && ok[1];
                    }
                    let idx = match cmp_bson(v, target) {
                        Ordering::Less => 0,
                        Ordering::Equal => 1,
                        Ordering::Greater => 2,
                    };
                    ok[idx]
                })
            }
            Pred::In(targets) => targets.iter().any(|t| Pred::Eq(t.clone()).test(vals)),
            Pred::Nin(targets) => !targets.iter().any(|t| Pred::Eq(t.clone()).test(vals)),
            Pred::Exists(want) => vals.is_empty() != *want,
            Pred::Type(sels) => any_value(vals, &|v| {
                sels.iter().any(|s| match &s.0 {
                    TypeSel::Number => type_rank(v) == 3,
                    TypeSel::Code(code) => type_code(v) == *code,
                })
            }),
            Pred::Size(n) => vals
                .iter()
                .any(|v| matches!(v, Bson::Array(a) if a.len() as i64 == *n)),
            Pred::All(targets) => {
                !targets.is_empty() && targets.iter().all(|t| Pred::Eq(t.clone()).test(vals))
            }
            Pred::ElemMatchDoc(f) => vals.iter().any(|v| match v {
                Bson::Array(a) => a
                    .iter()
                    .any(|e| matches!(e, Bson::Document(d) if f.matches(d))),
                _ => false,
            }),
            Pred::ElemMatchValue(p) => vals.iter().any(|v| match v {
                Bson::Array(a) => a.iter().any(|e| p.test(&[e])),
                _ => false,
            }),
            Pred::Mod(d, r) => any_value(vals, &|v| {
                as_f64(v).is_some_and(|x| x.is_finite() && (x.trunc() % d) == *r)
            }),
            Pred::Not(p) => !p.test(vals),
            Pred::And(ps) => ps.iter().all(|p| p.test(vals)),
        }
    }
}

/// A compiled sort specification.
#[derive(Debug, Clone, Default)]
pub(crate) struct Sort(Vec<(String, bool)>);

impl Sort {
    /// Parses `{field: 1 | -1, …}`.
    pub(crate) fn parse(spec: &Document) -> CmdResult<Sort> {
        let mut keys = Vec::new();
        for (k, v) in spec {
            let asc = match as_f64(v) {
                Some(1.0) => true,
                Some(-1.0) => false,
                _ => {
                    if matches!(v, Bson::Document(_)) {
                        return Err(CmdError::unsupported(format!(
                            "the sort specification {{{k}: {v}}} ($meta)"
                        )));
                    }
                    return Err(CmdError::bad_value(format!("$sort key ordering must be 1 (for ascending) or -1 (for descending), got {k}: {v}")));
                }
            };
            keys.push((k.clone(), asc));
        }
        Ok(Sort(keys))
    }

    /// Whether the spec is empty.
    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn key(doc: &Document, path: &str, asc: bool) -> Bson {
        let vals = values_at(doc, path);
        let mut flat: Vec<&Bson> = Vec::new();
        for v in &vals {
            match v {
                Bson::Array(a) if !a.is_empty() => flat.extend(a.iter()),
                other => flat.push(other),
            }
        }
        let pick = if asc {
            flat.into_iter().min_by(|a, b| cmp_bson(a, b))
        } else {
            flat.into_iter().max_by(|a, b| cmp_bson(a, b))
        };
        pick.cloned().unwrap_or(Bson::Null)
    }

    /// Compares two documents under this sort.
    pub(crate) fn compare(&self, a: &Document, b: &Document) -> Ordering {
        for (path, asc) in &self.0 {
            let o = cmp_bson(&Self::key(a, path, *asc), &Self::key(b, path, *asc));
            let o = if *asc { o } else { o.reverse() };
            if o != Ordering::Equal {
                return o;
            }
        }
        Ordering::Equal
    }

    /// Sorts documents stably.
    pub(crate) fn apply(&self, docs: &mut [Document]) {
        if !self.0.is_empty() {
            docs.sort_by(|a, b| self.compare(a, b));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bson::doc;

    fn m(filter: Document, d: Document) -> bool {
        Filter::parse(&filter).unwrap().matches(&d)
    }

    #[test]
    fn equality_paths_arrays() {
        assert!(m(doc! {"a.b": 1}, doc! {"a": {"b": 1}}));
        assert!(m(doc! {"a.b": 1}, doc! {"a": [{"b": 2}, {"b": 1}]}));
        assert!(m(doc! {"tags": "x"}, doc! {"tags": ["y", "x"]}));
        assert!(m(doc! {"n": 1}, doc! {"n": 1.0}));
        assert!(m(doc! {"z": null}, doc! {"a": 1}));
        assert!(!m(doc! {"a": 2}, doc! {"a": 1}));
    }

    #[test]
    fn operators() {
        let d = doc! {"a": 5, "s": "x", "arr": [1, 2, 3]};
        assert!(m(doc! {"a": {"$gt": 4, "$lte": 5}}, d.clone()));
        assert!(!m(doc! {"s": {"$gt": 4}}, d.clone()));
        assert!(m(doc! {"a": {"$in": [1, 5]}}, d.clone()));
        assert!(m(doc! {"a": {"$nin": [1, 2]}}, d.clone()));
        assert!(m(doc! {"b": {"$exists": false}}, d.clone()));
        assert!(m(doc! {"a": {"$type": "number"}}, d.clone()));
        assert!(m(doc! {"s": {"$type": 2}}, d.clone()));
        assert!(m(doc! {"$or": [{"a": 1}, {"s": "x"}]}, d.clone()));
        assert!(m(doc! {"$nor": [{"a": 1}]}, d.clone()));
        assert!(m(doc! {"a": {"$not": {"$lt": 3}}}, d.clone()));
        assert!(m(doc! {"arr": {"$size": 3}}, d.clone()));
        assert!(m(doc! {"arr": {"$all": [3, 1]}}, d.clone()));
        assert!(m(doc! {"arr": {"$elemMatch": {"$gt": 2}}}, d.clone()));
        assert!(m(doc! {"a": {"$ne": 4}}, d));
    }

    #[test]
    fn unsupported_operators_are_named() {
        let e = Filter::parse(&doc! {"a": {"$regex": "x"}}).unwrap_err();
        assert!(e.msg.contains("$regex"));
        let e = Filter::parse(&doc! {"a": {"$foo": 1}}).unwrap_err();
        assert_eq!(e.code, 2);
        assert!(e.msg.contains("$foo"));
        let e = Filter::parse(&doc! {"$bar": 1}).unwrap_err();
        assert!(e.msg.contains("$bar"));
    }

    #[test]
    fn sort_orders_by_type_then_value() {
        let mut docs = vec![doc! {"a": "x"}, doc! {"a": 2}, doc! {}, doc! {"a": 1.5}];
        Sort::parse(&doc! {"a": 1}).unwrap().apply(&mut docs);
        assert_eq!(docs[0], doc! {});
        assert_eq!(docs[1], doc! {"a": 1.5});
        assert_eq!(docs[3], doc! {"a": "x"});
    }
}
