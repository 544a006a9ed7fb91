//! Update documents: parsing, applying operators, and the change-stream `updateDescription`.

use bson::{doc, Bson, DateTime, Document, Timestamp};

use crate::error::{CmdError, CmdResult};
use crate::query::{as_f64, bson_eq, cmp_bson, get_path, Filter, Pred};

/// A parsed update.
#[derive(Debug, Clone)]
pub(crate) enum Update {
    /// A replacement document (without operators).
    Replace(Document),
    /// Operators in order.
    Ops(Vec<OpSpec>),
}

/// One operator applied to one path.
#[derive(Debug, Clone)]
pub(crate) struct OpSpec {
    op: Op,
    path: String,
    arg: Bson,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Op {
    Set,
    Unset,
    Inc,
    Mul,
    Min,
    Max,
    Rename,
    Push,
    AddToSet,
    Pull,
    PullAll,
    Pop,
    CurrentDate,
    SetOnInsert,
}

fn check_path(path: &str) -> CmdResult<()> {
    if path.is_empty() || path.split('.').any(|p| p.is_empty()) {
        return Err(CmdError::new(
            56,
            format!("An update path '{path}' contains an empty field name, which is not allowed."),
        ));
    }
    if path.split('.').any(|p| p == "$" || p.starts_with("$[")) {
        return Err(CmdError::unsupported(format!(
            "the positional update operator in path '{path}'"
        )));
    }
    if path.split('.').any(|p| p.starts_with('$')) {
        return Err(CmdError::new(
            52,
            format!("The dollar ($) prefixed field in '{path}' is not valid for storage."),
        ));
    }
    Ok(())
}

fn overlaps(a: &str, b: &str) -> bool {
    let (short, long) = if a.len() <= b.len() { (a, b) } else { (b, a) };
    long == short || long.starts_with(&format!("{short}."))
}

impl Update {
    /// Parses the `u` of an update statement.
    pub(crate) fn parse(u: &Bson) -> CmdResult<Update> {
        let d = match u {
            Bson::Document(d) => d,
            Bson::Array(_) => {
                return Err(CmdError::unsupported(
                    "pipeline-style updates (an aggregation pipeline as the update)",
                ))
            }
            _ => {
                return Err(CmdError::failed_to_parse(
                    "Update argument must be either an object or an array",
                ))
            }
        };
        if !d.keys().next().is_some_and(|k| k.starts_with('$')) {
            for k in d.keys() {
                if k.starts_with('$') {
                    return Err(CmdError::new(52, format!("The dollar ($) prefixed field '{k}' in '{k}' is not valid for storage.")));
                }
            }
            return Ok(Update::Replace(d.clone()));
        }
        let mut ops = Vec::new();
        for (name, arg) in d {
            let op = match name.as_str() {
                "$set" => Op::Set,
                "$unset" => Op::Unset,
                "$inc" => Op::Inc,
                "$mul" => Op::Mul,
                "$min" => Op::Min,
                "$max" => Op::Max,
                "$rename" => Op::Rename,
                "$push" => Op::Push,
                "$addToSet" => Op::AddToSet,
                "$pull" => Op::Pull,
                "$pullAll" => Op::PullAll,
                "$pop" => Op::Pop,
                "$currentDate" => Op::CurrentDate,
                "$setOnInsert" => Op::SetOnInsert,
                "$bit" => return Err(CmdError::unsupported("the update operator $bit")),
                other if other.starts_with('$') => {
                    return Err(CmdError::failed_to_parse(format!("Unknown modifier: {other}. Expected a valid update modifier or pipeline-style update specified as an array")))
                }
                other => {
                    return Err(CmdError::failed_to_parse(format!("Unknown modifier: {other}. Expected a valid update modifier or pipeline-style update specified as an array")))
                }
            };
            let Bson::Document(fields) = arg else {
                return Err(CmdError::failed_to_parse(format!("Modifiers operate on fields but we found type {} instead. For example: {{$mod: {{<field>: ...}}}} not {{{name}: {arg}}}", type_name(arg))));
            };
            for (path, v) in fields {
                check_path(path)?;
                if op == Op::Rename {
                    let Bson::String(to) = v else {
                        return Err(CmdError::bad_value(format!(
                            "The 'to' field for $rename must be a string: {path}: {v}"
                        )));
                    };
                    check_path(to)?;
                }
                ops.push(OpSpec {
                    op,
                    path: path.clone(),
                    arg: v.clone(),
                });
            }
        }
        if ops.is_empty() {
            return Err(CmdError::failed_to_parse(
                "'$set' is empty. You must specify a field like so: {$set: {<field>: ...}}",
            ));
        }
        let mut paths: Vec<&str> = Vec::new();
        for o in &ops {
            paths.push(&o.path);
            if o.op == Op::Rename {
                if let Bson::String(to) = &o.arg {
                    paths.push(to);
                }
            }
        }
        for (i, a) in paths.iter().enumerate() {
            for b in paths.iter().skip(i + 1) {
                if overlaps(a, b) {
                    return Err(CmdError::new(
                        40,
                        format!("Updating the path '{b}' would create a conflict at '{a}'"),
                    ));
                }
            }
        }
        Ok(Update::Ops(ops))
    }

    /// Applies the update to `doc`; returns the paths the operators touched (for
    /// `updateDescription`). `inserting` enables `$setOnInsert`. `_id` may not change.
    pub(crate) fn apply(
        &self,
        doc: &mut Document,
        inserting: bool,
        now: (DateTime, Timestamp),
    ) -> CmdResult<Vec<String>> {
        let old_id = doc.get("_id").cloned();
        let touched = match self {
            Update::Replace(r) => {
                let mut new = Document::new();
                if let Some(id) = &old_id {
                    new.insert("_id", id.clone());
                }
                for (k, v) in r {
                    if k == "_id" && old_id.is_some() {
                        continue;
                    }
                    new.insert(k.clone(), v.clone());
                }
                if let (Some(id), Some(rid)) = (&old_id, r.get("_id")) {
                    if !bson_eq(id, rid) || id != rid {
                        return Err(immutable_id(id));
                    }
                }
                *doc = new;
                Vec::new()
            }
            Update::Ops(ops) => {
                let mut touched = Vec::new();
                for o in ops {
                    apply_op(doc, o, inserting, now)?;
                    touched.push(o.path.clone());
                    if let (Op::Rename, Bson::String(to)) = (o.op, &o.arg) {
                        touched.push(to.clone());
                    }
                }
                touched
            }
        };
        if let Some(id) = &old_id {
            match doc.get("_id") {
                Some(new_id) if new_id == id => {}
                _ => return Err(immutable_id(id)),
            }
        }
        Ok(touched)
    }
}

fn immutable_id(id: &Bson) -> CmdError {
    CmdError::new(66, format!("Performing an update on the path '_id' would modify the immutable field '_id' (was {id})"))
}

/// mongod's name for a value's type, as error messages print it.
pub(crate) fn type_name(b: &Bson) -> &'static str {
    match b {
        Bson::Double(_) => "double",
        Bson::String(_) => "string",
        Bson::Document(_) => "object",
        Bson::Array(_) => "array",
        Bson::Binary(_) => "binData",
        Bson::ObjectId(_) => "objectId",
        Bson::Boolean(_) => "bool",
        Bson::DateTime(_) => "date",
        Bson::Null => "null",
        Bson::Int32(_) => "int",
        Bson::Int64(_) => "long",
        Bson::Timestamp(_) => "timestamp",
        Bson::Decimal128(_) => "decimal",
        _ => "other",
    }
}

fn not_viable(path: &str, part: &str, at: &Bson) -> CmdError {
    CmdError::new(
        28,
        format!("Cannot create field '{part}' in element {{{path}: {at}}}"),
    )
}

/// Sets `path` to `v`, creating intermediate documents; arrays are indexed numerically.
pub(crate) fn set_path(doc: &mut Document, path: &str, v: Bson) -> CmdResult<()> {
    let parts: Vec<&str> = path.split('.').collect();
    set_in_doc(doc, &parts, v, path)
}

fn set_in_doc(d: &mut Document, parts: &[&str], v: Bson, path: &str) -> CmdResult<()> {
    let Some((first, rest)) = parts.split_first() else {
        return Ok(());
    };
    if rest.is_empty() {
        d.insert(*first, v);
        return Ok(());
    }
    if !d.contains_key(*first) {
        d.insert(*first, Document::new());
    }
    match d.get_mut(*first) {
        Some(Bson::Document(sub)) => set_in_doc(sub, rest, v, path),
        Some(Bson::Array(arr)) => set_in_array(arr, rest, v, path),
        Some(other) => Err(not_viable(first, rest[0], other)),
        None => Ok(()),
    }
}

fn set_in_array(a: &mut Vec<Bson>, parts: &[&str], v: Bson, path: &str) -> CmdResult<()> {
    let Some((first, rest)) = parts.split_first() else {
        return Ok(());
    };
    let Ok(i) = first.parse::<usize>() else {
        return Err(CmdError::new(
            28,
            format!("Cannot create field '{first}' in element {{{path}: [..]}}"),
        ));
    };
    if i > a.len() + 1_000_000 {
        return Err(CmdError::bad_value(format!(
            "array index {i} too large in '{path}'"
        )));
    }
    while a.len() <= i {
        a.push(Bson::Null);
    }
    if rest.is_empty() {
        a[i] = v;
        return Ok(());
    }
    if matches!(a[i], Bson::Null) {
        a[i] = Bson::Document(Document::new());
    }
    match &mut a[i] {
        Bson::Document(sub) => set_in_doc(sub, rest, v, path),
        Bson::Array(arr) => set_in_array(arr, rest, v, path),
        other => Err(not_viable(first, rest[0], other)),
    }
}

/// Removes `path`; array elements become null, as mongod's `$unset` does.
fn unset_path(doc: &mut Document, path: &str) {
    let parts: Vec<&str> = path.split('.').collect();
    let Some((last, init)) = parts.split_last() else {
        return;
    };
    let mut cur: &mut Bson = match init.first() {
        None => {
            doc.remove(*last);
            return;
        }
        Some(f) => match doc.get_mut(*f) {
            Some(b) => b,
            None => return,
        },
    };
    for p in init.iter().skip(1) {
        cur = match cur {
            Bson::Document(d) => match d.get_mut(*p) {
                Some(b) => b,
                None => return,
            },
            Bson::Array(a) => match p.parse::<usize>().ok().and_then(|i| a.get_mut(i)) {
                Some(b) => b,
                None => return,
            },
            _ => return,
        };
    }
    match cur {
        Bson::Document(d) => {
            d.remove(*last);
        }
        Bson::Array(a) => {
            if let Some(e) = last.parse::<usize>().ok().and_then(|i| a.get_mut(i)) {
                *e = Bson::Null;
            }
        }
        _ => {}
    }
}

fn arith(a: &Bson, b: &Bson, mul: bool) -> Option<Bson> {
    match (a, b) {
        (Bson::Int32(x), Bson::Int32(y)) => {
            let r = if mul {
                x.checked_mul(*y)
            } else {
                x.checked_add(*y)
            };
            Some(match r {
                Some(v) => Bson::Int32(v),
                None => Bson::Int64(if mul {
                    *x as i64 * *y as i64
                } else {
                    *x as i64 + *y as i64
                }),
            })
        }
        (Bson::Int32(_) | Bson::Int64(_), Bson::Int32(_) | Bson::Int64(_)) => {
            let (x, y) = (int(a)?, int(b)?);
            let r = if mul {
                x.checked_mul(y)
            } else {
                x.checked_add(y)
            };
            Some(match r {
                Some(v) => Bson::Int64(v),
                None => Bson::Double(if mul {
                    x as f64 * y as f64
                } else {
                    x as f64 + y as f64
                }),
            })
        }
        (Bson::Decimal128(_), _) | (_, Bson::Decimal128(_)) => None,
        _ => {
            let (x, y) = (as_f64(a)?, as_f64(b)?);
            Some(Bson::Double(if mul { x * y } else { x + y }))
        }
    }
}

fn int(b: &Bson) -> Option<i64> {
    match b {
        Bson::Int32(v) => Some(*v as i64),
        Bson::Int64(v) => Some(*v),
        _ => None,
    }
}

fn id_of(doc: &Document) -> String {
    doc.get("_id").map(|v| v.to_string()).unwrap_or_default()
}

fn apply_op(
    doc: &mut Document,
    o: &OpSpec,
    inserting: bool,
    now: (DateTime, Timestamp),
) -> CmdResult<()> {
    let cur = get_path(doc, &o.path).cloned();
    match o.op {
        Op::Set => set_path(doc, &o.path, o.arg.clone()),
        Op::SetOnInsert => {
            if inserting {
                set_path(doc, &o.path, o.arg.clone())?;
            }
            Ok(())
        }
        Op::Unset => {
            unset_path(doc, &o.path);
            Ok(())
        }
        Op::Inc | Op::Mul => {
            let mul = o.op == Op::Mul;
            let name = if mul { "$mul" } else { "$inc" };
            if as_f64(&o.arg).is_none() {
                return Err(CmdError::type_mismatch(format!(
                    "Cannot {} with non-numeric argument: {{{}: {}}}",
                    if mul { "multiply" } else { "increment" },
                    o.path,
                    o.arg
                )));
            }
            let base = cur.unwrap_or(if mul {
                zero_like(&o.arg)
            } else {
                Bson::Int32(0)
            });
            if as_f64(&base).is_none() {
                return Err(CmdError::type_mismatch(format!("Cannot apply {name} to a value of non-numeric type. {{_id: {}}} has the field '{}' of non-numeric type {}", id_of(doc), o.path, type_name(&base))));
            }
            let v = arith(&base, &o.arg, mul)
                .ok_or_else(|| CmdError::unsupported(format!("{name} on decimal128 values")))?;
            set_path(doc, &o.path, v)
        }
        Op::Min | Op::Max => {
            let replace = match &cur {
                None => true,
                Some(c) => {
                    let ord = cmp_bson(&o.arg, c);
                    if o.op == Op::Min {
                        ord.is_lt()
                    } else {
                        ord.is_gt()
                    }
                }
            };
            if replace {
                set_path(doc, &o.path, o.arg.clone())?;
            }
            Ok(())
        }
        Op::Rename => {
            if let (Some(v), Bson::String(to)) = (cur, &o.arg) {
                unset_path(doc, &o.path);
                set_path(doc, to, v)?;
            }
            Ok(())
        }
        Op::Push | Op::AddToSet => {
            let mut arr = match cur {
                None => Vec::new(),
                Some(Bson::Array(a)) => a,
                Some(other) => {
                    return Err(CmdError::bad_value(format!(
                        "The field '{}' must be an array but is of type {} in document {{_id: {}}}",
                        o.path,
                        type_name(&other),
                        id_of(doc)
                    )));
                }
            };
            let (items, slice, position) = push_args(&o.arg, o.op == Op::Push)?;
            if o.op == Op::AddToSet {
                for it in items {
                    if !arr.iter().any(|e| bson_eq(e, &it)) {
                        arr.push(it);
                    }
                }
            } else {
                let at = match position {
                    None => arr.len(),
                    Some(p) if p >= 0 => (p as usize).min(arr.len()),
                    Some(p) => arr.len().saturating_sub(p.unsigned_abs() as usize),
                };
                for (k, it) in items.into_iter().enumerate() {
                    arr.insert(at + k, it);
                }
                if let Some(s) = slice {
                    if s >= 0 {
                        arr.truncate(s as usize);
                    } else {
                        let keep = (s.unsigned_abs() as usize).min(arr.len());
                        arr.drain(..arr.len() - keep);
                    }
                }
            }
            set_path(doc, &o.path, Bson::Array(arr))
        }
        Op::Pull | Op::PullAll => {
            let Some(cur) = cur else { return Ok(()) };
            let Bson::Array(arr) = cur else {
                return Err(CmdError::bad_value(
                    "Cannot apply $pull to a non-array value",
                ));
            };
            let keep: Vec<Bson> = if o.op == Op::PullAll {
                let Bson::Array(vals) = &o.arg else {
                    return Err(CmdError::bad_value(format!(
                        "$pullAll requires an array argument but was given a {}",
                        type_name(&o.arg)
                    )));
                };
                arr.into_iter()
                    .filter(|e| !vals.iter().any(|v| bson_eq(e, v)))
                    .collect()
            } else {
                let m = pull_matcher(&o.arg)?;
                arr.into_iter().filter(|e| !m(e)).collect()
            };
            set_path(doc, &o.path, Bson::Array(keep))
        }
        Op::Pop => {
            let Some(cur) = cur else { return Ok(()) };
            let Bson::Array(mut arr) = cur else {
                return Err(CmdError::type_mismatch(format!(
                    "Path '{}' contains an element of non-array type '{}'",
                    o.path,
                    type_name(&cur)
                )));
            };
            match as_f64(&o.arg) {
                Some(1.0) => {
                    arr.pop();
                }
                Some(-1.0) => {
                    if !arr.is_empty() {
                        arr.remove(0);
                    }
                }
                _ => {
                    return Err(CmdError::failed_to_parse(format!(
                        "$pop expects 1 or -1, found: {}",
                        o.arg
                    )))
                }
            }
            set_path(doc, &o.path, Bson::Array(arr))
        }
        Op::CurrentDate => {
            let v = match &o.arg {
                Bson::Boolean(true) => Bson::DateTime(now.0),
                Bson::Document(d) => match d.get_str("$type") {
                    Ok("date") => Bson::DateTime(now.0),
                    Ok("timestamp") => Bson::Timestamp(now.1),
                    _ => return Err(CmdError::bad_value("The '$type' string field is required to be 'date' or 'timestamp'")),
                },
                _ => return Err(CmdError::bad_value(format!("{} is not valid type for $currentDate. Please use a boolean ('true') or a $type expression ({{$type: 'timestamp/date'}}).", o.arg))),
            };
            set_path(doc, &o.path, v)
        }
    }
}

fn zero_like(b: &Bson) -> Bson {
    match b {
        Bson::Int64(_) => Bson::Int64(0),
        Bson::Double(_) => Bson::Double(0.0),
        _ => Bson::Int32(0),
    }
}

type PushArgs = (Vec<Bson>, Option<i64>, Option<i64>);

fn push_args(arg: &Bson, push: bool) -> CmdResult<PushArgs> {
    if let Bson::Document(d) = arg {
        if d.contains_key("$each") {
            let Ok(each) = d.get_array("$each") else {
                return Err(CmdError::bad_value(
                    "The argument to $each in $push must be an array",
                ));
            };
            let mut slice = None;
            let mut position = None;
            for (k, v) in d {
                match k.as_str() {
                    "$each" => {}
                    "$slice" if push => {
                        slice = Some(as_f64(v).ok_or_else(|| {
                            CmdError::bad_value("The value for $slice must be an integer value")
                        })? as i64)
                    }
                    "$position" if push => {
                        position = Some(as_f64(v).ok_or_else(|| {
                            CmdError::bad_value("The value for $position must be an integer value")
                        })? as i64)
                    }
                    "$sort" if push => {
                        return Err(CmdError::unsupported("the $push modifier $sort"))
                    }
                    other => {
                        return Err(CmdError::bad_value(format!(
                            "Unrecognized clause in $push: {other}"
                        )))
                    }
                }
            }
            return Ok((each.clone(), slice, position));
        }
    }
    Ok((vec![arg.clone()], None, None))
}

type ElemMatcher = Box<dyn Fn(&Bson) -> bool>;

fn pull_matcher(arg: &Bson) -> CmdResult<ElemMatcher> {
    match arg {
        Bson::Document(d)
            if d.keys().next().is_some_and(|k| k.starts_with('$'))
                && !d.contains_key("$and")
                && !d.contains_key("$or") =>
        {
            let f = Filter::parse(&doc! {"x": Bson::Document(d.clone())})?;
            Ok(Box::new(move |e: &Bson| f.matches(&doc! {"x": e.clone()})))
        }
        Bson::Document(d) => {
            let f = Filter::parse(d)?;
            Ok(Box::new(
                move |e: &Bson| matches!(e, Bson::Document(ed) if f.matches(ed)),
            ))
        }
        other => {
            let p = Pred::Eq(other.clone());
            Ok(Box::new(move |e: &Bson| p.test(&[e])))
        }
    }
}

/// The `updateDescription` of a change event: per touched path, what changed between
/// `old` and `new` (appended array elements as `path.N`, shrunk arrays as `truncatedArrays`).
pub(crate) fn describe(old: &Document, new: &Document, touched: &[String]) -> Document {
    let mut updated = Document::new();
    let mut removed: Vec<Bson> = Vec::new();
    let mut truncated: Vec<Bson> = Vec::new();
    let mut seen: Vec<&str> = Vec::new();
    for p in touched {
        if seen.contains(&p.as_str()) {
            continue;
        }
        seen.push(p);
        match (get_path(old, p), get_path(new, p)) {
            (Some(_), None) => removed.push(Bson::String(p.clone())),
            (None, Some(n)) => {
                updated.insert(p.clone(), n.clone());
            }
            (Some(o), Some(n)) if o == n => {}
            (Some(Bson::Array(o)), Some(Bson::Array(n))) => {
                let common = o.len().min(n.len());
                if o[..common] == n[..common] {
                    for (i, e) in n.iter().enumerate().skip(common) {
                        updated.insert(format!("{p}.{i}"), e.clone());
                    }
                    if n.len() < o.len() {
                        truncated.push(Bson::Document(
                            doc! {"field": p.clone(), "newSize": n.len() as i32},
                        ));
                    }
                } else {
                    updated.insert(p.clone(), Bson::Array(n.clone()));
                }
            }
            (Some(_), Some(n)) => {
                updated.insert(p.clone(), n.clone());
            }
            (None, None) => {}
        }
    }
    // Kept in the oplog entry and shown only to `showExpandedEvents` streams, as mongod 6.1+.
    let mut disambiguated = Document::new();
    for (path, within) in updated
        .keys()
        .map(|k| (k.as_str(), new))
        .chain(removed.iter().filter_map(|b| b.as_str()).map(|k| (k, old)))
    {
        if let Some(parts) = disambiguate(path, within) {
            disambiguated.insert(path.to_owned(), parts);
        }
    }
    doc! {
        "updatedFields": updated,
        "removedFields": removed,
        "truncatedArrays": truncated,
        "disambiguatedPaths": disambiguated,
    }
}

/// A path's components, array indices as ints, when the dotted form is ambiguous:
/// mongod lists a path whose components include a numeric field name (not an array
/// index), since `a.1` alone cannot say which it is.
fn disambiguate(path: &str, doc: &Document) -> Option<Bson> {
    let mut parts = Vec::new();
    let mut ambiguous = false;
    let mut cur: Option<&Bson> = None;
    for (i, comp) in path.split('.').enumerate() {
        let here = if i == 0 { doc.get(comp) } else { None };
        match (i, cur) {
            (0, _) => {
                ambiguous |= comp.bytes().all(|b| b.is_ascii_digit());
                parts.push(Bson::String(comp.to_owned()));
                cur = here;
            }
            (_, Some(Bson::Array(items))) if comp.parse::<usize>().is_ok() => {
                let idx = comp.parse::<usize>().unwrap_or(0);
                parts.push(Bson::Int32(i32::try_from(idx).unwrap_or(i32::MAX)));
                cur = items.get(idx);
            }
            (_, Some(Bson::Document(d))) => {
                ambiguous |= comp.bytes().all(|b| b.is_ascii_digit());
                parts.push(Bson::String(comp.to_owned()));
                cur = d.get(comp);
            }
            _ => {
                ambiguous |= comp.bytes().all(|b| b.is_ascii_digit());
                parts.push(Bson::String(comp.to_owned()));
                cur = None;
            }
        }
    }
    ambiguous.then_some(Bson::Array(parts))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> (DateTime, Timestamp) {
        (
            DateTime::from_millis(0),
            Timestamp {
                time: 1,
                increment: 1,
            },
        )
    }

    fn run(mut d: Document, u: Document) -> Document {
        Update::parse(&Bson::Document(u))
            .unwrap()
            .apply(&mut d, false, now())
            .unwrap();
        d
    }

    #[test]
    fn operators_apply() {
        assert_eq!(
            run(
                doc! {"_id": 1, "a": 1},
                doc! {"$set": {"b.c": 2}, "$inc": {"a": 2}}
            ),
            doc! {"_id": 1, "a": 3, "b": {"c": 2}}
        );
        assert_eq!(
            run(doc! {"_id": 1, "a": 1}, doc! {"$unset": {"a": ""}}),
            doc! {"_id": 1}
        );
        assert_eq!(
            run(doc! {"_id": 1, "t": [1]}, doc! {"$push": {"t": 2}}),
            doc! {"_id": 1, "t": [1, 2]}
        );
        assert_eq!(
            run(doc! {"_id": 1, "t": [1, 2, 1]}, doc! {"$pull": {"t": 1}}),
            doc! {"_id": 1, "t": [2]}
        );
        assert_eq!(
            run(
                doc! {"_id": 1, "t": [1, 5]},
                doc! {"$pull": {"t": {"$gt": 2}}}
            ),
            doc! {"_id": 1, "t": [1]}
        );
        assert_eq!(
            run(doc! {"_id": 1}, doc! {"$inc": {"n": 5i64}}),
            doc! {"_id": 1, "n": 5i64}
        );
        assert_eq!(
            run(doc! {"_id": 1, "a": 1}, doc! {"x": 1}),
            doc! {"_id": 1, "x": 1}
        );
    }

    #[test]
    fn id_is_immutable_and_conflicts_detected() {
        let mut d = doc! {"_id": 1};
        let u = Update::parse(&Bson::Document(doc! {"$set": {"_id": 2}})).unwrap();
        assert_eq!(u.apply(&mut d, false, now()).unwrap_err().code, 66);
        assert_eq!(
            Update::parse(&Bson::Document(doc! {"$set": {"a": 1}, "$inc": {"a.b": 1}}))
                .unwrap_err()
                .code,
            40
        );
        assert!(Update::parse(&Bson::Document(doc! {"$set": {"a.$": 1}}))
            .unwrap_err()
            .msg
            .contains("positional"));
    }

    #[test]
    fn description_shapes() {
        let old = doc! {"_id": 1, "a": 1, "t": [1], "r": 1};
        let new = doc! {"_id": 1, "a": 2, "t": [1, 2], "s": 3};
        let d = describe(
            &old,
            &new,
            &["a".into(), "t".into(), "r".into(), "s".into()],
        );
        assert_eq!(
            d,
            doc! {"updatedFields": {"a": 2, "t.1": 2, "s": 3}, "removedFields": ["r"], "truncatedArrays": [], "disambiguatedPaths": {}}
        );
    }

    #[test]
    fn numeric_field_names_are_disambiguated_array_indices_are_not() {
        let old = doc! {"_id": 1, "a": {"1": 1}, "b": [{"1": 1}], "t": [1]};
        let new = doc! {"_id": 1, "a": {"1": 2}, "b": [{"1": 2}], "t": [1, 2]};
        let d = describe(&old, &new, &["a.1".into(), "b.0.1".into(), "t".into()]);
        assert_eq!(
            d.get_document("disambiguatedPaths").unwrap(),
            &doc! {"a.1": ["a", "1"], "b.0.1": ["b", 0, "1"]}
        );
    }
}
